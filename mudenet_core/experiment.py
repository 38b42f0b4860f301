"""The thin orchestration the notebooks call: splits, fit-or-load, evaluate, tidy outputs.

A *run* is one (dataset, category, seed) and owns one output folder (``OUT_DIR`` of the notebooks)::

    <run>/splits/<dataset>_<category>.csv        resolved index (which images were used)
    <run>/checkpoints/<name>/model.pt            fitted detector (+ fit_log.json, last.pt while training)
    <run>/checkpoints/<name>/threshold.json      decision threshold chosen on the validation set
    <run>/eval/<method>/{metrics.json, scores.csv, maps.npy}        test split (read once, final report)
    <run>/eval/<method>/val/{metrics.json, scores.csv, maps.npy}    validation set (every choice)
    <run>/tables/metrics_<method>.csv            tidy: method, dataset, category, seed, split, metric, ...
    <run>/tables/timings_<method>.csv            tidy timings (fit_s = distill_s + train_s + calibration_s)
    <run>/tables/ablations.csv                   tidy, with ``ablation`` and ``variant`` columns
    <run>/figures/*.png

Everything is written atomically and every step is skippable: with ``reuse=True`` a detector whose
checkpoint exists is loaded instead of refitted. Each tidy row carries the config hash and the git SHA.

The protocol: the *validation set* (:func:`build_validation`) is the held-out normal training images plus
synthetic anomalies made on them (:mod:`mudenet_core.data.synthesis`); normalisation statistics, the
decision threshold and every selection use it. The test split is scored once, by :func:`evaluate_method`.

Beside this module: :mod:`mudenet_core.ablations` (MuDeNet ablations by re-scoring) and
:mod:`mudenet_core.mudenet_figures` (MuDeNet's display helpers); their names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mudenet_core import io, report, tracking

# re-exported for the notebooks and older callers (the moved names live in their own modules)
from mudenet_core.ablations import raw_components, rescore, run_scoring_ablations, scoring_variants  # noqa: F401
from mudenet_core.mudenet_figures import (  # noqa: F401
    MapSnapshots,
    load_distilled,
    snapshot_figure,
    teacher_and_target,
    teacher_target_figure,
)
from mudenet_core.report import show_figure  # noqa: F401
from mudenet_core.utils import resolve_device, seed_everything

SPLIT_SEED = 0  # the train/val split is fixed across training seeds: seeds measure training variance only


@dataclasses.dataclass(frozen=True)
class Run:
    """One (dataset, category, seed) run and its output folder.

    Example:
        >>> r = Run(Path("/tmp/x"), "synthetic", "plate", 0, "abc")
        >>> r.table("metrics_padim.csv").as_posix()
        '/tmp/x/tables/metrics_padim.csv'
    """

    out_dir: Path
    dataset: str
    category: str
    seed: int
    git_sha: str

    def path(self, *parts: str) -> Path:
        """A path inside the run folder."""
        return self.out_dir.joinpath(*parts)

    def table(self, name: str) -> Path:
        """``<run>/tables/<name>``."""
        return self.path("tables", name)

    def figure(self, name: str) -> Path:
        """``<run>/figures/<name>``."""
        return self.path("figures", name)

    def checkpoint_dir(self, name: str) -> Path:
        """``<run>/checkpoints/<name>``."""
        return self.path("checkpoints", name)

    def eval_dir(self, method: str) -> Path:
        """``<run>/eval/<method>``."""
        return self.path("eval", method)

    def tidy(self, metrics: dict[str, float], *, method: str, config_hash: str, **extra: str) -> pd.DataFrame:
        """Tidy rows (see :func:`mudenet_core.report.tidy_metrics`) for this run."""
        return report.tidy_metrics(
            metrics,
            method=method,
            dataset=self.dataset,
            category=self.category,
            seed=self.seed,
            config_hash=config_hash,
            git_sha=self.git_sha,
            **extra,
        )


def resolve_path(p: str | Path) -> Path:
    """A path from a notebook parameter: absolute as given, relative to the repository root otherwise."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (io.REPO_ROOT / p)


def start_run(
    out_dir: str | Path, *, dataset: str, category: str, seed: int, device: str = "auto"
) -> tuple[Run, torch.Generator, torch.device]:
    """Create the run folder, seed everything, cap torch's threads; return run, generator and device.

    Threads: ``OMP_NUM_THREADS`` when set (``run_all.py --jobs`` shares the cores), else all cores.
    """
    out = resolve_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    g = seed_everything(seed)
    return Run(out, dataset, category, int(seed), io.git_sha()), g, resolve_device(device)


