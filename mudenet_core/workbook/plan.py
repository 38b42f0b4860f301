"""The run plan: which notebooks run for which (dataset, category, seed), with which parameters, into where.

Everything the command line can get wrong is checked here, before any work starts: an unknown profile,
dataset, category, method or notebook, a ``--set`` key the method's (or the data's) config does not have or a
value out of its range, an option that no planned notebook consumes, a folder dataset without anomalous test
images, and an output folder that git tracks without ``--reference`` (or that cannot be created).
Those raise :class:`PlanError` (exit status 2).
"""

from __future__ import annotations

import argparse
import ast
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mudenet_core.workbook.errors import PlanError, RunAllError
from mudenet_core.workbook.executor_config import ExecutorConfig, executor_config, require_ray
from mudenet_core.workbook.overrides import data_overrides, parse_overrides, validate_method_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"
PROFILES = ("smoke", "cpu", "paper")
DATASETS = ("synthetic", "mvtec_ad", "mvtec_loco", "visa", "mpdd", "folder")
REFERENCE_DIR = "reference"  # <results root>/reference/<profile>/: the committed reference results

# The explicit, ordered list of notebooks: (name, scope). "run" notebooks execute once per
# (dataset, category, seed); "profile" notebooks once per profile, after every run.
NOTEBOOKS: list[tuple[str, str]] = [
    ("00_data_exploration", "run"),
    ("10_distillation", "run"),
    ("20_training", "run"),
    ("30_evaluation", "run"),
    ("40_baselines", "run"),
    ("50_ablations", "run"),
    ("90_report", "profile"),
]
MUDENET_NOTEBOOKS = {"10_distillation", "20_training", "30_evaluation", "50_ablations"}
BASELINE_NOTEBOOKS = {"40_baselines"}
NO_INPUT_NOTEBOOKS = {"90_report"}  # paper-facing: rendered without code



# ------------------------------------------------------------------------------------------------------------
# Notebook sources and their parameters cell
# ------------------------------------------------------------------------------------------------------------
def notebook_path(name: str) -> Path:
    """``notebooks/<name>.py``; the error names the missing file."""
    p = NOTEBOOK_DIR / f"{name}.py"
    if not p.is_file():
        raise RunAllError(f"notebook source not found: {p}")
    return p


def read_notebook(path: Path):
    """The percent script as an nbformat notebook (via jupytext)."""
    import jupytext

    return jupytext.read(path, fmt="py:percent")


