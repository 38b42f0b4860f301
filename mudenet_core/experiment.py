"""The thin orchestration the notebooks call: splits, fit-or-load, evaluate, tidy outputs, ablations.

A *run* is one (dataset, category, seed) and owns one output folder (``OUT_DIR`` of the notebooks)::

    <run>/splits/<dataset>_<category>.csv        resolved index (which images were used)
    <run>/checkpoints/<name>/model.pt            fitted detector (+ fit_log.json, last.pt while training)
    <run>/checkpoints/<name>/threshold.json      decision threshold chosen on the validation set
    <run>/eval/<method>/{metrics.json, scores.csv, maps.npy}        test split (read once, final report)
    <run>/eval/<method>/val/{metrics.json, scores.csv, maps.npy}    validation set (every choice)
    <run>/tables/metrics_<method>.csv            tidy: method, dataset, category, seed, split, metric, value, ...
    <run>/tables/timings_<method>.csv            tidy timings (fit_s = distill_s + train_s + calibration_s)
    <run>/tables/ablations.csv                   tidy, with ``ablation`` and ``variant`` columns
    <run>/figures/*.png

Everything is written atomically and every step is skippable: with ``reuse=True`` a detector whose
checkpoint exists is loaded instead of refitted. Each tidy row carries the config hash and the git SHA.

The protocol: the *validation set* (:func:`build_validation`) is the held-out normal training images plus
synthetic anomalies made on them (:mod:`mudenet_core.data.synthesis`); normalisation statistics, the
decision threshold and every selection use it. The test split is scored once, by :func:`evaluate_method`.
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

from mudenet_core import io, report
from mudenet_core.report import show_figure  # noqa: F401  (re-exported for the notebooks)
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
        if info.get("config_hash") == config.config_hash() and (val_set is None or info.get("fit_key") == key):
            det = det_cls.load(model_path, device=device)
            return det, {**info, "loaded": True}
        print(f"{model_path}: made with another config or validation set; fitting again")
    det = detector if detector is not None else det_cls(config)
    kwargs = {"callback": callback} if callback is not None else {}
    resume = reuse if resume is None else resume
    prior_s = _prior_distill_s(ckpt_dir) if resume else 0.0
    train_ds = splits.train
    if getattr(det_cls, "TRAINING_FREE", False) and hasattr(train_ds, "without_augment"):
        train_ds = train_ds.without_augment()  # PaDiM, PatchCore: fitted on the images as they are
    t0 = time.perf_counter()
    fit = functools.partial(det.fit, train_ds, splits.val, generator=generator, device=device,
                            show_progress=show_progress, checkpoint_dir=ckpt_dir, **kwargs)
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
        labels = val_result.scores["label"].to_numpy()
        harness.save_threshold(ckpt_dir, threshold, tcfg, n_normal=int((labels == 0).sum()),
                               n_anomalous=int((labels == 1).sum()))
        harness.save_evaluation(val_result, run.eval_dir(method) / "val", config=config,
                                extra={"git_sha": run.git_sha, "split": "val", "threshold": threshold})
        info["threshold"] = threshold
        info["threshold_config"] = tcfg.to_dict()
        info["validation"] = {k: v for k, v in val_result.metrics.items() if k != "images_per_s"}
    info["stages_s"] = stages
    info["fit_s"] = float(sum(stages.values()))
    io.save_json(log_path, info)
    return det, {**info, "loaded": False}


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


def teacher_and_target(det, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Distillation target E and the teacher's level maps for some images (for display).

    Rebuilds E as :meth:`MuDeNet.fit` does (same backbone, the stored channel indices and channel statistics)
    and resizes it to the teacher's grid (bilinear), where the distillation loss compares them.

    Returns:
        targets (B, C, h, w) and S x (B, C, h, w) teacher maps.
    """
    import torch.nn.functional as F

    from mudenet_core import train

    cfg, nets = det.config, det.nets
    backbone, layers = det.distillation_backbone()
    feats = train.backbone_features(backbone, layers, images, batch_size=cfg.eval_batch_size,
                                    channel_idx=nets.channel_idx.cpu())  # (B, C, h1, w1)
    targets, _, _ = train.distillation_targets(feats, nets.target_mean.cpu(), nets.target_std.cpu())
    nets.eval()
    with torch.no_grad():
        teacher = [t.cpu() for t in nets.teacher(images.to(det.device))]  # S x (B, C, h, w)
    if targets.shape[-2:] != teacher[0].shape[-2:]:
        targets = F.interpolate(targets, size=teacher[0].shape[-2:], mode="bilinear", align_corners=False)
    return targets, teacher


