"""Experiment tracking and the model registry: each fit an MLflow run, each fitted model a registered version.

Where things go (decided once, here):

* **Workbook** (``experiment.fit_or_load`` / ``evaluate_method``, the notebooks ``run_all.py`` executes): the
  backend store is ``sqlite:///<results root>/mlflow.db``, where the results root is the folder above the
  run's ``runs/`` folder (``results/<profile>`` for ``results/<profile>/runs/<dataset>/<category>/seed<k>``),
  or the run folder itself when it is not under a ``runs/`` folder (:func:`results_root`).
* **CLI** (``mudenet train`` / ``evaluate``): an output folder's parents say nothing reliable, so the store is
  ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo>/results/mlflow.db`` (:func:`tracking_uri`).
* ``$MLFLOW_TRACKING_URI``, when set, wins in both cases (one store for everything, e.g. a tracking server).
* Artefacts of a SQLite store go to ``mlartifacts/`` beside its database file; other stores: their default.
* ``MUDENET_TRACKING=0`` (also ``false``/``no``/``off``) turns tracking off: nothing is imported or written.

What a run holds: the full method config flattened into parameters (``method.<key>``, nested keys dotted)
plus the data config (``data.<key>``); metrics ``val.<metric>`` (validation set, at fit time) and
``test.<metric>`` (test split, at evaluation); tags ``dataset``, ``category``, ``seed``, ``method``,
``profile``, ``git_sha``, ``config_hash`` and ``model_sha256``; the run's tables and figures as artefacts;
and under the artefact folder ``model/`` the fitted model: ``model.pt``, ``threshold.json`` (the
validation-calibrated threshold and heat-map range) and ``config.yaml`` (method, method and data configs,
the run-record format of ``mudenet train``). That folder is registered as a version of the model
``<method>-<dataset>-<category>``. A model already logged (same ``model.pt`` SHA-256, e.g. a notebook run
again with ``REUSE``) is not logged twice: its run is reused.

Model IDs: ``models:/<name>/<version>``, ``<name>/<version>`` or ``runs:/<run_id>``. Anything else, and
anything that looks like a path (``..``, absolute paths, ``file:`` URIs, backslashes), raises
:class:`ModelNotFound` before the store is asked (:func:`parse_model_id`).

Tracking never loses a result: the run's own files are written before it is called, and any failure
(MLflow not installed, a locked or unreadable database, a bad URI) becomes one :class:`TrackingWarning` line
naming the error; the fit goes on.

Example:
    >>> parse_model_id("models:/patchcore-synthetic-plate/3")
    ('models', 'patchcore-synthetic-plate', '3')
    >>> parse_model_id("../../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mudenet_core.tracking.ModelNotFound: ...looks like a path...
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from mudenet_core.io import REPO_ROOT, file_sha256

ENV_SWITCH = "MUDENET_TRACKING"  # "0"/"false"/"no"/"off": no tracking at all
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
MODEL_ARTIFACT = "model"  # artefact folder of a run holding model.pt, threshold.json, config.yaml
CLI_RESULTS_ROOT = REPO_ROOT / "results"  # the CLI's default store: <repo>/results/mlflow.db
MAX_PARAM_CHARS = 500  # longer parameter values (lists of paths...) are cut, with "..." at the end
MODEL_FILES = ("model.pt", "threshold.json")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_RUN_RE = re.compile(r"^[0-9a-f]{32}$")


class ModelNotFound(LookupError):
    """A model ID that the registry does not know, is malformed, or looks like a path (refused)."""


class TrackingWarning(UserWarning):
    """Tracking failed; the run's own files are written all the same."""


# ------------------------------------------------------------------------------------------------ where


def enabled(environ: dict | None = None) -> bool:
    """Whether tracking is on (``MUDENET_TRACKING`` unset or not one of 0/false/no/off).

    Example:
        >>> enabled({"MUDENET_TRACKING": "0"}), enabled({"MUDENET_TRACKING": "off"}), enabled({})
        (False, False, True)
    """
    env = os.environ if environ is None else environ
    return env.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def results_root(run_dir: str | Path) -> Path:
    """The results root of a run folder: the parent of its nearest ``runs`` ancestor, else the folder itself.

    Example:
        >>> results_root("/r/cpu/runs/synthetic/plate/seed0").as_posix()
        '/r/cpu'
        >>> results_root("/tmp/x").as_posix()
        '/tmp/x'
    """
    p = Path(run_dir)
    for parent in p.parents:
        if parent.name == "runs":
            return parent.parent
    return p


