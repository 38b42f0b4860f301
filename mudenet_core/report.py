"""Result tables: everything here reads tidy CSVs only, never models.

Every table is *tidy*: one row per measurement with the columns of :data:`TIDY_COLUMNS` (tables of
ablations add ``ablation`` and ``variant``). ``split`` says which images a number was measured on: ``val``
(held-out normal training images plus synthetic anomalies made on them: what model selection and threshold
calibration may look at) or ``test`` (the test split, read once for the final report). A table never stores
a "Mean" row: means over seeds, their standard deviation and the mean over categories are computed here,
when the table is rendered. CSVs written before ``split`` existed are read as ``split="test"``.

Layout of a profile folder (``results/<profile>/``, or ``results/reference/<profile>/`` for the committed
reference run; every function takes the profile folder as a parameter)::

    runs/<dataset>/<category>/seed<k>/tables/*.csv     per-run tidy CSVs written by the notebooks
    runs/<dataset>/<category>/seed<k>/eval/<method>/   scores.csv, maps.npy (test), val/ (validation)
    runs/<dataset>/<category>/seed<k>/NN_name.html     rendered notebooks (linked from the index)
    tables/<dataset>.csv                               per-category metrics, every method (tidy)
    tables/ablations.csv, tables/timings.csv           tidy
    figures/*.png                                      built from the tables only (90_report)
    categories/<dataset>/<category>/index.html         one page per category (:mod:`category_report`)
    index.html                                         static page: headline tables + links

Beside this module: :mod:`mudenet_core.published` (the published numbers, "paper vs ours") and
:mod:`mudenet_core.report_html` (the static HTML: ``index.html`` and the helpers the category pages share).

Example:
    >>> df = pd.DataFrame({"method": "m", "dataset": "d", "category": "c", "seed": [0, 1, 2], "split": "test",
    ...                    "metric": "image_auroc", "value": [0.9, 0.8, 1.0],
    ...                    "config_hash": "h", "git_sha": "s"})
    >>> agg = aggregate_seeds(df)
    >>> float(agg["mean"].iloc[0]), round(float(agg["std"].iloc[0]), 6), int(agg["n"].iloc[0])
    (0.9, 0.1, 3)
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mudenet_core.io import atomic_write_text, save_csv

Split = Literal["val", "test"]
SPLITS: tuple[str, ...] = ("val", "test")
TIDY_COLUMNS = ["method", "dataset", "category", "seed", "split", "metric", "value", "config_hash", "git_sha"]
ABLATION_COLUMNS = [
    "method",
    "dataset",
    "category",
    "seed",
    "split",
    "ablation",
    "variant",
    "metric",
    "value",
    "config_hash",
    "git_sha",
]
HEADLINE_METRICS = ("image_auroc", "pixel_auroc", "au_pro")
# at the threshold calibrated on the validation split (what a deployment gets), measured on test
DEPLOYMENT_METRICS = (
    "f1_at_threshold",
    "precision_at_threshold",
    "recall_at_threshold",
    "accuracy_at_threshold",
)
TIMING_METRICS = ("fit_s", "distill_s", "train_s", "calibration_s", "images_per_s")
PERCENT_METRICS = {
    "image_auroc",
    "image_aupr",
    "pixel_auroc",
    "au_pro",
    "f1_max",
    *DEPLOYMENT_METRICS,
}
METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "au_pro": "AU-PRO",
    "image_aupr": "image AUPR",
    "f1_max": "F1-max (oracle: best threshold on test)",
    "f1_at_threshold": "F1 @ val threshold",
    "precision_at_threshold": "precision @ val threshold",
    "recall_at_threshold": "recall @ val threshold",
    "accuracy_at_threshold": "accuracy @ val threshold",
    "threshold": "threshold (calibrated on val)",
    "fit_s": "fit (s)",
    "distill_s": "distill (s)",
    "train_s": "train (s)",
    "calibration_s": "calibration (s)",
    "images_per_s": "images/s",
}
_FORBIDDEN_LABELS = {"mean", "average", "avg", "all"}


class ReportError(ValueError):
    """A results table that cannot be used (missing columns, a stored mean row, no data)."""


def metric_label(metric: str) -> str:
    """The display name of a metric (``"image AUROC"``); unknown metrics keep their name."""
    return METRIC_LABELS.get(metric, metric)


# ----------------------------------------------------------------------------------------------------
# Tidy rows
# ----------------------------------------------------------------------------------------------------
def tidy_metrics(
    metrics: dict[str, float],
    *,
    method: str,
    dataset: str,
    category: str,
    seed: int,
    split: Split,
    config_hash: str,
    git_sha: str,
    **extra: str,
) -> pd.DataFrame:
    """One tidy row per metric.

    Args:
        metrics: metric name -> value (non-finite values are dropped, never stored as NaN).
        method: method name (registry name, or e.g. ``mudenet_structural`` for a component).
        dataset: dataset name.
        category: category name.
        seed: training seed.
        split: ``"val"`` (validation split: held-out normals + synthetic anomalies) or ``"test"``.
        config_hash: hash of the config that produced the numbers.
        git_sha: commit of the code.
        **extra: further identifying columns, e.g. ``ablation="levels", variant="1,2"``.

    Raises:
        ReportError: ``split`` is not "val" or "test".

    Example:
        >>> tidy_metrics({"image_auroc": 0.5, "x": float("nan")}, method="m", dataset="d", category="c",
        ...              seed=0, split="val", config_hash="h", git_sha="s")[["split", "metric", "value"]
        ...              ].values.tolist()
        [['val', 'image_auroc', 0.5]]
    """
    if split not in SPLITS:
        raise ReportError(f"tidy_metrics: split must be one of {SPLITS}, got {split!r}")
    rows = []
    for k, v in metrics.items():
        if v is None or not np.isfinite(float(v)):
            continue
        rows.append(
            {
                "method": method,
                "dataset": dataset,
                "category": category,
                "seed": int(seed),
                "split": split,
                **extra,
                "metric": k,
                "value": float(v),
                "config_hash": config_hash,
                "git_sha": git_sha,
            }
        )
    cols = TIDY_COLUMNS[:5] + list(extra) + TIDY_COLUMNS[5:]
    return pd.DataFrame(rows, columns=cols)


def ensure_split(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``split`` column: tables written before it existed are test-split numbers.

    Example:
        >>> ensure_split(pd.DataFrame({"seed": [0], "metric": ["a"]})).columns.tolist()
        ['seed', 'split', 'metric']
    """
    if "split" in df.columns:
        return df
    df = df.copy()
    pos = df.columns.get_loc("seed") + 1 if "seed" in df.columns else len(df.columns)
    df.insert(pos, "split", "test")
    return df