def declared_parameters(nb) -> dict[str, Any]:
    """Names and literal defaults of the single ``parameters``-tagged cell.

    Raises:
        RunAllError: no parameters cell, more than one, or a non-literal assignment in it.
    """
    cells = [
        c for c in nb.cells if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if len(cells) != 1:
        raise RunAllError(f"expected exactly one cell tagged 'parameters', found {len(cells)}")
    out: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        elif (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            name, value = node.targets[0].id, node.value
        else:
            raise RunAllError(
                f"parameters cell: only 'NAME: type = literal' assignments allowed, got {ast.unparse(node)!r}"
            )
        try:
            out[name] = ast.literal_eval(value)
        except ValueError:
            raise RunAllError(f"parameters cell: {name} is not a literal ({ast.unparse(value)!r})") from None
    return out


def notebook_declarations(name: str) -> dict[str, Any]:
    """:func:`declared_parameters` of ``notebooks/<name>.py``."""
    return declared_parameters(read_notebook(notebook_path(name)))


# ------------------------------------------------------------------------------------------------------------
# Profiles and the run plan
# ------------------------------------------------------------------------------------------------------------
def load_profile(profile: str) -> dict:
    """``params/<profile>.yaml`` as a dict: ``run``, ``common``, ``notebooks``, ``synthetic``, ``executor``.

    ``executor`` is an :class:`~mudenet_core.workbook.executor_config.ExecutorConfig` (checked here).
    """
    if profile not in PROFILES:
        raise PlanError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise PlanError(f"profile file not found: {path}")
    d = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(d) - {"run", "common", "notebooks", "synthetic", "executor", "description"})
    if unknown:
        raise PlanError(f"{path}: unknown top-level key(s) {unknown}")
    d.setdefault("run", {})
    d.setdefault("common", {})
    d.setdefault("notebooks", {})
    d.setdefault("synthetic", {})
    d["executor"] = executor_config(d.get("executor"), path)
    for nb in d["notebooks"]:
        if nb not in dict(NOTEBOOKS):
            raise PlanError(f"{path}: notebooks.{nb} is not one of {', '.join(n for n, _ in NOTEBOOKS)}")
    return d


@dataclass(frozen=True)
class RunKey:
    """One (dataset, category, seed) run."""

    dataset: str
    category: str
    seed: int

    @property
    def label(self) -> str:
        """``dataset/category/seed<k>``."""
        return f"{self.dataset}/{self.category}/seed{self.seed}"


@dataclass
class Plan:
    """Everything the executor needs, resolved from the CLI and the profile (picklable)."""

    profile: str
    out_root: Path  # the results root (--results-root, default results/)
    data_root: Path
    runs: list[RunKey]
    notebooks: list[str]
    methods: list[str]
    common: dict  # injected into every notebook that declares the name (incl. OVERRIDES, DATA_OVERRIDES...)
    per_notebook: dict
    resume: bool
    jobs: int
    synthetic: dict = field(default_factory=dict)
    explicit_root: bool = False
    reference: bool = False  # write <out_root>/reference/<profile>/ (the committed results)
    allow_dirty: bool = False  # --reference from a dirty tree (the SHA then says -dirty)
    texture_dir: str = ""  # --texture-dir, absolute ("" = none)
    extra_env: dict = field(default_factory=dict)  # for the kernels, set while executing (GIT_INDEX_FILE)
    executor: str = "local"  # --executor: local (this process or --jobs processes) | ray
    address: str | None = None  # --address of an existing Ray cluster (None: a local one is started)
    resources: ExecutorConfig = field(default_factory=ExecutorConfig)  # the profile's executor: section
    cluster_cpus: int | None = None  # CPUs of the local Ray cluster (None with --address)
    invocation: str = ""  # id of this run_all invocation, recorded in every entry (set by run_profile)

    @property
    def profile_dir(self) -> Path:
        """``<out>/<profile>``, or ``<out>/reference/<profile>`` for ``--reference``."""
        return (self.out_root / REFERENCE_DIR if self.reference else self.out_root) / self.profile

    def run_dir(self, key: RunKey) -> Path:
        """``<profile_dir>/runs/<dataset>/<category>/seed<k>``."""
        return self.profile_dir / "runs" / key.dataset / key.category / f"seed{key.seed}"


def _split_list(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v.strip() for x in values for v in x.split(",") if v.strip()]


def _visa_categories(root: Path) -> list[str]:
    csv = root / "split_csv" / "1cls.csv"
    if not csv.is_file():
        return []
    import pandas as pd

    return sorted(pd.read_csv(csv, dtype=str, keep_default_na=False, usecols=["object"])["object"].unique())


def known_categories(dataset: str) -> tuple[str, ...] | None:
    """The published category list of ``dataset`` (e.g. ``MPDD_CATEGORIES``), or None (synthetic, folder)."""
    from mudenet_core import data

    return {"mvtec_ad": data.MVTEC_AD_CATEGORIES, "mvtec_loco": data.MVTEC_LOCO_CATEGORIES,
            "visa": data.VISA_CATEGORIES, "mpdd": data.MPDD_CATEGORIES}.get(dataset)


def discover_categories(dataset: str, root: Path) -> list[str]:
    """The categories of ``dataset`` under ``root``, sorted: what is on disk, of the dataset's known list.

    Category folders are those with a ``train`` or ``test`` folder whose name is one of the dataset's
    categories (:func:`known_categories`; other such folders are left out with a note, ``--categories`` runs
    them). VisA: the objects of ``split_csv/1cls.csv``; a folder dataset is one category named after its
    folder; the generated dataset has its own fixed list.

    Raises:
        PlanError: ``root`` does not exist or holds no category of the dataset (the message says what it
            found instead, e.g. a single category folder given as ``--data-root``).
    """
    if dataset == "synthetic":
        from mudenet_core.data import synthetic

        return list(synthetic.CATEGORIES)
    if not root.is_dir():
        raise PlanError(f"--data-root {root} does not exist")
    if dataset == "folder":
        return [root.name]
    if dataset == "visa":
        cats = _visa_categories(root)
        if not cats:
            raise PlanError(f"no VisA categories under {root} (expected split_csv/1cls.csv)")
        return cats
    found = sorted(
        p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())
    )
    known = known_categories(dataset)
    cats = [c for c in found if known is None or c in known]
    others = [c for c in found if c not in cats]
    if not cats and ((root / "train").is_dir() or (root / "test").is_dir()):
        raise PlanError(f"--data-root {root} is a category folder itself (it holds train/ or test/); pass "
                        f"the folder of the categories: --data-root {root.parent} --categories {root.name}")
    if not cats:
        hint = (f"; found folders of that layout that are not {dataset} categories: {', '.join(others)} (run "
                f"them with --categories)" if others else "")
        raise PlanError(f"no {dataset} categories found under {root} (expected <category>/train, "
                        f"<category>/test for one of {', '.join(known or ())}){hint}")
    if others:
        print(f"[run_all] note: left out folder(s) {others} under {root}: not {dataset} categories (name "
              f"them with --categories to run them)", flush=True)
    return cats


