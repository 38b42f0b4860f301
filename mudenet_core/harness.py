"""One evaluation harness for every method: score a test set, compute the metrics, save tidy outputs.

Example (any registered detector)::

    val = evaluate(detector, validation_set, device=dev)      # normal + synthetic anomalies (choices)
    threshold = choose_threshold(val.scores["label"], val.scores["score"], ThresholdConfig())
    result = evaluate(detector, splits.test, device=dev)      # read once, for the final report
    labels, scores = result.scores["label"], result.scores["score"]
    result.metrics["image_auroc"], deployment_metrics(labels, scores, threshold)
    save_evaluation(result, out_dir / "mudenet" / category)

Thresholds never come from test data: :func:`choose_threshold` uses the validation scores only, either a
quantile of the normal validation images' scores (default: the 0.99 quantile, i.e. about 1 % false alarms if
the validation normals are representative) or the F1-optimal threshold on the synthetic validation anomalies.
The threshold is saved next to the model (``threshold.json``, with the SHA-256 of the model file it was
chosen for and a fixed heat-map range from the validation maps, :func:`map_normalization`) and used by
``predict``, the classification report and the "at threshold" test metrics, which are what a deployment
gets; ``f1_max`` on the test split is the oracle, reported beside them under its own name. A record whose
hash does not match the model file (a model trained again since) is refused (:func:`load_calibration`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from mudenet_core import metrics
from mudenet_core.config import ConfigBase, bounded
from mudenet_core.io import file_sha256, load_json, save_csv, save_json, save_npy
from mudenet_core.utils import progress


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: metric name -> value (image_auroc, pixel_auroc, au_pro, image_aupr, f1_max, f1_threshold,
            images_per_s; au_spro_* for MVTec LOCO).
        scores: one row per test image: image_path, category, defect_type, label, score.
        maps: anomaly maps (N, H, W) float32, in the order of ``scores``.
        masks: ground-truth masks (N, H, W) uint8 in {0, 1}.
    """

    metrics: dict[str, float]
    scores: pd.DataFrame
    maps: np.ndarray
    masks: np.ndarray


@torch.no_grad()
def predict_dataset(detector: Any, dataset: Dataset, *, batch_size: int = 8,
                    device: torch.device | str = "cpu", num_workers: int = 0, show_progress: bool = True,
                    desc: str = "predict"):
    """Run ``detector.predict`` over a dataset.

    Returns:
        maps (N, H, W) float32, scores (N,) float64, masks (N, H, W) uint8, rows (list of per-image metadata),
        and the wall time spent in ``predict`` (seconds).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    maps, scores, masks, rows = [], [], [], []
    t_pred = 0.0
    for batch in progress(loader, desc=desc, enabled=show_progress):
        images = batch["image"].to(device)  # (B, 3, H, W)
        t0 = time.perf_counter()
        amap, score = detector.predict(images)  # (B, 1, H, W), (B,)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        t_pred += time.perf_counter() - t0
        assert amap.ndim == 4 and amap.shape[1] == 1, f"expected map (B,1,H,W), got {tuple(amap.shape)}"
        assert amap.shape[-2:] == images.shape[-2:], "anomaly map must be upsampled to the input size"
        maps.append(amap[:, 0].float().cpu().numpy())
        scores.append(score.double().cpu().numpy())
        masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
        for i in range(images.shape[0]):
            rows.append({k: (batch[k][i] if isinstance(batch[k], list) else batch[k][i].item())
                         for k in ("path", "category", "defect_type", "label")})
    return (np.concatenate(maps), np.concatenate(scores), np.concatenate(masks), rows, t_pred)


def evaluate(detector: Any, dataset: Dataset, *, batch_size: int = 8, device: torch.device | str = "cpu",
             max_fpr: float = 0.3, num_workers: int = 0, show_progress: bool = True) -> EvalResult:
    """Score every test image and compute the harness metrics.

    Args:
        detector: a fitted detector (see :mod:`mudenet_core.methods`).
        dataset: a test split yielding ``image``, ``label``, ``mask``, ``path``, ``category``,
            ``defect_type``.
        batch_size: images per ``predict`` call.
        device: where the images go (the detector must already be there).
        max_fpr: FPR integration limit of AU-PRO (0.3 as in the MVTec AD protocol).
        num_workers: DataLoader workers.
        show_progress: show a progress bar.
    """
    maps, scores, masks, rows, t_pred = predict_dataset(
        detector, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
        show_progress=show_progress, desc="evaluate")
    df = pd.DataFrame(rows).rename(columns={"path": "image_path"})
    df["score"] = scores
    labels = df["label"].to_numpy()
    m = metrics.summary_metrics(labels, scores, masks, maps, max_fpr=max_fpr)
    m["images_per_s"] = float(len(df) / t_pred) if t_pred > 0 else float("nan")
    if hasattr(dataset, "spro_regions"):  # MVTec LOCO: per-defect saturation
        m.update(metrics.au_spro_all(dataset.spro_regions(), maps))
    return EvalResult(metrics=m, scores=df, maps=maps, masks=masks)


def save_evaluation(result: EvalResult, out_dir: str | Path, *, config: Any = None,
                    extra: dict | None = None, save_maps: bool = True) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.csv`` (tidy), ``scores.csv`` and ``maps.npy`` atomically."""
    out_dir = Path(out_dir)
    info = {"metrics": result.metrics, "config": config.to_dict() if hasattr(config, "to_dict") else config,
            **(extra or {})}
    paths = {"metrics_json": save_json(out_dir / "metrics.json", info)}
    tidy = pd.DataFrame([{"metric": k, "value": v} for k, v in result.metrics.items()])
    paths["metrics_csv"] = save_csv(out_dir / "metrics.csv", tidy)
    paths["scores_csv"] = save_csv(out_dir / "scores.csv", result.scores)
    if save_maps:
        paths["maps"] = save_npy(out_dir / "maps.npy", result.maps.astype(np.float16))
    return paths