def build_splits(run: Run, data_root: str | Path, image_size: int, data_overrides: dict | None = None,
                 **fields: Any):
    """The category's train/val/test splits; the resolved index is saved under ``<run>/splits/``.

    Args:
        run: the run (dataset and category).
        data_root: folder holding the categories ("" for the generated dataset's default root).
        image_size: square input size.
        data_overrides: ``DataConfig`` overrides as ``run_all.py --set data.KEY=VALUE`` gives them (the
            notebooks' ``DATA_OVERRIDES``; dotted keys reach nested fields, e.g. ``augment.hflip``).
        **fields: further :class:`~mudenet_core.data.DataConfig` fields.
    """
    from mudenet_core.data import DataConfig, make_splits

    root = str(resolve_path(data_root)) if data_root else ""
    cfg = DataConfig.from_dict(
        {
            "dataset": run.dataset,
            "root": root,
            "category": run.category,
            "image_size": image_size,
            "split_seed": SPLIT_SEED,
            **fields,
        }
    )
    if data_overrides:
        cfg = cfg.with_overrides(dict(data_overrides))
    return make_splits(cfg, save_split_to=run.path("splits"))


def build_validation(splits, texture_dir: str | Path = "", *, min_anomalous: int = 60, seed: int = 0,
                     show_progress: bool = False):
    """The synthetic-anomaly validation set of a category (held-out normals + anomalies made on them).

    Args:
        splits: the category's splits (``splits.val`` holds the held-out normal training images).
        texture_dir: a folder of texture images (e.g. DTD ``images/``; relative to the repository root);
            "" = self-textures from the normal images (works offline).
        min_anomalous: at least this many synthetic anomalies (several versions of each normal image).
        seed: the validation set's seed (fixed: every method and training seed sees the same set).
        show_progress: progress bar.

    Returns:
        :class:`~mudenet_core.data.synthesis.SyntheticAnomalySet`.
    """
    from mudenet_core.data import synthesis

    syn = synthesis.SynthesisConfig(texture_dir=str(resolve_path(texture_dir)) if texture_dir else "")
    cfg = synthesis.ValidationConfig(min_anomalous=min_anomalous, seed=seed, synthesis=syn)
    return synthesis.validation_set(splits.val, cfg, show_progress=show_progress)


def split_counts(index: pd.DataFrame) -> pd.DataFrame:
    """Image counts per split and defect type (rows) with label, from a resolved index.

    Example:
        >>> idx = pd.DataFrame({"split": ["train", "test", "test"], "defect_type": ["good", "good", "hole"],
        ...                     "label": [0, 0, 1]})
        >>> split_counts(idx).values.tolist()
        [['test', 'good', 0, 1], ['test', 'hole', 1, 1], ['train', 'good', 0, 1]]
    """
    return (
        index.groupby(["split", "defect_type", "label"])
        .size()
        .rename("images")
        .reset_index()
        .sort_values(["split", "label", "defect_type"])
        .reset_index(drop=True)
    )


def image_statistics(dataset, max_images: int = 64) -> pd.DataFrame:
    """Per-channel mean and std (in [0, 1] pixel units) and image size over up to ``max_images`` images."""
    from mudenet_core.data import denormalize

    n = min(len(dataset), max_images)
    assert n > 0, "image_statistics: empty dataset"
    x = torch.stack([dataset[i]["image"] for i in range(n)])  # (n, 3, H, W)
    x = denormalize(x) if getattr(dataset, "normalize", True) else x
    return pd.DataFrame(
        {
            "channel": ["R", "G", "B"],
            "mean": x.mean(dim=(0, 2, 3)).tolist(),
            "std": x.std(dim=(0, 2, 3)).tolist(),
            "images": n,
            "height": x.shape[-2],
            "width": x.shape[-1],
        }
    )


def mask_coverage(dataset) -> pd.DataFrame:
    """Fraction of anomalous pixels per image (columns defect_type, label, mask_fraction)."""
    rows = []
    for i in range(len(dataset)):
        it = dataset[i]
        rows.append(
            {
                "defect_type": it["defect_type"],
                "label": int(it["label"]),
                "mask_fraction": float(it["mask"].mean()),
            }
        )
    return pd.DataFrame(rows, columns=["defect_type", "label", "mask_fraction"])


def stack_items(dataset, indices: Sequence[int]) -> dict[str, Any]:
    """Images (n, 3, H, W), masks (n, 1, H, W), labels, defect types and paths of some dataset items."""
    items = [dataset[int(i)] for i in indices]
    return {
        "image": torch.stack([it["image"] for it in items]) if items else torch.empty(0, 3, 1, 1),
        "mask": torch.stack([it["mask"] for it in items]) if items else torch.empty(0, 1, 1, 1),
        "label": [int(it["label"]) for it in items],
        "defect_type": [it["defect_type"] for it in items],
        "path": [it["path"] for it in items],
    }


