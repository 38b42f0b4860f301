"""Anomaly-detection metrics: image AUROC / AUPR / F1, pixel AUROC, AU-PRO and AU-sPRO.

Every curve here is exact and threshold-free. The curve has a point for every distinct score (all pixels
scoring at least that much are positive), so nothing depends on a threshold grid. Normal-pixel scores are
sorted once with ``np.sort``, anomalous-pixel scores are located in them with ``np.searchsorted``, and
only the curve's vertices are kept. For 200 x 256 x 256 float32 maps, :func:`summary_metrics` took 1 to 3 s
and about 0.16 GiB of extra memory on 2 shared CPU cores.

* **AU-PRO** (MVTec AD) follows the official evaluation code (Bergmann et al., IJCV 2021:
  ``pro_curve_util.py`` and ``generic_util.trapezoid``). Ground-truth regions are the connected components
  of each mask under 8-connectivity (``scipy.ndimage.label`` with a 3x3 ones structure). At a threshold,
  the PRO is the mean over *all* regions of *all* images of the fraction of the region's pixels whose score
  is above the threshold. The FPR is taken over all normal pixels (mask == 0) of all images, anomalous
  images included. The curve is integrated with the trapezoidal rule up to ``max_fpr``; the end point is
  linearly interpolated. The area is then divided by ``max_fpr``, so a perfect map scores 1 and a constant
  map scores ``max_fpr / 2``.
* **AU-sPRO** (MVTec LOCO AD) follows the official evaluation code (Bergmann et al., IJCV 2022:
  ``src/metrics.py``, ``src/image.py`` and ``src/util.py``). Each annotated defect region ``r`` has a
  saturation threshold ``s_r`` in pixels. At a threshold, ``sPRO_r = min(1, TP_r / min(s_r, |r|))``,
  averaged over all regions of all images. As in that code, the FPR is taken over every pixel that lies in
  no region, in every image passed in. That means all pixels of the good images *and* the defect-free
  pixels of the anomalous images, not the good images only. The official script refines its thresholds
  adaptively (``curve_max_distance=0.01``). The exact curve used here is the limit that refinement
  converges to. The official "structural" and "logical" numbers come from calling :func:`au_spro_all` on
  (good + structural) and (good + logical) test images separately; their mean is the "mean" entry.
* **Thresholded metrics** (:func:`f1_max`, :func:`threshold_metrics`, :func:`iou`) predict "anomalous"
  when ``score >= threshold``, the convention of ``sklearn.metrics.precision_recall_curve``. So the
  threshold returned by :func:`f1_max` reproduces its F1 in :func:`threshold_metrics`.

Shapes: labels and image scores (N,); masks and anomaly maps (N, H, W), where (N, 1, H, W) is also
accepted and squeezed. Masks are boolean or take values in {0, 1}. Undefined cases raise
:class:`MetricError`, for example an AUROC with one class only, a PRO with no anomalous pixel, or
non-finite scores. No function returns NaN.

Example:
    >>> import numpy as np
    >>> masks = np.zeros((2, 4, 4), dtype=np.uint8); masks[1, :2, :2] = 1
    >>> maps = masks + 0.1 * np.arange(32).reshape(2, 4, 4) / 32   # anomalous pixels score highest
    >>> au_pro(masks, maps), pixel_auroc(masks, maps)
    (1.0, 1.0)
    >>> summary_metrics(np.array([0, 1]), np.array([0.2, 0.9]), masks, maps)["image_auroc"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

__all__ = [
    "MetricError",
    "image_auroc",
    "image_aupr",
    "f1_max",
    "threshold_metrics",
    "pixel_auroc",
    "pro_curve",
    "au_pro",
    "spro_curve",
    "au_spro",
    "au_spro_all",
    "iou",
    "partial_auc",
    "truncate_curve",
    "summary_metrics",
    "SPRO_LIMITS",
]

SPRO_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)  # MVTec LOCO AD integration limits (MAX_FPRS)

# 8-connectivity within each image, none across images: a (3, 3, 3) structure whose middle slice is all ones.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


class MetricError(ValueError):
    """A metric is undefined for the given input (one class only, no anomalous pixel, NaN scores, ...)."""


# ----------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------
def _labels_scores(labels, scores, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate image labels (N,) in {0, 1} and finite scores (N,); return (bool labels, float64 scores)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise MetricError(f"{name}: labels {y.shape} and scores {s.shape} differ in length")
    if y.size == 0:
        raise MetricError(f"{name}: empty input")
    if not np.isin(y, (0, 1)).all():
        raise MetricError(f"{name}: labels must be 0 (normal) or 1 (anomalous), "
                          f"got values {np.unique(y)[:10]}")
    if not np.isfinite(s).all():
        raise MetricError(f"{name}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y.astype(bool), s


def _both_classes(y: np.ndarray, name: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous" if n_pos else "normal"
        raise MetricError(f"{name} is undefined: all {y.size} labels are {only}; it needs both classes")


def _as_maps(x, name: str, what: str) -> np.ndarray:
    """Return an (N, H, W) array, squeezing an (N, 1, H, W) channel axis."""
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]  # (N, 1, H, W) -> (N, H, W)
    if a.ndim != 3:
        raise MetricError(f"{name}: expected {what} of shape (N, H, W) or (N, 1, H, W), got {a.shape}")
    return a


def _masks_maps(masks, maps, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks (N, H, W) in {0, 1} and finite maps (N, H, W); return (bool masks, float maps)."""
    m = _as_maps(masks, name, "masks")
    a = _as_maps(maps, name, "anomaly maps")
    if m.shape != a.shape:
        raise MetricError(f"{name}: masks {m.shape} and anomaly maps {a.shape} differ in shape")
    if m.size == 0:
        raise MetricError(f"{name}: empty input")
    if m.dtype != bool:
        if not ((m == 0) | (m == 1)).all():
            raise MetricError(f"{name}: masks must be boolean or take values in {{0, 1}} (binarise first, "
                              "e.g. mask > 0.5)")
        m = m.astype(bool)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise MetricError(f"{name}: {int((~np.isfinite(a)).sum())} anomaly-map values are NaN or infinite")
    return m, a