# ------------------------------------------------------------------------------------------------------------
# Thresholds chosen on validation data
# ------------------------------------------------------------------------------------------------------------
THRESHOLD_FILE = "threshold.json"


@dataclasses.dataclass(frozen=True)
class ThresholdConfig(ConfigBase):
    """How the decision threshold is chosen on the validation set (never on test data)."""

    mode: Literal["normal_quantile", "f1_synthetic"] = "normal_quantile"  # see choose_threshold
    # normal_quantile: this quantile of the normal validation scores (linear interp.)
    quantile: float = bounded(0.99, gt=0, le=1)



def choose_threshold(labels, scores, cfg: ThresholdConfig = ThresholdConfig()) -> float:
    """A decision threshold (``score >= threshold`` is anomalous) from validation labels and scores.

    Args:
        labels: (N,) 0 for normal validation images, 1 for synthetic anomalies.
        scores: (N,) image scores.
        cfg: ``normal_quantile`` (needs normal images) or ``f1_synthetic`` (needs both classes).

    Example:
        >>> choose_threshold([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9], ThresholdConfig(quantile=0.5))
        0.2
        >>> choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], ThresholdConfig(mode="f1_synthetic"))
        0.35
    """
    y = np.asarray(labels).astype(int).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"choose_threshold: {y.size} labels for {s.size} scores")
    if cfg.mode == "normal_quantile":
        normal = s[y == 0]
        if normal.size == 0:
            raise metrics.MetricError("choose_threshold: no normal validation image to take a quantile of")
        return float(np.quantile(normal, cfg.quantile))
    _, thr = metrics.f1_max(y, s)
    return float(thr)


def deployment_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """Test metrics at a threshold chosen beforehand: ``threshold`` and ``<metric>_at_threshold``.

    The metrics are accuracy, precision, recall and F1 (:func:`mudenet_core.metrics.threshold_metrics`).

    Example:
        >>> deployment_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.35)["f1_at_threshold"]
        0.8
    """
    m = metrics.threshold_metrics(labels, scores, threshold)
    return {"threshold": float(threshold), **{f"{k}_at_threshold": float(v) for k, v in m.items()}}


CALIBRATION_FORMAT = 2  # threshold.json: 1 = threshold only; 2 = + model_sha256 and map_normalization
MAP_NORM_Q_LOW = 0.01  # map_normalization "low": this quantile of the normal validation images' map values
MAP_NORM_Q_HIGH = 0.999  # map_normalization "high": this quantile of all validation map values


class CalibrationWarning(UserWarning):
    """A ``threshold.json`` that is ignored: written before model hashes, or chosen for another model."""