def validate_tidy(
    df: pd.DataFrame, where: str = "table", columns: Sequence[str] = TIDY_COLUMNS
) -> pd.DataFrame:
    """Check a tidy table: required columns present, known splits, numeric values, no stored "Mean" rows.

    Raises:
        ReportError: naming ``where`` and what is wrong.
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ReportError(f"{where}: missing column(s) {missing}; expected {list(columns)}")
    for col in ("method", "category", "dataset"):
        bad = df[col].astype(str).str.strip().str.lower().isin(_FORBIDDEN_LABELS)
        if bad.any():
            labels = sorted(df.loc[bad, col].astype(str).unique())
            raise ReportError(
                f"{where}: stored aggregate row(s) in column {col!r} ({labels}); "
                "means are computed at render time, never stored"
            )
    if "split" in df.columns:
        bad_split = sorted(set(df["split"].astype(str)) - set(SPLITS))
        if bad_split:
            raise ReportError(f"{where}: unknown split value(s) {bad_split}; expected one of {list(SPLITS)}")
    if not pd.api.types.is_numeric_dtype(df["value"]):
        raise ReportError(f"{where}: column 'value' is not numeric")
    return df


def read_tidy(paths: Iterable[str | Path], columns: Sequence[str] = TIDY_COLUMNS) -> pd.DataFrame:
    """Concatenate tidy CSVs (each validated; the error names the file; no ``split`` column = test)."""
    frames = []
    for p in sorted(Path(p) for p in paths):
        try:
            df = pd.read_csv(p)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            raise ReportError(f"{p}: cannot be read as CSV ({e})") from None
        if df.empty:
            continue
        frames.append(validate_tidy(ensure_split(df), where=str(p), columns=columns))
    if not frames:
        return pd.DataFrame(columns=list(columns))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------------
# Aggregation (render time only)
# ----------------------------------------------------------------------------------------------------
def _std(v) -> float:
    """Sample standard deviation (ddof=1), NaN for fewer than two values."""
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def aggregate_seeds(
    df: pd.DataFrame, by: Sequence[str] = ("method", "dataset", "category", "split", "metric")
) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof=1; NaN for a single seed) and count over seeds.

    Returns:
        one row per group with columns ``*by, mean, std, n``.
    """
    df = ensure_split(df)
    missing = [c for c in (*by, "value") if c not in df.columns]
    if missing:
        raise ReportError(f"aggregate_seeds: missing column(s) {missing}")
    g = df.groupby(list(by), sort=True, dropna=False)["value"]
    out = g.agg(mean="mean", std=_std, n="count")
    return out.reset_index()