def load_distilled(run: Run, device: torch.device):
    """The MuDeNet with the distilled teacher from ``<run>/checkpoints/mudenet/last.pt`` (any stage)."""
    from mudenet_core.mudenet import MuDeNet, MuDeNetConfig

    ckpt = io.load_checkpoint(run.checkpoint_dir("mudenet") / MuDeNet.CHECKPOINT_NAME)
    det = MuDeNet(MuDeNetConfig.from_dict(ckpt["config"]))
    det.nets.load_state_dict(ckpt["state_dict"])
    det.device = torch.device(device)
    det.nets.to(det.device).eval()
    return det


def teacher_target_figure(
    targets: torch.Tensor, teacher: Sequence[torch.Tensor], *, channel: int = 0, panel_size: float = 2.0
):
    """One row per image: target E[channel] | teacher level 1..S [channel], each on its own colour scale.

    Args:
        targets: (B, C, h, w) distillation targets.
        teacher: S x (B, C, h, w) teacher level maps.
        channel: descriptor channel to show.
        panel_size: inches per panel.
    """
    from matplotlib.figure import Figure

    b, s = targets.shape[0], len(teacher)
    fig = Figure(figsize=(panel_size * (s + 1), panel_size * b), layout="constrained")
    axes = np.atleast_2d(fig.subplots(b, s + 1, squeeze=False))
    for i in range(b):
        panels = [("target E", targets[i, channel])] + [
            (f"teacher level {j + 1}", teacher[j][i, channel]) for j in range(s)
        ]
        for ax, (title, m) in zip(axes[i], panels, strict=True):
            ax.imshow(m.numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{title} (ch {channel})", fontsize=8)
    return fig


class MapSnapshots:
    """A MuDeNet fit callback that records raw structural and logical maps of a few images during training.

    Every ``every`` steps of stage 2 it runs the networks on ``images`` (B, 3, H, W) and keeps the level-mean
    raw maps (B, 2, h, w); the networks' train/eval modes are restored afterwards.
    """

    def __init__(self, det, images: torch.Tensor, every: int):
        assert images.ndim == 4, f"expected (B,3,H,W), got {tuple(images.shape)}"
        self.det, self.images, self.every = det, images, max(1, int(every))
        self.steps: list[int] = []
        self.maps: list[np.ndarray] = []

    def __call__(self, stage: str, step: int, losses: dict[str, float]) -> None:
        """Record at steps 1, every, 2*every, ... of stage "train"."""
        if stage != "train" or (step != 1 and step % self.every != 0):
            return
        nets = self.det.nets
        modes = {m: m.training for m in nets.modules()}
        device = next(nets.parameters()).device
        with torch.no_grad():
            nets.eval()
            x, s1, a, s2 = nets(self.images.to(device))
            from mudenet_core import scoring

            raw = scoring.raw_maps(x, s1, a, s2).mean(dim=2)  # (B, 2, S, h, w) -> (B, 2, h, w)
        for m, t in modes.items():
            m.train(t)
        self.steps.append(int(step))
        self.maps.append(raw.cpu().numpy())

    def save(self, path: str | Path) -> Path:
        """Write ``steps`` (T,) and ``maps`` (T, B, 2, h, w) as ``.npz`` atomically."""
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f, steps=np.array(self.steps), maps=np.stack(self.maps) if self.maps else np.zeros(0)
                )
        return Path(path)


def snapshot_figure(steps: np.ndarray, maps: np.ndarray, image: int = 0, panel_size: float = 1.8):
    """Raw structural (top) and logical (bottom) maps of one image across training steps.

    Args:
        steps: (T,) training steps.
        maps: (T, B, 2, h, w) from :class:`MapSnapshots`.
        image: which of the B images.
        panel_size: inches per panel.
    """
    from matplotlib.figure import Figure

    t = len(steps)
    assert t > 0 and maps.ndim == 5, f"expected (T, B, 2, h, w) snapshots, got {maps.shape}"
    fig = Figure(figsize=(panel_size * t, panel_size * 2), layout="constrained")
    axes = fig.subplots(2, t, squeeze=False)
    for j in range(t):
        for r, name in enumerate(("structural", "logical")):
            ax = axes[r, j]
            ax.imshow(maps[j, image, r], cmap="jet")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {int(steps[j])}", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    return fig


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
        extra={"git_sha": run.git_sha, "config_hash": h, "split": "test"},
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


# ------------------------------------------------------------------------------------------------------------
# Ablations by re-scoring (no retraining)
# ------------------------------------------------------------------------------------------------------------
def raw_components(det, dataset) -> torch.Tensor:
    """MuDeNet's raw per-level, per-branch maps for a whole dataset: (N, 2, S, h, w) on CPU."""
    bs = det.config.eval_batch_size
    out = []
    for i in range(0, len(dataset), bs):
        batch = torch.stack([dataset[j]["image"] for j in range(i, min(i + bs, len(dataset)))])
        out.append(det.predict_components(batch).cpu())
    return torch.cat(out)