def tracking_uri(root: str | Path | None = None, *, environ: dict | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db`` (default root ``<repo>/results``).

    Example:
        >>> tracking_uri("/r/cpu", environ={})
        'sqlite:////r/cpu/mlflow.db'
        >>> tracking_uri("/r/cpu", environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
        'http://127.0.0.1:5000'
    """
    env = (os.environ if environ is None else environ).get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    base = Path(root) if root is not None else CLI_RESULTS_ROOT
    return f"sqlite:///{base.resolve() / DB_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None.

    Example:
        >>> sqlite_path("sqlite:////r/mlflow.db").as_posix(), sqlite_path("http://x:5000")
        ('/r/mlflow.db', None)
    """
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep artefacts: ``mlartifacts/`` beside a SQLite database, else the default.

    Example:
        >>> artifact_location("sqlite:////r/mlflow.db")
        'file:///r/mlartifacts'
    """
    db = sqlite_path(uri)
    return (db.parent / ARTIFACT_DIR).as_uri() if db is not None else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's INFO lines (database creation, migrations) and artefact progress bars off inside the block."""
    import mlflow  # noqa: F401  (importing configures mlflow's loggers: set the levels after it)

    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "mlflow.store.db.utils")]
    levels = [lg.level for lg in loggers]
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def client(uri: str):
    """An ``MlflowClient`` for ``uri`` (tracking and registry); a SQLite database's folder is created."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _warn(what: str, uri: str, e: BaseException) -> None:
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    warnings.warn(
        f"mlflow tracking failed while {what} ({msg}); store {uri}; the run's own files are written, "
        f"set {ENV_SWITCH}=0 to turn tracking off",
        TrackingWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------------------------------------ logging


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested dict as ``{"a.b": "value"}`` strings (long values cut at :data:`MAX_PARAM_CHARS`).

    Example:
        >>> flatten({"width": 16, "train": {"steps": 800, "lr": 1e-3}}, "method.")
        {'method.width': '16', 'method.train.steps': '800', 'method.train.lr': '0.001'}
    """
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            s = str(v)
            out[key] = s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."
    return out


def _finite_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == f and abs(f) != float("inf"):
            out[f"{prefix}{k}"] = f
    return out


@dataclasses.dataclass(frozen=True)
class FitRecord:
    """What one fit logs (see the module docstring).

    Attributes:
        method: registry name of the method.
        dataset: dataset name (``synthetic``, ``mvtec_ad``...).
        category: dataset category.
        seed: training seed.
        profile: the method profile (``paper``/``cpu``/``smoke``, or ``custom``).
        config: the method config (``ConfigBase``).
        model_dir: folder holding ``model.pt`` and ``threshold.json``.
        git_sha: the code version.
        data_config: the data config as a dict (``DataConfig.to_dict()``), or None.
        validation: validation metrics (logged as ``val.<name>``).
        files: tables and figures to log as artefacts (missing ones are skipped).
        tags: further tags.
    """

    method: str
    dataset: str
    category: str
    seed: int
    profile: str
    config: Any
    model_dir: Path
    git_sha: str
    data_config: dict | None = None
    validation: dict | None = None
    files: tuple[Path, ...] = ()
    tags: dict | None = None

    @property
    def model_name(self) -> str:
        """The registered model's name ``<method>-<dataset>-<category>`` (odd characters become ``_``)."""
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{self.method}-{self.dataset}-{self.category}")

    @property
    def experiment(self) -> str:
        """The experiment ``<dataset>-<category>``: every method of a category side by side."""
        return f"{self.dataset}-{self.category}"


