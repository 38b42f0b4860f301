"""Plots for the CLI and the notebooks: anomaly-map overlays, sample grids, curves and histograms.

Every function builds and returns a :class:`matplotlib.figure.Figure` without touching ``pyplot``'s
global state (no ``plt.show``, no implicit current figure), so the CLI can render headless and a notebook
cell shows the returned figure exactly once. :func:`save_figure` writes a figure atomically.

Images are accepted as (3, H, W) or (H, W, 3) arrays or tensors with values in [0, 1] (use
``mudenet_core.data.denormalize`` first for normalised tensors); maps and masks as (H, W) or (1, H, W).

Example:
    >>> import numpy as np
    >>> images = np.zeros((2, 3, 8, 8)); maps = np.random.default_rng(0).random((2, 8, 8))
    >>> fig = anomaly_map_grid(images, maps, masks=np.zeros((2, 8, 8)))
    >>> len(fig.axes)  # 2 rows x (image, ground truth, heat map, overlay) + 1 colour bar
    9
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mudenet_core.io import atomic_path

ArrayLike = Any  # numpy array or torch tensor
Images = Sequence[ArrayLike] | ArrayLike  # a stack (N, ...) or a list of N arrays/tensors

DEFAULT_CMAP = "jet"
PANEL_TITLES = ("image", "ground truth", "anomaly map", "overlay")


def _np(x: ArrayLike) -> np.ndarray:
    """A float numpy copy of an array or (CPU/GPU, grad or not) tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def to_hwc(image: ArrayLike) -> np.ndarray:
    """One image as (H, W, 3) float in [0, 1], from (3, H, W), (H, W, 3), (1, H, W) or (H, W).

    Example:
        >>> to_hwc(np.ones((3, 4, 5))).shape
        (4, 5, 3)
    """
    a = _np(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.ndim == 3 and a.shape[0] in (1, 3) and not (a.shape[-1] == 3 and a.shape[0] == 1):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C); channels-first wins when ambiguous (tensors)
    assert a.ndim == 3, f"expected an image (3,H,W) or (H,W,3), got {a.shape}"
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    assert a.shape[-1] == 3, f"expected 3 channels, got {a.shape}"
    return np.clip(a, 0.0, 1.0)