def mean_over_categories(
    df: pd.DataFrame, by: Sequence[str] = ("method", "dataset", "split", "metric")
) -> pd.DataFrame:
    """Category mean per seed, then mean and std of that over seeds.

    For every seed the metric is averaged over the categories that seed has; the table then reports the
    mean and the sample std (ddof=1) of those per-seed means, ``n`` (seeds) and ``n_categories``.
    """
    df = ensure_split(df)
    per_seed = df.groupby([*by, "seed"], sort=True)["value"].agg(["mean", "count"]).reset_index()
    g = per_seed.groupby(list(by), sort=True)
    out = g["mean"].agg(mean="mean", std=_std, n="count")
    out["n_categories"] = df.groupby(list(by), sort=True)["category"].nunique()
    return out.reset_index()


def format_value(mean: float, std: float = float("nan"), *, percent: bool = True, digits: int = 1) -> str:
    """``"97.3 ± 0.4"`` (std shown only when defined); empty for NaN means.

    Example:
        >>> format_value(0.9731, 0.004), format_value(0.5), format_value(float("nan"))
        ('97.3 ± 0.4', '50.0', '')
    """
    if mean is None or not np.isfinite(mean):
        return ""
    k = 100.0 if percent else 1.0
    s = f"{mean * k:.{digits}f}"
    if std is not None and np.isfinite(std):
        s += f" ± {std * k:.{digits}f}"
    return s


def format_metric(metric: str, mean: float, std: float = float("nan")) -> str:
    """A metric's cell: percent metrics in percent with one digit, times and rates as they are.

    Example:
        >>> format_metric("au_pro", 0.981, 0.004), format_metric("fit_s", 12.34), format_metric("x", 0.5)
        ('98.1 ± 0.4', '12.3', '0.5')
    """
    if metric in PERCENT_METRICS:
        return format_value(mean, std, percent=True, digits=1)
    if metric in TIMING_METRICS:
        return format_value(mean, std, percent=False, digits=1)
    if mean is None or not np.isfinite(mean):
        return ""
    s = f"{mean:.3g}"
    return s + (f" ± {std:.2g}" if std is not None and np.isfinite(std) else "")


def _select(df: pd.DataFrame, dataset: str | None = None, category: str | None = None) -> pd.DataFrame:
    d = ensure_split(df)
    if dataset is not None:
        d = d[d["dataset"] == dataset]
    if category is not None:
        d = d[d["category"] == category]
    return d


def category_table(
    df: pd.DataFrame, metric: str, *, dataset: str | None = None, split: Split = "test"
) -> pd.DataFrame:
    """Categories × methods for one metric and split ("mean ± std" over seeds) with a final "Mean" row.

    The "Mean" row is computed here (mean over categories per seed, then over seeds); never from a CSV.
    """
    d = _select(df, dataset)
    d = d[(d["metric"] == metric) & (d["split"] == split)]
    if d.empty:
        return pd.DataFrame()
    agg = aggregate_seeds(d)
    agg["cell"] = [format_metric(metric, m, s) for m, s in zip(agg["mean"], agg["std"], strict=True)]
    table = agg.pivot_table(index="category", columns="method", values="cell", aggfunc="first").fillna("")
    mean = mean_over_categories(d)
    mean_row = {r.method: format_metric(metric, r.mean, r.std) for r in mean.itertuples()}
    table.loc["Mean"] = [mean_row.get(m, "") for m in table.columns]
    table.columns.name = None
    table.index.name = "category"
    return table


def _method_cells(d: pd.DataFrame, metrics: Sequence[str], split: str) -> dict[str, dict[str, str]]:
    """Map method -> {metric -> "mean ± std"} over the categories and seeds in ``d`` (one split)."""
    d = d[(d["split"] == split) & d["metric"].isin(metrics)]
    if d.empty:
        return {}
    out: dict[str, dict[str, str]] = {}
    for r in mean_over_categories(d, by=("method", "metric")).itertuples():
        out.setdefault(r.method, {})[r.metric] = format_metric(r.metric, r.mean, r.std)
    return out


