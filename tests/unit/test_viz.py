"""Tests of mudenet_core.viz: axes counts, drawn data against independent values, PNGs that decode."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from mudenet_core import viz


def _assert_png(path, min_size=(50, 50)):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 0, "blank image"


@pytest.fixture
def toy():
    """4 images 16x16 with one anomalous square in the last two; maps high on the square."""
    rng = np.random.default_rng(0)
    images = rng.random((4, 3, 16, 16))
    masks = np.zeros((4, 16, 16))
    masks[2:, 4:8, 4:8] = 1
    maps = 0.1 * rng.random((4, 16, 16)) + masks
    labels = np.array([0, 0, 1, 1])
    scores = maps.reshape(4, -1).max(1)
    return images, masks, maps, labels, scores


def test_to_hwc_layouts():
    chw = np.arange(3 * 4 * 5, dtype=float).reshape(3, 4, 5) / 60
    hwc = viz.to_hwc(chw)
    assert hwc.shape == (4, 5, 3)
    np.testing.assert_allclose(hwc[..., 1], chw[1])
    np.testing.assert_allclose(viz.to_hwc(hwc), hwc)  # (H, W, 3) passes through
    assert viz.to_hwc(np.ones((4, 5))).shape == (4, 5, 3)
    assert viz.to_hwc(torch.ones(1, 4, 5)).shape == (4, 5, 3)
    assert viz.to_hwc(np.full((3, 2, 2), 7.0)).max() == 1.0  # clipped to [0, 1]


def test_colorize_endpoints_and_overlay_blend():
    amap = np.array([[0.0, 1.0], [2.0, 4.0]])
    jet = matplotlib.colormaps["jet"]
    heat = viz.colorize(amap)
    np.testing.assert_allclose(heat[0, 0], jet(0.0)[:3])
    np.testing.assert_allclose(heat[1, 1], jet(1.0)[:3])
    np.testing.assert_allclose(heat[1, 0], jet(0.5)[:3])
    # a shared range clips values outside it
    np.testing.assert_allclose(viz.colorize(amap, vmin=0, vmax=1)[1, 1], jet(1.0)[:3])
    img = np.full((3, 2, 2), 0.2)
    np.testing.assert_allclose(viz.overlay(img, amap, alpha=0.0), viz.to_hwc(img))
    np.testing.assert_allclose(viz.overlay(img, amap, alpha=0.25), 0.75 * 0.2 + 0.25 * heat)


def test_map_range_uses_quantile():
    maps = np.concatenate([np.zeros(999), [1000.0]])
    lo, hi = viz.map_range(maps, q=0.99)
    assert lo == 0.0 and hi < 1000.0
    assert viz.map_range(np.ones(5))[1] > 1.0  # degenerate range is widened


def test_anomaly_map_grid_axes_and_png(toy, tmp_path):
    images, masks, maps, labels, scores = toy
    fig = viz.anomaly_map_grid(torch.from_numpy(images), maps, masks, titles=[f"s={s:.2f}" for s in scores])
    assert len(fig.axes) == 4 * 4 + 1  # + colour bar
    # the heat-map panel draws the map itself with the shared range
    heat_ax = fig.axes[2]
    np.testing.assert_allclose(heat_ax.images[0].get_array(), maps[0])
    assert heat_ax.images[0].get_clim() == (maps.min(), maps.max())
    # anomalous rows get a ground-truth contour on the overlay panel, normal rows none
    assert len(fig.axes[3].collections) == 0 and len(fig.axes[4 * 2 + 3].collections) > 0
    _assert_png(viz.save_figure(fig, tmp_path / "grid.png"))


def test_anomaly_map_grid_without_masks(toy):
    images, _, maps, _, _ = toy
    fig = viz.anomaly_map_grid(images[:1], maps[:1])
    assert len(fig.axes) == 5
    assert fig.axes[1].get_title() == "no ground truth"


def test_sample_grid_hides_unused_cells(toy, tmp_path):
    images, masks, *_ = toy
    fig = viz.sample_grid(images[:3], masks[:3], titles=["a", "b", "c"], ncols=2)
    assert len(fig.axes) == 4
    assert [ax.get_visible() for ax in fig.axes] == [True, True, True, False]
    assert len(fig.axes[0].collections) == 0 and len(fig.axes[2].collections) > 0  # contour where anomalous
    _assert_png(viz.save_figure(fig, tmp_path / "samples.png"))


def test_sample_grid_real_mpdd_image(mpdd_root, tmp_path):
    mask_path = sorted((mpdd_root / "ground_truth" / "defective").glob("*_mask.png"))[0]
    img_path = mpdd_root / "test" / "defective" / mask_path.name.replace("_mask", "")
    img = np.asarray(Image.open(img_path).convert("RGB").resize((128, 128))) / 255.0
    mask = (np.asarray(Image.open(mask_path).convert("L").resize((128, 128))) > 127).astype(float)
    assert mask.sum() > 0
    fig = viz.sample_grid([img], [mask], titles=[img_path.name])
    assert len(fig.axes) == 1 and len(fig.axes[0].collections) > 0
    _assert_png(viz.save_figure(fig, tmp_path / "mpdd.png"))


def test_loss_curves_one_panel_per_term(tmp_path):
    log = {"step": [0, 10, 20, 30], "loss_st": [4.0, 2.0, 1.0, 0.5], "loss_ae": [1.0, 0.9, 0.8, 0.7],
           "lr": [0.0, 0.0, 0.0, 0.0]}
    fig = viz.loss_curves(log, terms=["loss_st", "loss_ae"])
    assert len(fig.axes) == 2
    x, y = fig.axes[0].lines[0].get_data()
    np.testing.assert_allclose(x, log["step"])
    np.testing.assert_allclose(y, log["loss_st"])
    assert fig.axes[0].get_yscale() == "log"
    assert [ax.get_title() for ax in fig.axes] == ["loss_st", "loss_ae"]
    # default terms: every numeric column but the step; non-positive values stay on a linear axis
    fig = viz.loss_curves(log, smooth=2)
    assert len(fig.axes) == 3 and fig.axes[2].get_yscale() == "linear"
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), [4.0, 3.0, 1.5, 0.75])  # moving average
    _assert_png(viz.save_figure(fig, tmp_path / "loss.png"))
    with pytest.raises(AssertionError, match="not in the log"):
        viz.loss_curves(log, terms=["loss_xx"])


def test_roc_curves_legend_matches_sklearn(toy, tmp_path):
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(20), np.ones(20)]
    scores = labels + rng.normal(0, 0.8, 40)
    fig = viz.roc_curves({"a": (labels, scores), "b": (labels, -scores)})
    assert len(fig.axes) == 1
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == [f"a ({roc_auc_score(labels, scores):.3f})", f"b ({roc_auc_score(labels, -scores):.3f})"]
    x, y = fig.axes[0].lines[0].get_data()
    assert (x[0], y[0]) == (0, 0) and (x[-1], y[-1]) == (1, 1)
    _assert_png(viz.save_figure(fig, tmp_path / "roc.png"))
    with pytest.raises(AssertionError, match="normal and anomalous"):
        viz.roc_curves({"a": (np.zeros(3), np.arange(3))})


def test_pro_curves_perfect_maps(toy, tmp_path):
    _, masks, maps, _, _ = toy
    fig = viz.pro_curves({"perfect": (masks, masks + 0.01 * maps), "noise": (masks, maps[::-1])}, max_fpr=0.3)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.lines) == 2
    assert ax.get_xlim() == (0, 0.3)
    x, y = ax.lines[0].get_data()
    assert x.max() <= 0.3 and y.max() == pytest.approx(1.0)  # a map equal to the mask overlaps fully
    for line in ax.lines:  # every curve is drawn up to the FPR limit (its corner points can lie far apart)
        assert line.get_xdata()[-1] == pytest.approx(0.3)
    label = ax.get_legend().get_texts()[0].get_text()
    assert label.startswith("perfect (") and float(label[9:-1]) > 0.95
    _assert_png(viz.save_figure(fig, tmp_path / "pro.png"))


def test_score_histogram_counts(toy, tmp_path):
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    fig = viz.score_histogram(labels, scores, threshold=0.5, bins=4)
    ax = fig.axes[0]
    heights = [sum(p.get_height() for p in c) for c in ax.containers]
    assert heights == [3, 2]
    assert any(line.get_xdata()[0] == 0.5 for line in ax.lines)  # threshold line
    _assert_png(viz.save_figure(fig, tmp_path / "hist.png"))


def test_select_best_worst_and_figure(toy, tmp_path):
    images, masks, maps, labels, scores = toy
    sel = viz.select_best_worst(labels, scores, k=5)  # k larger than each class
    assert set(sel) == {"anomalous, highest", "anomalous, lowest", "normal, lowest", "normal, highest"}
    assert sorted(sel["anomalous, highest"].tolist()) == [2, 3]
    assert scores[sel["anomalous, highest"][0]] == scores[2:].max()
    assert scores[sel["normal, highest"][0]] == scores[:2].max()
    assert set(viz.select_best_worst(np.zeros(3), np.arange(3), k=1)) == {"normal, lowest", "normal, highest"}
    fig = viz.best_worst_cases(images, maps, labels, scores, masks, k=2)
    assert len(fig.axes) == 4 * 2
    assert fig.axes[0].get_ylabel() == "anomalous, highest"
    _assert_png(viz.save_figure(fig, tmp_path / "cases.png"))


def test_save_figure_pdf_and_heatmap_png(toy, tmp_path):
    _, _, maps, labels, scores = toy
    path = viz.save_figure(viz.score_histogram(labels, scores), tmp_path / "sub" / "hist.pdf")
    assert path.read_bytes()[:4] == b"%PDF"
    assert not list((tmp_path / "sub").glob(".*.tmp"))  # no temporary left behind
    png = viz.save_heatmap_png(maps[2], tmp_path / "heat.png", vmin=0, vmax=1.1)
    with Image.open(png) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
        arr = np.asarray(im)
    jet = matplotlib.colormaps["jet"]
    expected = np.round(np.asarray(jet(np.clip(maps[2, 0, 0] / 1.1, 0, 1))[:3]) * 255)
    np.testing.assert_allclose(arr[0, 0], expected, atol=1)