def _experiment_id(c, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # created meanwhile by a parallel job
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _run_of_model(c, experiment_ids: list[str], sha: str) -> str | None:
    """The run (in these experiments) whose tag ``model_sha256`` is ``sha``, or None."""
    runs = c.search_runs(experiment_ids, filter_string=f"tags.model_sha256 = '{sha}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _log_files(c, run_id: str, files: Iterable[Path], artifact_path: str) -> None:
    for f in files:
        f = Path(f)
        if f.is_file():
            c.log_artifact(run_id, str(f), artifact_path)


def _run_config_yaml(rec: FitRecord) -> str:
    return yaml.safe_dump(
        {
            "method": rec.method,
            "method_config": rec.config.to_dict(),
            "data_config": rec.data_config or {},
            "seed": int(rec.seed),
            "profile": rec.profile,
            "git_sha": rec.git_sha,
            "config_hash": rec.config.config_hash(),
        },
        sort_keys=False,
    )


def log_fit(rec: FitRecord, *, uri: str) -> str | None:
    """Log a fit as an MLflow run and register its model; the run ID, or None (off, or failed: one warning).

    A model whose ``model.pt`` (by SHA-256) is already logged in the experiment is not logged again: that
    run's ID is returned.
    """
    if not enabled():
        return None
    try:
        with _quiet():
            return _log_fit(rec, uri)
    except Exception as e:  # tracking must never stop a fit: its files are already written
        _warn(f"logging the fit of {rec.method} on {rec.dataset}/{rec.category}", uri, e)
        return None


def _log_fit(rec: FitRecord, uri: str) -> str:
    from mlflow.entities import Metric, Param, RunTag

    model_path = Path(rec.model_dir) / "model.pt"
    sha = file_sha256(model_path)
    c = client(uri)
    exp_id = _experiment_id(c, rec.experiment, uri)
    found = _run_of_model(c, [exp_id], sha)
    if found is not None:
        return found
    tags = {
        "dataset": rec.dataset,
        "category": rec.category,
        "seed": str(int(rec.seed)),
        "method": rec.method,
        "profile": rec.profile,
        "git_sha": rec.git_sha,
        "config_hash": rec.config.config_hash(),
        "model_sha256": sha,
        "mlflow.runName": f"{rec.method}-seed{int(rec.seed)}",
        **{str(k): str(v) for k, v in (rec.tags or {}).items()},
    }
    run = c.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    params = {**flatten(rec.config.to_dict(), "method."), **flatten(rec.data_config or {}, "data.")}
    now = int(time.time() * 1000)
    metrics = _finite_metrics(rec.validation or {}, "val.")
    items = list(params.items())
    for i in range(0, max(len(items), 1), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(
            run_id,
            params=[Param(k, v) for k, v in items[i : i + 100]],
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()] if i == 0 else [],
            tags=[RunTag("mlflow.source.name", "mudenet_core")] if i == 0 else [],
        )
    _log_files(c, run_id, rec.files, "results")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(_run_config_yaml(rec))
        _log_files(c, run_id, [model_path, Path(rec.model_dir) / "threshold.json", cfg_path], MODEL_ARTIFACT)
    if not (
        Path(rec.model_dir) / "threshold.json"
    ).is_file():  # no calibration: not deployable, not registered
        c.set_terminated(run_id)
        return run_id
    name = rec.model_name
    with contextlib.suppress(Exception):  # exists already
        c.create_registered_model(name, description="fitted by mudenet_core; see the runs of its versions")
    c.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}",
        run_id=run_id,
        tags={k: tags[k] for k in ("method", "dataset", "category", "seed", "profile", "model_sha256")},
    )
    c.set_terminated(run_id)
    return run_id


def log_evaluation(
    metrics: dict[str, Any],
    *,
    uri: str,
    run_id: str | None = None,
    model_path: str | Path | None = None,
    files: Iterable[Path] = (),
    prefix: str = "test.",
) -> str | None:
    """Add test metrics (``test.<name>``) and files to the run of a model; its ID, or None.

    The run is ``run_id``, else the run whose tag ``model_sha256`` is that of ``model_path``. None when
    tracking is off, no run holds this model (it was fitted with tracking off), or logging failed (one
    warning).
    """
    if not enabled() or (run_id is None and (model_path is None or not Path(model_path).is_file())):
        return None
    try:
        with _quiet():
            from mlflow.entities import Metric

            c = client(uri)
            run_id = run_id or _run_holding(c, model_path)
            if run_id is None:
                return None
            now = int(time.time() * 1000)
            c.log_batch(
                run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite_metrics(metrics, prefix).items()]
            )
            _log_files(c, run_id, files, "results")
            return run_id
    except Exception as e:
        _warn("logging an evaluation", uri, e)
        return None


