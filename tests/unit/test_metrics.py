"""Tests for mudenet_core.metrics.

Each metric is checked against expectations that do not share its code:
* cases worked out on paper (a two-image PRO curve, anomalib's striped mask whose AU-PRO is about 1/6, an
  sPRO case with saturation);
* scikit-learn (roc_auc_score, average_precision_score, f1_score, precision_score, ...);
* a dense-threshold brute force written here. It evaluates every distinct score as a threshold, finds
  regions with scikit-image instead of scipy, and checks region by region, with no sorting tricks;
* an approximate, sampled reference in the style of the MVTec 3D-AD / anomalib reference code: thresholds at
  the normal pixels' scores and one region at a time. It should agree to within 0.1 percentage point;
* invariance to strictly increasing transforms of the scores;
* edge cases, which must raise MetricError or return the documented value, never NaN.
"""

from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn import metrics as skm

from mudenet_core import metrics as M
from mudenet_core.metrics import MetricError

# ------------------------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------------------------


def _components(masks):
    """8-connected components (scikit-image, connectivity=2): a list of (image index, bool mask)."""
    out = []
    for i, m in enumerate(masks):
        lab = sk_label(np.asarray(m, dtype=int), connectivity=2)
        out.extend((i, lab == r) for r in range(1, lab.max() + 1))
    return out


def _brute_pro_points(masks, maps):
    """All (FPR, PRO) points, one per distinct score t, with 'positive' meaning score >= t."""
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps, dtype=np.float64)
    regions = [maps[i][r] for i, r in _components(masks)]
    normal = maps[~masks]
    ts = np.unique(maps)[::-1]  # every distinct score, descending
    fpr = (normal[None, :] >= ts[:, None]).mean(axis=1)
    pro = np.mean([(r[None, :] >= ts[:, None]).mean(axis=1) for r in regions], axis=0)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _brute_spro_points(regions, maps):
    """All (FPR, mean sPRO) points by the MVTec LOCO definition, one per distinct score."""
    maps = np.asarray(maps, dtype=np.float64)
    union = np.zeros(maps.shape, dtype=bool)
    per_region = []
    ts = np.unique(maps)[::-1]
    for i, image_regions in enumerate(regions):
        for mask, sat in image_regions:
            mask = np.asarray(mask, dtype=bool)
            union[i] |= mask
            tp = (maps[i][mask][None, :] >= ts[:, None]).sum(axis=1)
            per_region.append(np.minimum(tp / min(sat, mask.sum()), 1.0))
    normal = maps[~union]
    fpr = (normal[None, :] >= ts[:, None]).mean(axis=1)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], np.mean(per_region, axis=0)))


def _area(x, y, limit):
    """Trapezoidal area of the polyline (x, y) from 0 to ``limit``, with y interpolated at the limit."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = x <= limit
    xi, yi = x[inside], y[inside]
    if xi[-1] < limit:
        j = int(np.argmax(x > limit))  # first point past the limit
        y_lim = yi[-1] + (y[j] - yi[-1]) * (limit - xi[-1]) / (x[j] - xi[-1])
        xi, yi = np.append(xi, limit), np.append(yi, y_lim)
    return float(np.trapezoid(yi, xi))


def _sampled_reference_au_pro(masks, maps, limit):
    """Approximate AU-PRO in the style of the MVTec 3D-AD / anomalib reference: a threshold at every normal
    pixel's score (strictly-greater semantics), one region at a time, curve closed at (1, 1)."""
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps, dtype=np.float64)
    regions = [np.sort(maps[i][r]) for i, r in _components(masks)]
    ok = np.sort(maps[~masks])
    n_ok = ok.size
    fprs, pros = [1.0], [1.0]
    for pos in range(n_ok):  # ascending thresholds
        t = ok[pos]
        fprs.append(1.0 - (pos + 1) / n_ok)
        pros.append(np.mean([1.0 - np.searchsorted(r, t, side="right") / r.size for r in regions]))
    return _area(fprs[::-1], pros[::-1], limit) / limit