def headline_table(
    metrics: pd.DataFrame,
    timings: pd.DataFrame | None = None,
    *,
    dataset: str,
    category: str | None = None,
    quality: Sequence[str] = HEADLINE_METRICS,
) -> pd.DataFrame:
    """Methods × (each quality metric on val and on test, seeds, categories, fit time, images/s).

    Cells are "mean ± std" over seeds of the category mean (of one category when ``category`` is given);
    ``seeds`` and ``categories`` count what the cells average; a missing split leaves its cells empty.
    """
    d = _select(metrics, dataset, category)
    if d.empty:
        return pd.DataFrame()
    methods = sorted(d["method"].unique())
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    by_split = {s: _method_cells(d, quality, s) for s in SPLITS}
    for metric in quality:
        for split in SPLITS:
            table[f"{metric_label(metric)} · {split}"] = [by_split[split].get(m, {}).get(metric, "")
                                                          for m in methods]
    q = d[d["metric"].isin(quality)]
    table["seeds"] = [int(q.loc[q["method"] == m, "seed"].nunique()) for m in methods]
    if category is None:
        table["categories"] = [int(q.loc[q["method"] == m, "category"].nunique()) for m in methods]
    if timings is not None and not timings.empty:
        t = _select(timings, dataset, category)
        cells = _method_cells(t, ("fit_s", "images_per_s"), "test")
        for metric in ("fit_s", "images_per_s"):
            table[metric_label(metric)] = [cells.get(m, {}).get(metric, "") for m in methods]
    return table


def deployment_table(metrics: pd.DataFrame, *, dataset: str, category: str | None = None) -> pd.DataFrame:
    """Methods × test metrics at the threshold calibrated on val, beside the oracle F1-max (best on test).

    Returns:
        an empty DataFrame when none of these metrics were measured.
    """
    d = _select(metrics, dataset, category)
    wanted = (*DEPLOYMENT_METRICS, "f1_max")
    d = d[d["metric"].isin(wanted) & (d["split"] == "test")]
    if d.empty:
        return pd.DataFrame()
    methods = sorted(d["method"].unique())
    cells = _method_cells(d, wanted, "test")
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    for metric in wanted:
        table[metric_label(metric)] = [cells.get(m, {}).get(metric, "") for m in methods]
    table["seeds"] = [int(d.loc[d["method"] == m, "seed"].nunique()) for m in methods]
    return table


def ablation_table(df: pd.DataFrame, metric: str = "image_auroc", split: Split = "test") -> pd.DataFrame:
    """Ablation × variant rows, one column per (dataset) with the category mean ± std over seeds."""
    d = ensure_split(df)
    d = d[(d["metric"] == metric) & (d["split"] == split)]
    if d.empty:
        return pd.DataFrame()
    m = mean_over_categories(d, by=("ablation", "variant", "dataset"))
    m["cell"] = [format_metric(metric, a, s) for a, s in zip(m["mean"], m["std"], strict=True)]
    t = m.pivot_table(index=["ablation", "variant"], columns="dataset", values="cell", aggfunc="first")
    t = t.fillna("")
    t.columns.name = None
    return t


# ----------------------------------------------------------------------------------------------------
# Building the profile tables from the per-run CSVs
# ----------------------------------------------------------------------------------------------------
def run_csvs(profile_dir: str | Path, name: str) -> list[Path]:
    """Per-run CSVs ``runs/*/*/seed*/tables/<name>`` (``name`` may be a glob such as ``metrics_*.csv``)."""
    return sorted(Path(profile_dir).glob(f"runs/*/*/seed*/tables/{name}"))


def build_tables(profile_dir: str | Path) -> dict[str, Path]:
    """Collect per-run CSVs into ``tables/<dataset>.csv``, ``tables/ablations.csv``, ``tables/timings.csv``.

    Returns:
        table name -> path written (only tables that have data).

    Raises:
        ReportError: if no per-run metrics exist at all.
    """
    profile_dir = Path(profile_dir)
    written: dict[str, Path] = {}
    metrics = read_tidy(run_csvs(profile_dir, "metrics_*.csv"))
    if metrics.empty:
        raise ReportError(
            f"{profile_dir}: no per-run metrics found (runs/*/*/seed*/tables/metrics_*.csv); "
            "run the evaluation notebooks first"
        )
    order = ["dataset", "category", "method", "seed", "split", "metric"]
    metrics = metrics.sort_values(order).reset_index(drop=True)
    for ds, part in metrics.groupby("dataset", sort=True):
        written[str(ds)] = save_csv(profile_dir / "tables" / f"{ds}.csv", part[TIDY_COLUMNS])
    abl = read_tidy(run_csvs(profile_dir, "ablations.csv"), columns=ABLATION_COLUMNS)
    if not abl.empty:
        abl = abl.sort_values(["dataset", "category", "ablation", "variant", "seed", "split", "metric"])
        written["ablations"] = save_csv(profile_dir / "tables" / "ablations.csv", abl[ABLATION_COLUMNS])
    tim = read_tidy(run_csvs(profile_dir, "timings_*.csv"))
    if not tim.empty:
        tim = tim.sort_values(order)
        written["timings"] = save_csv(profile_dir / "tables" / "timings.csv", tim[TIDY_COLUMNS])
    return written