def _run_holding(c, model_path: str | Path) -> str | None:
    """The run (in any experiment) that logged the model file ``model_path``, or None."""
    return _run_of_model(c, [e.experiment_id for e in c.search_experiments()], file_sha256(model_path))


def log_export(model_path: str | Path, onnx_file: str | Path, sidecar: str | Path, *, uri: str) -> str | None:
    """Add an ONNX export to the model artefact of the run holding ``model_path``; the run ID, or None.

    The files are stored as ``model/model.onnx`` and ``model/model.onnx.json`` whatever their names on disk,
    so ``mudenet serve --runtime onnx --model <ID>`` finds them beside ``model.pt`` in the resolved folder.
    None when tracking is off, no run holds this model, or logging failed (one warning).
    """
    if not enabled() or not Path(model_path).is_file():
        return None
    try:
        with _quiet():
            c = client(uri)
            run_id = _run_holding(c, model_path)
            if run_id is None:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                for src, name in ((onnx_file, "model.onnx"), (sidecar, "model.onnx.json")):
                    shutil.copyfile(src, Path(tmp) / name)
                files = (Path(tmp) / "model.onnx", Path(tmp) / "model.onnx.json")
                _log_files(c, run_id, files, MODEL_ARTIFACT)
            return run_id
    except Exception as e:
        _warn("logging an export", uri, e)
        return None


# ------------------------------------------------------------------------------------------------ registry


def parse_model_id(model_id: str) -> tuple[str, str, str]:
    """``("models", name, version)`` or ``("runs", run_id, "")``; :class:`ModelNotFound` for anything else.

    Accepted: ``models:/<name>/<version>``, ``<name>/<version>``, ``runs:/<run_id>`` (32 hex digits). Names
    are letters, digits, ``_``, ``.``, ``-`` (not starting with ``.``), versions positive integers; paths,
    ``..``, ``file:`` URIs, backslashes and whitespace are refused.

    Example:
        >>> parse_model_id("ae-synthetic-plate/2"), parse_model_id("runs:/" + "a" * 32)[:2]
        (('models', 'ae-synthetic-plate', '2'), ('runs', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'))
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelNotFound(
            "empty model ID; expected models:/<name>/<version>, <name>/<version> or runs:/<run_id>"
        )
    s = model_id.strip()
    if (
        ".." in s
        or "\\" in s
        or s.startswith(("/", "~"))
        or s.lower().startswith("file:")
        or re.search(r"\s|%|\x00", s)
    ):
        raise ModelNotFound(
            f"model ID {model_id!r} looks like a path; models are loaded by registry ID only "
            "(models:/<name>/<version>, <name>/<version> or runs:/<run_id>)"
        )
    if s.startswith("runs:/"):
        rid = s[len("runs:/") :].rstrip("/")
        if not _RUN_RE.match(rid):
            raise ModelNotFound(f"model ID {model_id!r}: a run ID is 32 hexadecimal digits")
        return "runs", rid, ""
    body = s[len("models:/") :] if s.startswith("models:/") else s
    parts = body.split("/")
    if len(parts) != 2 or not _NAME_RE.match(parts[0]) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ModelNotFound(
            f"malformed model ID {model_id!r}; expected models:/<name>/<version>, "
            "<name>/<version> or runs:/<run_id>"
        )
    return "models", parts[0], str(int(parts[1]))


def _metrics_of(run) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    for k, v in run.data.metrics.items():
        if k.startswith("val."):
            out["validation"][k[4:]] = float(v)
        elif k.startswith("test."):
            out["test"][k[5:]] = float(v)
    return out


def list_models(uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model version, newest first within a name: one dict per version.

    Keys: ``model_id``, ``name``, ``version``, ``method``, ``dataset``, ``category``, ``seed``, ``profile``,
    ``run_id``, ``validation`` and ``test`` (metric dicts), ``created`` (ms since the epoch). An empty list
    when the store holds nothing (or does not exist yet).
    """
    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return []
    with _quiet():
        c = client(uri)
        out = []
        for rm in c.search_registered_models(max_results=1000):
            for mv in c.search_model_versions(f"name = '{rm.name}'", max_results=1000):
                try:
                    run = c.get_run(mv.run_id)
                    tags, metrics = run.data.tags, _metrics_of(run)
                except Exception:  # a version whose run was deleted
                    tags, metrics = dict(mv.tags or {}), {"validation": {}, "test": {}}
                out.append(
                    {
                        "model_id": f"models:/{mv.name}/{mv.version}",
                        "name": mv.name,
                        "version": int(mv.version),
                        "method": tags.get("method", ""),
                        "dataset": tags.get("dataset", ""),
                        "category": tags.get("category", ""),
                        "seed": int(tags["seed"]) if str(tags.get("seed", "")).isdigit() else None,
                        "profile": tags.get("profile", ""),
                        "run_id": mv.run_id,
                        **metrics,
                        "created": int(mv.creation_timestamp or 0),
                    }
                )
    return sorted(out, key=lambda d: (d["name"], -d["version"]))