def map_normalization(maps, labels, *, q_low: float = MAP_NORM_Q_LOW,
                      q_high: float = MAP_NORM_Q_HIGH) -> dict[str, float]:
    """A fixed display range ``{low, high, q_low, q_high}`` for anomaly maps, from the validation maps.

    ``low`` is the ``q_low`` quantile of the normal validation images' map values: their background, drawn
    in the coolest colour. ``high`` is the ``q_high`` quantile of all validation map values, normal images
    and synthetic anomalies together: the statistic :func:`mudenet_core.viz.map_range` takes over a test set
    (there the minimum stands in for ``low``), here fixed once on validation data, so a heat map depends on
    its own image only. With synthetic anomalies covering more than ``1 - q_high`` of the validation pixels,
    their typical defect saturates the colour scale; with none, the top of the normal maps does.

    Args:
        maps: validation anomaly maps (N, H, W).
        labels: (N,) 0 normal, 1 synthetic anomaly.
        q_low: quantile of the normal maps for ``low`` (all maps when there is no normal image).
        q_high: quantile of all maps for ``high``.

    Example:
        >>> maps = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0)])
        >>> r = map_normalization(maps, [0, 1], q_low=0.0, q_high=1.0)
        >>> r["low"], r["high"]
        (1.0, 3.0)
    """
    a = np.asarray(maps, dtype=np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    assert a.ndim == 3 and a.shape[0] == y.size, f"expected maps (N,H,W) for {y.size} labels, got {a.shape}"
    normal = a[y == 0] if (y == 0).any() else a
    low, high = float(np.quantile(normal, q_low)), float(np.quantile(a, q_high))
    if not high > low:  # constant maps: a non-empty range, as viz.map_range does
        high = low + max(abs(low), 1.0) * 1e-9
    return {"low": low, "high": high, "q_low": float(q_low), "q_high": float(q_high)}


def save_threshold(folder: str | Path, threshold: float, cfg: ThresholdConfig, *, n_normal: int,
                   n_anomalous: int, model_path: str | Path, map_norm: dict | None = None,
                   source: str = "validation") -> Path:
    """Write ``threshold.json``, the calibration record of the model file ``model_path``.

    It holds the threshold, how it was chosen and on how many validation images, the map display range
    (:func:`map_normalization`) and ``model_sha256``, the hash of ``model_path`` as it is now (save the model
    first), so that a record left beside a retrained model is refused by :func:`load_calibration`.
    """
    model_path = Path(model_path)
    return save_json(Path(folder) / THRESHOLD_FILE, {
        "format_version": CALIBRATION_FORMAT,
        "threshold": float(threshold), "source": source, "config": cfg.to_dict(),
        "n_normal": int(n_normal), "n_anomalous": int(n_anomalous),
        "model_file": model_path.name, "model_sha256": file_sha256(model_path),
        "map_normalization": map_norm})


def load_calibration(folder: str | Path, model_path: str | Path | None = None) -> tuple[dict | None, str]:
    """The calibration record (``threshold.json``) of ``folder``, if it was made for the model ``model_path``.

    Args:
        folder: the model folder.
        model_path: the model file it is used with (default: ``folder/model.pt``).

    Returns:
        (record, "") when the record names this model's SHA-256; (None, why) when there is no record, it
        predates model hashes (format 1), or it was chosen for another model (e.g. left beside a model trained
        again since): such a threshold and map range would describe another model's scores.
    """
    path = Path(folder) / THRESHOLD_FILE
    model_path = Path(model_path) if model_path is not None else Path(folder) / "model.pt"
    if not path.is_file():
        return None, f"no {THRESHOLD_FILE} beside the model"
    rec = load_json(path)
    recorded = rec.get("model_sha256") if isinstance(rec, dict) else None
    if not recorded:
        return None, f"{path} predates model hashes, so it cannot be matched to {model_path.name}"
    if not model_path.is_file():
        return None, f"{path}: model file {model_path} not found"
    actual = file_sha256(model_path)
    if actual != recorded:
        return None, (f"{path} was chosen for another model (sha256 {recorded[:12]}, {model_path.name} has "
                      f"{actual[:12]}): stale after retraining")
    return rec, ""


def load_threshold(folder: str | Path, model_path: str | Path | None = None) -> dict | None:
    """The ``threshold.json`` record of a model folder when it belongs to ``model_path``, else None.

    See :func:`load_calibration` (default model: ``folder/model.pt``); a record that exists but is refused
    raises a :class:`CalibrationWarning` saying why.
    """
    rec, why = load_calibration(folder, model_path)
    if rec is None and (Path(folder) / THRESHOLD_FILE).is_file():
        warnings.warn(f"ignoring the threshold: {why}", CalibrationWarning, stacklevel=2)
    return rec


def save_calibration(result: EvalResult, threshold: float, cfg: ThresholdConfig, *, threshold_dir: str | Path,
                     eval_dir: str | Path, model_path: str | Path, config: Any = None,
                     extra: dict | None = None, save_maps: bool = True) -> None:
    """Record a validation calibration: ``threshold.json`` and the validation evaluation.

    ``threshold.json`` goes to ``threshold_dir`` (beside the model) with the map display range of the
    validation maps (:func:`map_normalization`) and the SHA-256 of ``model_path``, which must already hold
    the calibrated model; the evaluation (split "val", with its threshold) goes to ``eval_dir``.
    """
    labels = result.scores["label"].to_numpy()
    save_threshold(threshold_dir, threshold, cfg, n_normal=int((labels == 0).sum()),
                   n_anomalous=int((labels == 1).sum()), model_path=model_path,
                   map_norm=map_normalization(result.maps, labels))
    save_evaluation(result, eval_dir, config=config, save_maps=save_maps,
                    extra={**(extra or {}), "split": "val", "threshold": threshold})


def calibrate_threshold(detector: Any, validation_set: Dataset, *, cfg: ThresholdConfig = ThresholdConfig(),
                        batch_size: int = 8, device: torch.device | str = "cpu",
                        show_progress: bool = False) -> tuple[EvalResult, float]:
    """Score the validation set, compute its metrics and choose the threshold on it.

    Returns:
        (validation EvalResult, threshold).
    """
    result = evaluate(detector, validation_set, batch_size=batch_size, device=device,
                      show_progress=show_progress)
    return result, choose_threshold(result.scores["label"], result.scores["score"], cfg)
