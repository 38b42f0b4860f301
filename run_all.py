#!/usr/bin/env python
"""Execute the numbered notebooks for every (dataset, category, seed) and build the results index.

For each run it converts ``notebooks/NN_name.py`` (jupytext percent script) to a notebook, executes it with
papermill (parameters injected after the ``parameters`` cell, kernel ``python3``, cwd = repository root) into
``<out>/<profile>/runs/<dataset>/<category>/seed<k>/NN_name.ipynb``, renders HTML beside it with nbconvert,
and records everything in ``<out>/<profile>/manifest.json`` (written atomically). ``90_report`` runs once per
profile after all runs; it builds ``tables/*.csv`` and ``figures/*.png`` from the per-run CSVs, and this
program then writes ``index.html``.

Examples::

    python run_all.py                                  # cpu profile on the embedded generated dataset
    python run_all.py --profile smoke                  # a minute-scale check of the whole pipeline
    python run_all.py --profile paper --dataset mvtec_ad --data-root /data/mvtec_ad --seeds 0 1 2 --jobs 2
    python run_all.py --resume                         # skip notebooks whose outputs are complete

Profiles live in ``params/<profile>.yaml``: the run grid (dataset, categories, seeds, methods) and the
notebook parameters (``common`` for every notebook that declares the name, ``notebooks.<NN_name>`` for one).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import copy
import datetime as dt
import hashlib
import importlib.metadata
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"
PROFILES = ("smoke", "cpu", "paper")
DATASETS = ("synthetic", "mvtec_ad", "mvtec_loco", "visa", "mpdd", "folder")

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
NO_INPUT_NOTEBOOKS = {"90_report"}  # paper-facing: rendered without code
PACKAGES = (
    "mudenet_core",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "papermill",
    "nbconvert",
    "nbformat",
    "jupytext",
    "ipykernel",
)


class RunAllError(RuntimeError):
    """A run that cannot start or did not finish (bad arguments, a failed notebook)."""


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


def configs_sha(profile: str | None) -> str:
    """Short SHA-256 over the method configs of a profile (``configs/*/<profile>.yaml``).

    A changed config makes ``--resume`` re-run the notebooks (the package code itself is not hashed).
    """
    h = hashlib.sha256()
    for p in sorted((REPO_ROOT / "configs").glob(f"*/{profile}.yaml")) if profile else []:
        h.update(p.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def file_sha(path: Path) -> str:
    """Short SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Profiles and the run plan
# ------------------------------------------------------------------------------------------------------------
def load_profile(profile: str) -> dict:
    """``params/<profile>.yaml`` as a dict with keys ``run``, ``common``, ``notebooks``, ``synthetic``."""
    if profile not in PROFILES:
        raise RunAllError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise RunAllError(f"profile file not found: {path}")
    d = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(d) - {"run", "common", "notebooks", "synthetic", "description"})
    if unknown:
        raise RunAllError(f"{path}: unknown top-level key(s) {unknown}")
    d.setdefault("run", {})
    d.setdefault("common", {})
    d.setdefault("notebooks", {})
    d.setdefault("synthetic", {})
    for nb in d["notebooks"]:
        if nb not in dict(NOTEBOOKS):
            raise RunAllError(f"{path}: notebooks.{nb} is not one of {', '.join(n for n, _ in NOTEBOOKS)}")
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
    out_root: Path
    data_root: Path
    runs: list[RunKey]
    notebooks: list[str]
    methods: list[str]
    common: dict
    per_notebook: dict
    resume: bool
    jobs: int
    synthetic: dict = field(default_factory=dict)
    explicit_root: bool = False

    @property
    def profile_dir(self) -> Path:
        """``<out>/<profile>``."""
        return self.out_root / self.profile

    def run_dir(self, key: RunKey) -> Path:
        """``<out>/<profile>/runs/<dataset>/<category>/seed<k>``."""
        return self.profile_dir / "runs" / key.dataset / key.category / f"seed{key.seed}"


def _split_list(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v.strip() for x in values for v in x.split(",") if v.strip()]


def discover_categories(dataset: str, root: Path) -> list[str]:
    """Category folders under ``root`` (those with a ``train`` or ``test`` folder), sorted."""
    if dataset == "synthetic":
        from mudenet_core.data import synthetic

        return list(synthetic.CATEGORIES)
    if not root.is_dir():
        raise RunAllError(f"--data-root {root} does not exist")
    cats = sorted(
        p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())
    )
    if not cats and ((root / "train").is_dir() or (root / "test").is_dir()):
        return [root.name]
    if not cats:
        raise RunAllError(f"no categories found under {root} (expected <category>/train, <category>/test)")
    return cats


def resolve_methods(requested: list[str] | None, profile_methods: list[str] | None) -> list[str]:
    """The methods to run: the requested (or profile) list, keeping only those whose module is available."""
    from mudenet_core import methods as registry

    wanted = requested if requested is not None else (profile_methods or list(registry.METHODS))
    unknown = [m for m in wanted if m not in registry.METHODS]
    if unknown:
        raise RunAllError(f"unknown method(s) {unknown}; registered: {', '.join(registry.METHODS)}")
    available = set(registry.available_methods())
    missing = [m for m in wanted if m not in available]
    if missing:
        print(
            f"[run_all] note: method(s) {missing} are registered but not importable yet; skipped", flush=True
        )
    return [m for m in wanted if m in available]


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve the CLI arguments against ``params/<profile>.yaml``."""
    prof = load_profile(args.profile)
    run = prof["run"]
    dataset = args.dataset or run.get("dataset", "synthetic")
    if dataset not in DATASETS:
        raise RunAllError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if args.data_root:
        data_root = Path(args.data_root).expanduser().resolve()
    elif dataset == "synthetic":
        data_root = (REPO_ROOT / run.get("synthetic_root", "data/synthetic")).resolve()
    else:
        raise RunAllError(
            f"--data-root is required for dataset {dataset!r} (the folder holding its categories)"
        )
    categories = _split_list(args.categories)
    if categories is None:
        categories = (
            (run.get("categories") or {}).get(dataset)
            if isinstance(run.get("categories"), dict)
            else run.get("categories")
        )
    if not categories:
        categories = discover_categories(dataset, data_root)
    seeds = args.seeds if args.seeds is not None else list(run.get("seeds", [0]))
    methods = resolve_methods(_split_list(args.methods), run.get("methods"))
    notebooks = [n for n, _ in NOTEBOOKS]
    if args.only:
        only = _split_list(args.only)
        picked = [n for n in notebooks if any(n == o or n.split("_", 1)[0] == o for o in only)]
        bad = [o for o in only if not any(n == o or n.split("_", 1)[0] == o for n in notebooks)]
        if bad:
            raise RunAllError(f"--only: unknown notebook(s) {bad}; choose from {', '.join(notebooks)}")
        notebooks = picked
    if "mudenet" not in methods:
        skipped = [n for n in notebooks if n in MUDENET_NOTEBOOKS]
        if skipped:
            print(f"[run_all] note: 'mudenet' not in the methods; skipping {skipped}", flush=True)
        notebooks = [n for n in notebooks if n not in MUDENET_NOTEBOOKS]
    runs = [RunKey(dataset, c, int(s)) for c in categories for s in seeds]
    return Plan(
        profile=args.profile,
        out_root=Path(args.out).expanduser().resolve(),
        data_root=data_root,
        runs=runs,
        notebooks=notebooks,
        methods=methods,
        common={**dict(prof["common"]), "OVERRIDES": parse_overrides(args.set)},
        per_notebook=copy.deepcopy(prof["notebooks"]),
        resume=bool(args.resume),
        jobs=max(1, args.jobs),
        synthetic=dict(prof["synthetic"]),
        explicit_root=bool(args.data_root),
    )


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """Parse ``--set`` items: ``METHOD.KEY=VALUE`` -> ``{METHOD: ["KEY=VALUE", ...]}``.

    Example:
        >>> parse_overrides(["mudenet.train.steps=500", "mudenet.width=32"])
        {'mudenet': ['train.steps=500', 'width=32']}
    """
    out: dict[str, list[str]] = {}
    for item in items:
        method, _, rest = item.partition(".")
        if not rest or "=" not in rest:
            raise RunAllError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. mudenet.train.steps=500")
        out.setdefault(method, []).append(rest)
    return out


def notebook_parameters(
    plan: Plan, name: str, key: RunKey | None, declared: dict[str, Any]
) -> dict[str, Any]:
    """The parameters injected into one notebook: common + per-notebook + per-run, only names it declares.

    Raises:
        RunAllError: a per-notebook key in the profile that the notebook does not declare.
    """
    values: dict[str, Any] = {k: v for k, v in plan.common.items() if k in declared}
    own = plan.per_notebook.get(name, {}) or {}
    unknown = sorted(set(own) - set(declared))
    if unknown:
        raise RunAllError(
            f"params/{plan.profile}.yaml: notebooks.{name} sets {unknown}, which notebooks/{name}.py "
            f"does not declare (declared: {', '.join(declared)})"
        )
    values.update(own)
    base = {
        "PROFILE": plan.profile,
        "REUSE": plan.resume,
        "METHODS": [m for m in plan.methods if m != "mudenet"],
        "DATA_ROOT": str(plan.data_root),
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


# ------------------------------------------------------------------------------------------------------------
# Executing one notebook
# ------------------------------------------------------------------------------------------------------------
def _snapshot(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    out = {}
    if not folder.is_dir():
        return out
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.name.startswith(".") and not any(rel.startswith(e) for e in exclude):
            st = p.stat()
            out[rel] = (st.st_mtime_ns, st.st_size)
    return out


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's terminated, reaped children (the notebook kernels)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def render_html(ipynb: Path, html_path: Path, *, no_input: bool) -> Path:
    """Render an executed notebook to static HTML (images inline); ``hide_input`` cells lose their code."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    from mudenet_core.io import atomic_write_text

    c = Config()
    c.TagRemovePreprocessor.remove_input_tags = {"hide_input"}
    c.TagRemovePreprocessor.remove_cell_tags = {"remove_cell"}
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c)
    exporter.register_preprocessor(TagRemovePreprocessor(config=c), enabled=True)
    exporter.exclude_input = no_input
    exporter.exclude_input_prompt = no_input
    exporter.exclude_output_prompt = no_input
    body, _ = exporter.from_notebook_node(nbformat.read(ipynb, as_version=4))
    return atomic_write_text(html_path, body)


def execute_one(name: str, params: dict, out_dir: Path, *, env: dict | None = None) -> dict:
    """Execute one notebook into ``out_dir/<name>.ipynb`` and render ``<name>.html``; return a manifest entry.

    The entry's ``status`` is "ok" or "failed" (with ``error``); the executed copy is kept in both cases.
    """
    import papermill

    src = notebook_path(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    ipynb, html_path = out_dir / f"{name}.ipynb", out_dir / f"{name}.html"
    exclude = ("runs/",) if name in NO_INPUT_NOTEBOOKS else ()
    before = _snapshot(out_dir, exclude)
    entry = {
        "notebook": name,
        "source": str(src.relative_to(REPO_ROOT)),
        "source_sha": file_sha(src),
        "configs_sha": configs_sha(params.get("PROFILE")),
        "parameters": params,
        "executed": str(ipynb),
        "html": str(html_path),
        "start": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        papermill.execute_notebook(
            read_notebook(src),
            str(ipynb),
            parameters=params,
            kernel_name="python3",
            cwd=str(REPO_ROOT),
            progress_bar=False,
            log_output=False,
        )
        entry["status"] = "ok"
    except Exception as e:  # papermill raises PapermillExecutionError; keep going to render the failed copy
        entry["status"] = "failed"
        evalue = getattr(e, "evalue", None) or str(e)
        entry["error"] = f"{getattr(e, 'ename', type(e).__name__)}: {str(evalue).strip()[:2000]}"
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if ipynb.is_file():
        try:
            render_html(ipynb, html_path, no_input=name in NO_INPUT_NOTEBOOKS)
        except Exception as e:  # a rendering problem must not hide the execution result
            entry.setdefault("error", f"HTML rendering failed: {type(e).__name__}: {e}")
            if entry["status"] == "ok":
                entry["status"] = "failed"
    entry["end"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entry["duration_s"] = round(time.perf_counter() - t0, 2)
    # CPU seconds of the finished kernel (user + system): comparable across machine loads, unlike wall time
    entry["kernel_cpu_s"] = round(_children_cpu_s() - cpu0, 2)
    after = _snapshot(out_dir, exclude)
    entry["files"] = sorted(k for k, v in after.items() if before.get(k) != v)
    return entry


def entry_complete(entry: dict | None, name: str, params: dict, out_dir: Path) -> bool:
    """True if an entry says ``name`` ran OK with these parameters and this source, and its files exist."""
    if not entry or entry.get("status") != "ok" or entry.get("notebook") != name:
        return False
    if entry.get("source_sha") != file_sha(notebook_path(name)):
        return False
    if entry.get("configs_sha") != configs_sha(params.get("PROFILE")):
        return False
    if _comparable(entry.get("parameters")) != _comparable(params):
        return False
    return all((out_dir / f).is_file() for f in entry.get("files", [])) and Path(entry["executed"]).is_file()


def _comparable(params: dict | None) -> dict:
    """Parameters without the ones that do not change results (``REUSE``)."""
    return {k: v for k, v in (params or {}).items() if k != "REUSE"}


def kernel_env(plan: Plan) -> dict[str, str]:
    """Environment for the kernels: quiet progress bars and a fair share of the CPU threads per job."""
    # an OMP_NUM_THREADS set by the caller wins (two run_all processes sharing a machine)
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // plan.jobs)
    return {
        "MUDENET_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONWARNINGS": "ignore:IProgress not found",  # tqdm.auto without ipywidgets: bars are off anyway
    }


def execute_run(plan: Plan, key: RunKey, queue=None) -> dict:
    """Execute the run notebooks of one (dataset, category, seed) in order; stop at the first failure.

    The per-run manifest ``<run_dir>/manifest.json`` is rewritten (atomically) after every notebook, so an
    interrupted run resumes where it stopped. Returns ``{"key", "entries", "executed", "failed"}``.
    """
    from mudenet_core.io import load_json, save_json

    run_dir = plan.run_dir(key)
    mpath = run_dir / "manifest.json"
    old = {}
    if mpath.is_file():
        try:
            old = {e["notebook"]: e for e in load_json(mpath).get("notebooks", [])}
        except (ValueError, KeyError, AttributeError):
            old = {}
    entries: dict[str, dict] = dict(old)
    executed, failed = 0, None
    dirty = False  # once a notebook re-runs, every later one re-runs too (its inputs changed)
    for name, scope in NOTEBOOKS:
        if scope != "run" or name not in plan.notebooks:
            continue
        try:
            declared = declared_parameters(read_notebook(notebook_path(name)))
            params = notebook_parameters(plan, name, key, declared)
        except RunAllError as e:
            failed = {"notebook": name, "error": str(e), "executed": "(not executed)"}
            break
        if plan.resume and not dirty and entry_complete(old.get(name), name, params, run_dir):
            if queue is not None:
                queue.put(("skip", key.label, name))
            continue
        dirty = True
        entry = execute_one(name, params, run_dir, env=kernel_env(plan))
        entry["run"] = key.label
        entries[name] = entry
        executed += 1
        order = [n for n, _ in NOTEBOOKS]
        save_json(
            mpath,
            {
                "run": key.label,
                "notebooks": sorted(entries.values(), key=lambda e: order.index(e["notebook"])),
            },
        )
        if queue is not None:
            queue.put((entry["status"], key.label, name))
        if entry["status"] != "ok":
            failed = {"notebook": name, "error": entry.get("error", ""), "executed": entry["executed"]}
            break
    order = [n for n, _ in NOTEBOOKS]
    return {
        "key": key.label,
        "entries": sorted(entries.values(), key=lambda e: order.index(e["notebook"])),
        "executed": executed,
        "failed": failed,
    }


def _execute_run_worker(plan: Plan, key: RunKey, queue) -> dict:
    try:
        return execute_run(plan, key, queue)
    except Exception as e:  # report, never hang the pool
        return {
            "key": key.label,
            "entries": [],
            "executed": 0,
            "failed": {
                "notebook": "(runner)",
                "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                "executed": "(not executed)",
            },
        }


# ------------------------------------------------------------------------------------------------------------
# The whole profile
# ------------------------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter for the results."""
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def prepare_data(plan: Plan, explicit_root: bool = False) -> None:
    """Generate the embedded synthetic dataset once, before any job starts (no races between jobs).

    A folder given with ``--data-root`` that already holds a generated dataset is used as it is.
    """
    if not any(k.dataset == "synthetic" for k in plan.runs):
        return
    from mudenet_core.data import synthetic

    cats = sorted({k.category for k in plan.runs if k.dataset == "synthetic"})
    unknown = [c for c in cats if c not in synthetic.CATEGORIES]
    if unknown:
        raise RunAllError(
            f"unknown synthetic categories {unknown}; choose from {', '.join(synthetic.CATEGORIES)}"
        )
    if explicit_root and (plan.data_root / synthetic.PARAMS_FILE).is_file():
        return
    synthetic.ensure(plan.data_root, **plan.synthetic)


def run_profile(plan: Plan, *, show_progress: bool = True) -> dict:
    """Execute the plan; write the manifest and the index. Returns a summary with ``executed`` (count).

    Raises:
        RunAllError: naming the failed notebook, its run and its executed copy.
    """
    from mudenet_core.io import git_sha, load_json, save_json
    from mudenet_core.utils import progress

    plan.profile_dir.mkdir(parents=True, exist_ok=True)
    prepare_data(plan, plan.explicit_root)
    mpath = plan.profile_dir / "manifest.json"
    previous = load_json(mpath) if mpath.is_file() else {}
    manifest = {
        "profile": plan.profile,
        "argv": sys.argv[1:],
        "git_sha": git_sha(),
        "packages": package_versions(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data_root": str(plan.data_root),
        "methods": plan.methods,
        "notebooks": plan.notebooks,
        "runs": {},
        "report": previous.get("report"),
        # every invocation that wrote into this profile folder (runs of other datasets stay in the report)
        "invocations": [*previous.get("invocations", []), {"argv": sys.argv[1:], "git_sha": git_sha(),
                                                           "started": dt.datetime.now(dt.timezone.utc)
                                                           .isoformat(timespec="seconds")}],
    }
    this_plan = {key.label for key in plan.runs}
    # runs of earlier invocations are kept; this plan's own are kept only when resuming (else they rerun)
    manifest["runs"] = {k: v for k, v in previous.get("runs", {}).items()
                        if plan.resume or k not in this_plan}
    n_run_nbs = sum(1 for n, s in NOTEBOOKS if s == "run" and n in plan.notebooks)
    n_prof_nbs = sum(1 for n, s in NOTEBOOKS if s == "profile" and n in plan.notebooks)
    total = n_run_nbs * len(plan.runs) + n_prof_nbs
    bar = progress(total=total, desc=f"run_all[{plan.profile}]", enabled=show_progress, unit="nb")
    executed = 0

    def record(res: dict) -> None:
        nonlocal executed
        executed += res["executed"]
        manifest["runs"][res["key"]] = res["entries"]
        if res["executed"] or res["failed"]:
            save_json(mpath, manifest)
        if res["failed"]:
            f = res["failed"]
            raise RunAllError(
                f"notebook {f['notebook']} failed for run {res['key']}: {f['error']}\n"
                f"  executed copy: {f['executed']}\n"
                f"  (fix it, then re-run with --resume to continue from there)"
            )

    def on_event(ev) -> None:
        status, label, name = ev
        bar.update(1)
        bar.set_postfix_str(f"{label} {name} {status}")

    try:
        if plan.jobs == 1 or len(plan.runs) == 1:

            class _Q:
                def put(self, ev):
                    on_event(ev)

            for key in plan.runs:
                record(execute_run(plan, key, _Q()))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Manager() as manager:
                queue = manager.Queue()
                with cf.ProcessPoolExecutor(max_workers=plan.jobs, mp_context=ctx) as pool:
                    futures = {pool.submit(_execute_run_worker, plan, key, queue) for key in plan.runs}
                    pending = set(futures)
                    try:
                        while pending:
                            done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                            while not queue.empty():
                                on_event(queue.get())
                            for fut in done:
                                record(fut.result())
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
                    while not queue.empty():
                        on_event(queue.get())
        # Profile-level notebooks (90_report) after every run.
        report_executed = 0
        for name, scope in NOTEBOOKS:
            if scope != "profile" or name not in plan.notebooks:
                continue
            declared = declared_parameters(read_notebook(notebook_path(name)))
            params = notebook_parameters(plan, name, None, declared)
            params_all_runs = {**params, "_runs": sorted(k.label for k in plan.runs)}
            out_dir = plan.profile_dir / "report"
            prev = manifest.get("report") or {}
            if (
                plan.resume
                and executed == 0
                and entry_complete(prev, name, params, out_dir.parent)
                and prev.get("_runs") == params_all_runs["_runs"]
            ):
                on_event(("skip", "profile", name))
                continue
            entry = execute_one(name, params, out_dir, env=kernel_env(plan))
            # files are relative to the profile folder for the report notebook
            entry["files"] = [f"report/{f}" for f in entry["files"]]
            entry["files"] += _report_outputs(plan.profile_dir, entry["start"])
            entry["_runs"] = params_all_runs["_runs"]
            manifest["report"] = entry
            executed += 1
            report_executed += 1
            save_json(mpath, manifest)
            on_event((entry["status"], "profile", name))
            if entry["status"] != "ok":
                raise RunAllError(
                    f"notebook {name} failed: {entry.get('error', '')}\n  executed copy: {entry['executed']}"
                )
    finally:
        bar.close()
    manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest["executed"] = executed
    index = plan.profile_dir / "index.html"
    if executed or not index.is_file():
        from mudenet_core import report

        save_json(mpath, manifest)
        if (plan.profile_dir / "tables").is_dir():
            report.write_index(
                plan.profile_dir,
                manifest=manifest,
                title=f"MuDeNet workbook — profile {plan.profile}",
                protocol=_protocol(plan, manifest),
            )
    return {"executed": executed, "manifest": str(mpath), "index": str(index)}


def _report_outputs(profile_dir: Path, start_iso: str) -> list[str]:
    """Files under ``tables/`` and ``figures/`` (relative to the profile folder) written by the report."""
    start = dt.datetime.fromisoformat(start_iso).timestamp() - 1
    out = []
    for sub in ("tables", "figures"):
        for p in sorted((profile_dir / sub).glob("*")):
            if p.is_file() and p.stat().st_mtime >= start:
                out.append(p.relative_to(profile_dir).as_posix())
    return out


def _protocol(plan: Plan, manifest: dict) -> str:
    """The index's protocol line: every run in the profile folder and the commands that produced them."""
    keys = [k.split("/") for k in manifest.get("runs", {})] or [
        [k.dataset, k.category, f"seed{k.seed}"] for k in plan.runs]
    datasets = sorted({k[0] for k in keys})
    cats = sorted({f"{k[0]}/{k[1]}" for k in keys})
    seeds = sorted({k[2].removeprefix("seed") for k in keys})
    commands = "; ".join(dict.fromkeys(  # each distinct command once, in order
        "python run_all.py " + " ".join(inv.get("argv", [])) for inv in manifest.get("invocations", [])))
    return (
        f"Protocol: profile '{plan.profile}' (params/{plan.profile}.yaml); dataset(s) {', '.join(datasets)}; "
        f"categories {', '.join(cats)}; seeds {', '.join(seeds)}; "
        f"methods {', '.join(plan.methods)}. "
        "Models train on train/good only; normalisation and thresholds are calibrated on a validation split "
        "carved from train/good; metrics are computed on the full test split (image AUROC, pixel AUROC, "
        "AU-PRO up to FPR 0.3, normalised)." + (f" Commands: {commands}." if commands else "")
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--profile",
        choices=PROFILES,
        default="cpu",
        help="run grid and notebook parameters "
        "(params/<profile>.yaml); default: cpu (generated dataset, fits 30 min on 2 cores)",
    )
    p.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: the profile's)")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding the dataset's categories "
        "(default for synthetic: the profile's synthetic_root, generated on first use)",
    )
    p.add_argument("--categories", nargs="+", default=None, help="categories (space- or comma-separated)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods of the harness (mudenet runs notebooks "
        "10-30 and 50; the others run in 40_baselines); default: the profile's, available ones only",
    )
    p.add_argument("--jobs", type=int, default=1, help="independent (category, seed) runs in parallel")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip notebooks whose outputs are complete (manifest) "
        "and let notebooks reuse existing checkpoints",
    )
    p.add_argument(
        "--only", nargs="+", default=None, help="a subset of notebooks, by name or number (e.g. 00 40)"
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="method config overrides for every run, e.g. mudenet.train.steps=500 "
        "mudenet.distill.source=train+folder (unknown keys are rejected by the notebooks)",
    )
    p.add_argument("--out", default="results", help="results root (default: results/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a notebook failed, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        plan = make_plan(args)
        print(
            f"[run_all] profile {plan.profile}: {len(plan.runs)} run(s) x {len(plan.notebooks)} notebook(s) "
            f"-> {plan.profile_dir}",
            flush=True,
        )
        summary = run_profile(plan, show_progress=not args.quiet)
    except RunAllError as e:
        print(f"[run_all] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    wall = time.perf_counter() - t0
    if summary["executed"] == 0:
        print(f"[run_all] nothing to do: every notebook's outputs are complete ({wall:.1f} s)", flush=True)
    else:
        print(
            f"[run_all] executed {summary['executed']} notebook(s) in {wall:.1f} s; "
            f"index: {summary['index']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