def _check_max_fpr(max_fpr: float, name: str) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise MetricError(f"{name}: max_fpr must lie in (0, 1], got {max_fpr}")
    return max_fpr


# ----------------------------------------------------------------------------------------------------------
# curve machinery
# ----------------------------------------------------------------------------------------------------------
def truncate_curve(x: np.ndarray, y: np.ndarray, max_x: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of a curve with ``x <= max_x``, ending at ``max_x`` with y linearly interpolated there.

    Use it to plot a curve from :func:`pro_curve` up to an FPR limit. Its vertices can lie far apart, so
    dropping the points past the limit would leave the line short of the limit.

    Args:
        x: (K,) non-decreasing, starting at or before ``max_x`` and ending at or after it.
        y: (K,) curve values.
        max_x: where to cut.

    Returns:
        x (J,) and y (J,), float64, with x[-1] == max_x.

    Example:
        >>> truncate_curve(np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.5, 1.0]), 0.5)
        (array([0. , 0. , 0.5]), array([0.  , 0.5 , 0.75]))
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    assert x.ndim == 1 and x.shape == y.shape and x.size >= 2, f"bad curves: {x.shape}, {y.shape}"
    if not x[0] <= max_x <= x[-1]:
        raise MetricError(f"limit {max_x} lies outside the curve's range [{x[0]}, {x[-1]}]")
    k = int(np.searchsorted(x, max_x, side="right"))  # points with x <= max_x
    if x[k - 1] == max_x:
        return x[:k], y[:k]
    # interpolate y at max_x between the last point inside and the first point outside
    x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
    y_end = y0 + (y1 - y0) * (max_x - x0) / (x1 - x0)
    return np.append(x[:k], max_x), np.append(y[:k], y_end)