def load_metric_tables(profile_dir: str | Path) -> pd.DataFrame:
    """All ``tables/<dataset>.csv`` of a profile concatenated, one per dataset name (``DatasetName``).

    Other tables there (ablations, timings, a script's own table such as ``rgpkd_prompts_at_test.csv``) are
    not metric tables and are left out.
    """
    from typing import get_args

    from mudenet_core.data.datasets import DatasetName

    tables = Path(profile_dir) / "tables"
    paths = [tables / f"{ds}.csv" for ds in sorted(get_args(DatasetName))]
    return read_tidy([p for p in paths if p.is_file()])


def load_timings(profile_dir: str | Path) -> pd.DataFrame:
    """``tables/timings.csv`` of a profile (empty, with the tidy columns, when absent)."""
    path = Path(profile_dir) / "tables" / "timings.csv"
    return read_tidy([path]) if path.is_file() else pd.DataFrame(columns=TIDY_COLUMNS)


def to_markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-flavoured Markdown table (no external dependency)."""
    if df.empty:
        return "_(no data)_\n"
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def format_cell(v) -> str:
    """A table cell as text: floats with one digit (empty for NaN), anything else as ``str``."""
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.1f}"
    return str(v)


# ----------------------------------------------------------------------------------------------------
# Figures and rendered tables (built from the tables only)
# ----------------------------------------------------------------------------------------------------
def bar_figure(
    wide: pd.DataFrame,
    *,
    title: str = "",
    xlim: tuple[float, float] | None = None,
    xerr: pd.DataFrame | None = None,
):
    """Horizontal grouped bars: one group per row of ``wide``, one bar per column (a matplotlib Figure).

    Args:
        wide: rows (e.g. methods or ablation variants) x columns (e.g. metrics), numeric.
        title: axes title.
        xlim: x-axis range.
        xerr: same shape as ``wide``: error bars (e.g. std over seeds), NaN for none.
    """
    from matplotlib.figure import Figure

    n_rows, n_cols = wide.shape
    fig = Figure(figsize=(6.5, 0.32 * n_rows * max(1, n_cols) ** 0.5 + 1.6), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / max(1, n_cols)
    y = np.arange(n_rows)
    for j, col in enumerate(wide.columns):
        err = None if xerr is None else np.nan_to_num(xerr[col].to_numpy(dtype=float))
        ax.barh(
            y + j * height - 0.4 + height / 2,
            wide[col].to_numpy(dtype=float),
            height=height,
            xerr=err,
            label=str(col),
        )
    ax.set_yticks(
        y, [" / ".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in wide.index], fontsize=8
    )
    ax.invert_yaxis()
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig


def show_figure(fig, path: str | Path):
    """Save ``fig`` atomically to ``path`` (PNG) and return it as an ``IPython.display.Image`` to display.

    The notebooks build figures with matplotlib's object API (no pyplot), which IPython does not render by
    itself; showing the saved file also guarantees the notebook shows exactly what was written.
    """
    from IPython.display import Image

    from mudenet_core.viz import save_figure

    return Image(filename=str(save_figure(fig, path)))


def method_summary(
    df: pd.DataFrame, dataset: str, metrics: Sequence[str] = HEADLINE_METRICS, split: Split = "test"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Methods x metrics: category mean (mean over seeds) and its std over seeds, one dataset and split."""
    d = _select(df, dataset)
    d = d[d["metric"].isin(metrics) & (d["split"] == split)]
    if d.empty:
        return pd.DataFrame(), pd.DataFrame()
    m = mean_over_categories(d)
    mean = m.pivot_table(index="method", columns="metric", values="mean")
    std = m.pivot_table(index="method", columns="metric", values="std", dropna=False).reindex_like(mean)
    cols = [c for c in metrics if c in mean.columns]
    return mean[cols], std[cols]


