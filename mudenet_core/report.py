"""Result tables and the static HTML index: everything here reads tidy CSVs only, never models.

Every table is *tidy*: one row per measurement with the columns of :data:`TIDY_COLUMNS` (tables of
ablations add ``ablation`` and ``variant``). A table never stores a "Mean" row: means over seeds, their
standard deviation and the mean over categories are computed here, when the table is rendered.

Layout of a profile folder (``results/<profile>/``)::

    runs/<dataset>/<category>/seed<k>/tables/*.csv     per-run tidy CSVs written by the notebooks
    runs/<dataset>/<category>/seed<k>/NN_name.html     rendered notebooks (linked from the index)
    tables/<dataset>.csv                               per-category metrics, every method (tidy)
    tables/ablations.csv, tables/timings.csv           tidy
    figures/*.png                                      built from the tables only (90_report)
    index.html                                         static page: headline tables + links

Example:
    >>> df = pd.DataFrame({"method": "m", "dataset": "d", "category": "c", "seed": [0, 1, 2],
    ...                    "metric": "image_auroc", "value": [0.9, 0.8, 1.0],
    ...                    "config_hash": "h", "git_sha": "s"})
    >>> agg = aggregate_seeds(df)
    >>> float(agg["mean"].iloc[0]), round(float(agg["std"].iloc[0]), 6), int(agg["n"].iloc[0])
    (0.9, 0.1, 3)
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mudenet_core.io import atomic_write_text, save_csv

TIDY_COLUMNS = ["method", "dataset", "category", "seed", "metric", "value", "config_hash", "git_sha"]
ABLATION_COLUMNS = [
    "method",
    "dataset",
    "category",
    "seed",
    "ablation",
    "variant",
    "metric",
    "value",
    "config_hash",
    "git_sha",
]
HEADLINE_METRICS = ("image_auroc", "pixel_auroc", "au_pro")
PERCENT_METRICS = {"image_auroc", "image_aupr", "pixel_auroc", "au_pro", "f1_max"}
_FORBIDDEN_LABELS = {"mean", "average", "avg", "all"}


class ReportError(ValueError):
    """A results table that cannot be used (missing columns, a stored mean row, no data)."""


# ----------------------------------------------------------------------------------------------------
# Published numbers ("paper vs ours"). Only numbers with a source; everything else stays empty.
# ----------------------------------------------------------------------------------------------------
PUBLISHED: list[dict] = [
    {
        "method": "patchcore",
        "dataset": "mvtec_ad",
        "metric": "image_auroc",
        "value": 99.1,
        "source": "Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022 "
        "(arXiv:2106.08265), Table 1, PatchCore-25%",
        "protocol": "mean over the 15 MVTec AD categories, WRN50 layer2+3, 224 px center crop, one run",
    },
    {
        "method": "patchcore",
        "dataset": "mvtec_ad",
        "metric": "pixel_auroc",
        "value": 98.1,
        "source": "Roth et al., CVPR 2022 (arXiv:2106.08265), Table 2, PatchCore-25%",
        "protocol": "mean over the 15 MVTec AD categories, WRN50 layer2+3, 224 px center crop, one run",
    },
    {
        "method": "padim",
        "dataset": "mvtec_ad",
        "metric": "image_auroc",
        "value": 97.9,
        "source": "Defard et al., PaDiM, ICPR 2021 (arXiv:2011.08785), as listed in Roth et al. CVPR 2022, "
        "Table 1",
        "protocol": "mean over the 15 MVTec AD categories",
    },
    {
        "method": "padim",
        "dataset": "mvtec_ad",
        "metric": "pixel_auroc",
        "value": 97.5,
        "source": "Defard et al., PaDiM, ICPR 2021 (arXiv:2011.08785), Table 2, PaDiM-WR50-Rd550",
        "protocol": "mean over the 15 MVTec AD categories, WRN50, 256->224 px",
    },
]
PUBLISHED_NOTES = {
    "mudenet": "MuDeNet (Campos-Romero et al., Information Fusion 132, 2026): "
    "per-metric numbers not transcribed here (no verified source text available offline); "
    "the paper column is left empty.",
}


def published_table() -> pd.DataFrame:
    """The published reference numbers as a DataFrame (values in percent)."""
    return pd.DataFrame(PUBLISHED, columns=["method", "dataset", "metric", "value", "source", "protocol"])


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
        config_hash: hash of the config that produced the numbers.
        git_sha: commit of the code.
        **extra: further identifying columns, e.g. ``ablation="levels", variant="1,2"``.

    Example:
        >>> tidy_metrics({"image_auroc": 0.5, "x": float("nan")}, method="m", dataset="d", category="c",
        ...              seed=0, config_hash="h", git_sha="s")[["metric", "value"]].values.tolist()
        [['image_auroc', 0.5]]
    """
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
                **extra,
                "metric": k,
                "value": float(v),
                "config_hash": config_hash,
                "git_sha": git_sha,
            }
        )
    cols = TIDY_COLUMNS[:4] + list(extra) + TIDY_COLUMNS[4:]
    return pd.DataFrame(rows, columns=cols)


