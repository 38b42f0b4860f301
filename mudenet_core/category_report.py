"""One static page per (dataset, category): every method side by side, curves and the hardest test images.

The page is written without code (the notebooks' own pages stay linked for those who want it), from what the
runs saved; nothing is re-run. Per run folder ``runs/<dataset>/<category>/seed<k>/`` it reads::

    tables/metrics_<method>.csv        tidy, splits val and test (mean ± std over seeds on the page)
    tables/timings_<method>.csv        tidy: fit_s, images_per_s, ...
    eval/<method>/scores.csv           test split: image_path, category, defect_type, label, score
    eval/<method>/maps.npy             (N, H, W) float16 in the order of scores.csv (optional: PRO, grid)
    eval/<method>/val/scores.csv       validation split (optional: validation ROC)
    splits/<dataset>_<category>.csv    resolved index: ground-truth masks are reloaded from its test rows

and writes ``<profile>/categories/<dataset>/<category>/index.html`` with ``roc.png``, ``roc_val.png``,
``pro.png`` and ``hardest.png`` beside it. Curves and images come from one seed (the one with the most
evaluated methods, lowest first); tables average every seed.

Example:
    >>> s = {"a": pd.DataFrame({"image_path": ["n1", "n2", "x1", "x2"], "label": [0, 0, 1, 1],
    ...                         "defect_type": ["good", "good", "hole", "hole"],
    ...                         "score": [0.1, 0.9, 0.5, 2.0]})}
    >>> hardest_images(s, k_normal=1, k_anomalous=1)[["image_path", "group"]].values.tolist()
    [['n2', 'normal, highest scores'], ['x1', 'anomalous, lowest scores']]
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mudenet_core import report, report_html, viz
from mudenet_core.io import REPO_ROOT, atomic_write_text

PAGES_DIR = "categories"
GROUP_NORMAL = "normal, highest scores"
GROUP_ANOMALOUS = "anomalous, lowest scores"


class CategoryPageError(ValueError):
    """A category whose runs cannot make a page (no run folder, no metrics)."""


# ----------------------------------------------------------------------------------------------------
# Reading one category's runs
# ----------------------------------------------------------------------------------------------------
def page_path(profile_dir: str | Path, dataset: str, category: str) -> Path:
    """``<profile>/categories/<dataset>/<category>/index.html``."""
    return Path(profile_dir) / PAGES_DIR / dataset / category / "index.html"


def run_dirs(profile_dir: str | Path, dataset: str, category: str) -> dict[int, Path]:
    """Seed -> run folder ``runs/<dataset>/<category>/seed<k>``, sorted by seed."""
    out = {}
    for p in Path(profile_dir).glob(f"runs/{dataset}/{category}/seed*"):
        m = re.fullmatch(r"seed(\d+)", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def categories(profile_dir: str | Path) -> list[tuple[str, str]]:
    """Every (dataset, category) with at least one run folder that has per-run metrics."""
    found = {(p.parents[3].name, p.parents[2].name)
             for p in Path(profile_dir).glob("runs/*/*/seed*/tables/metrics_*.csv")}
    return sorted(found)


def eval_dir(run_dir: Path, method: str, split: report.Split = "test") -> Path:
    """``eval/<method>`` (test) or ``eval/<method>/val`` (validation)."""
    return run_dir / "eval" / method / ("val" if split == "val" else "")


def eval_methods(run_dir: Path) -> list[str]:
    """Methods with a test ``eval/<method>/scores.csv`` in a run folder, sorted."""
    return sorted(p.parent.name for p in (run_dir / "eval").glob("*/scores.csv"))


def load_scores(run_dir: Path, method: str, split: report.Split = "test") -> pd.DataFrame | None:
    """A method's per-image scores (image_path, category, defect_type, label, score), or None if absent."""
    path = eval_dir(run_dir, method, split) / "scores.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    missing = [c for c in ("image_path", "label", "score") if c not in df.columns]
    if missing:
        raise CategoryPageError(f"{path}: missing column(s) {missing}")
    if "defect_type" not in df.columns:
        df["defect_type"] = np.where(df["label"] == 0, "good", "anomaly")
    return df