def resolve_model(model_id: str, *, uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local folder holding the model of ``model_id`` (``model.pt``, ``threshold.json``, ``config.yaml``).

    The files are downloaded from the artefact store into ``dst`` (default: a new temporary folder; the caller
    removes it). Raises :class:`ModelNotFound` for malformed IDs, IDs that look like paths, IDs the registry
    does not know and runs without a logged model.
    """
    kind, a, b = parse_model_id(model_id)
    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ModelNotFound(f"model {model_id!r} not found: no registry at {uri} (train a model first)")
    with _quiet():
        c = client(uri)
        try:
            run_id = c.get_model_version(a, b).run_id if kind == "models" else c.get_run(a).info.run_id
        except Exception as e:
            raise ModelNotFound(f"model {model_id!r} not found in the registry at {uri}") from e
        if not run_id:
            raise ModelNotFound(f"model {model_id!r} has no run to download it from")
        out = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="mudenet_model_"))
        out.mkdir(parents=True, exist_ok=True)
        try:
            folder = Path(c.download_artifacts(run_id, MODEL_ARTIFACT, str(out)))
        except Exception as e:
            if dst is None:
                shutil.rmtree(out, ignore_errors=True)
            raise ModelNotFound(
                f"model {model_id!r}: its files cannot be fetched from the artefact store "
                f"({type(e).__name__})"
            ) from e
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelNotFound(f"model {model_id!r}: its artefacts lack {', '.join(missing)}")
    return folder


def search_runs(uri: str | None = None, *, max_results: int = 1000):
    """Every run of every experiment as a DataFrame (``mlflow.search_runs``; empty without a store).

    Columns: ``run_id``, ``experiment``, the tags method/dataset/category/seed/profile/git_sha, then the
    ``val.*`` and ``test.*`` metrics.
    """
    import pandas as pd

    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if not enabled() or (db is not None and not db.is_file()):
        return pd.DataFrame()
    import mlflow

    with _quiet():
        c = client(uri)
        exps = {e.experiment_id: e.name for e in c.search_experiments()}
        saved = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            df = mlflow.search_runs(experiment_ids=list(exps), max_results=max_results)
        finally:
            mlflow.set_tracking_uri(saved)
    if df.empty:
        return df
    df = df.assign(experiment=df["experiment_id"].map(exps))
    tag_cols = [f"tags.{t}" for t in ("method", "dataset", "category", "seed", "profile", "git_sha")]
    metric_cols = sorted(c for c in df.columns if c.startswith(("metrics.val.", "metrics.test.")))
    cols = ["run_id", "experiment", *[c for c in tag_cols if c in df.columns], *metric_cols]
    return df[cols].rename(columns=lambda c: c.removeprefix("tags.").removeprefix("metrics."))


# -------------------------------------------------------------------------------------------- workbook hooks


def infer_profile(method: str, config) -> str:
    """The profile whose YAML gives ``config`` (``image_size`` aside), else ``custom``."""
    from mudenet_core import methods

    want = {k: v for k, v in config.to_dict().items() if k != "image_size"}
    for profile in methods.PROFILES:
        try:
            cfg = methods.load_config(method, profile)
        except Exception:
            continue
        if {k: v for k, v in cfg.to_dict().items() if k != "image_size"} == want:
            return profile
    return "custom"


def track_workbook_fit(method: str, config, splits, run, *, name: str | None, info: dict) -> str | None:
    """:func:`log_fit` for ``experiment.fit_or_load`` (store: :func:`results_root` of the run folder)."""
    if not enabled():
        return None
    uri = tracking_uri(results_root(run.out_dir))
    try:
        data_cfg = splits.config.to_dict() if hasattr(getattr(splits, "config", None), "to_dict") else None
        rec = FitRecord(
            method=method,
            dataset=run.dataset,
            category=run.category,
            seed=run.seed,
            profile=infer_profile(method, config),
            config=config,
            model_dir=run.checkpoint_dir(name or method),
            git_sha=run.git_sha,
            data_config=data_cfg,
            validation=info.get("validation"),
            files=_files_of(run.eval_dir(method) / "val"),
            tags={"checkpoint_name": name or method, "results_root": str(results_root(run.out_dir))},
        )
    except Exception as e:
        _warn(f"preparing the record of {method}", uri, e)
        return None
    return log_fit(rec, uri=uri)


def _files_of(folder: Path, patterns: tuple[str, ...] = ("*.json", "*.csv", "*.png")) -> tuple[Path, ...]:
    folder = Path(folder)
    return tuple(sorted(p for pat in patterns for p in folder.glob(pat) if p.is_file()))


def track_workbook_evaluation(method: str, run, *, metrics: dict, fit_info: dict | None) -> str | None:
    """:func:`log_evaluation` for ``experiment.evaluate_method``: test metrics, the tables and figures."""
    if not enabled():
        return None
    uri = tracking_uri(results_root(run.out_dir))
    fit_info = fit_info or {}
    files = (
        *_files_of(run.eval_dir(method), ("*.json", "*.csv")),
        *[p for p in (run.table(f"metrics_{method}.csv"), run.table(f"timings_{method}.csv")) if p.is_file()],
        *_files_of(run.path("figures"), ("*.png",)),
    )
    return log_evaluation(
        metrics,
        uri=uri,
        run_id=fit_info.get("tracking_run_id"),
        model_path=run.checkpoint_dir(method) / "model.pt",
        files=files,
    )


# ------------------------------------------------------------------------------------------------ CLI hooks


def track_cli_fit(out: Path, *, method: str, config, data_config, seed: int) -> str | None:
    """:func:`log_fit` for ``mudenet train`` (store: :func:`tracking_uri` with the CLI default)."""
    if not enabled():
        return None
    uri = tracking_uri()
    out = Path(out)
    try:
        val_json = out / "validation" / "metrics.json"
        validation = {}
        if val_json.is_file():
            from mudenet_core.io import load_json

            validation = load_json(val_json).get("metrics", {})
        from mudenet_core.io import git_sha

        rec = FitRecord(
            method=method,
            dataset=data_config.dataset,
            category=data_config.category,
            seed=seed,
            profile=infer_profile(method, config),
            config=config,
            model_dir=out,
            git_sha=git_sha(),
            data_config=data_config.to_dict(),
            validation=validation,
            files=(
                *_files_of(out / "validation", ("*.json", "*.csv")),
                *_files_of(out, ("loss_curves_*.png", "train_log.json", "split.csv")),
            ),
            tags={"output_dir": str(out.resolve())},
        )
    except Exception as e:
        _warn(f"preparing the record of {method}", uri, e)
        return None
    return log_fit(rec, uri=uri)


def track_cli_evaluation(model_path: Path, metrics: dict, out: Path) -> str | None:
    """:func:`log_evaluation` for ``mudenet evaluate``: test metrics and figures, on the run of this model."""
    if not enabled():
        return None
    out = Path(out)
    files = (*_files_of(out, ("metrics.json", "metrics.csv", "scores.csv")), *_files_of(out / "figures"))
    return log_evaluation(metrics, uri=tracking_uri(), model_path=model_path, files=files)


def track_cli_export(model_path: Path, onnx_file: Path, sidecar: Path) -> str | None:
    """:func:`log_export` for ``mudenet export --format onnx`` (store: :func:`tracking_uri`)."""
    if not enabled():
        return None
    return log_export(model_path, onnx_file, sidecar, uri=tracking_uri())