def partial_auc(x: np.ndarray, y: np.ndarray, max_x: float) -> float:
    """Area under a curve up to ``max_x`` by the trapezoidal rule, the end point linearly interpolated.

    This is the same computation as ``trapezoid(x, y, x_max)`` in MVTec's evaluation code. Points with
    equal ``x`` (vertical steps) are kept in their order and add no area.

    Args:
        x: (K,) non-decreasing, starting at 0 and ending at or after ``max_x``.
        y: (K,) curve values.
        max_x: upper integration limit.

    Returns:
        The area (not normalised).

    Example:
        >>> partial_auc(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)
        0.125
    """
    xs, ys = truncate_curve(x, y, max_x)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))


def _curve_events(normal_scores: np.ndarray, pos_scores: np.ndarray, pos_weights: np.ndarray | None):
    """Events of an exact FPR curve: one per distinct score among the positive (defect) pixels.

    The curve only rises at defect pixels, so it is fixed by its values just above and at each distinct
    defect score. Normal scores are sorted with ``np.sort``, several times faster than an ``argsort`` of all
    pixels; the defect scores, usually a small share, get an ``argsort``.

    Args:
        normal_scores: (P,) scores of the pixels that count for the FPR (sorted in place).
        pos_scores: (Q,) scores of the defect pixels (a pixel in two regions may appear twice).
        pos_weights: (Q,) amount each entry adds to the curve when it turns positive, or None.

    Returns:
        counts (D,) int64 entries per distinct defect score, highest first; above (D,) and at_or_above (D,)
        int64 numbers of normal pixels strictly above / at or above each score; cum (D,) float64 running
        total of the weights (None without weights). D is the number of distinct defect scores.
    """
    normal_scores.sort()  # (P,) ascending
    order = np.argsort(pos_scores)[::-1]  # (Q,) descending
    s = pos_scores[order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last index of each run of equal scores
    v = s[ends]  # (D,) distinct defect scores, descending
    counts = np.diff(np.concatenate(([-1], ends)))
    p = normal_scores.size
    at_or_above = p - np.searchsorted(normal_scores, v[::-1], side="left")[::-1]
    above = p - np.searchsorted(normal_scores, v[::-1], side="right")[::-1]
    cum = None
    if pos_weights is not None:
        cum = np.cumsum(pos_weights[order], dtype=np.float64)[ends]
        np.clip(cum, 0.0, 1.0, out=cum)  # rounding of the running sum must not leave [0, 1]
        cum[-1] = 1.0  # below the lowest defect score every defect pixel is positive
    return counts, above.astype(np.int64), at_or_above.astype(np.int64), cum


def _vertices(above: np.ndarray, at_or_above: np.ndarray, cum: np.ndarray, n_normal: int):
    """Vertices (K,) of the exact (FPR, Y) curve from :func:`_curve_events`, from (0, 0) to (1, 1).

    Just above defect score v the curve is at (FPR(> v), Y before v), at v it is at (FPR(>= v), Y after v).
    Between two defect scores only normal pixels turn positive: a horizontal run, kept as one segment. That
    changes neither the trapezoidal area nor the interpolated end point. Repeated points are dropped.
    """
    y_before = np.concatenate(([0.0], cum[:-1]))
    x = np.empty(2 * cum.size + 2)
    y = np.empty_like(x)
    x[0], y[0], x[-1], y[-1] = 0.0, 0.0, 1.0, 1.0
    x[1:-1:2], y[1:-1:2] = above / n_normal, y_before
    x[2:-1:2], y[2:-1:2] = at_or_above / n_normal, cum
    keep = np.append(True, (np.diff(x) != 0) | (np.diff(y) != 0))
    return x[keep], y[keep]


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (N, H, W) int32 of each mask, 8-connected within an image; 0 = normal."""
    labeled, n_regions = ndimage.label(masks, structure=_STRUCTURE_8)
    return labeled, int(n_regions)


def _pixel_curves(masks: np.ndarray, maps: np.ndarray, *, pro: bool, name: str):
    """Pixel AUROC and, if ``pro``, the PRO curve vertices (fpr, pro), from one sort (validated inputs)."""
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous == 0:
        raise MetricError(f"{name} is undefined: the masks contain no anomalous pixel")
    if n_anomalous == masks.size:
        raise MetricError(f"{name} is undefined: every pixel is anomalous, so the FPR has no normal pixel")
    n_normal = masks.size - n_anomalous
    weights = None
    if pro:
        labeled, n_regions = _region_labels(masks)
        sizes = np.bincount(labeled.reshape(-1), minlength=n_regions + 1)
        inc = np.zeros(n_regions + 1, dtype=np.float64)
        inc[1:] = 1.0 / (sizes[1:].astype(np.float64) * n_regions)  # each region adds 1 / n_regions in all
        weights = inc[labeled[masks]]  # (Q,) in the order of maps[masks]
        del labeled
    counts, above, at_or_above, cum = _curve_events(maps[~masks], maps[masks], weights)
    # AUROC = P(anomalous > normal) + P(tie) / 2 = sum over defect scores v of
    # count(v) * (#normal < v + #normal <= v) / (2 * n_anomalous * n_normal), in exact integers.
    twice = int(np.sum(counts * ((n_normal - at_or_above) + (n_normal - above))))
    auroc = twice / (2 * n_anomalous * n_normal)
    curve = _vertices(above, at_or_above, cum, n_normal) if pro else None
    return auroc, curve


# ----------------------------------------------------------------------------------------------------------
# image level
# ----------------------------------------------------------------------------------------------------------
def image_auroc(labels, scores) -> float:
    """Image-level area under the ROC curve (``sklearn.metrics.roc_auc_score``).

    Args:
        labels: (N,) 0 normal / 1 anomalous.
        scores: (N,) image anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1]; ties count one half.

    Raises:
        MetricError: one class only, NaN/inf scores, or mismatched lengths.

    Example:
        >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y, s = _labels_scores(labels, scores, "image_auroc")
    _both_classes(y, "image_auroc")
    return float(skm.roc_auc_score(y, s))


