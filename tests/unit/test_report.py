"""report.py: aggregation against hand-computed numbers, the paper-vs-ours join, table building, the index."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mudenet_core import report
from mudenet_core.io import save_csv


def rows(method, dataset, category, metric, values_by_seed, h="h0", sha="s0"):
    return [
        {
            "method": method,
            "dataset": dataset,
            "category": category,
            "seed": s,
            "metric": metric,
            "value": v,
            "config_hash": h,
            "git_sha": sha,
        }
        for s, v in values_by_seed.items()
    ]


@pytest.fixture
def two_categories() -> pd.DataFrame:
    # cat A: seed0 0.8, seed1 0.9; cat B: seed0 1.0, seed1 0.7
    # per-seed category means: seed0 0.9, seed1 0.8 -> mean 0.85, sample std sqrt(2 * 0.05^2 / 1) = 0.0707107
    r = rows("padim", "synthetic", "A", "image_auroc", {0: 0.8, 1: 0.9})
    r += rows("padim", "synthetic", "B", "image_auroc", {0: 1.0, 1: 0.7})
    return pd.DataFrame(r)


def test_aggregate_seeds_hand_numbers():
    df = pd.DataFrame(
        rows("m", "d", "c", "image_auroc", {0: 0.9, 1: 0.8, 2: 1.0})
        + rows("m", "d", "single", "image_auroc", {0: 0.75})
    )
    agg = report.aggregate_seeds(df).set_index("category")
    assert agg.loc["c", "mean"] == pytest.approx(0.9)
    assert agg.loc["c", "std"] == pytest.approx(0.1)  # ddof=1: sqrt((0 + .01 + .01) / 2)
    assert agg.loc["c", "n"] == 3
    assert agg.loc["single", "mean"] == pytest.approx(0.75)
    assert math.isnan(agg.loc["single", "std"])  # one seed: no std, never a fake 0
    assert agg.loc["single", "n"] == 1


def test_mean_over_categories_per_seed_then_over_seeds(two_categories):
    m = report.mean_over_categories(two_categories).iloc[0]
    assert m["mean"] == pytest.approx(0.85)
    assert m["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert m["n"] == 2 and m["n_categories"] == 2


def test_category_table_mean_row_is_rendered_not_stored(two_categories):
    t = report.category_table(two_categories, "image_auroc")
    assert list(t.index) == ["A", "B", "Mean"]
    assert t.loc["A", "padim"] == "85.0 ± 7.1"  # mean .85, std .0707 of (0.8, 0.9)
    assert t.loc["B", "padim"] == "85.0 ± 21.2"  # (1.0, 0.7): std .2121
    assert t.loc["Mean", "padim"] == "85.0 ± 7.1"
    assert "Mean" not in set(two_categories["category"])


def test_format_value():
    assert report.format_value(0.97349, 0.0041) == "97.3 ± 0.4"
    assert report.format_value(0.5) == "50.0"
    assert report.format_value(float("nan")) == ""
    assert report.format_value(12.345, percent=False, digits=2) == "12.35"


def test_paper_vs_ours_join():
    df = pd.DataFrame(
        rows("patchcore", "mvtec_ad", "bottle", "image_auroc", {0: 1.0})
        + rows("patchcore", "mvtec_ad", "screw", "image_auroc", {0: 0.9})
        + rows("patchcore", "mvtec_ad", "bottle", "au_pro", {0: 0.8})
        + rows("mudenet", "mvtec_ad", "bottle", "image_auroc", {0: 0.96})
        + rows("padim", "synthetic", "plate", "image_auroc", {0: 0.7})
    )
    out = report.paper_vs_ours(df).set_index(["method", "dataset", "metric"])
    pc = out.loc[("patchcore", "mvtec_ad", "image_auroc")]
    assert pc["ours"] == pytest.approx(95.0)
    assert pc["paper"] == pytest.approx(99.1)
    assert pc["delta"] == pytest.approx(-4.1)
    assert "Roth" in pc["source"] and pc["n_categories"] == 2
    # a metric without a published number keeps an empty paper column
    assert math.isnan(out.loc[("patchcore", "mvtec_ad", "au_pro"), "paper"])
    # MuDeNet: no sourced number -> empty paper column with the note
    md = out.loc[("mudenet", "mvtec_ad", "image_auroc")]
    assert math.isnan(md["paper"]) and "left empty" in md["source"]
    # published rows without a result of ours still show, with an empty "ours"
    pix = out.loc[("patchcore", "mvtec_ad", "pixel_auroc")]
    assert math.isnan(pix["ours"]) and pix["paper"] == pytest.approx(98.1)
    assert out.loc[("padim", "mvtec_ad", "image_auroc"), "paper"] == pytest.approx(97.9)
    # the published MVTec AD numbers never join another dataset
    assert math.isnan(out.loc[("padim", "synthetic", "image_auroc"), "paper"])


def test_published_numbers_have_sources():
    pub = report.published_table()
    assert set(pub["method"]) == {"patchcore", "padim"}
    assert pub["source"].str.len().gt(10).all()
    got = {(r.method, r.metric): r.value for r in pub.itertuples()}
    assert got == {
        ("patchcore", "image_auroc"): 99.1,
        ("patchcore", "pixel_auroc"): 98.1,
        ("padim", "image_auroc"): 97.9,
        ("padim", "pixel_auroc"): 97.5,
    }


def test_tidy_metrics_drops_non_finite_and_keeps_extra_columns():
    df = report.tidy_metrics(
        {"image_auroc": 0.5, "au_pro": float("nan"), "x": None},
        method="m",
        dataset="d",
        category="c",
        seed=1,
        config_hash="h",
        git_sha="s",
        ablation="levels",
        variant="1",
    )
    assert df["metric"].tolist() == ["image_auroc"]
    assert list(df.columns) == report.ABLATION_COLUMNS


@pytest.mark.parametrize("label", ["Mean", "mean", " Average "])
def test_validate_tidy_rejects_stored_means(label):
    df = pd.DataFrame(rows("m", "d", label, "image_auroc", {0: 0.5}))
    with pytest.raises(report.ReportError, match="aggregate"):
        report.validate_tidy(df)


def test_validate_tidy_names_missing_columns():
    with pytest.raises(report.ReportError, match=r"x\.csv: missing column\(s\) \['git_sha'\]"):
        report.validate_tidy(
            pd.DataFrame(rows("m", "d", "c", "a", {0: 1.0})).drop(columns="git_sha"), "x.csv"
        )


def _write_run(root, dataset, category, seed, method, values, ablation=None):
    run = root / "runs" / dataset / category / f"seed{seed}" / "tables"
    df = pd.DataFrame(
        [
            {
                "method": method,
                "dataset": dataset,
                "category": category,
                "seed": seed,
                "metric": k,
                "value": v,
                "config_hash": "h",
                "git_sha": "s",
            }
            for k, v in values.items()
        ]
    )
    save_csv(run / f"metrics_{method}.csv", df)
    save_csv(run / f"timings_{method}.csv", df.assign(metric="fit_s", value=1.5)[:1])
    if ablation:
        a = df.assign(ablation="branches", variant=ablation)[report.ABLATION_COLUMNS]
        save_csv(run / "ablations.csv", a)


def test_build_tables_and_index(tmp_path):
    _write_run(
        tmp_path,
        "synthetic",
        "plate",
        0,
        "mudenet",
        {"image_auroc": 0.9, "pixel_auroc": 0.8},
        ablation="structural",
    )
    _write_run(
        tmp_path,
        "synthetic",
        "plate",
        1,
        "mudenet",
        {"image_auroc": 0.7, "pixel_auroc": 0.6},
        ablation="structural",
    )
    _write_run(tmp_path, "synthetic", "weave", 0, "padim", {"image_auroc": 0.5})
    _write_run(tmp_path, "mpdd", "metal_plate", 0, "padim", {"image_auroc": 0.6})
    written = report.build_tables(tmp_path)
    assert set(written) == {"synthetic", "mpdd", "ablations", "timings"}
    syn = pd.read_csv(written["synthetic"])
    assert list(syn.columns) == report.TIDY_COLUMNS
    assert len(syn) == 5 and set(syn["dataset"]) == {"synthetic"}
    assert not syn["category"].str.lower().eq("mean").any()
    abl = pd.read_csv(written["ablations"])
    assert list(abl.columns) == report.ABLATION_COLUMNS and len(abl) == 4
    t = report.ablation_table(abl, "image_auroc")
    assert t.loc[("branches", "structural"), "synthetic"] == "80.0 ± 14.1"

    (tmp_path / "runs" / "synthetic" / "plate" / "seed0" / "30_evaluation.html").write_text("<html></html>")
    md = report.write_rendered_tables(tmp_path)
    assert any(p.name == "synthetic_image_auroc.md" for p in md)
    assert "| Mean |" in (tmp_path / "tables" / "synthetic_image_auroc.md").read_text()
    index = report.write_index(tmp_path, title="T <&>")
    text = index.read_text()
    assert "T &lt;&amp;&gt;" in text
    assert 'id="tbl-synthetic-image_auroc"' in text and 'id="tbl-paper-vs-ours"' in text
    assert "runs/synthetic/plate/seed0/30_evaluation.html" in text
    assert "tables/synthetic.csv" in text


def test_build_tables_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(report.ReportError, match="no per-run metrics"):
        report.build_tables(tmp_path)


def test_to_markdown_and_bar_figure():
    t = pd.DataFrame({"a": [0.5, np.nan]}, index=pd.Index(["x", "Mean"], name="k"))
    md = report.to_markdown(t)
    assert md.splitlines()[0] == "| k | a |" and "| x | 0.5 |" in md and "| Mean |  |" in md
    fig = report.bar_figure(pd.DataFrame({"m1": [0.2, 0.4], "m2": [0.3, 0.1]}, index=["u", "v"]), xlim=(0, 1))
    ax = fig.axes[0]
    assert len(ax.patches) == 4
    assert [t.get_text() for t in ax.get_yticklabels()] == ["u", "v"]