def load_maps(run_dir: Path, method: str, n: int, split: report.Split = "test") -> np.ndarray | None:
    """A method's maps (N, H, W) as float32, or None if absent; the row count must match its scores."""
    path = eval_dir(run_dir, method, split) / "maps.npy"
    if not path.is_file():
        return None
    maps = np.load(path, mmap_mode="r")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]  # (N, 1, H, W) -> (N, H, W)
    if maps.ndim != 3 or len(maps) != n:
        raise CategoryPageError(f"{path}: expected ({n}, H, W) maps in the order of scores.csv, "
                                f"got {tuple(maps.shape)}")
    return np.asarray(maps, dtype=np.float32)


def aligned_maps(scores: pd.DataFrame, maps: np.ndarray, image_paths: Sequence[str]) -> np.ndarray:
    """The rows of ``maps`` (in the order of ``scores``) for ``image_paths``, in that order: (K, H, W)."""
    pos = pd.Series(np.arange(len(scores)), index=scores["image_path"].astype(str))
    pos = pos[~pos.index.duplicated()]
    return maps[pos.loc[list(image_paths)].to_numpy()]


def hardest_images(
    scores: Mapping[str, pd.DataFrame], k_normal: int = 3, k_anomalous: int = 3
) -> pd.DataFrame:
    """The test images every method finds hardest: normals scored highest, anomalies scored lowest.

    Each method's scores are turned into ranks (fractional, ``pct=True``, ties averaged) over the images all
    methods scored, so methods on different score scales weigh the same; ``mean_rank`` is their mean. The
    hardest normal images have the highest mean rank, the hardest anomalous ones the lowest (ties broken by
    image path).

    Args:
        scores: method -> its per-image scores (image_path, label, score; defect_type if known).
        k_normal: normal images to pick (fewer when there are fewer).
        k_anomalous: anomalous images to pick.

    Returns:
        rows normal first (hardest first), then anomalous: image_path, label, defect_type, mean_rank, group,
        and ``score_<method>`` per method.
    """
    if not scores:
        raise CategoryPageError("hardest_images: no method's scores given")
    frames = {m: df.drop_duplicates("image_path").set_index("image_path") for m, df in scores.items()}
    common = sorted(set.intersection(*(set(f.index.astype(str)) for f in frames.values())))
    if not common:
        raise CategoryPageError("hardest_images: the methods scored no image in common")
    first = next(iter(frames.values())).loc[common]
    base = pd.DataFrame({"image_path": common, "label": first["label"].astype(int).to_numpy(),
                         "defect_type": first["defect_type"].astype(str).to_numpy()
                         if "defect_type" in first.columns else ""})
    ranks = []
    for m, f in frames.items():
        s = f.loc[common, "score"].astype(float)
        ranks.append(s.rank(pct=True, method="average").to_numpy())
        base[f"score_{m}"] = s.to_numpy()
    base["mean_rank"] = np.mean(ranks, axis=0)
    normal = base[base["label"] == 0].sort_values(["mean_rank", "image_path"], ascending=[False, True])
    anomalous = base[base["label"] == 1].sort_values(["mean_rank", "image_path"], ascending=[True, True])
    out = pd.concat([normal.head(k_normal).assign(group=GROUP_NORMAL),
                     anomalous.head(k_anomalous).assign(group=GROUP_ANOMALOUS)], ignore_index=True)
    cols = ["image_path", "label", "defect_type", "mean_rank", "group"]
    return out[cols + [c for c in out.columns if c.startswith("score_")]]


def _resolve(p: str) -> str:
    if not p:
        return p
    path = Path(p)
    return str(path if path.is_absolute() or path.exists() else REPO_ROOT / path)