def to_hw(x: ArrayLike) -> np.ndarray:
    """One map or mask as (H, W) float, from (H, W) or (1, H, W)."""
    a = _np(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    assert a.ndim == 2, f"expected a map (H,W) or (1,H,W), got {a.shape}"
    return a


def map_range(maps: ArrayLike, q: float = 0.999) -> tuple[float, float]:
    """A shared colour range ``(vmin, vmax)`` for a set of maps: the minimum and the ``q`` quantile.

    Using one range for every image of a test set keeps normal images cool instead of stretching their noise.
    """
    a = _np(maps)
    lo, hi = float(np.min(a)), float(np.quantile(a, q))
    return lo, (hi if hi > lo else lo + 1e-12)


def colorize(amap: ArrayLike, vmin: float | None = None, vmax: float | None = None,
             cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Map (H, W) to an RGB heat map (H, W, 3) in [0, 1]; the range defaults to the map's own min/max."""
    m = to_hw(amap)
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    norm = np.clip((m - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return matplotlib.colormaps[cmap](norm)[..., :3]


def overlay(image: ArrayLike, amap: ArrayLike, *, alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Blend a heat map over an image: ``(1 - alpha) * image + alpha * colorize(map)``, (H, W, 3) in [0, 1].

    Example:
        >>> out = overlay(np.zeros((3, 4, 4)), np.eye(4), alpha=1.0)
        >>> out.shape, bool(np.allclose(out, colorize(np.eye(4))))
        ((4, 4, 3), True)
    """
    img, heat = to_hwc(image), colorize(amap, vmin, vmax, cmap)
    assert img.shape[:2] == heat.shape[:2], f"image {img.shape[:2]} and map {heat.shape[:2]} differ in size"
    return (1.0 - alpha) * img + alpha * heat


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def anomaly_map_grid(images: Images, maps: Images, masks: Images | None = None, *,
                     titles: Sequence[str] | None = None, vmin: float | None = None,
                     vmax: float | None = None, alpha: float = 0.5, cmap: str = DEFAULT_CMAP,
                     panel_size: float = 2.4) -> Figure:
    """One row per image: image | ground truth | anomaly map | overlay.

    Args:
        images: N images (N, 3, H, W) or a list of (3, H, W) / (H, W, 3), values in [0, 1].
        maps: N anomaly maps (N, H, W) or (N, 1, H, W).
        masks: N ground-truth masks like ``maps``; None draws an empty panel titled "no ground truth".
        titles: one row label per image (e.g. "crack  score=1.23").
        vmin: lower end of the shared colour range (see :func:`map_range`); default: the maps' minimum.
        vmax: upper end of the shared colour range; default: the maps' maximum.
        alpha: weight of the heat map in the overlay.
        cmap: matplotlib colour map of the heat map.
        panel_size: inches per panel.

    Returns:
        Figure with 4 * N image axes plus one colour bar axes (the last in ``fig.axes``).
    """
    n = len(images)
    assert n > 0 and len(maps) == n, f"got {n} images and {len(maps)} maps"
    assert masks is None or len(masks) == n, f"got {n} images and {len(masks)} masks"
    if vmin is None or vmax is None:
        lo, hi = float(min(_np(m).min() for m in maps)), float(max(_np(m).max() for m in maps))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    fig = Figure(figsize=(4 * panel_size, n * panel_size), layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    for i in range(n):
        img, m = to_hwc(images[i]), to_hw(maps[i])
        axes[i, 0].imshow(img)
        if masks is not None:
            axes[i, 1].imshow(to_hw(masks[i]), cmap="gray", vmin=0, vmax=1)
        else:
            axes[i, 1].imshow(np.zeros(m.shape), cmap="gray", vmin=0, vmax=1)
        im = axes[i, 2].imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
        axes[i, 3].imshow(overlay(img, m, alpha=alpha, vmin=vmin, vmax=vmax, cmap=cmap))
        if masks is not None and to_hw(masks[i]).max() > 0:
            axes[i, 3].contour(to_hw(masks[i]), levels=[0.5], colors="white", linewidths=0.8)
        for j, ax in enumerate(axes[i]):
            _off(ax)
            if i == 0:
                title = PANEL_TITLES[j] if (j != 1 or masks is not None) else "no ground truth"
                ax.set_title(title, fontsize=9)
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.8, fraction=0.05)
    return fig


def sample_grid(images: Images, masks: Images | None = None, *,
                titles: Sequence[str] | None = None, ncols: int = 4, panel_size: float = 2.2,
                contour_color: str = "red") -> Figure:
    """A grid of images with their ground-truth outlines drawn as contours.

    Args:
        images: N images, values in [0, 1].
        masks: N masks (H, W) in {0, 1} or None; empty masks draw nothing.
        titles: one title per image (e.g. the defect type).
        ncols: images per row; the grid has ``ceil(N / ncols)`` rows and unused cells are hidden.
        panel_size: inches per panel.
        contour_color: colour of the mask outlines.

    Returns:
        Figure with ``rows * ncols`` axes (N of them visible).
    """
    n = len(images)
    assert n > 0, "no images to draw"
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(ncols * panel_size, nrows * panel_size), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        _off(ax)
        if i >= n:
            ax.set_visible(False)
            continue
        ax.imshow(to_hwc(images[i]))
        if masks is not None and to_hw(masks[i]).max() > 0:
            ax.contour(to_hw(masks[i]), levels=[0.5], colors=contour_color, linewidths=1.0)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    return fig


def loss_curves(log: Mapping[str, Sequence[float]] | pd.DataFrame, *, step_key: str = "step",
                terms: Sequence[str] | None = None, logy: bool = True, smooth: int = 1,
                panel_size: float = 3.0) -> Figure:
    """One panel per loss term against the step (each term on its own scale).

    Args:
        log: a DataFrame or a dict of equal-length sequences, e.g. ``{"step": [...], "loss_st": [...],
            "loss_ae": [...]}``; a missing ``step_key`` means steps 0..n-1.
        step_key: the column holding the x axis.
        terms: the columns to draw; default every numeric column except ``step_key``.
        logy: log-scale y axis (only where all values are positive).
        smooth: moving-average window (1 = raw); the raw curve stays visible, faded.
        panel_size: inches per panel.

    Returns:
        Figure with one axes per term.
    """
    df = log if isinstance(log, pd.DataFrame) else pd.DataFrame({k: list(v) for k, v in log.items()})
    assert len(df) > 0, "empty loss log"
    x = df[step_key].to_numpy() if step_key in df else np.arange(len(df))
    if terms is None:
        terms = [c for c in df.columns if c != step_key and pd.api.types.is_numeric_dtype(df[c])]
    assert len(terms) > 0, f"no loss terms to draw among columns {list(df.columns)}"
    missing = [t for t in terms if t not in df]
    assert not missing, f"loss terms {missing} not in the log (columns: {list(df.columns)})"
    fig = Figure(figsize=(len(terms) * panel_size, panel_size * 0.85), layout="constrained")
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    for ax, t in zip(axes, terms, strict=True):
        y = df[t].to_numpy(dtype=float)
        if smooth > 1:
            ax.plot(x, y, alpha=0.3, lw=0.8)
            y = pd.Series(y).rolling(smooth, min_periods=1).mean().to_numpy()
        ax.plot(x, y, lw=1.2)
        if logy and np.all(y[np.isfinite(y)] > 0):
            ax.set_yscale("log")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(step_key)
        ax.grid(alpha=0.3)
    return fig


def roc_curves(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], *, title: str = "image-level ROC",
               size: float = 3.6) -> Figure:
    """ROC curves of several score sets on one axes, AUROC in the legend.

    Args:
        curves: name -> (labels (N,) in {0, 1}, scores (N,)); each needs both classes.
        title: axes title.
        size: figure size in inches (square).

    Returns:
        Figure with one axes.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    for name, (labels, scores) in curves.items():
        y, s = _np(labels).astype(int).ravel(), _np(scores).ravel()
        assert len(np.unique(y)) == 2, f"{name}: ROC needs normal and anomalous images, got {np.unique(y)}"
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.3, label=f"{name} ({roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=title)
    ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def pro_curves(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], *, max_fpr: float = 0.3,
               title: str = "per-region overlap", size: float = 3.6) -> Figure:
    """PRO curves (``metrics.pro_curve``) of several map sets, up to ``max_fpr``, AU-PRO in the legend.

    Args:
        curves: name -> (masks (N, H, W) in {0, 1}, maps (N, H, W)); the masks need anomalous pixels.
        max_fpr: right end of the x axis and the AU-PRO integration limit (0.3 in the MVTec AD protocol).
        title: axes title.
        size: figure size in inches (square).

    Returns:
        Figure with one axes.
    """
    from mudenet_core import metrics

    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    for name, (masks, maps) in curves.items():
        masks, maps = _np(masks), _np(maps)
        fpr, pro = metrics.pro_curve(masks, maps)
        # the curve holds only its corner points: cut at max_fpr with the end point interpolated
        fpr, pro = metrics.truncate_curve(np.asarray(fpr), np.asarray(pro), max_fpr)
        aupro = metrics.au_pro(masks, maps, max_fpr=max_fpr)
        ax.plot(fpr, pro, lw=1.3, label=f"{name} ({aupro:.3f})")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, max_fpr), ylim=(0, 1.01),
           title=title)
    ax.legend(fontsize=7, loc="lower right", title=f"AU-PRO@{max_fpr:g}", title_fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def pro_curve_figure(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], *, max_fpr: float = 0.3,
                     title: str = "per-region overlap", size: float = 3.6) -> Figure:
    """Like :func:`pro_curves`, from curves already computed by ``metrics.pro_curve`` (each computed once).

    Args:
        curves: name -> (fpr (K,), pro (K,)), the full curve from (0, 0) to (1, 1).
        max_fpr: right end of the x axis and the AU-PRO integration limit (0.3 in the MVTec AD protocol).
        title: axes title.
        size: figure size in inches (square).

    Returns:
        Figure with one axes; the legend gives each AU-PRO (area up to ``max_fpr`` divided by ``max_fpr``).

    Example:
        >>> fig = pro_curve_figure({"m": (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))})
        >>> fig.axes[0].get_legend().get_texts()[0].get_text()
        'm (1.000)'
    """
    from mudenet_core import metrics

    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    for name, (fpr, pro) in curves.items():
        fpr, pro = np.asarray(fpr, dtype=float), np.asarray(pro, dtype=float)
        aupro = metrics.partial_auc(fpr, pro, max_fpr) / max_fpr
        x, y = metrics.truncate_curve(fpr, pro, max_fpr)
        ax.plot(x, y, lw=1.3, label=f"{name} ({aupro:.3f})")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, max_fpr), ylim=(0, 1.01),
           title=title)
    ax.legend(fontsize=7, loc="lower right", title=f"AU-PRO@{max_fpr:g}", title_fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def score_histogram(labels: ArrayLike, scores: ArrayLike, *, threshold: float | None = None, bins: int = 30,
                    title: str = "image scores", size: tuple[float, float] = (4.2, 3.0)) -> Figure:
    """Histograms of the image scores of normal vs anomalous images (shared bins), optional threshold line.

    Returns:
        Figure with one axes.
    """
    y, s = _np(labels).astype(int).ravel(), _np(scores).ravel()
    assert y.shape == s.shape, f"labels {y.shape} and scores {s.shape} differ"
    edges = np.histogram_bin_edges(s, bins=bins)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    for lab, name, color in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        if np.any(y == lab):
            n = int(np.sum(y == lab))
            ax.hist(s[y == lab], bins=edges, alpha=0.6, color=color, label=f"{name} (n={n})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1.0, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="anomaly score", ylabel="images", title=title)
    ax.legend(fontsize=7)
    return fig


def select_best_worst(labels: ArrayLike, scores: ArrayLike, k: int = 3) -> dict[str, np.ndarray]:
    """Indices of the best and worst cases per class, ``k`` each (fewer where a class is smaller).

    Returns:
        ``{"anomalous, highest", "anomalous, lowest", "normal, lowest", "normal, highest"}`` -> indices
        sorted from most to least extreme (anomalous images with the lowest scores and normal images with the
        highest are the hardest cases); classes absent from ``labels`` are left out.

    Example:
        >>> sel = select_best_worst([0, 0, 1, 1], [0.1, 0.9, 0.5, 2.0], k=1)
        >>> {k: v.tolist() for k, v in sel.items()}
        {'anomalous, highest': [3], 'anomalous, lowest': [2], 'normal, lowest': [0], 'normal, highest': [1]}
    """
    y, s = _np(labels).astype(int).ravel(), _np(scores).ravel()
    out: dict[str, np.ndarray] = {}
    for lab, name, best_high in ((1, "anomalous", True), (0, "normal", False)):
        idx = np.flatnonzero(y == lab)
        if idx.size == 0:
            continue
        order = idx[np.argsort(s[idx], kind="stable")]  # ascending score
        kk = min(k, idx.size)
        high, low = order[::-1][:kk], order[:kk]
        if best_high:
            out[f"{name}, highest"], out[f"{name}, lowest"] = high, low
        else:
            out[f"{name}, lowest"], out[f"{name}, highest"] = low, high
    return out


def best_worst_cases(images: Images, maps: Images, labels: ArrayLike, scores: ArrayLike,
                     masks: Images | None = None, *,
                     k: int = 3, vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5,
                     cmap: str = DEFAULT_CMAP, panel_size: float = 2.2) -> Figure:
    """Overlays of the easiest and hardest cases: one row per group of :func:`select_best_worst`.

    Args:
        images: the whole scored set, N images in [0, 1].
        maps: their anomaly maps (N, H, W).
        labels: (N,) ground-truth labels in {0, 1}.
        scores: (N,) image scores.
        masks: (N, H, W) ground-truth masks (outlined in white) or None.
        k: cases per group (columns).
        vmin: lower end of the shared colour range; default :func:`map_range` of ``maps``.
        vmax: upper end of the shared colour range; default :func:`map_range` of ``maps``.
        alpha: weight of the heat map in the overlay.
        cmap: matplotlib colour map of the heat map.
        panel_size: inches per panel.

    Returns:
        Figure with ``rows * k`` axes (rows = groups present, at most 4); unused cells are hidden.
    """
    groups = select_best_worst(labels, scores, k)
    assert groups, "no images to select from"
    s = _np(scores).ravel()
    if vmin is None or vmax is None:
        lo, hi = map_range(np.stack([to_hw(m) for m in maps]))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    k = max(len(v) for v in groups.values())
    fig = Figure(figsize=(k * panel_size, len(groups) * panel_size), layout="constrained")
    axes = fig.subplots(len(groups), k, squeeze=False)
    for r, (group, idx) in enumerate(groups.items()):
        for c in range(k):
            ax = axes[r, c]
            _off(ax)
            if c >= len(idx):
                ax.set_visible(False)
                continue
            i = int(idx[c])
            ax.imshow(overlay(images[i], maps[i], alpha=alpha, vmin=vmin, vmax=vmax, cmap=cmap))
            if masks is not None and to_hw(masks[i]).max() > 0:
                ax.contour(to_hw(masks[i]), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(f"#{i}  score={s[i]:.3g}", fontsize=7)
            if c == 0:
                ax.set_ylabel(group, fontsize=8)
    return fig


def method_map_grid(images: Images, masks: Images | None, maps: Mapping[str, Images], *,
                    ranges: Mapping[str, tuple[float, float]] | None = None,
                    row_titles: Sequence[str] | None = None,
                    cell_titles: Mapping[str, Sequence[str]] | None = None, alpha: float = 0.5,
                    cmap: str = DEFAULT_CMAP, panel_size: float = 2.0) -> Figure:
    """The same images under every method: a row per image; the image, then one overlay per method.

    Args:
        images: N images (N, 3, H, W) or a list of (3, H, W) / (H, W, 3), values in [0, 1].
        masks: N ground-truth masks (H, W) in {0, 1} (outlined in red on the image, white on the overlays),
            or None.
        maps: method -> its N maps (N, H, W), in the order of ``images``.
        ranges: method -> (vmin, vmax) colour range, e.g. :func:`map_range` of the method's whole test set, so
            a method's colours mean the same in every row; default: the range of the N maps shown.
        row_titles: one label per image (left of the row).
        cell_titles: method -> N titles (e.g. the image score).
        alpha: weight of the heat map in the overlay.
        cmap: matplotlib colour map of the heat maps.
        panel_size: inches per panel.

    Returns:
        Figure with ``N * (1 + len(maps))`` axes.

    Example:
        >>> fig = method_map_grid(np.zeros((2, 3, 8, 8)), np.zeros((2, 8, 8)),
        ...                       {"a": np.ones((2, 8, 8)), "b": np.zeros((2, 8, 8))})
        >>> len(fig.axes), fig.axes[1].get_title()
        (6, 'a')
    """
    n = len(images)
    assert n > 0, "no images to draw"
    assert masks is None or len(masks) == n, f"got {n} images and {len(masks)} masks"
    for name, m in maps.items():
        assert len(m) == n, f"{name}: got {len(m)} maps for {n} images"
    names = list(maps)
    fig = Figure(figsize=((1 + len(names)) * panel_size, n * panel_size), layout="constrained")
    axes = fig.subplots(n, 1 + len(names), squeeze=False)
    for i in range(n):
        img = to_hwc(images[i])
        mask = None if masks is None else to_hw(masks[i])
        axes[i, 0].imshow(img)
        if mask is not None and mask.max() > 0:
            axes[i, 0].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        for j, name in enumerate(names, start=1):
            lo, hi = ranges[name] if ranges and name in ranges else map_range(np.stack(
                [to_hw(x) for x in maps[name]]), q=1.0)
            axes[i, j].imshow(overlay(img, maps[name][i], alpha=alpha, vmin=lo, vmax=hi, cmap=cmap))
            if mask is not None and mask.max() > 0:
                axes[i, j].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
            label = name if i == 0 else ""
            if cell_titles and name in cell_titles:
                label = f"{label}\n{cell_titles[name][i]}" if label else str(cell_titles[name][i])
            axes[i, j].set_title(label, fontsize=7)
        for ax in axes[i]:
            _off(ax)
        if i == 0:
            axes[i, 0].set_title("image + ground truth", fontsize=7)
        if row_titles is not None:
            axes[i, 0].set_ylabel(str(row_titles[i]), fontsize=7)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110, close: bool = True) -> Path:
    """Save a figure atomically; the format follows the suffix (``.png``, ``.pdf``, ``.svg``)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    if close:
        fig.clf()
    return path


def save_heatmap_png(amap: ArrayLike, path: str | Path, *, vmin: float | None = None,
                     vmax: float | None = None, cmap: str = DEFAULT_CMAP) -> Path:
    """Write one map as a colour PNG at its own resolution (no axes), atomically."""
    from PIL import Image

    rgb = (colorize(amap, vmin, vmax, cmap) * 255).round().astype(np.uint8)  # (H, W, 3)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