def rescore(
    raw_val: torch.Tensor,
    raw_test: torch.Tensor,
    scoring_config,
    image_size: int,
    labels: np.ndarray,
    masks: np.ndarray,
    batch_size: int = 16,
) -> dict[str, float]:
    """Calibrate ``scoring_config`` on the validation raw maps, score the test raw maps, compute the metrics.

    Equivalent to ``det.calibrate(val, scoring_config)`` followed by ``predict`` on the test set, but it
    reuses the networks' outputs, so a whole ablation grid costs one forward pass per image.
    """
    from mudenet_core import metrics, scoring

    stats = scoring.map_statistics(raw_val, scoring_config)
    maps, scores = [], []
    for i in range(0, raw_test.shape[0], batch_size):
        amap = scoring.anomaly_map(
            raw_test[i : i + batch_size], stats, scoring_config, image_size
        )  # (b, 1, H, W)
        maps.append(amap[:, 0].numpy())
        scores.append(scoring.image_scores(amap).double().numpy())
    return metrics.summary_metrics(labels, np.concatenate(scores), masks, np.concatenate(maps))


def scoring_variants(
    base,
    *,
    branches: Sequence[str] = (),
    level_sets: Sequence[Sequence[int]] = (),
    normalizations: Sequence[str] = (),
    blur_sigmas: Sequence[float] = (),
) -> list[tuple]:
    """One-factor-at-a-time variants of a :class:`~mudenet_core.scoring.ScoringConfig`.

    Args:
        base: the trained model's scoring config (every variant changes one factor of it).
        branches: any of "both", "structural", "logical".
        level_sets: 1-based level tuples, e.g. ``[[1], [1, 2], [1, 2, 3]]``.
        normalizations: any of "minmax", "quantile", "none".
        blur_sigmas: Gaussian sigmas in input pixels.

    Returns:
        ``[(ablation, variant, ScoringConfig), ...]``.

    Example:
        >>> from mudenet_core.scoring import ScoringConfig
        >>> variants = scoring_variants(ScoringConfig(), branches=["structural"], blur_sigmas=[0])
        >>> [(a, v) for a, v, _ in variants]
        [('branches', 'structural'), ('blur_sigma', '0')]
    """
    out = []
    for b in branches:
        flags = {"both": (True, True), "structural": (True, False), "logical": (False, True)}
        if b not in flags:
            raise ValueError(f"unknown branch variant {b!r}; choose from {', '.join(flags)}")
        out.append(("branches", b, base.replace(use_structural=flags[b][0], use_logical=flags[b][1])))
    for levels in level_sets:
        out.append(("levels", ",".join(str(int(v)) for v in levels), base.replace(levels=tuple(levels))))
    for n in normalizations:
        out.append(("normalization", str(n), base.replace(normalization=n)))
    for s in blur_sigmas:
        out.append(("blur_sigma", f"{float(s):g}", base.replace(blur_sigma=float(s))))
    return out


def run_scoring_ablations(
    det, splits, run: Run, variants: Sequence[tuple], *, method: str = "mudenet", config_hash: str = "",
    val_set=None,
) -> pd.DataFrame:
    """Evaluate every scoring variant by re-scoring; return the tidy ablation rows.

    Each variant re-fits the normalisation statistics on the normal validation images, then scores the
    synthetic-anomaly validation set (``split="val"``, when ``val_set`` is given: the numbers a choice may
    use) and the test split (``split="test"``: reported as ablations, never used to choose).
    """
    raw_val = raw_components(det, splits.val)
    targets = []
    if val_set is not None:
        targets.append(("val", val_set))
    targets.append(("test", splits.test))
    prepared = []
    for split, ds in targets:
        items = [ds[i] for i in range(len(ds))]
        labels = np.array([int(it["label"]) for it in items])
        masks = np.stack([(it["mask"][0] > 0.5).numpy().astype(np.uint8) for it in items])
        prepared.append((split, raw_components(det, ds), labels, masks))
    size = int(det.config.image_size)
    frames = []
    for ablation, variant, scfg in variants:
        for split, raw, labels, masks in prepared:
            m = rescore(raw_val, raw, scfg, size, labels, masks)
            frames.append(run.tidy(m, method=method, config_hash=config_hash or scfg.config_hash(),
                                   split=split, ablation=ablation, variant=variant))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=report.ABLATION_COLUMNS)
    return df[report.ABLATION_COLUMNS]