def pick_examples(index: pd.DataFrame, k: int = 2) -> list[int]:
    """Positions (within the test split) of up to ``k`` images per defect type, good first."""
    test = index[index["split"] == "test"].reset_index(drop=True)
    out: list[int] = []
    for _, grp in test.groupby("defect_type", sort=False):
        out.extend(grp.index[:k].tolist())
    return sorted(out, key=lambda i: (test.loc[i, "label"], test.loc[i, "defect_type"], i))


# ------------------------------------------------------------------------------------------------------------
# Configs, fitting, evaluation
# ------------------------------------------------------------------------------------------------------------
def method_config(
    method: str,
    profile: str,
    *,
    image_size: int | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
):
    """A method's profile config (``configs/<method>/<profile>.yaml``) with overrides; sets ``image_size``."""
    from mudenet_core import methods

    cfg = methods.load_config(method, profile, overrides=overrides)
    if image_size is not None and "image_size" in cfg.field_names() and cfg.image_size != image_size:
        cfg = cfg.replace(image_size=image_size)
    return cfg


def fit_or_load(
    method: str,
    config,
    splits,
    run: Run,
    *,
    generator: torch.Generator,
    device: torch.device,
    reuse: bool = True,
    resume: bool | None = None,
    name: str | None = None,
    show_progress: bool = False,
    callback=None,
    detector=None,
    val_set=None,
    threshold_config=None,
):
    """Load ``<run>/checkpoints/<name>/model.pt`` when ``reuse`` and it exists, else fit and save it.

    With ``val_set`` (see :func:`build_validation`), the fitted detector is then scored on the validation
    set, whose metrics are saved under ``eval/<method>/val/``, and the decision threshold is chosen on it
    (``threshold.json`` beside ``model.pt``). That is part of the fit: a deployment needs it before its first
    prediction, so ``fit_s`` counts it, as it counts a distillation run earlier by ``10_distillation``.

    Args:
        method: registry name.
        config: the method's config.
        splits: the category's splits (fit on ``train``, calibrate on ``val``).
        run: the run (output folder).
        generator: the only source of randomness of the fit.
        device: where to fit.
        reuse: load an existing ``model.pt`` instead of fitting.
        resume: continue from ``checkpoints/<name>/last.pt`` when it exists (default: ``reuse``); MuDeNet's
            training notebook resumes from the distilled teacher this way.
        name: checkpoint folder name (default: ``method``), e.g. ``mudenet_z16`` for an ablation.
        show_progress: progress bars while fitting.
        callback: MuDeNet only: ``callback(stage, step, losses)`` after every step.
        detector: an unfitted detector to fit (default: a new one built from ``config``), e.g. one a callback
            already holds.
        val_set: the synthetic-anomaly validation set (None: no threshold, no validation metrics).
        threshold_config: :class:`~mudenet_core.harness.ThresholdConfig` (default: its defaults).

    Returns:
        (detector, info) where info holds ``log`` (the fit log), ``fit_s`` (every stage), ``stages_s``
        (``distill_s``, ``train_s``, ``calibration_s``), ``config_hash``, ``loaded`` and, with ``val_set``,
        ``threshold`` and ``validation`` (its metrics).
    """
    from mudenet_core import harness, methods

    det_cls, _ = methods.get_method(method)
    ckpt_dir = run.checkpoint_dir(name or method)
    model_path, log_path = ckpt_dir / "model.pt", ckpt_dir / "fit_log.json"
    key = _fit_key(config, val_set, threshold_config)
    if reuse and model_path.is_file() and log_path.is_file():
        info = io.load_json(log_path)
        same_validation = val_set is None or info.get("fit_key") == key
        if info.get("config_hash") == config.config_hash() and same_validation:
            det = det_cls.load(model_path, device=device)
            return det, _tracked({**info, "loaded": True}, method, config, splits, run, name)
        print(f"{model_path}: made with another config or validation set; fitting again")
    det = detector if detector is not None else det_cls(config)
    kwargs = {"callback": callback} if callback is not None else {}
    resume = reuse if resume is None else resume
    prior_s = _prior_distill_s(ckpt_dir) if resume else 0.0
    t0 = time.perf_counter()
    fit = functools.partial(det.fit, methods.training_split(det_cls, splits), splits.val, generator=generator,
                            device=device, show_progress=show_progress, checkpoint_dir=ckpt_dir, **kwargs)
    try:
        log = fit(resume=resume)
    except io.CheckpointError as e:  # a resume checkpoint from another config: start afresh
        print(f"cannot resume ({e}); fitting from scratch")
        prior_s = 0.0
        log = fit(resume=False)
    train_s = time.perf_counter() - t0
    det.save(model_path)
    info: dict[str, Any] = {"log": log, "config_hash": config.config_hash(), "fit_key": key}
    stages = {"distill_s": prior_s, "train_s": train_s, "calibration_s": 0.0}
    if val_set is not None:
        tcfg = threshold_config or harness.ThresholdConfig()
        t0 = time.perf_counter()
        val_result, threshold = harness.calibrate_threshold(det, val_set, cfg=tcfg, device=device)
        stages["calibration_s"] = time.perf_counter() - t0
        harness.save_calibration(val_result, threshold, tcfg, threshold_dir=ckpt_dir,
                                 eval_dir=run.eval_dir(method) / "val", model_path=model_path, config=config,
                                 extra={"git_sha": run.git_sha})
        info["threshold"] = threshold
        info["threshold_config"] = tcfg.to_dict()
        info["validation"] = {k: v for k, v in val_result.metrics.items() if k != "images_per_s"}
    info["stages_s"] = stages
    info["fit_s"] = float(sum(stages.values()))
    io.save_json(log_path, info)
    return det, _tracked({**info, "loaded": False}, method, config, splits, run, name)