def check_categories(dataset: str, root: Path, categories: list[str]) -> None:
    """Every requested category exists under ``root``; the error lists the ones that do.

    Raises:
        PlanError: an unknown category.
    """
    if dataset == "folder":
        return
    if dataset == "synthetic":
        from mudenet_core.data import synthetic

        known = list(synthetic.CATEGORIES)
        bad = [c for c in categories if c not in known]
    elif dataset == "visa":
        known = discover_categories(dataset, root)
        bad = [c for c in categories if c not in known]
    else:
        if not root.is_dir():
            raise PlanError(f"--data-root {root} does not exist")
        bad = [c for c in categories if not (root / c).is_dir()]
        if not bad:
            return
        try:
            known = discover_categories(dataset, root)
        except PlanError:
            known = []
    if bad:
        raise PlanError(f"unknown {dataset} categor{'y' if len(bad) == 1 else 'ies'} {bad} under {root}; "
                        f"found: {', '.join(known) or '(none)'}")


def check_folder_dataset(root: Path, category: str, image_size: int, data_over: dict[str, Any]) -> None:
    """A folder dataset has anomalous test images on disk, else training would end in "all labels are normal".

    Indexes the folders (file names only, no image is read) with the ``--set data.folder_*`` options applied.

    Raises:
        PlanError: ``data.folder_anomaly_dir`` not set (the message names the options), or a folder of the
            dataset missing or empty.
    """
    from mudenet_core.config import ConfigError
    from mudenet_core.data import DataConfig, DataError, index_folder

    try:
        cfg = DataConfig(dataset="folder", root=str(root), category=category, image_size=image_size)
        cfg = cfg.with_overrides({**data_over, "validate": False})
    except ConfigError as e:  # data_overrides has checked these already
        raise PlanError(f"--set data.*: {e}") from None
    if not cfg.folder_anomaly_dir:
        raise PlanError(
            "--dataset folder needs anomalous test images (without them every metric fails after training: "
            "all labels are normal): name their folder with --set data.folder_anomaly_dir=PATH (relative to "
            "--data-root, or absolute), their masks, if any, with data.folder_mask_dir=PATH (and "
            "data.folder_mask_suffix=_mask for 000_mask.png), normal test images with "
            f"data.folder_test_normal_dir=PATH; normal training images: data.folder_normal_dir "
            f"(now {cfg.folder_normal_dir!r})")
    try:
        index = index_folder(cfg)
    except DataError as e:
        raise PlanError(f"--dataset folder under {root}: {e} (its folders: --set data.folder_normal_dir, "
                        "data.folder_anomaly_dir, data.folder_mask_dir, data.folder_test_normal_dir)"
                        ) from None
    if not (index["label"] == 1).any():  # pragma: no cover - index_folder refuses an empty anomaly folder
        raise PlanError(f"--dataset folder: no anomalous test image in {cfg.folder_anomaly_dir}")