def validate_tidy(
    df: pd.DataFrame, where: str = "table", columns: Sequence[str] = TIDY_COLUMNS
) -> pd.DataFrame:
    """Check a tidy table: required columns present, numeric values, and no stored "Mean" rows.

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
    if not pd.api.types.is_numeric_dtype(df["value"]):
        raise ReportError(f"{where}: column 'value' is not numeric")
    return df


def read_tidy(paths: Iterable[str | Path], columns: Sequence[str] = TIDY_COLUMNS) -> pd.DataFrame:
    """Concatenate tidy CSVs (each validated; the error names the file)."""
    frames = []
    for p in sorted(Path(p) for p in paths):
        try:
            df = pd.read_csv(p)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            raise ReportError(f"{p}: cannot be read as CSV ({e})") from None
        if df.empty:
            continue
        frames.append(validate_tidy(df, where=str(p), columns=columns))
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
    df: pd.DataFrame, by: Sequence[str] = ("method", "dataset", "category", "metric")
) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof=1; NaN for a single seed) and count over seeds.

    Returns:
        one row per group with columns ``*by, mean, std, n``.
    """
    missing = [c for c in (*by, "value") if c not in df.columns]
    if missing:
        raise ReportError(f"aggregate_seeds: missing column(s) {missing}")
    g = df.groupby(list(by), sort=True, dropna=False)["value"]
    out = g.agg(mean="mean", std=_std, n="count")
    return out.reset_index()


def mean_over_categories(
    df: pd.DataFrame, by: Sequence[str] = ("method", "dataset", "metric")
) -> pd.DataFrame:
    """Category mean per seed, then mean and std of that over seeds.

    For every seed the metric is averaged over the categories that seed has; the table then reports the
    mean and the sample std (ddof=1) of those per-seed means, and ``n_categories``.
    """
    per_seed = df.groupby([*by, "seed"], sort=True)["value"].agg(["mean", "count"]).reset_index()
    g = per_seed.groupby(list(by), sort=True)
    out = g["mean"].agg(mean="mean", std=_std, n="count")
    out["n_categories"] = g["count"].max()
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


def category_table(df: pd.DataFrame, metric: str, *, dataset: str | None = None) -> pd.DataFrame:
    """Categories × methods for one metric ("mean ± std" over seeds) with a final "Mean" row.

    The "Mean" row is computed here (mean over categories per seed, then over seeds); never from a CSV.
    """
    d = df[df["metric"] == metric]
    if dataset is not None:
        d = d[d["dataset"] == dataset]
    if d.empty:
        return pd.DataFrame()
    pct = metric in PERCENT_METRICS
    agg = aggregate_seeds(d)
    agg["cell"] = [format_value(m, s, percent=pct) for m, s in zip(agg["mean"], agg["std"], strict=True)]
    table = agg.pivot_table(index="category", columns="method", values="cell", aggfunc="first").fillna("")
    mean = mean_over_categories(d)
    mean_row = {r.method: format_value(r.mean, r.std, percent=pct) for r in mean.itertuples()}
    table.loc["Mean"] = [mean_row.get(m, "") for m in table.columns]
    table.columns.name = None
    table.index.name = "category"
    return table