def timings_table(timings: pd.DataFrame) -> pd.DataFrame:
    """Methods × timing metrics per dataset (mean over categories per seed, then over seeds)."""
    if timings.empty:
        return pd.DataFrame()
    t = mean_over_categories(timings, by=("method", "dataset", "metric"))
    t["cell"] = [format_metric(m, a, s) for m, a, s in zip(t["metric"], t["mean"], t["std"], strict=True)]
    t = t.pivot_table(index=["dataset", "method"], columns="metric", values="cell", aggfunc="first")
    t = t.fillna("")
    known = [m for m in TIMING_METRICS if m in t.columns]
    t = t[known + [c for c in t.columns if c not in known]]
    t.columns = [metric_label(c) for c in t.columns]
    return t


PROTOCOL_NOTE = (
    "val: the validation split (held-out normal training images plus synthetic anomalies made on them), "
    "used for model selection and threshold calibration; test: the test split, read once for this report. "
    "Cells: mean ± sample std over seeds of the category mean (std omitted with one seed), in percent; "
    "'seeds' and 'categories' count what a cell averages. '@ val threshold': on test, at the threshold "
    "calibrated on val (what a deployment gets); F1-max is the oracle (best threshold chosen on test)."
)


def write_rendered_tables(profile_dir: str | Path, *, profile: str = "") -> list[Path]:
    """Markdown renderings of the headline tables next to the CSVs (``tables/*.md``, means computed here)."""
    profile_dir = Path(profile_dir)
    profile = profile or profile_dir.name
    out = []
    metrics = load_metric_tables(profile_dir)
    timings = load_timings(profile_dir)
    tables = profile_dir / "tables"
    for ds in sorted(metrics["dataset"].unique()):
        head = headline_table(metrics, timings, dataset=ds)
        dep = deployment_table(metrics, dataset=ds)
        text = f"# {ds}: summary (mean over categories)\n\n{PROTOCOL_NOTE}\n\n{to_markdown(head)}"
        if not dep.empty:
            text += f"\n## Deployment (test, at the val threshold) vs oracle F1-max\n\n{to_markdown(dep)}"
        out.append(atomic_write_text(tables / f"{ds}_summary.md", text))
        for metric in HEADLINE_METRICS:
            t = category_table(metrics, metric, dataset=ds)
            if not t.empty:
                out.append(
                    atomic_write_text(
                        tables / f"{ds}_{metric}.md",
                        f"# {ds}: {metric} on test (mean ± std over seeds, %)\n\n{to_markdown(t)}",
                    )
                )
    from mudenet_core import published  # here, not at the top: published imports this module

    pvo = published.paper_vs_ours(metrics, published.run_configs(profile_dir), profile=profile)
    table, sentence = published.render_paper_vs_ours(pvo)
    out.append(
        atomic_write_text(
            tables / "paper_vs_ours.md",
            "# Paper vs ours (percent, test split)\n\n"
            + (to_markdown(table, index=False) if not table.empty
               else "_(no result of ours matches a published config)_\n")
            + (f"\n{sentence}\n" if sentence else ""),
        )
    )
    abl_path = tables / "ablations.csv"
    if abl_path.is_file():
        abl = read_tidy([abl_path], columns=ABLATION_COLUMNS)
        for metric in ("image_auroc", "pixel_auroc"):
            t = ablation_table(abl, metric)
            if not t.empty:
                out.append(
                    atomic_write_text(
                        tables / f"ablations_{metric}.md",
                        f"# Ablations: {metric} on test (mean over categories, %)\n\n" + to_markdown(t),
                    )
                )
    return out


# ----------------------------------------------------------------------------------------------------
# Names that moved to their own modules, still reachable as ``report.<name>``
# ----------------------------------------------------------------------------------------------------
_MOVED = {
    **dict.fromkeys(
        ("PUBLISHED", "PUBLISHED_COLUMNS", "PUBLISHED_CATEGORY_COUNT", "PVO_COLUMNS", "published_table",
         "run_configs", "config_matches", "describe_config", "paper_vs_ours", "render_paper_vs_ours"),
        "mudenet_core.published",
    ),
    **dict.fromkeys(
        ("CSS", "_CSS", "html_table", "html_page", "category_pages", "write_index"),
        "mudenet_core.report_html",
    ),
}


def __getattr__(name: str):
    """``report.paper_vs_ours`` and the other moved names, imported on first use.

    Lazily, because :mod:`mudenet_core.published` and :mod:`mudenet_core.report_html` import this module.
    """
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