def _tracked(info: dict[str, Any], method: str, config, splits, run: Run, name: str | None) -> dict[str, Any]:
    """``info`` plus ``tracking_run_id``: the fit's MLflow run (:mod:`mudenet_core.tracking`) or None."""
    run_id = tracking.track_workbook_fit(method, config, splits, run, name=name, info=info)
    return {**info, "tracking_run_id": run_id}


def _fit_key(config, val_set, threshold_config) -> str:
    """What a finished fit depends on besides the config: the validation set and the threshold rule."""
    import hashlib
    import json

    parts = {"config": config.config_hash()}
    if val_set is not None:
        cfg = getattr(val_set, "cfg", None)
        parts["validation"] = cfg.config_hash() if hasattr(cfg, "config_hash") else str(len(val_set))
        parts["n"] = len(val_set)
        parts["threshold"] = threshold_config.config_hash() if threshold_config is not None else "default"
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _prior_distill_s(ckpt_dir: Path) -> float:
    """Wall time of a distillation that an earlier step left in ``ckpt_dir`` for this fit to resume from."""
    log_path, last = ckpt_dir / "distill_log.json", ckpt_dir / "last.pt"
    if not (log_path.is_file() and last.is_file()):
        return 0.0
    try:
        stage = io.load_checkpoint(last).get("stage")
    except io.CheckpointError:
        return 0.0
    return float(io.load_json(log_path).get("wall_s", 0.0)) if stage == "train" else 0.0


def load_fitted(method: str, run: Run, *, device: torch.device, name: str | None = None):
    """A detector fitted by an earlier notebook, and its fit info; the error names the missing file."""
    from mudenet_core import methods

    det_cls, _ = methods.get_method(method)
    ckpt_dir = run.checkpoint_dir(name or method)
    model_path, log_path = ckpt_dir / "model.pt", ckpt_dir / "fit_log.json"
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path} not found: run the training notebook for {method!r} first (same OUT_DIR)"
        )
    info = io.load_json(log_path) if log_path.is_file() else {"log": {}, "fit_s": float("nan")}
    return det_cls.load(model_path, device=device), {**info, "loaded": True}


