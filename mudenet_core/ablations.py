"""MuDeNet ablations by re-scoring: new scoring configs on cached network outputs, no retraining.

The networks run once per image (:func:`raw_components`); each variant of the scoring config
(:func:`scoring_variants`, one factor at a time) re-fits the normalisation statistics on the normal validation
images and scores the cached maps (:func:`rescore`). :func:`run_scoring_ablations` returns the tidy ablation
rows (:data:`mudenet_core.report.ABLATION_COLUMNS`) the ablation notebook saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from mudenet_core import report

if TYPE_CHECKING:
    from mudenet_core.experiment import Run


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
