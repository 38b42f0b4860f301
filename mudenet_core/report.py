"""Result tables and the static HTML index: everything here reads tidy CSVs only, never models.

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

Example:
    >>> df = pd.DataFrame({"method": "m", "dataset": "d", "category": "c", "seed": [0, 1, 2], "split": "test",
    ...                    "metric": "image_auroc", "value": [0.9, 0.8, 1.0],
    ...                    "config_hash": "h", "git_sha": "s"})
    >>> agg = aggregate_seeds(df)
    >>> float(agg["mean"].iloc[0]), round(float(agg["std"].iloc[0]), 6), int(agg["n"].iloc[0])
    (0.9, 0.1, 3)
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
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
# Published numbers ("paper vs ours"). One source per row; each row says which config of ours it may be set
# beside (``match``: keys that our run's config must have with these values). Only numbers transcribed with
# confidence; a number we could not verify offline is left out rather than guessed (e.g. PaDiM-R18-Rd100 and
# the image AUROC of PaDiM-WR50-Rd550).
# ----------------------------------------------------------------------------------------------------
_PADIM_WR50 = {
    "method": "padim",
    "config": "PaDiM-WR50-Rd550",
    "match": {"backbone": "wide_resnet50_2", "n_features": 550},
    "dataset": "mvtec_ad",
    "category": "",
    "protocol": "mean over the 15 MVTec AD categories; WRN50 layer1-3, 550 random channels; 256 px resized, "
    "224 px center crop; one run",
}
_PATCHCORE_10 = {
    "method": "patchcore",
    "config": "PatchCore-10% (WRN50 layer2+3)",
    "match": {"backbone": "wide_resnet50_2", "coreset_ratio": 0.1},
    "dataset": "mvtec_ad",
    "category": "",
    "protocol": "mean over the 15 MVTec AD categories; WRN50 layer2+3, 10% greedy coreset; 256 px resized, "
    "224 px center crop; one run",
}
_MUDENET_CABLE = {
    "method": "mudenet",
    "config": "MuDeNet (paper settings)",
    "match": {"backbone": "wide_resnet50_2"},
    "dataset": "mvtec_ad",
    "category": "cable",
    "protocol": "MVTec AD cable only, the paper's settings",
}
PUBLISHED: list[dict] = [
    {**_PADIM_WR50, "metric": "pixel_auroc", "value": 97.5,
     "source": "Defard et al., PaDiM, ICPR 2021 workshops (arXiv:2011.08785), Table 2"},
    {**_PADIM_WR50, "metric": "au_pro", "value": 92.1,
     "source": "Defard et al., PaDiM, ICPR 2021 workshops (arXiv:2011.08785), Table 2"},
    {**_PATCHCORE_10, "metric": "image_auroc", "value": 99.0,
     "source": "Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022 "
     "(arXiv:2106.08265), Table 1"},
    {**_PATCHCORE_10, "metric": "pixel_auroc", "value": 98.1,
     "source": "Roth et al., CVPR 2022 (arXiv:2106.08265), Table 2"},
    {**_MUDENET_CABLE, "metric": "image_auroc", "value": 98.9,
     "source": "MuDeNet (Campos-Romero et al., Information Fusion 132, 2026), cable; via the public "
     "reproduction's notes"},
    {**_MUDENET_CABLE, "metric": "pixel_auroc", "value": 98.3,
     "source": "MuDeNet (Campos-Romero et al., Information Fusion 132, 2026), cable; via the public "
     "reproduction's notes"},
    {**_MUDENET_CABLE, "metric": "au_pro", "value": 90.6,
     "source": "MuDeNet (Campos-Romero et al., Information Fusion 132, 2026), cable; via the public "
     "reproduction's notes"},
]
PUBLISHED_COLUMNS = [
    "method", "config", "match", "dataset", "category", "metric", "value", "source", "protocol"
]
# categories behind a published mean (category "")
PUBLISHED_CATEGORY_COUNT = {"mvtec_ad": 15}


def published_table() -> pd.DataFrame:
    """The published reference numbers as a DataFrame (values in percent; ``category`` "" = dataset mean)."""
    return pd.DataFrame(PUBLISHED, columns=PUBLISHED_COLUMNS)


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
# Paper vs ours
# ----------------------------------------------------------------------------------------------------
def run_configs(profile_dir: str | Path) -> pd.DataFrame:
    """The config of every evaluated method, from ``runs/*/*/seed*/eval/<method>/metrics.json``.

    Returns:
        one row per (method, config_hash): columns ``method, config_hash, config`` (the config as a dict).
    """
    rows, seen = [], set()
    for p in sorted(Path(profile_dir).glob("runs/*/*/seed*/eval/*/metrics.json")):
        try:
            info = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        key = (p.parent.name, str(info.get("config_hash", "")))
        if key in seen or not isinstance(info.get("config"), dict):
            continue
        seen.add(key)
        rows.append({"method": key[0], "config_hash": key[1], "config": info["config"]})
    return pd.DataFrame(rows, columns=["method", "config_hash", "config"])


def _lookup(config: Mapping, key: str):
    cur = config
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def config_matches(config: Mapping, match: Mapping) -> bool:
    """True when every (dotted) key of ``match`` has that value in ``config`` (floats compared closely).

    Example:
        >>> config_matches({"backbone": "resnet18", "train": {"lr": 0.001}}, {"train.lr": 1e-3})
        True
        >>> config_matches({"backbone": "resnet18"}, {"backbone": "wide_resnet50_2"})
        False
    """
    for key, want in match.items():
        got = _lookup(config, key)
        if isinstance(want, float) or isinstance(got, float):
            try:
                if not math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12):
                    return False
            except (TypeError, ValueError):
                return False
        elif got != want:
            return False
    return True


def describe_config(method: str, config: Mapping, keys: Sequence[str] = (), *, profile: str = "") -> str:
    """``"padim · profile paper · backbone=resnet18, n_features=100, image_size=256"``."""
    shown = list(dict.fromkeys(["backbone", *keys, "image_size"]))
    parts = [f"{k}={_lookup(config, k)}" for k in shown if _lookup(config, k) is not None]
    head = f"{method} · profile {profile}" if profile else method
    return head + (" · " + ", ".join(parts) if parts else "")


PVO_COLUMNS = [
    "method",
    "published_config",
    "dataset",
    "category",
    "metric",
    "paper",
    "ours",
    "ours_std",
    "n_seeds",
    "n_categories",
    "n_categories_paper",
    "delta",
    "ours_config",
    "source",
]


def paper_vs_ours(
    df: pd.DataFrame,
    configs: pd.DataFrame | None = None,
    published: pd.DataFrame | None = None,
    *,
    profile: str = "",
    metrics: Sequence[str] = HEADLINE_METRICS,
) -> pd.DataFrame:
    """Each published number beside our test-split result with a matching config (values in percent).

    A published row is compared with our runs of the same method, dataset (and category, when the row is
    about one category) whose config (``configs``, see :func:`run_configs`) matches the row's ``match`` keys;
    one output row per matching config hash. ``ours`` is the category mean per seed, then the mean over
    seeds, and ``delta = ours - paper``. A published row without a matching result keeps ``ours`` (and
    ``delta``) NaN, so the caller can say what is published but not run (:func:`render_paper_vs_ours`).

    Returns:
        columns of :data:`PVO_COLUMNS`.
    """
    published = published_table() if published is None else published
    published = published[published["metric"].isin(metrics)]
    d = ensure_split(df)
    d = d[(d["split"] == "test") & d["metric"].isin(metrics)] if not d.empty else d
    configs = configs if configs is not None else pd.DataFrame(columns=["method", "config_hash", "config"])
    out = []
    for pub in published.itertuples(index=False):
        cat = str(pub.category or "")
        base = {
            "method": pub.method,
            "published_config": pub.config,
            "dataset": pub.dataset,
            "category": cat,
            "metric": pub.metric,
            "paper": float(pub.value),
            "n_categories_paper": 1 if cat else PUBLISHED_CATEGORY_COUNT.get(pub.dataset, np.nan),
            "source": pub.source,
        }
        match = dict(pub.match or {})
        hashes = {
            str(c.config_hash): c.config
            for c in configs.itertuples(index=False)
            if c.method == pub.method and config_matches(c.config, match)
        }
        ours = d[(d["method"] == pub.method) & (d["dataset"] == pub.dataset) & (d["metric"] == pub.metric)]
        if cat:
            ours = ours[ours["category"] == cat]
        ours = ours[ours["config_hash"].astype(str).isin(hashes)]
        if ours.empty:
            out.append({**base, "ours": np.nan, "ours_std": np.nan, "n_seeds": 0, "n_categories": 0,
                        "delta": np.nan, "ours_config": ""})
            continue
        for h, part in ours.groupby(ours["config_hash"].astype(str), sort=True):
            m = mean_over_categories(part, by=("method", "metric")).iloc[0]
            value = float(m["mean"]) * 100.0
            out.append({
                **base,
                "ours": value,
                "ours_std": float(m["std"]) * 100.0,
                "n_seeds": int(m["n"]),
                "n_categories": int(m["n_categories"]),
                "delta": value - float(pub.value),
                "ours_config": describe_config(pub.method, hashes[h], list(match), profile=profile),
            })
    return pd.DataFrame(out, columns=PVO_COLUMNS)


def render_paper_vs_ours(pvo: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The display table (only rows that compare something) and a sentence on what is published but not run.

    Returns:
        (table with formatted cells, sentence); the sentence is "" when every published row has ours.
    """
    cols = ["method", "published config", "our config", "dataset", "categories", "metric", "paper", "ours",
            "Δ (ours − paper)", "seeds", "source"]
    shown = pvo[pvo["ours"].notna()] if not pvo.empty else pvo
    rows = []
    for r in shown.itertuples(index=False):
        std = f" ± {r.ours_std:.1f}" if np.isfinite(r.ours_std) else ""
        n_paper = "" if not np.isfinite(r.n_categories_paper) else f" of {int(r.n_categories_paper)}"
        cats = r.category if r.category else f"{int(r.n_categories)}{n_paper} (mean)"
        rows.append([r.method, r.published_config, r.ours_config, r.dataset, cats, metric_label(r.metric),
                     f"{r.paper:.1f}", f"{r.ours:.1f}{std}", f"{r.delta:+.1f}", int(r.n_seeds), r.source])
    table = pd.DataFrame(rows, columns=cols)
    missing = pvo[pvo["ours"].isna()] if not pvo.empty else pvo
    if missing.empty:
        return table, ""
    groups = []
    for (cfg, ds, cat, src), part in missing.groupby(
        ["published_config", "dataset", "category", "source"], sort=False
    ):
        n = PUBLISHED_CATEGORY_COUNT.get(ds, "all")
        where = f"{ds}, {cat}" if cat else f"{ds}, mean of {n} categories"
        pairs = zip(part["metric"], part["paper"], strict=True)
        nums = ", ".join(f"{metric_label(m)} {v:.1f}" for m, v in pairs)
        groups.append(f"{cfg} ({where}): {nums} [{src}]")
    sentence = ("Published but not run here (no result of ours with a matching method, config and dataset): "
                + "; ".join(groups) + ".")
    return table, sentence


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
    """All ``tables/<dataset>.csv`` of a profile concatenated (excludes ablations and timings)."""
    tables = Path(profile_dir) / "tables"
    paths = [p for p in sorted(tables.glob("*.csv")) if p.stem not in ("ablations", "timings")]
    return read_tidy(paths)


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
    table, sentence = render_paper_vs_ours(paper_vs_ours(metrics, run_configs(profile_dir), profile=profile))
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
# HTML index
# ----------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1.05rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:bold;background:#fafafa}
.note{color:#555;font-size:.85rem}img{max-width:100%;border:1px solid #eee;margin:.3rem 0}
code{background:#f5f5f5;padding:0 .2rem}ul.runs{columns:2}figure{display:inline-block;margin:.3rem}
"""
_CSS = CSS  # backwards-compatible name


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


def html_page(title: str, body: Sequence[str]) -> str:
    """A complete static HTML page with the shared inline CSS."""
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def category_pages(profile_dir: str | Path) -> list[Path]:
    """The category pages of a profile (``categories/<dataset>/<category>/index.html``), sorted."""
    return sorted(Path(profile_dir).glob("categories/*/*/index.html"))


def write_index(
    profile_dir: str | Path,
    *,
    title: str = "MuDeNet workbook results",
    manifest: dict | None = None,
    protocol: str = "",
) -> Path:
    """Write ``<profile_dir>/index.html``, the static results page of a profile.

    It holds the headline tables (val beside test), deployment vs oracle, per-category tables, links to the
    category pages, paper vs ours, ablations, timings, figures and links to the rendered notebooks.

    Reads only ``tables/*.csv``, ``figures/*.png``, the runs' ``eval/*/metrics.json`` (configs, for paper vs
    ours) and the rendered pages (``**/*.html``). Static HTML with inline CSS, readable without Jupyter.
    """
    profile_dir = Path(profile_dir)
    profile = str((manifest or {}).get("profile", "")) or profile_dir.name
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if manifest:
        parts.append(
            f"<p class='note'>profile <code>{html.escape(str(manifest.get('profile', '')))}</code>, "
            f"git <code>{html.escape(str(manifest.get('git_sha', '')))}</code>, "
            f"finished {html.escape(str(manifest.get('finished', '')))}</p>"
        )
    if protocol:
        parts.append(f"<p class='note'>{html.escape(protocol)}</p>")
    metrics = load_metric_tables(profile_dir) if (profile_dir / "tables").is_dir() else pd.DataFrame()
    timings = load_timings(profile_dir)
    pages = category_pages(profile_dir)
    if metrics.empty:
        parts.append("<p class='note'>No result tables yet.</p>")
    else:
        parts.append(f"<p class='note'>{html.escape(PROTOCOL_NOTE)}</p>")
        for ds in sorted(metrics["dataset"].unique()):
            parts.append(f"<h2>{html.escape(ds)} — summary (mean over categories)</h2>")
            head = headline_table(metrics, timings, dataset=ds)
            parts.append(html_table(head, table_id=f"tbl-{ds}-headline"))
            dep = deployment_table(metrics, dataset=ds)
            if not dep.empty:
                parts.append("<h3>Deployment: test metrics at the threshold calibrated on val, beside the "
                             "oracle F1-max</h3>")
                parts.append(html_table(dep, table_id=f"tbl-{ds}-deployment"))
            ds_pages = [p for p in pages if p.parent.parent.name == ds]
            if ds_pages:
                parts.append(f"<p>Category pages (every method side by side, curves, hardest images):</p>"
                             f"<ul class='runs' id='pages-{html.escape(ds)}'>")
                for p in ds_pages:
                    rel = os.path.relpath(p, profile_dir)
                    parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(ds)} / "
                                 f"{html.escape(p.parent.name)}</a></li>")
                parts.append("</ul>")
            for metric in HEADLINE_METRICS:
                t = category_table(metrics, metric, dataset=ds)
                if t.empty:
                    continue
                parts.append(f"<h3>{html.escape(ds)} — {html.escape(metric)} (test, per category)</h3>")
                parts.append(html_table(t, table_id=f"tbl-{ds}-{metric}"))
        pvo = paper_vs_ours(metrics, run_configs(profile_dir), profile=profile)
        table, sentence = render_paper_vs_ours(pvo)
        parts.append(
            "<h2>Paper vs ours</h2><p class='note'>Test split, percent. Each row sets one published number "
            "beside our runs of the same method with a matching config (named in 'our config') on the same "
            "dataset; 'categories' says how many of the paper's categories our mean covers (a mean over "
            "fewer categories is not the same quantity). One source per row.</p>"
        )
        if table.empty:
            parts.append("<p class='note' id='tbl-paper-vs-ours'>No result of ours matches a published "
                         "config.</p>")
        else:
            parts.append(html_table(table, table_id="tbl-paper-vs-ours", index=False))
        if sentence:
            parts.append(f"<p class='note' id='paper-not-run'>{html.escape(sentence)}</p>")
    abl_path = profile_dir / "tables" / "ablations.csv"
    if abl_path.is_file():
        abl = read_tidy([abl_path], columns=ABLATION_COLUMNS)
        for metric in ("image_auroc", "pixel_auroc"):
            t = ablation_table(abl, metric)
            if not t.empty:
                parts.append(f"<h2>Ablations — {html.escape(metric)} (test, mean over categories)</h2>")
                parts.append(html_table(t, table_id=f"tbl-ablations-{metric}"))
    t = timings_table(timings)
    if not t.empty:
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
    reports = sorted(
        p for p in profile_dir.rglob("*.html")
        if p.name != "index.html" and "categories" not in p.relative_to(profile_dir).parts[:1]
    )
    if reports:
        parts.append("<h2>Notebook reports (with code)</h2><ul class='runs'>")
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
    return atomic_write_text(profile_dir / "index.html", html_page(title, parts))