def paper_vs_ours(
    df: pd.DataFrame,
    published: pd.DataFrame | None = None,
    metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "au_pro"),
) -> pd.DataFrame:
    """Join our category means (in percent) with the published numbers, per (method, dataset, metric).

    Published rows without a result of ours are kept (ours empty), so the paper's numbers always show.

    Returns:
        columns method, dataset, metric, ours (mean over categories, percent), ours_std, n_categories,
        n_seeds, paper (percent or NaN), delta (ours - paper), source.
    """
    published = published_table() if published is None else published
    d = df[df["metric"].isin(metrics)]
    if d.empty:
        ours = pd.DataFrame(columns=["method", "dataset", "metric", "mean", "std", "n", "n_categories"])
    else:
        ours = mean_over_categories(d)
    ours = ours.rename(columns={"mean": "ours", "std": "ours_std", "n": "n_seeds"})
    ours["ours"] = ours["ours"] * 100.0
    ours["ours_std"] = ours["ours_std"] * 100.0
    pub = published.rename(columns={"value": "paper"})[["method", "dataset", "metric", "paper", "source"]]
    pub = pub[pub["metric"].isin(metrics)]
    out = ours.merge(pub, on=["method", "dataset", "metric"], how="outer")
    out["delta"] = out["ours"] - out["paper"]
    out["source"] = out["source"].fillna("")
    for m, note in PUBLISHED_NOTES.items():
        out.loc[(out["method"] == m) & (out["source"] == ""), "source"] = note
    no_pub = ~out["dataset"].isin(set(pub["dataset"])) & (out["source"] == "")
    out.loc[no_pub, "source"] = "no published numbers for this dataset"
    cols = [
        "method",
        "dataset",
        "metric",
        "ours",
        "ours_std",
        "n_categories",
        "n_seeds",
        "paper",
        "delta",
        "source",
    ]
    return out[cols].sort_values(["dataset", "metric", "method"]).reset_index(drop=True)


