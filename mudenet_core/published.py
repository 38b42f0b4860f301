"""Paper vs ours: the published reference numbers and our test-split results with a matching config.

A published row names one source and the config of ours it may be set beside (``match``).
:func:`paper_vs_ours` compares it with the runs of a profile (configs read by :func:`run_configs`);
:func:`render_paper_vs_ours` turns that into the display table and a sentence on what is published but not
run. Values are in percent. The tidy tables, their aggregation and formatting are
:mod:`mudenet_core.report`'s.

Example:
    >>> pub = published_table()
    >>> sorted(pub["method"].unique())
    ['glass', 'mudenet', 'padim', 'pagmfr', 'patchcore', 'rgpkd']
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mudenet_core.report import HEADLINE_METRICS, ensure_split, mean_over_categories, metric_label

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
_GLASS_MVTEC = {
    "method": "glass",
    "config": "GLASS-j (WRN50 layer2+3, per-category distribution)",
    "match": {"backbone": "wide_resnet50_2", "distribution": "auto"},
    "dataset": "mvtec_ad",
    "category": "",
    "protocol": "mean over the 15 MVTec AD categories; 288 px, 640 epochs, foreground masks; best epoch "
    "chosen on the TEST set every epoch (ours: on the synthetic validation set); its PRO dilates maps 5x5 "
    "(left out)",
}
_GLASS_MPDD = {
    **_GLASS_MVTEC,
    "config": "GLASS-j (WRN50 layer2+3, manifold on MPDD)",
    "dataset": "mpdd",
    "protocol": "mean over the 6 MPDD categories, manifold everywhere, no foreground masks; best epoch "
    "chosen on the TEST set (ours: on the synthetic validation set); no per-category number published",
}
_GLASS_SOURCE = "Chen et al., GLASS, ECCV 2024 (arXiv:2407.09359); official README (cqylunlun/GLASS @f788d56)"
_PAGMFR = {
    "method": "pagmfr",
    "config": "PAGMFR (README Table I)",
    "match": {"backbone": "wide_resnet50_2"},
    "dataset": "mvtec_ad",
    "category": "",
    "protocol": "15-class mean of the README's Table I (its 'Total Average' 99.0 is the mean of the texture "
    "99.5 and object 98.5 group means); an earlier README version disagrees (bottle 0.98 vs 100); backbone "
    "not stated; no paper, pixel AUROC or PRO numbers",
}
_RGPKD = {
    "method": "rgpkd",
    "config": "RGPKD (ResNet-18 teacher, U-Net student)",
    "match": {"teacher": "resnet18"},
    "dataset": "mvtec_ad",
    "category": "",
    "protocol": "the mean of the texture (99.9) and object (99.6) group means; a 15-class mean would be "
    "99.7; pixel AUROC / PRO not published as numbers; no paper found",
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
    {**_GLASS_MVTEC, "metric": "image_auroc", "value": 99.9, "source": _GLASS_SOURCE},
    {**_GLASS_MVTEC, "metric": "pixel_auroc", "value": 99.3, "source": _GLASS_SOURCE},
    {**_GLASS_MPDD, "metric": "image_auroc", "value": 99.6, "source": _GLASS_SOURCE},
    {**_GLASS_MPDD, "metric": "pixel_auroc", "value": 99.4, "source": _GLASS_SOURCE},
    {**_PAGMFR, "metric": "image_auroc", "value": 98.85,
     "source": "Altmannnnnn/PAGMFR README @0b78a89, Table I (no code or paper public)"},
    {**_RGPKD, "metric": "image_auroc", "value": 99.8,
     "source": "Cariaaaaaa/RGPKD README @7fcf649 (Result_test.csv there is from an earlier RD4AD-style "
     "upload, not RGPKD)"},
]
PUBLISHED_COLUMNS = [
    "method", "config", "match", "dataset", "category", "metric", "value", "source", "protocol"
]
# categories behind a published mean (category "")
PUBLISHED_CATEGORY_COUNT = {"mvtec_ad": 15, "mpdd": 6}


def published_table() -> pd.DataFrame:
    """The published reference numbers as a DataFrame (values in percent; ``category`` "" = dataset mean)."""
    return pd.DataFrame(PUBLISHED, columns=PUBLISHED_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# Matching our runs to the published rows
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