def resolve_methods(requested: list[str] | None, profile_methods: list[str] | None) -> list[str]:
    """The methods to run: the requested (or profile) list; missing optional extras are left out with a note.

    Raises:
        PlanError: an unknown method name, or a method whose module fails to import.
    """
    from mudenet_core import methods as registry
    from mudenet_core.config import ConfigError

    wanted = requested if requested is not None else (profile_methods or list(registry.METHODS))
    unknown = [m for m in wanted if m not in registry.METHODS]
    if unknown:
        raise PlanError(f"unknown method(s) {unknown}; registered: {', '.join(registry.METHODS)}")
    try:
        missing = registry.unavailable_methods()
    except ConfigError as e:
        raise PlanError(str(e)) from e
    for m in wanted:
        if m in missing:
            print(f"[run_all] note: method {m!r} skipped: {missing[m]}", flush=True)
    return [m for m in wanted if m not in missing]


# ------------------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------------------
def _pick_notebooks(only: list[str] | None) -> list[str]:
    notebooks = [n for n, _ in NOTEBOOKS]
    if not only:
        return notebooks
    only = _split_list(only)
    bad = [o for o in only if not any(n == o or n.split("_", 1)[0] == o for n in notebooks)]
    if bad:
        raise PlanError(f"--only: unknown notebook(s) {bad}; choose from {', '.join(notebooks)}")
    return [n for n in notebooks if any(n == o or n.split("_", 1)[0] == o for o in only)]