def ablation_table(df: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """Ablation × variant rows, one column per (dataset) with the category mean ± std over seeds."""
    d = df[df["metric"] == metric]
    if d.empty:
        return pd.DataFrame()
    m = mean_over_categories(d, by=("ablation", "variant", "dataset"))
    pct = metric in PERCENT_METRICS
    m["cell"] = [format_value(a, s, percent=pct) for a, s in zip(m["mean"], m["std"], strict=True)]
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
    metrics = metrics.sort_values(["dataset", "category", "method", "seed", "metric"]).reset_index(drop=True)
    for ds, part in metrics.groupby("dataset", sort=True):
        written[str(ds)] = save_csv(profile_dir / "tables" / f"{ds}.csv", part[TIDY_COLUMNS])
    abl = read_tidy(run_csvs(profile_dir, "ablations.csv"), columns=ABLATION_COLUMNS)
    if not abl.empty:
        abl = abl.sort_values(["dataset", "category", "ablation", "variant", "seed", "metric"])
        written["ablations"] = save_csv(profile_dir / "tables" / "ablations.csv", abl[ABLATION_COLUMNS])
    tim = read_tidy(run_csvs(profile_dir, "timings_*.csv"))
    if not tim.empty:
        tim = tim.sort_values(["dataset", "category", "method", "seed", "metric"])
        written["timings"] = save_csv(profile_dir / "tables" / "timings.csv", tim[TIDY_COLUMNS])
    return written


def load_metric_tables(profile_dir: str | Path) -> pd.DataFrame:
    """All ``tables/<dataset>.csv`` of a profile concatenated (excludes ablations and timings)."""
    tables = Path(profile_dir) / "tables"
    paths = [p for p in sorted(tables.glob("*.csv")) if p.stem not in ("ablations", "timings")]
    return read_tidy(paths)


def to_markdown(df: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-flavoured Markdown table (no external dependency)."""
    if df.empty:
        return "_(no data)_\n"
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _fmt_cell(v) -> str:
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
    df: pd.DataFrame, dataset: str, metrics: Sequence[str] = HEADLINE_METRICS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Methods x metrics: category mean (mean over seeds) and its std over seeds, for one dataset."""
    d = df[(df["dataset"] == dataset) & df["metric"].isin(metrics)]
    if d.empty:
        return pd.DataFrame(), pd.DataFrame()
    m = mean_over_categories(d)
    mean = m.pivot_table(index="method", columns="metric", values="mean")
    std = m.pivot_table(index="method", columns="metric", values="std", dropna=False).reindex_like(mean)
    cols = [c for c in metrics if c in mean.columns]
    return mean[cols], std[cols]


def write_rendered_tables(profile_dir: str | Path) -> list[Path]:
    """Markdown renderings of the headline tables next to the CSVs (``tables/*.md``, means computed here)."""
    profile_dir = Path(profile_dir)
    out = []
    metrics = load_metric_tables(profile_dir)
    for ds in sorted(metrics["dataset"].unique()):
        for metric in HEADLINE_METRICS:
            t = category_table(metrics, metric, dataset=ds)
            if not t.empty:
                out.append(
                    atomic_write_text(
                        profile_dir / "tables" / f"{ds}_{metric}.md",
                        f"# {ds}: {metric} (mean ± std over seeds, %)\n\n{to_markdown(t)}",
                    )
                )
    pvo = paper_vs_ours(metrics)
    out.append(
        atomic_write_text(
            profile_dir / "tables" / "paper_vs_ours.md",
            "# Paper vs ours (percent)\n\n" + to_markdown(pvo, index=False),
        )
    )
    abl_path = profile_dir / "tables" / "ablations.csv"
    if abl_path.is_file():
        abl = read_tidy([abl_path], columns=ABLATION_COLUMNS)
        for metric in ("image_auroc", "pixel_auroc"):
            t = ablation_table(abl, metric)
            if not t.empty:
                out.append(
                    atomic_write_text(
                        profile_dir / "tables" / f"ablations_{metric}.md",
                        f"# Ablations: {metric} (mean over categories, %)\n\n" + to_markdown(t),
                    )
                )
    return out


# ----------------------------------------------------------------------------------------------------
# HTML index
# ----------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:bold;background:#fafafa}
.note{color:#555;font-size:.85rem}img{max-width:100%;border:1px solid #eee;margin:.3rem 0}
code{background:#f5f5f5;padding:0 .2rem}ul.runs{columns:2}
"""


def html_table(df: pd.DataFrame, *, table_id: str = "", index: bool = True) -> str:
    """A small static HTML table (escaped), bold "Mean" row."""
    if df.empty:
        return '<p class="note">(no data)</p>'
    d = df.reset_index() if index else df
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in d.columns)
    body = []
    for row in d.itertuples(index=False):
        cls = ' class="mean"' if str(row[0]) == "Mean" else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt_cell(v))}</td>" for v in row) + "</tr>")
    tid = f' id="{html.escape(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_index(
    profile_dir: str | Path,
    *,
    title: str = "MuDeNet workbook results",
    manifest: dict | None = None,
    protocol: str = "",
) -> Path:
    """Write ``<profile_dir>/index.html``: headline tables, paper vs ours, ablations, timings, figures, links.

    Reads only ``tables/*.csv``, ``figures/*.png`` and the rendered notebooks (``**/*.html``). Static HTML
    with inline CSS, readable without Jupyter.
    """
    profile_dir = Path(profile_dir)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    if manifest:
        parts.append(
            f"<p class='note'>profile <code>{html.escape(str(manifest.get('profile', '')))}</code>, "
            f"git <code>{html.escape(str(manifest.get('git_sha', '')))}</code>, "
            f"finished {html.escape(str(manifest.get('finished', '')))}</p>"
        )
    if protocol:
        parts.append(f"<p class='note'>{html.escape(protocol)}</p>")
    metrics = load_metric_tables(profile_dir) if (profile_dir / "tables").is_dir() else pd.DataFrame()
    if metrics.empty:
        parts.append("<p class='note'>No result tables yet.</p>")
    else:
        parts.append(
            "<p class='note'>Cells: mean ± sample std over seeds (std omitted with one seed), "
            "in percent. The Mean row averages categories per seed and is computed here, "
            "never stored.</p>"
        )
        for ds in sorted(metrics["dataset"].unique()):
            for metric in HEADLINE_METRICS:
                t = category_table(metrics, metric, dataset=ds)
                if t.empty:
                    continue
                parts.append(f"<h2>{html.escape(ds)} — {html.escape(metric)}</h2>")
                parts.append(html_table(t, table_id=f"tbl-{ds}-{metric}"))
        pvo = paper_vs_ours(metrics)
        parts.append(
            "<h2>Paper vs ours</h2><p class='note'>Ours: mean over our categories (a subset or a "
            "different dataset than the paper's unless the dataset column says mvtec_ad with all 15 "
            "categories). Paper: published means, source per row; empty where no number could be "
            "sourced.</p>"
        )
        parts.append(html_table(pvo, table_id="tbl-paper-vs-ours", index=False))
    abl_path = profile_dir / "tables" / "ablations.csv"
    if abl_path.is_file():
        abl = read_tidy([abl_path], columns=ABLATION_COLUMNS)
        for metric in ("image_auroc", "pixel_auroc"):
            t = ablation_table(abl, metric)
            if not t.empty:
                parts.append(f"<h2>Ablations — {html.escape(metric)} (mean over categories)</h2>")
                parts.append(html_table(t, table_id=f"tbl-ablations-{metric}"))
    tim_path = profile_dir / "tables" / "timings.csv"
    if tim_path.is_file():
        tim = read_tidy([tim_path])
        if not tim.empty:
            t = mean_over_categories(tim, by=("method", "dataset", "metric"))
            t["cell"] = [
                format_value(a, s, percent=False, digits=2) for a, s in zip(t["mean"], t["std"], strict=True)
            ]
            t = t.pivot_table(index="method", columns="metric", values="cell", aggfunc="first").fillna("")
            t.columns.name = None
            parts.append("<h2>Timings (mean over categories)</h2>")
            parts.append(html_table(t, table_id="tbl-timings"))
    figs = sorted((profile_dir / "figures").glob("*.png"))
    if figs:
        parts.append("<h2>Figures</h2>")
        for f in figs:
            rel = os.path.relpath(f, profile_dir)
            parts.append(
                f"<figure><img src='{html.escape(rel)}' alt='{html.escape(f.stem)}'>"
                f"<figcaption class='note'>{html.escape(f.name)}</figcaption></figure>"
            )
    reports = sorted(p for p in profile_dir.rglob("*.html") if p.name != "index.html")
    if reports:
        parts.append("<h2>Notebook reports</h2><ul class='runs'>")
        for p in reports:
            rel = os.path.relpath(p, profile_dir)
            parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(rel)}</a></li>")
        parts.append("</ul>")
    tables = sorted((profile_dir / "tables").glob("*.csv")) if (profile_dir / "tables").is_dir() else []
    if tables:
        parts.append("<h2>Tables (tidy CSV)</h2><ul>")
        for p in tables:
            rel = os.path.relpath(p, profile_dir)
            parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(rel)}</a></li>")
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return atomic_write_text(profile_dir / "index.html", "\n".join(parts))