def image_aupr(labels, scores) -> float:
    """Image-level area under the precision-recall curve as average precision (``average_precision_score``).

    Raises:
        MetricError: one class only, NaN/inf scores, or mismatched lengths.

    Example:
        >>> round(image_aupr([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
        0.8333
    """
    y, s = _labels_scores(labels, scores, "image_aupr")
    _both_classes(y, "image_aupr")
    return float(skm.average_precision_score(y, s))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (anomalous when score >= threshold).

    Among thresholds with the same F1, the lowest is returned.

    Args:
        labels: (N,) 0 / 1. At least one anomalous label is needed. With normal labels absent, F1 = 1.
        scores: (N,) image scores.

    Returns:
        (f1, threshold), where threshold is one of the given scores.

    Raises:
        MetricError: no anomalous label, NaN/inf scores, or mismatched lengths.

    Example:
        >>> f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        (0.8, 0.35)
    """
    y, s = _labels_scores(labels, scores, "f1_max")
    if not y.any():
        raise MetricError("f1_max is undefined: there is no anomalous label (recall has no denominator)")
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the final point (precision 1, recall 0) has no threshold
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


def threshold_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 when images with ``score >= threshold`` are predicted anomalous.

    Ratios with an empty denominator are 0.0, as with scikit-learn's ``zero_division=0``: precision when
    nothing is predicted anomalous, recall when there is no anomalous label, F1 when both hold.

    Args:
        labels: (N,) 0 / 1.
        scores: (N,) image scores.
        threshold: decision threshold.

    Returns:
        dict with keys accuracy, precision, recall, f1.

    Example:
        >>> threshold_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.35)
        {'accuracy': 0.75, 'precision': 0.6666666666666666, 'recall': 1.0, 'f1': 0.8}
    """
    y, s = _labels_scores(labels, scores, "threshold_metrics")
    if not np.isfinite(threshold):
        raise MetricError(f"threshold_metrics: threshold must be finite, got {threshold}")
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    return {
        "accuracy": (tp + tn) / y.size,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------
# pixel level
# ----------------------------------------------------------------------------------------------------------
def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC over all test pixels pooled (exact, ties count one half).

    Args:
        masks: (N, H, W) ground truth in {0, 1}.
        maps: (N, H, W) anomaly maps.

    Raises:
        MetricError: no anomalous or no normal pixel, NaN/inf map values, or mismatched shapes.

    Example:
        >>> pixel_auroc(np.array([[[0, 1]]]), np.array([[[0.2, 0.1]]]))
        0.0
    """
    m, a = _masks_maps(masks, maps, "pixel_auroc")
    auroc, _ = _pixel_curves(m, a, pro=False, name="pixel_auroc")
    return auroc


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap (PRO) curve of MVTec AD, as its vertices.

    Args:
        masks: (N, H, W) ground truth in {0, 1}; regions are its 8-connected components within each image.
        maps: (N, H, W) anomaly maps.

    Returns:
        fpr (K,) and pro (K,), non-decreasing, from (0, 0) to (1, 1): the vertices of the curve that has a
        point for every distinct score v (every pixel with score >= v positive). Runs of points where only
        normal pixels turn positive are horizontal and are merged into one segment, so K <= 2 * (number of
        distinct anomalous-pixel scores) + 2. Integrating these vertices gives the same area as all points.

    Raises:
        MetricError: no anomalous or no normal pixel, NaN/inf map values, or mismatched shapes.

    Example:
        >>> fpr, pro = pro_curve(np.array([[[1, 0, 1]]]), np.array([[[3.0, 2.0, 1.0]]]))
        >>> fpr.tolist(), pro.tolist()
        ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0])
    """
    m, a = _masks_maps(masks, maps, "pro_curve")
    _, (fpr, pro) = _pixel_curves(m, a, pro=True, name="pro_curve")
    return fpr, pro


def au_pro(masks, maps, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (MVTec AD protocol: 0.3).

    Args:
        masks: (N, H, W) ground truth in {0, 1}.
        maps: (N, H, W) anomaly maps.
        max_fpr: integration limit in (0, 1].

    Returns:
        Normalised AU-PRO in [0, 1]. A constant map gives the diagonal, so ``max_fpr / 2``.

    Raises:
        MetricError: no anomalous or no normal pixel, NaN/inf values, mismatched shapes, or max_fpr
            outside (0, 1].

    Example:
        >>> au_pro(np.array([[[1, 0, 1]]]), np.array([[[3.0, 2.0, 1.0]]]), max_fpr=1.0)
        0.5
    """
    max_fpr = _check_max_fpr(max_fpr, "au_pro")
    fpr, pro = pro_curve(masks, maps)
    return partial_auc(fpr, pro, max_fpr) / max_fpr


def iou(masks, maps, threshold: float) -> float:
    """IoU of the binarised maps (``map >= threshold``) and the masks, pooled over all pixels.

    Raises:
        MetricError: the union is empty (no anomalous pixel in the masks and none predicted), or bad inputs.

    Example:
        >>> iou(np.array([[[1, 1, 0, 0]]]), np.array([[[0.9, 0.2, 0.8, 0.1]]]), 0.5)
        0.3333333333333333
    """
    m, a = _masks_maps(masks, maps, "iou")
    if not np.isfinite(threshold):
        raise MetricError(f"iou: threshold must be finite, got {threshold}")
    pred = a >= threshold
    union = int(np.count_nonzero(pred | m))
    if union == 0:
        raise MetricError("iou is undefined: the masks contain no anomalous pixel and no pixel reaches "
                          "the threshold")
    return int(np.count_nonzero(pred & m)) / union


# ----------------------------------------------------------------------------------------------------------
# MVTec LOCO AD: saturated PRO
# ----------------------------------------------------------------------------------------------------------
Regions = Sequence[Sequence[tuple[np.ndarray, float]]]


def spro_curve(regions: Regions, maps) -> tuple[np.ndarray, np.ndarray]:
    """Exact saturated-PRO curve of MVTec LOCO AD, as its vertices (see :func:`pro_curve`).

    Args:
        regions: one list per image, in the order of ``maps``. Each entry is a (mask (H, W) bool,
            saturation threshold in pixels) pair, one per annotated defect. Good images have an empty list.
            Regions may overlap. The saturation area is ``min(threshold, |mask|)``, as for the absolute
            thresholds of ``defects_config.json``. Convert relative thresholds to pixels beforehand (the
            official code uses ``int(fraction * |mask|)``).
        maps: (N, H, W) anomaly maps.

    Returns:
        fpr (K,) and spro (K,) from (0, 0) to (1, 1). The FPR counts the pixels outside every region of
        every image.

    Raises:
        MetricError: no region at all, an empty region mask, a saturation threshold <= 0, no defect-free
            pixel, NaN/inf values, or mismatched shapes.

    Example:
        >>> mask = np.array([[1, 1, 1, 1, 0]], dtype=bool)   # 4 defect pixels, saturated after 2
        >>> fpr, spro = spro_curve([[(mask, 2.0)]], np.array([[[5.0, 4.0, 3.0, 2.0, 1.0]]]))
        >>> fpr.tolist(), spro.tolist()
        ([0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    a = _as_maps(maps, "spro_curve", "anomaly maps")
    if len(regions) != a.shape[0]:
        raise MetricError(f"spro_curve: {len(regions)} region lists for {a.shape[0]} anomaly maps")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise MetricError(f"spro_curve: {int((~np.isfinite(a)).sum())} anomaly-map values are NaN "
                          "or infinite")
    n_regions = sum(len(r) for r in regions)
    if n_regions == 0:
        raise MetricError("sPRO is undefined: no image has a defect region")
    normal = np.ones(a.shape, dtype=bool)  # (N, H, W) pixels outside every region
    pos_scores, pos_weights = [], []  # per region: (|r|,) scores and the sPRO each adds when positive
    for i, image_regions in enumerate(regions):
        for j, (mask, saturation) in enumerate(image_regions):
            mask = np.asarray(mask)
            if mask.shape != a.shape[1:]:
                raise MetricError(f"spro_curve: region {j} of image {i} has shape {mask.shape}, "
                                  f"expected {a.shape[1:]}")
            mask = mask.astype(bool)
            idx = np.flatnonzero(mask)  # (|r|,) flat indices within the image
            if idx.size == 0:
                raise MetricError(f"spro_curve: region {j} of image {i} has an empty mask")
            saturation = float(saturation)
            if not (np.isfinite(saturation) and saturation > 0):
                raise MetricError(f"spro_curve: region {j} of image {i} has saturation threshold "
                                  f"{saturation}; it must be a positive number of pixels")
            sat = min(saturation, float(idx.size))
            scores = np.sort(a[i].reshape(-1)[idx])[::-1]  # (|r|,) region scores, highest first
            k = np.arange(idx.size + 1, dtype=np.float64)
            steps = np.diff(np.minimum(k / sat, 1.0))  # (|r|,) sPRO gained by the k-th positive pixel
            pos_scores.append(scores)
            pos_weights.append(steps / n_regions)
            normal[i][mask] = False
    n_normal = int(np.count_nonzero(normal))
    if n_normal == 0:
        raise MetricError("sPRO is undefined: every pixel lies in a defect region, so the FPR has no "
                          "normal pixel")
    # Ties inside a region: equal scores turn positive together, so which of them carries which step does
    # not matter; only the running total at the end of each run of equal scores is used.
    _, above, at_or_above, cum = _curve_events(a[normal], np.concatenate(pos_scores),
                                               np.concatenate(pos_weights))
    return _vertices(above, at_or_above, cum, n_normal)


def au_spro(regions: Regions, maps, max_fpr: float) -> float:
    """Area under the sPRO curve up to ``max_fpr``, divided by ``max_fpr`` (MVTec LOCO AD).

    Example:
        >>> mask = np.array([[1, 1, 1, 1, 0]], dtype=bool)
        >>> au_spro([[(mask, 2.0)]], np.array([[[5.0, 4.0, 3.0, 2.0, 1.0]]]), max_fpr=0.5)
        1.0
    """
    max_fpr = _check_max_fpr(max_fpr, "au_spro")
    fpr, spro = spro_curve(regions, maps)
    return partial_auc(fpr, spro, max_fpr) / max_fpr


def au_spro_all(regions: Regions, maps, limits: Sequence[float] = SPRO_LIMITS) -> dict[str, float]:
    """AU-sPRO at several FPR limits from one curve: ``{"au_spro_0.01": ..., ..., "au_spro_1.0": ...}``.

    The key is ``f"au_spro_{float(limit)}"``.

    Example:
        >>> mask = np.array([[1, 1, 0, 0]], dtype=bool)
        >>> au_spro_all([[(mask, 2.0)]], np.array([[[1.0, 0.3, 0.5, 0.2]]]), limits=(0.5, 1.0))
        {'au_spro_0.5': 0.5, 'au_spro_1.0': 0.75}
    """
    limits = [_check_max_fpr(lim, "au_spro_all") for lim in limits]
    fpr, spro = spro_curve(regions, maps)
    return {f"au_spro_{lim}": partial_auc(fpr, spro, lim) / lim for lim in limits}


# ----------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------
def summary_metrics(labels, scores, masks=None, maps=None, max_fpr: float = 0.3) -> dict[str, float]:
    """The harness metrics: image AUROC / AUPR / F1-max and, when defined, pixel AUROC and AU-PRO.

    Pixel AUROC and AU-PRO share one sort of all pixels. They are left out, never NaN, when ``masks`` or
    ``maps`` is None or the masks have no anomalous pixel (or no normal one).

    Args:
        labels: (N,) 0 / 1.
        scores: (N,) image scores.
        masks: (N, H, W) ground truth in {0, 1}, or None.
        maps: (N, H, W) anomaly maps, or None.
        max_fpr: AU-PRO integration limit.

    Returns:
        dict with keys image_auroc, image_aupr, f1_max, f1_threshold and, when defined, pixel_auroc and
        au_pro.

    Raises:
        MetricError: image labels of one class only, NaN/inf scores or maps, or mismatched shapes.
    """
    out = {"image_auroc": image_auroc(labels, scores), "image_aupr": image_aupr(labels, scores)}
    out["f1_max"], out["f1_threshold"] = f1_max(labels, scores)
    if masks is None or maps is None:
        return out
    max_fpr = _check_max_fpr(max_fpr, "summary_metrics")
    m, a = _masks_maps(masks, maps, "summary_metrics")
    if m.shape[0] != np.asarray(labels).reshape(-1).shape[0]:
        raise MetricError(f"summary_metrics: {m.shape[0]} masks for {np.asarray(labels).size} labels")
    n_anomalous = int(m.sum())
    if 0 < n_anomalous < m.size:
        auroc, (fpr, pro) = _pixel_curves(m, a, pro=True, name="summary_metrics")
        out["pixel_auroc"] = auroc
        out["au_pro"] = partial_auc(fpr, pro, max_fpr) / max_fpr
    return out