def load_test_index(run_dir: Path, dataset: str, category: str) -> pd.DataFrame:
    """The test rows of the run's saved split index ``splits/<dataset>_<category>.csv``.

    Raises:
        FileNotFoundError: the run saved no index.
    """
    path = run_dir / "splits" / f"{dataset}_{category}.csv"
    idx = pd.read_csv(path)
    idx["mask_path"] = idx["mask_path"].fillna("").astype(str)
    idx["image_path"] = idx["image_path"].astype(str)
    return idx[idx["split"] == "test"].drop_duplicates("image_path").reset_index(drop=True)


def load_items(index: pd.DataFrame, image_paths: Sequence[str], size: int, *,
               with_images: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Images and ground-truth masks of ``image_paths`` at the maps' size, as the data layer loads them.

    Uses :class:`mudenet_core.data.AnomalyDataset` (bilinear image resize, nearest-neighbour mask resize to a
    ``size`` x ``size`` square), so masks match the maps the evaluation scored.

    Returns:
        images (K, 3, size, size) in [0, 1] (None when ``with_images`` is False) and masks (K, size, size)
        uint8 in {0, 1}.

    Raises:
        KeyError: an image path is not in the index; DataError / FileNotFoundError: a file is missing.
    """
    from mudenet_core.data import AnomalyDataset
    from mudenet_core.data.images import image_size
    from mudenet_core.data.transforms import resize_mask

    sub = index.set_index("image_path").loc[list(image_paths)].reset_index()
    sub["image_path"] = [_resolve(p) for p in sub["image_path"]]
    sub["mask_path"] = [_resolve(p) for p in sub["mask_path"]]
    ds = AnomalyDataset(sub, image_size=size, normalize=False)
    if with_images:
        items = [ds[i] for i in range(len(ds))]
        images = np.stack([it["image"].numpy() for it in items])  # (K, 3, S, S)
        masks = np.stack([(it["mask"][0] > 0.5).numpy() for it in items]).astype(np.uint8)  # (K, S, S)
        return images, masks
    masks = []
    for i in range(len(ds)):
        w, h = image_size(sub["image_path"].iloc[i])
        m = resize_mask(ds.load_mask(i, (h, w)), size)  # (1, S, S)
        masks.append((m[0] > 0.5).numpy())
    return None, np.stack(masks).astype(np.uint8)


def choose_seed(runs: Mapping[int, Path]) -> int | None:
    """The seed whose run has the most methods with test scores (the lowest among ties); None if none."""
    counts = {s: len(eval_methods(p)) for s, p in runs.items()}
    best = max(counts.values(), default=0)
    return min(s for s, c in counts.items() if c == best) if best else None


# ----------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------
def _img(rel: str, alt: str, caption: str) -> str:
    return (f"<figure><img src='{html.escape(rel)}' alt='{html.escape(alt)}'>"
            f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")


def _short(path: str, parts: int = 3) -> str:
    return "/".join(Path(path).parts[-parts:])


def _roc_section(test: Mapping[str, pd.DataFrame], val: Mapping[str, pd.DataFrame], category: str,
                 out_dir: Path) -> list[str]:
    parts = []
    for split, scores, name, caption in (
        ("test", test, "roc.png", "image-level ROC on test, every method (AUROC in the legend)"),
        ("val", val, "roc_val.png", "image-level ROC on val (held-out normals + synthetic anomalies)"),
    ):
        curves = {m: (s["label"], s["score"]) for m, s in scores.items() if s["label"].nunique() == 2}
        if curves:
            fig = viz.roc_curves(curves, title=f"{category}: image-level ROC ({split})")
            viz.save_figure(fig, out_dir / name)
            parts.append(_img(name, f"ROC {split}", caption))
    return parts


def _pro_section(masks: np.ndarray, maps: Mapping[str, np.ndarray], category: str,
                 out_dir: Path) -> list[str]:
    if not (masks.any() and (masks == 0).any()):
        return ["<p class='note'>The test masks have no anomalous pixels: no PRO curves.</p>"]
    from mudenet_core import metrics

    curves = {m: metrics.pro_curve(masks, a) for m, a in maps.items()}  # each (fpr, pro), computed once
    fig = viz.pro_curve_figure(curves, title=f"{category}: per-region overlap (test)")
    viz.save_figure(fig, out_dir / "pro.png")
    caption = "PRO curves on test up to FPR 0.3, every method (AU-PRO in the legend)"
    return [_img("pro.png", "PRO test", caption)]


_GRID_NOTE = (
    "The normal images scored highest and the anomalous images scored lowest, by the mean over methods of "
    "each image's score rank. Columns: the image with its ground truth outlined, then each method's map over "
    "it (one colour range per method: its test maps' minimum to 99.9% quantile)."
)


def _grid_section(hard: pd.DataFrame, images: np.ndarray, masks: np.ndarray,
                  shown: Mapping[str, np.ndarray], ranges: Mapping[str, tuple[float, float]],
                  out_dir: Path) -> list[str]:
    titles = [f"{g.split(',')[0]} · {d}\n{_short(p, 2)}"
              for g, d, p in zip(hard["group"], hard["defect_type"], hard["image_path"], strict=True)]
    cells = {m: [f"score {v:.3g}" for v in hard[f"score_{m}"]] for m in shown}
    fig = viz.method_map_grid(images, masks, shown, ranges=ranges, row_titles=titles, cell_titles=cells)
    viz.save_figure(fig, out_dir / "hardest.png")
    table = hard.assign(image=[_short(p) for p in hard["image_path"]], mean_rank=hard["mean_rank"].round(3))
    table = table[["group", "image", "defect_type", "mean_rank", *[f"score_{m}" for m in shown]]]
    for m in shown:
        table[f"score_{m}"] = [f"{v:.4g}" for v in table[f"score_{m}"]]
    table["mean_rank"] = [f"{v:.3f}" for v in table["mean_rank"]]
    return [
        f"<h3>Hardest test images</h3><p class='note'>{html.escape(_GRID_NOTE)}</p>",
        _img("hardest.png", "hardest images", "rows: images; columns: methods"),
        report_html.html_table(table, table_id="tbl-hardest", index=False),
    ]


def _curves_and_grid(run_dir: Path, dataset: str, category: str, out_dir: Path, *, k_normal: int,
                     k_anomalous: int) -> list[str]:
    """The figures section of the page (one seed); notes stand where something could not be drawn."""
    methods = eval_methods(run_dir)
    test = {m: s for m in methods if (s := load_scores(run_dir, m)) is not None}
    val = {m: s for m in methods if (s := load_scores(run_dir, m, "val")) is not None}
    parts = _roc_section(test, val, category, out_dir)
    maps = {m: a for m, s in test.items() if (a := load_maps(run_dir, m, len(s))) is not None}
    sizes = {a.shape[-2:] for a in maps.values()}
    if not maps:
        return parts + ["<p class='note'>No anomaly maps saved (eval/&lt;method&gt;/maps.npy): no PRO curves "
                        "and no map grid.</p>"]
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        return parts + [f"<p class='note'>Maps of different or non-square sizes ({sorted(sizes)}): no PRO "
                        "curves and no map grid.</p>"]
    size = int(next(iter(sizes))[0])
    try:
        index = load_test_index(run_dir, dataset, category)
        scored = [set(test[m]["image_path"].astype(str)) for m in maps]
        common = [p for p in test[next(iter(maps))]["image_path"].astype(str) if all(p in s for s in scored)]
        _, masks = load_items(index, common, size, with_images=False)
        parts += _pro_section(masks, {m: aligned_maps(test[m], a, common) for m, a in maps.items()},
                              category, out_dir)
        hard = hardest_images({m: test[m] for m in maps}, k_normal, k_anomalous)
        images, hmasks = load_items(index, hard["image_path"], size)
        shown = {m: aligned_maps(test[m], a, hard["image_path"]) for m, a in maps.items()}
        ranges = {m: viz.map_range(a) for m, a in maps.items()}
        parts += _grid_section(hard, images, hmasks, shown, ranges, out_dir)
    except (FileNotFoundError, KeyError, OSError, ValueError) as e:
        note = (f"Test images or masks could not be reloaded from the split index ({type(e).__name__}: {e}); "
                "no PRO curves and no map grid.")
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    return parts


def write_category_page(
    profile_dir: str | Path,
    dataset: str,
    category: str,
    *,
    seed: int | None = None,
    k_normal: int = 3,
    k_anomalous: int = 3,
    profile: str = "",
) -> Path:
    """Write the page of one category and return its path (:func:`page_path`).

    Args:
        profile_dir: the profile folder (``results/<profile>`` or ``results/reference/<profile>``).
        dataset: dataset name.
        category: category name.
        seed: the run whose curves and maps are drawn; default :func:`choose_seed`.
        k_normal: hardest normal images shown.
        k_anomalous: hardest anomalous images shown.
        profile: profile name for the title (default: the folder's name).

    Raises:
        CategoryPageError: no run folder or no per-run metrics for this category.
    """
    profile_dir = Path(profile_dir)
    profile = profile or profile_dir.name
    runs = run_dirs(profile_dir, dataset, category)
    if not runs:
        raise CategoryPageError(f"{profile_dir}: no run folder runs/{dataset}/{category}/seed*")
    metrics = report.read_tidy(p for r in runs.values() for p in sorted(r.glob("tables/metrics_*.csv")))
    if metrics.empty:
        raise CategoryPageError(f"{profile_dir}: no tables/metrics_*.csv under runs/{dataset}/{category}")
    timings = report.read_tidy(p for r in runs.values() for p in sorted(r.glob("tables/timings_*.csv")))
    out = page_path(profile_dir, dataset, category)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{dataset} / {category} — profile {profile}"
    index_rel = os.path.relpath(profile_dir / "index.html", out.parent)
    parts = [
        f"<p class='note'><a href='{html.escape(index_rel)}'>← all results</a></p>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(report.PROTOCOL_NOTE)}</p>",
        "<h2>Every method</h2>",
        report_html.html_table(report.headline_table(metrics, timings, dataset=dataset, category=category),
                          table_id="tbl-methods"),
    ]
    dep = report.deployment_table(metrics, dataset=dataset, category=category)
    if not dep.empty:
        parts.append("<h3>Deployment: test metrics at the threshold calibrated on val, beside the oracle "
                     "F1-max</h3>")
        parts.append(report_html.html_table(dep, table_id="tbl-deployment"))
    seed = choose_seed(runs) if seed is None else seed
    if seed is not None and seed in runs:
        parts.append(f"<h2>Curves and maps (seed {seed})</h2>")
        parts += _curves_and_grid(runs[seed], dataset, category, out.parent, k_normal=k_normal,
                                  k_anomalous=k_anomalous)
    else:
        parts.append("<p class='note'>No run saved per-image scores (eval/&lt;method&gt;/scores.csv): "
                     "no curves.</p>")
    notebooks = sorted(p for r in runs.values() for p in r.glob("*.html"))
    if notebooks:
        parts.append("<h2>Notebooks (with code)</h2><ul class='runs'>")
        for p in notebooks:
            rel = os.path.relpath(p, out.parent)
            parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(os.path.relpath(p, profile_dir))}"
                         "</a></li>")
        parts.append("</ul>")
    return atomic_write_text(out, report_html.html_page(title, parts))


def write_category_pages(profile_dir: str | Path, *, k_normal: int = 3, k_anomalous: int = 3,
                         profile: str = "") -> list[Path]:
    """Write the page of every (dataset, category) of a profile (see :func:`write_category_page`)."""
    return [
        write_category_page(profile_dir, ds, cat, k_normal=k_normal, k_anomalous=k_anomalous, profile=profile)
        for ds, cat in categories(profile_dir)
    ]