def _random_case(seed, n=6, h=24, w=24, quantise=None):
    """Random masks (some blobs, plus a diagonal pixel pair that is one region only under 8-connectivity)
    and maps that score anomalous pixels higher on average; ``quantise`` makes many ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n // 2, n):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, h - 6, size=2)
            hh, ww = rng.integers(1, 6, size=2)
            masks[i, y:y + hh, x:x + ww] = 1
        masks[i, h - 2, 0] = masks[i, h - 1, 1] = 1
    maps = rng.normal(size=(n, h, w)) + 1.5 * masks
    if quantise is not None:
        maps = np.round(maps * quantise) / quantise
    return masks, maps


# ------------------------------------------------------------------------------------------------------------
# AU-PRO: hand-computed cases
# ------------------------------------------------------------------------------------------------------------


def _hand_case():
    # image 0: one region made of two diagonal pixels (8-connected), scores 0.9 and 0.5; 4 normal pixels
    # image 1: one region of one pixel, score 0.8; 5 normal pixels (one of them, 0.6, above 0.5)
    masks = np.array([[[1, 0, 0], [0, 1, 0]], [[0, 0, 0], [0, 0, 1]]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.1, 0.2], [0.3, 0.5, 0.0]], [[0.6, 0.05, 0.15], [0.25, 0.35, 0.8]]])
    return masks, maps


def test_pro_curve_hand_computed():
    masks, maps = _hand_case()
    fpr, pro = M.pro_curve(masks, maps)
    # 2 regions: each pixel of the 2-pixel region adds 1/4, the 1-pixel region adds 1/2; 9 normal pixels.
    # 0.9 -> (0, 1/4); 0.8 -> (0, 3/4); 0.6 (normal) -> (1/9, 3/4); 0.5 -> (1/9, 1); then normal pixels only.
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 9, 1 / 9, 1], atol=1e-15)
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 1, 1], atol=1e-15)
    # area up to 0.3: 0.75 * 1/9 + 1 * (0.3 - 1/9) = 0.3 - 1/36, normalised: 1 - 1/(36 * 0.3) = 49/54.
    # (With 4-connectivity the diagonal pair would be two regions, giving (2/3 * 1/9 + 0.3 - 1/9) / 0.3.)
    assert M.au_pro(masks, maps, max_fpr=0.3) == pytest.approx(49 / 54, abs=1e-12)
    assert M.au_pro(masks, maps, max_fpr=1.0) == pytest.approx(0.75 / 9 + 8 / 9, abs=1e-12)
    # pixel AUROC: 0.9 and 0.8 beat all 9 normal pixels, 0.5 beats 8 of them -> 26/27
    assert M.pixel_auroc(masks, maps) == pytest.approx(26 / 27, abs=1e-15)


def test_truncate_curve_ends_at_the_limit():
    fpr, pro = M.pro_curve(*_hand_case())
    x, y = M.truncate_curve(fpr, pro, 0.3)  # what a plot up to FPR 0.3 should draw
    np.testing.assert_allclose(x, [0, 0, 0, 1 / 9, 1 / 9, 0.3], atol=1e-15)
    np.testing.assert_allclose(y, [0, 0.25, 0.75, 0.75, 1, 1], atol=1e-15)
    assert np.trapezoid(y, x) / 0.3 == pytest.approx(49 / 54, abs=1e-12)
    x, y = M.truncate_curve(fpr, pro, 1 / 9)  # a limit on a vertex keeps the vertical step there
    np.testing.assert_allclose(y, [0, 0.25, 0.75, 0.75, 1], atol=1e-15)
    with pytest.raises(MetricError, match="outside"):
        M.truncate_curve(fpr, pro, 1.5)


def test_au_pro_striped_mask_anomalib():
    """anomalib's case: a 400 x 7 image scored 0..2799 in row-major order, one anomalous column.

    Per row (from the top score down), 3 normal pixels (FPR + 3/2400), the anomalous one (PRO + 1/400), then
    3 normal pixels. After j full rows the curve is at (j/400, j/400), and row j adds (2j + 1) / 320000 of
    area. Up to FPR 1/3: 133 full rows (133^2 / 320000), then 1/1200 of FPR at height 133/400, before the
    row's anomalous pixel. Total 53333 / 960000; normalised by 1/3: 53333 / 320000 (1/6 - 1e-6).
    """
    stripe = np.zeros((1, 400, 7), dtype=np.uint8)
    stripe[..., 3] = 1
    preds = (np.arange(2800) / 2800.0).reshape(1, 400, 7)
    assert M.au_pro(stripe, preds, max_fpr=1 / 3) == pytest.approx(53333 / 320000, abs=1e-12)
    assert M.au_pro(stripe, preds, max_fpr=1 / 3) == pytest.approx(1 / 6, abs=1e-3)

    stripes = np.zeros((1, 400, 7), dtype=np.uint8)
    stripes[..., [1, 3, 5]] = 1  # three regions
    assert M.au_pro(stripes, preds, max_fpr=1 / 3) == pytest.approx(1 / 6, abs=1e-3)
    both = M.au_pro(np.concatenate([stripe, stripes]), np.concatenate([preds, preds]), max_fpr=1 / 3)
    assert both == pytest.approx(1 / 6, abs=1e-3)


# ------------------------------------------------------------------------------------------------------------
# AU-PRO: agreement with the references
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantise", [None, 2.0])
def test_pro_curve_matches_brute_force(seed, quantise):
    masks, maps = _random_case(seed, quantise=quantise)
    bx, by = _brute_pro_points(masks, maps)
    fpr, pro = M.pro_curve(masks, maps)
    # every vertex we return is a point of the full curve ...
    dist = np.min(np.abs(fpr[:, None] - bx[None, :]) + np.abs(pro[:, None] - by[None, :]), axis=1)
    assert dist.max() < 1e-12
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    # ... and the areas agree at every limit (the full curve has one point per distinct score)
    for limit in (0.01, 0.05, 0.3, 0.777, 1.0):
        assert M.au_pro(masks, maps, max_fpr=limit) == pytest.approx(_area(bx, by, limit) / limit, abs=1e-12)
    sk_auroc = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(masks, maps) == pytest.approx(sk_auroc, abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_au_pro_agrees_with_sampled_reference(seed):
    masks, maps = _random_case(seed)
    ours = M.au_pro(masks, maps, max_fpr=0.3)
    ref = _sampled_reference_au_pro(masks, maps, 0.3)
    assert abs(ours - ref) < 1e-3  # < 0.1 percentage point
    assert 0.5 < ours < 1.0  # a real, informative value for these maps


def test_au_pro_and_pixel_auroc_invariant_to_monotone_transforms():
    masks, maps = _random_case(5, quantise=4.0)
    regions = [[(m.astype(bool), 3.0)] if m.any() else [] for m in masks]
    for f in (lambda x: 3 * x - 7, lambda x: np.exp(x), lambda x: np.arctan(x) + 10):
        assert M.au_pro(masks, f(maps)) == pytest.approx(M.au_pro(masks, maps), abs=1e-12)
        assert M.pixel_auroc(masks, f(maps)) == pytest.approx(M.pixel_auroc(masks, maps), abs=1e-12)
        assert M.au_spro(regions, f(maps), 0.1) == pytest.approx(M.au_spro(regions, maps, 0.1), abs=1e-12)


def test_perfect_and_inverted_maps():
    masks, maps = _random_case(6)
    perfect = masks + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert M.au_pro(masks, perfect) == 1.0 and M.pixel_auroc(masks, perfect) == 1.0
    assert M.au_pro(masks, -perfect) == 0.0 and M.pixel_auroc(masks, -perfect) == 0.0


# ------------------------------------------------------------------------------------------------------------
# AU-sPRO (MVTec LOCO AD)
# ------------------------------------------------------------------------------------------------------------


def _spro_hand_case(sat_a):
    # image 0 (good): 4 normal pixels. image 1: region A = pixels 0, 1 (saturation sat_a), region B = pixel 3
    # (saturation 1); pixel 2 is defect-free and counts for the FPR -> 5 normal pixels in all.
    maps = np.array([[[0.3, 0.1, 0.6, 0.2]], [[0.9, 0.4, 0.5, 0.7]]])
    region_a = np.array([[True, True, False, False]])
    region_b = np.array([[False, False, False, True]])
    return [[], [(region_a, sat_a), (region_b, 1.0)]], maps


def test_spro_hand_computed():
    # sat_a = 2: 0.9 -> A = 1/2 (mean 1/4); 0.7 -> B = 1 (mean 3/4); 0.6, 0.5 normal -> FPR 2/5; 0.4 -> A = 1.
    regions, maps = _spro_hand_case(2.0)
    fpr, spro = M.spro_curve(regions, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.4, 0.4, 1], atol=1e-15)
    np.testing.assert_allclose(spro, [0, 0.25, 0.75, 0.75, 1, 1], atol=1e-15)
    assert M.au_spro(regions, maps, 0.3) == pytest.approx(0.75)
    assert M.au_spro(regions, maps, 0.5) == pytest.approx((0.4 * 0.75 + 0.1) / 0.5)
    assert M.au_spro(regions, maps, 1.0) == pytest.approx(0.4 * 0.75 + 0.6)  # 0.9
    # If the FPR counted good images only (4 pixels), the 0.5 pixel would not count and the result would be
    # 0.25 * 0.75 + 0.75 = 0.9375. The official code counts defect-free pixels of anomalous images too.
    # Saturation: A saturates after 1 pixel -> the curve reaches 1 at FPR 0.
    regions, maps = _spro_hand_case(1.0)
    assert M.au_spro(regions, maps, 0.01) == pytest.approx(1.0)
    # fractional saturation 1.5: A = 2/3 after 1 pixel (mean 1/3), then B (mean 5/6)
    regions, maps = _spro_hand_case(1.5)
    assert M.au_spro(regions, maps, 1.0) == pytest.approx(0.4 * 5 / 6 + 0.6)
    # a saturation threshold above the region's area acts as the area (official min(threshold, area))
    assert M.au_spro(*_spro_hand_case(50.0), 1.0) == pytest.approx(M.au_spro(*_spro_hand_case(2.0), 1.0))


@pytest.mark.parametrize("quantise", [None, 2.0])
def test_spro_matches_brute_force_with_overlaps(quantise):
    masks, maps = _random_case(7, quantise=quantise)
    rng = np.random.default_rng(7)
    regions = []
    for m in masks:
        if not m.any():
            regions.append([])
            continue
        other = np.zeros_like(m, dtype=bool)
        other[2:9, 3:12] = True  # overlaps some blobs
        regions.append([(m.astype(bool), float(rng.integers(1, 12))), (other, 20.5)])
    bx, by = _brute_spro_points(regions, maps)
    for limit in M.SPRO_LIMITS:
        assert M.au_spro(regions, maps, limit) == pytest.approx(_area(bx, by, limit) / limit, abs=1e-12)
    got = M.au_spro_all(regions, maps)
    assert list(got) == ["au_spro_0.01", "au_spro_0.05", "au_spro_0.1", "au_spro_0.3", "au_spro_1.0"]
    assert got["au_spro_0.3"] == M.au_spro(regions, maps, 0.3)


def test_spro_without_saturation_equals_pro():
    masks, maps = _random_case(8)
    regions = [[] for _ in range(len(masks))]
    for i, r in _components(masks):
        regions[i].append((r, 1e9))  # saturation above the area -> plain overlap
    for limit in (0.05, 0.3, 1.0):
        assert M.au_spro(regions, maps, limit) == pytest.approx(M.au_pro(masks, maps, limit), abs=1e-12)


def test_spro_errors():
    maps = np.zeros((2, 2, 2))
    full = np.ones((2, 2), dtype=bool)
    empty = np.zeros((2, 2), dtype=bool)
    with pytest.raises(MetricError, match="no image has a defect region"):
        M.au_spro([[], []], maps, 0.3)
    with pytest.raises(MetricError, match="empty mask"):
        M.au_spro([[], [(empty, 1.0)]], maps, 0.3)
    with pytest.raises(MetricError, match="saturation threshold"):
        M.au_spro([[], [(full, 0.0)]], maps, 0.3)
    with pytest.raises(MetricError, match="region lists"):
        M.au_spro([[]], maps, 0.3)
    with pytest.raises(MetricError, match="no normal pixel"):
        M.au_spro([[(full, 1.0)], [(full, 1.0)]], maps, 0.3)
    with pytest.raises(MetricError, match="shape"):
        M.au_spro([[], [(np.ones((3, 3), dtype=bool), 1.0)]], maps, 0.3)


# ------------------------------------------------------------------------------------------------------------
# image level: scikit-learn agreement
# ------------------------------------------------------------------------------------------------------------


def _image_case(seed, n=60, ties=False):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores)
    return labels, scores


@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(ties):
    labels, scores = _image_case(0, ties=ties)
    assert M.image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-15)
    sk_ap = skm.average_precision_score(labels, scores)
    assert M.image_aupr(labels, scores) == pytest.approx(sk_ap, abs=1e-15)


@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_is_best_threshold(ties):
    labels, scores = _image_case(1, ties=ties)
    f1, thr = M.f1_max(labels, scores)
    brute = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1 == pytest.approx(brute, abs=1e-12)
    assert thr in scores
    assert skm.f1_score(labels, scores >= thr) == pytest.approx(f1, abs=1e-12)
    assert M.threshold_metrics(labels, scores, thr)["f1"] == pytest.approx(f1, abs=1e-12)


def test_threshold_metrics_match_sklearn():
    labels, scores = _image_case(2)
    for thr in (-1.0, 0.3, 1.2, 99.0):
        pred = scores >= thr
        got = M.threshold_metrics(labels, scores, thr)
        assert got == pytest.approx({
            "accuracy": skm.accuracy_score(labels, pred),
            "precision": skm.precision_score(labels, pred, zero_division=0),
            "recall": skm.recall_score(labels, pred, zero_division=0),
            "f1": skm.f1_score(labels, pred, zero_division=0),
        }, abs=1e-15)
    # nothing predicted anomalous: precision and F1 are 0.0 by convention, not NaN
    assert M.threshold_metrics([0, 1], [0.1, 0.2], 5.0) == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0,
                                                            "f1": 0.0}
    # no anomalous label: recall 0.0 by convention
    assert M.threshold_metrics([0, 0], [0.1, 0.2], 0.15)["recall"] == 0.0


def test_image_metrics_invariant_to_monotone_transforms():
    labels, scores = _image_case(3, ties=True)
    base = (M.image_auroc(labels, scores), M.image_aupr(labels, scores), M.f1_max(labels, scores)[0])
    for f in (lambda x: 2 * x + 1, np.exp):
        s = f(scores)
        got = (M.image_auroc(labels, s), M.image_aupr(labels, s), M.f1_max(labels, s)[0])
        assert got == pytest.approx(base, abs=1e-12)


def test_iou_hand_computed():
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 1, 0]]])
    maps = np.array([[[0.9, 0.2, 0.8, 0.1], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0.7, 0.6]]])
    # predicted (>= 0.5): (0,0,0), (0,0,2), (1,1,2), (1,1,3); truth: (0,0,0), (0,0,1), (1,1,2)
    # intersection 2, union 5
    assert M.iou(masks, maps, 0.5) == pytest.approx(2 / 5)
    assert M.iou(masks, maps, 0.7) == pytest.approx(2 / 4)  # threshold is inclusive: 0.7 counts
    with pytest.raises(MetricError, match="iou is undefined"):
        M.iou(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), 0.5)


# ------------------------------------------------------------------------------------------------------------
# edge cases: MetricError or a documented value, never NaN
# ------------------------------------------------------------------------------------------------------------


def test_single_class_labels():
    with pytest.raises(MetricError, match="all 3 labels are normal"):
        M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="all 2 labels are anomalous"):
        M.image_aupr([1, 1], [0.1, 0.2])
    with pytest.raises(MetricError, match="no anomalous label"):
        M.f1_max([0, 0], [0.1, 0.2])
    assert M.f1_max([1, 1], [0.1, 0.2]) == (1.0, 0.1)  # documented: only anomalous images -> F1 1 at the min


def test_pixel_metrics_without_anomalous_or_normal_pixels():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(MetricError, match="no anomalous pixel"):
        M.au_pro(np.zeros((2, 4, 4)), maps)
    with pytest.raises(MetricError, match="no anomalous pixel"):
        M.pixel_auroc(np.zeros((2, 4, 4)), maps)
    with pytest.raises(MetricError, match="no normal pixel"):
        M.au_pro(np.ones((2, 4, 4)), maps)


def test_constant_scores_give_chance_values():
    masks, _ = _random_case(9)
    const = np.full(masks.shape, 0.5)
    assert M.pixel_auroc(masks, const) == 0.5
    fpr, pro = M.pro_curve(masks, const)
    assert fpr.tolist() == [0.0, 1.0] and pro.tolist() == [0.0, 1.0]  # the diagonal
    assert M.au_pro(masks, const, max_fpr=0.3) == pytest.approx(0.15)  # documented: max_fpr / 2
    assert M.image_auroc([0, 1, 0, 1], [2.0] * 4) == 0.5
    assert M.f1_max([0, 1, 0, 1], [2.0] * 4) == (pytest.approx(2 / 3), 2.0)


def test_bad_inputs_raise():
    masks, maps = _random_case(10)
    with pytest.raises(MetricError, match="NaN"):
        M.image_auroc([0, 1], [0.1, np.nan])
    bad = maps.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(MetricError, match="NaN or infinite"):
        M.au_pro(masks, bad)
    with pytest.raises(MetricError, match="binarise"):
        M.au_pro(masks * 255, maps)
    with pytest.raises(MetricError, match="differ in shape"):
        M.au_pro(masks, maps[:, :-1])
    with pytest.raises(MetricError, match="differ in length"):
        M.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(MetricError, match="labels must be 0"):
        M.image_auroc([0, 2], [0.1, 0.2])
    for bad_fpr in (0.0, -0.1, 1.5):
        with pytest.raises(MetricError, match="max_fpr"):
            M.au_pro(masks, maps, max_fpr=bad_fpr)


def test_channel_axis_is_accepted():
    masks, maps = _random_case(11)
    assert M.au_pro(masks[:, None], maps[:, None]) == M.au_pro(masks, maps)
    assert M.pixel_auroc(masks[:, None].astype(bool), maps[:, None]) == M.pixel_auroc(masks, maps)


# ------------------------------------------------------------------------------------------------------------
# summary_metrics
# ------------------------------------------------------------------------------------------------------------


def test_summary_metrics_keys_and_values():
    masks, maps = _random_case(12)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    out = M.summary_metrics(labels, scores, masks, maps, max_fpr=0.3)
    assert set(out) == {"image_auroc", "image_aupr", "pixel_auroc", "au_pro", "f1_max", "f1_threshold"}
    assert out["image_auroc"] == M.image_auroc(labels, scores)
    assert out["image_aupr"] == M.image_aupr(labels, scores)
    assert (out["f1_max"], out["f1_threshold"]) == M.f1_max(labels, scores)
    assert out["pixel_auroc"] == M.pixel_auroc(masks, maps)
    assert out["au_pro"] == M.au_pro(masks, maps, 0.3)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())


def test_summary_metrics_leaves_pixel_keys_out_without_anomalous_pixels():
    _, maps = _random_case(13)
    labels = np.array([0, 0, 0, 1, 1, 1])  # e.g. logical anomalies without masks
    scores = maps.reshape(6, -1).max(axis=1)
    out = M.summary_metrics(labels, scores, np.zeros(maps.shape, dtype=np.uint8), maps)
    assert set(out) == {"image_auroc", "image_aupr", "f1_max", "f1_threshold"}
    assert all(math.isfinite(v) for v in out.values())
    assert set(M.summary_metrics(labels, scores, None, None)) == set(out)
    with pytest.raises(MetricError, match="masks for"):
        M.summary_metrics(labels[:4], scores[:4], np.zeros(maps.shape), maps)


@pytest.mark.slow
def test_summary_metrics_scales_to_200_images_of_256px():
    """200 x 256 x 256 pixels (13.1 M) must take seconds and well under a GiB of extra memory."""
    rng = np.random.default_rng(0)
    n, h, w = 200, 256, 256
    maps = rng.random((n, h, w), dtype=np.float32)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n // 2, n):
        y, x = rng.integers(0, 200, size=2)
        masks[i, y:y + 40, x:x + 30] = 1
        maps[i, y:y + 40, x:x + 30] += 0.3
    labels = masks.reshape(n, -1).max(axis=1)
    scores = maps.reshape(n, -1).max(axis=1)
    tracemalloc.start()
    t0 = time.perf_counter()
    out = M.summary_metrics(labels, scores, masks, maps)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 30, f"summary_metrics took {elapsed:.1f} s"
    assert peak < 2 * 2**30, f"peak extra memory {peak / 2**30:.2f} GiB"
    # the anomalous boxes are shifted by +0.3 on U(0, 1) noise: P(anom > normal) = 1 - 0.7^2 / 2 = 0.755
    assert out["pixel_auroc"] == pytest.approx(0.755, abs=0.005)
    assert 0.0 < out["au_pro"] < 1.0