def distill_mudenet(
    config,
    splits,
    run: Run,
    *,
    generator: torch.Generator,
    device: torch.device,
    reuse: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Stage 1 only: distil MuDeNet's teacher; the state is left in ``<run>/checkpoints/mudenet/last.pt``.

    :meth:`MuDeNet.distill` stops before stage 2; :func:`fit_or_load` resumes from that checkpoint.

    Returns:
        the distillation log (``step``, ``L_dist``, ``time_s``, ...), also saved as ``distill_log.json``.
    """
    from mudenet_core.mudenet import RESUME_KEYS, MuDeNet

    ckpt_dir = run.checkpoint_dir("mudenet")
    log_path = ckpt_dir / "distill_log.json"
    last = ckpt_dir / MuDeNet.CHECKPOINT_NAME
    if reuse and last.is_file():
        try:  # reuse or resume only a checkpoint of this config (training settings too: stage 2 resumes it)
            io.load_checkpoint(last, expected_config=config, keys=RESUME_KEYS)
        except io.CheckpointError as e:
            print(f"{e}; distilling again")
            reuse = False
        if reuse and log_path.is_file():
            return io.load_json(log_path)

    t0 = time.perf_counter()
    MuDeNet(config).distill(splits.train, generator=generator, device=device, show_progress=show_progress,
                            checkpoint_dir=ckpt_dir, resume=reuse)
    ckpt = io.load_checkpoint(ckpt_dir / MuDeNet.CHECKPOINT_NAME)
    log = dict(ckpt["log"].get("distill", {}))
    log["wall_s"] = time.perf_counter() - t0
    io.save_json(log_path, log)
    return log


def log_frame(log: dict[str, Any], keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The per-step part of a training log as a DataFrame (``step`` plus the per-step loss columns)."""
    n = len(log.get("step", []))
    cols = {
        k: v
        for k, v in log.items()
        if isinstance(v, list) and len(v) == n and (keys is None or k in keys or k == "step")
    }
    return pd.DataFrame(cols)


def evaluate_method(
    det,
    method: str,
    splits,
    run: Run,
    *,
    device: torch.device,
    config,
    fit_info: dict | None = None,
    save_maps: bool = True,
):
    """Evaluate on the test split (once), save ``eval/<method>/`` and the tidy ``metrics``/``timings`` tables.

    The tidy metrics hold both splits: ``split="val"`` rows are the validation metrics recorded at fit time
    (``fit_info["validation"]``), ``split="test"`` rows the test metrics, plus, when the fit chose a
    threshold on validation, what a deployment gets at that threshold (``*_at_threshold``) beside the
    oracle ``f1_max``.

    Returns:
        (EvalResult, tidy metrics DataFrame).
    """
    from mudenet_core import harness

    fit_info = fit_info or {}
    result = harness.evaluate(det, splits.test, device=device, show_progress=False)
    threshold = fit_info.get("threshold")
    if threshold is not None:
        result.metrics.update(harness.deployment_metrics(result.scores["label"], result.scores["score"],
                                                         threshold))
    h = config.config_hash()
    harness.save_evaluation(
        result,
        run.eval_dir(method),
        config=config,
        extra={"git_sha": run.git_sha, "config_hash": h, "split": "test",
               "torch_threads": torch.get_num_threads()},  # results depend on the thread count
        save_maps=save_maps,
    )
    quality = {k: v for k, v in result.metrics.items() if k != "images_per_s"}
    frames = [run.tidy(quality, method=method, config_hash=h, split="test")]
    if fit_info.get("validation"):
        frames.insert(0, run.tidy(fit_info["validation"], method=method, config_hash=h, split="val"))
    tidy = pd.concat(frames, ignore_index=True)
    io.save_csv(run.table(f"metrics_{method}.csv"), tidy)
    timings = {"images_per_s": result.metrics.get("images_per_s", float("nan"))}
    if fit_info:
        timings["fit_s"] = fit_info.get("fit_s", float("nan"))
        timings.update(fit_info.get("stages_s") or {})
    io.save_csv(run.table(f"timings_{method}.csv"),
                run.tidy(timings, method=method, config_hash=h, split="test"))
    tracking.track_workbook_evaluation(method, run, metrics=quality, fit_info=fit_info)  # MLflow
    return result, tidy


def per_defect_auroc(scores: pd.DataFrame) -> pd.DataFrame:
    """Image AUROC of the good test images against each defect type (defect_type, images, image_auroc).

    Example:
        >>> df = pd.DataFrame({"defect_type": ["good", "good", "a", "b"], "label": [0, 0, 1, 1],
        ...                    "score": [0.1, 0.3, 0.2, 0.9]})
        >>> per_defect_auroc(df).values.tolist()
        [['a', 1, 0.5], ['b', 1, 1.0]]
    """
    from mudenet_core import metrics

    good = scores[scores["label"] == 0]
    rows = []
    for dtype, grp in scores[scores["label"] == 1].groupby("defect_type", sort=True):
        y = np.r_[np.zeros(len(good)), np.ones(len(grp))]
        s = np.r_[good["score"].to_numpy(), grp["score"].to_numpy()]
        rows.append({"defect_type": dtype, "images": len(grp), "image_auroc": metrics.image_auroc(y, s)})
    return pd.DataFrame(rows, columns=["defect_type", "images", "image_auroc"])


def outputs_exist(*paths: str | Path) -> bool:
    """True when every path exists (a notebook cell uses it to skip finished work)."""
    return all(Path(p).exists() for p in paths)