def _require_consumer(option: str, parameter: str, candidates: list[str], declared: dict[str, dict]) -> None:
    """An option given on the command line must reach at least one planned notebook, else it is an error."""
    if not any(parameter in declared[n] for n in candidates):
        raise PlanError(
            f"{option} would be ignored: no notebook of this run ({', '.join(candidates) or 'none'}) "
            f"declares the parameter {parameter}"
        )


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve and validate the CLI arguments against ``params/<profile>.yaml``.

    Raises:
        PlanError: any bad argument (nothing has been executed).
    """
    prof = load_profile(args.profile)
    run = prof["run"]
    profile_dataset = run.get("dataset", "synthetic")
    dataset = args.dataset or profile_dataset
    if dataset not in DATASETS:
        raise PlanError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if args.data_root:
        data_root = Path(args.data_root).expanduser().resolve()
    elif dataset == "synthetic":
        data_root = (REPO_ROOT / run.get("synthetic_root", "data/synthetic")).resolve()
    else:
        raise PlanError(f"--data-root is required for dataset {dataset!r} (the folder of its categories)")
    categories = _split_list(args.categories)
    if categories is None:
        # the profile's categories belong to the profile's dataset; another dataset uses what is on disk
        listed = run.get("categories")
        if isinstance(listed, dict):
            categories = listed.get(dataset)
        elif dataset == profile_dataset:
            categories = listed
    if not categories:
        categories = discover_categories(dataset, data_root)
    check_categories(dataset, data_root, categories)
    seeds = args.seeds if args.seeds is not None else list(run.get("seeds", [0]))
    bad_seeds = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad_seeds:
        raise PlanError(f"seeds must be whole numbers >= 0, got {bad_seeds}")
    methods = resolve_methods(_split_list(args.methods), run.get("methods"))
    notebooks = _pick_notebooks(args.only)
    if "mudenet" not in methods:
        skipped = [n for n in notebooks if n in MUDENET_NOTEBOOKS]
        if skipped:
            print(f"[run_all] note: 'mudenet' not in the methods; skipping {skipped}", flush=True)
        notebooks = [n for n in notebooks if n not in MUDENET_NOTEBOOKS]
    if not notebooks:
        raise PlanError("no notebook left to run (check --only and --methods)")
    declared = {n: notebook_declarations(n) for n in notebooks}

    overrides = parse_overrides(args.set or [])
    data_items = overrides.pop("data", [])
    validate_method_overrides(overrides, args.profile, methods)
    for method in overrides:
        consumers = MUDENET_NOTEBOOKS if method == "mudenet" else BASELINE_NOTEBOOKS
        users = [n for n in notebooks if n in consumers]
        _require_consumer(f"--set {method}.*", "OVERRIDES", users, declared)
    common = dict(prof["common"])
    image_size = int(common.get("IMAGE_SIZE", 256))
    data_over = data_overrides(data_items, dataset, categories[0], image_size)
    if data_over:
        _require_consumer("--set data.*", "DATA_OVERRIDES", notebooks, declared)
    if dataset == "folder":
        for category in categories:
            check_folder_dataset(data_root, category, image_size, data_over)
    texture_dir = ""
    if getattr(args, "texture_dir", None):
        tex = Path(args.texture_dir).expanduser().resolve()
        if not tex.is_dir():
            raise PlanError(f"--texture-dir {tex} is not a folder")
        texture_dir = str(tex)
        _require_consumer("--texture-dir", "TEXTURE_DIR", notebooks, declared)
    common.update({"OVERRIDES": overrides, "DATA_OVERRIDES": data_over, "TEXTURE_DIR": texture_dir})
    executor, address, cluster_cpus = _executor_options(args, prof["executor"])

    plan = Plan(
        profile=args.profile,
        out_root=Path(args.results_root).expanduser().resolve(),
        data_root=data_root,
        runs=[RunKey(dataset, c, int(s)) for c in categories for s in seeds],
        notebooks=notebooks,
        methods=methods,
        common=common,
        per_notebook=copy.deepcopy(prof["notebooks"]),
        resume=bool(args.resume),
        jobs=args.jobs or 1,
        synthetic=dict(prof["synthetic"]),
        explicit_root=bool(args.data_root),
        reference=bool(getattr(args, "reference", False)),
        allow_dirty=bool(getattr(args, "allow_dirty", False)),
        texture_dir=texture_dir,
        executor=executor,
        address=address,
        resources=prof["executor"],
        cluster_cpus=cluster_cpus,
    )
    for name in notebooks:  # a per-notebook key of the profile that the notebook does not declare
        notebook_parameters(plan, name, plan.runs[0] if dict(NOTEBOOKS)[name] == "run" else None,
                            declared[name])
    check_output_location(plan)
    return plan


def _executor_options(args: argparse.Namespace,
                      resources: ExecutorConfig) -> tuple[str, str | None, int | None]:
    """``--executor``, ``--address`` and ``--jobs`` checked together: (executor, address, local cluster CPUs).

    With ``--executor ray`` and no ``--address``, ``--jobs N`` sizes the local cluster for N runs at once
    (N x ``executor.num_cpus`` CPUs; default: every core). With ``--address`` the cluster decides.

    Raises:
        PlanError: ``--jobs`` < 1, ``--address`` or ``--jobs`` with an executor they do not apply to, or Ray
            not importable.
    """
    import os

    executor = getattr(args, "executor", None) or "local"
    address = getattr(args, "address", None)
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise PlanError(f"--jobs must be >= 1, got {jobs}")
    if executor == "local":
        if address:
            raise PlanError("--address only applies to --executor ray")
        return executor, None, None
    require_ray()
    if address:
        if jobs is not None:
            raise PlanError("--jobs does not apply with --address: the Ray cluster's resources decide how "
                            "many runs execute at once (params/<profile>.yaml executor.num_cpus/num_gpus per "
                            "run)")
        return executor, address, None
    return executor, None, jobs * resources.num_cpus if jobs else (os.cpu_count() or 1)


def check_output_location(plan: Plan) -> None:
    """User runs never write into tracked files; ``--reference`` runs only from a clean tree.

    Raises:
        PlanError: a user run into a folder with tracked files, or a reference run from a dirty tree
            (unless ``--allow-dirty``) or outside a git repository.
    """
    from mudenet_core.workbook import gitstate

    check_writable(plan.profile_dir)
    tracked = gitstate.tracked_files(plan.profile_dir)
    if not plan.reference:
        if tracked:
            raise PlanError(
                f"{plan.profile_dir} holds {len(tracked)} file(s) tracked by git (e.g. {tracked[0]}); user "
                f"runs never overwrite tracked files. Write elsewhere (--results-root) or, to regenerate the "
                f"committed reference results, use --reference"
            )
        return
    if plan.allow_dirty:
        return
    if not gitstate.is_repository():
        raise PlanError("--reference needs a git checkout (rows carry the commit SHA); none found at "
                        f"{REPO_ROOT} (--allow-dirty overrides)")
    dirty = gitstate.dirty_files()
    if dirty:
        shown = ", ".join(dirty[:8]) + (f" and {len(dirty) - 8} more" if len(dirty) > 8 else "")
        raise PlanError(
            f"--reference refuses to run from a dirty git tree ({len(dirty)} changed tracked file(s): "
            f"{shown}); commit or stash them first so every reference row carries a clean git SHA, or pass "
            f"--allow-dirty (for development: the SHA then says -dirty)"
        )


def check_writable(folder: Path) -> None:
    """``folder`` exists as a folder, or can be made: its nearest existing ancestor is a writable folder.

    Raises:
        PlanError: a file in the way, or a folder this user cannot write into.
    """
    import os

    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise PlanError(f"cannot write results to {folder}: {base} is not a folder (see --results-root)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PlanError(f"cannot write results to {folder}: {base} is not writable (see --results-root)")


def notebook_parameters(
    plan: Plan, name: str, key: RunKey | None, declared: dict[str, Any]
) -> dict[str, Any]:
    """The parameters injected into one notebook: common + per-notebook + per-run, only names it declares.

    Raises:
        PlanError: a per-notebook key in the profile that the notebook does not declare.
    """
    values: dict[str, Any] = {k: v for k, v in plan.common.items() if k in declared}
    own = plan.per_notebook.get(name, {}) or {}
    unknown = sorted(set(own) - set(declared))
    if unknown:
        raise PlanError(
            f"params/{plan.profile}.yaml: notebooks.{name} sets {unknown}, which notebooks/{name}.py "
            f"does not declare (declared: {', '.join(declared)})"
        )
    values.update(own)
    base = {
        "PROFILE": plan.profile,
        "REUSE": plan.resume,
        "METHODS": [m for m in plan.methods if m != "mudenet"],
        "DATA_ROOT": str(plan.data_root),
        "TEXTURE_DIR": plan.texture_dir,
    }
    if key is not None:
        base.update(
            {
                "OUT_DIR": str(plan.run_dir(key)),
                "SEED": key.seed,
                "DATASET": key.dataset,
                "CATEGORY": key.category,
            }
        )
    else:
        base.update({"OUT_DIR": str(plan.profile_dir), "SEED": plan.runs[0].seed if plan.runs else 0})
    values.update({k: v for k, v in base.items() if k in declared})
    return values
