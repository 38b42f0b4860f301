"""report.py, report_html.py and category_report.py against hand-computed numbers.

Aggregation, val beside test, table building, the index, and the per-category page on a synthetic profile
folder with real PNGs (paper vs ours: test_published.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mudenet_core import category_report, report, report_html
from mudenet_core.io import save_csv


def rows(method, dataset, category, metric, values_by_seed, h="h0", sha="s0", split="test"):
    return [
        {
            "method": method,
            "dataset": dataset,
            "category": category,
            "seed": s,
            "split": split,
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
    # validation rows must never leak into test tables
    r += rows("padim", "synthetic", "A", "image_auroc", {0: 0.1, 1: 0.1}, split="val")
    return pd.DataFrame(r)


# ----------------------------------------------------------------------------------------------------
# Tidy rows and the split column
# ----------------------------------------------------------------------------------------------------
def test_tidy_metrics_requires_a_known_split_and_keeps_extra_columns():
    kw = dict(method="m", dataset="d", category="c", seed=1, config_hash="h", git_sha="s")
    df = report.tidy_metrics({"image_auroc": 0.5, "au_pro": float("nan"), "x": None}, split="val",
                             ablation="levels", variant="1", **kw)
    assert df["metric"].tolist() == ["image_auroc"] and df["split"].tolist() == ["val"]
    assert list(df.columns) == report.ABLATION_COLUMNS
    assert list(report.tidy_metrics({"a": 1.0}, split="test", **kw).columns) == report.TIDY_COLUMNS
    with pytest.raises(TypeError):
        report.tidy_metrics({"a": 1.0}, **kw)  # split is required: no silent default
    with pytest.raises(report.ReportError, match="split"):
        report.tidy_metrics({"a": 1.0}, split="train", **kw)


def test_old_csv_without_split_reads_as_test(tmp_path):
    old = pd.DataFrame(rows("m", "d", "c", "image_auroc", {0: 0.5})).drop(columns="split")
    save_csv(tmp_path / "old.csv", old)
    df = report.read_tidy([tmp_path / "old.csv"])
    assert df["split"].tolist() == ["test"]
    assert list(df.columns[:5]) == report.TIDY_COLUMNS[:5]


def test_validate_tidy_rejects_unknown_split():
    df = pd.DataFrame(rows("m", "d", "c", "image_auroc", {0: 0.5}, split="train"))
    with pytest.raises(report.ReportError, match=r"unknown split value\(s\) \['train'\]"):
        report.validate_tidy(df, "x.csv")


@pytest.mark.parametrize("label", ["Mean", "mean", " Average "])
def test_validate_tidy_rejects_stored_means(label):
    df = pd.DataFrame(rows("m", "d", label, "image_auroc", {0: 0.5}))
    with pytest.raises(report.ReportError, match="aggregate"):
        report.validate_tidy(df)


def test_validate_tidy_names_missing_columns():
    with pytest.raises(report.ReportError, match=r"x\.csv: missing column\(s\) \['git_sha'\]"):
        df = pd.DataFrame(rows("m", "d", "c", "a", {0: 1.0})).drop(columns="git_sha")
        report.validate_tidy(df, "x.csv")


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def test_aggregate_seeds_hand_numbers():
    df = pd.DataFrame(
        rows("m", "d", "c", "image_auroc", {0: 0.9, 1: 0.8, 2: 1.0})
        + rows("m", "d", "single", "image_auroc", {0: 0.75})
        + rows("m", "d", "c", "image_auroc", {0: 0.5, 1: 0.5, 2: 0.5}, split="val")
    )
    agg = report.aggregate_seeds(df).set_index(["category", "split"])
    assert agg.loc[("c", "test"), "mean"] == pytest.approx(0.9)
    assert agg.loc[("c", "test"), "std"] == pytest.approx(0.1)  # ddof=1: sqrt((0 + .01 + .01) / 2)
    assert agg.loc[("c", "test"), "n"] == 3
    assert agg.loc[("c", "val"), "mean"] == pytest.approx(0.5)  # splits are never pooled
    assert agg.loc[("single", "test"), "mean"] == pytest.approx(0.75)
    assert math.isnan(agg.loc[("single", "test"), "std"])  # one seed: no std, never a fake 0
    assert agg.loc[("single", "test"), "n"] == 1


def test_mean_over_categories_per_seed_then_over_seeds(two_categories):
    m = report.mean_over_categories(two_categories).set_index("split").loc["test"]
    assert m["mean"] == pytest.approx(0.85)
    assert m["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert m["n"] == 2 and m["n_categories"] == 2


def test_category_table_mean_row_is_rendered_not_stored(two_categories):
    t = report.category_table(two_categories, "image_auroc")
    assert list(t.index) == ["A", "B", "Mean"]
    assert t.loc["A", "padim"] == "85.0 ± 7.1"  # mean .85, std .0707 of (0.8, 0.9); val rows ignored
    assert t.loc["B", "padim"] == "85.0 ± 21.2"  # (1.0, 0.7): std .2121
    assert t.loc["Mean", "padim"] == "85.0 ± 7.1"
    assert report.category_table(two_categories, "image_auroc", split="val").loc["A", "padim"] == "10.0 ± 0.0"
    assert "Mean" not in set(two_categories["category"])


def test_format_value_and_metric():
    assert report.format_value(0.97349, 0.0041) == "97.3 ± 0.4"
    assert report.format_value(0.5) == "50.0"
    assert report.format_value(float("nan")) == ""
    assert report.format_value(12.345, percent=False, digits=2) == "12.35"
    assert report.format_metric("f1_at_threshold", 0.5) == "50.0"
    assert report.format_metric("images_per_s", 91.49, 2.04) == "91.5 ± 2.0"


def test_headline_table_val_beside_test_with_seeds_and_timings():
    # 3 seeds; test .90/.95/1.0 -> 95.0 ± 5.0; val .80/.85/.90 -> 85.0 ± 5.0
    # (by hand: deviations -.05, 0, .05 -> sample std sqrt(.005 / 2) = .05)
    m = pd.DataFrame(
        rows("alpha", "d", "c", "image_auroc", {0: 0.90, 1: 0.95, 2: 1.00})
        + rows("alpha", "d", "c", "image_auroc", {0: 0.80, 1: 0.85, 2: 0.90}, split="val")
        + rows("beta", "d", "c", "image_auroc", {0: 0.70})
    )
    t = pd.DataFrame(rows("alpha", "d", "c", "fit_s", {0: 1.0, 1: 2.0, 2: 3.0})
                     + rows("alpha", "d", "c", "images_per_s", {0: 10.0, 1: 10.0, 2: 10.0}))
    h = report.headline_table(m, t, dataset="d")
    assert h.loc["alpha", "image AUROC · test"] == "95.0 ± 5.0"
    assert h.loc["alpha", "image AUROC · val"] == "85.0 ± 5.0"
    assert h.loc["beta", "image AUROC · test"] == "70.0" and h.loc["beta", "image AUROC · val"] == ""
    assert h.loc["alpha", "seeds"] == 3 and h.loc["beta", "seeds"] == 1
    assert h.loc["alpha", "fit (s)"] == "2.0 ± 1.0" and h.loc["alpha", "images/s"] == "10.0 ± 0.0"
    assert h.loc["beta", "fit (s)"] == ""
    cols = list(h.columns)
    assert cols.index("pixel AUROC · val") + 1 == cols.index("pixel AUROC · test")


def test_deployment_table_names_the_oracle():
    m = pd.DataFrame(
        rows("a", "d", "c", "f1_at_threshold", {0: 0.6, 1: 0.8})
        + rows("a", "d", "c", "f1_max", {0: 0.9, 1: 0.9})
        + rows("a", "d", "c", "f1_at_threshold", {0: 0.1}, split="val")
    )
    t = report.deployment_table(m, dataset="d")
    assert t.loc["a", "F1 @ val threshold"] == "70.0 ± 14.1"
    assert t.loc["a", "F1-max (oracle: best threshold on test)"] == "90.0 ± 0.0"
    assert report.deployment_table(m[m["metric"] == "x"], dataset="d").empty


# ----------------------------------------------------------------------------------------------------
# Building tables and the index
# ----------------------------------------------------------------------------------------------------
def _write_run(root, dataset, category, seed, method, values, ablation=None):
    run = root / "runs" / dataset / category / f"seed{seed}" / "tables"
    df = pd.DataFrame(
        [r for k, v in values.items() for r in rows(method, dataset, category, k, {seed: v}, h="h")]
    )
    save_csv(run / f"metrics_{method}.csv", df)
    save_csv(run / f"timings_{method}.csv", df.assign(metric="fit_s", value=1.5)[:1])
    if ablation:
        a = df.assign(ablation="branches", variant=ablation)[report.ABLATION_COLUMNS]
        save_csv(run / "ablations.csv", a)


def test_build_tables_and_index(tmp_path):
    _write_run(tmp_path, "synthetic", "plate", 0, "mudenet", {"image_auroc": 0.9, "pixel_auroc": 0.8},
               ablation="structural")
    _write_run(tmp_path, "synthetic", "plate", 1, "mudenet", {"image_auroc": 0.7, "pixel_auroc": 0.6},
               ablation="structural")
    _write_run(tmp_path, "synthetic", "weave", 0, "padim", {"image_auroc": 0.5})
    _write_run(tmp_path, "mpdd", "metal_plate", 0, "padim", {"image_auroc": 0.6})
    # an old per-run CSV without the split column is read as test
    old = tmp_path / "runs" / "mpdd" / "metal_plate" / "seed0" / "tables" / "metrics_padim.csv"
    pd.read_csv(old).drop(columns="split").to_csv(old, index=False)
    written = report.build_tables(tmp_path)
    assert set(written) == {"synthetic", "mpdd", "ablations", "timings"}
    syn = pd.read_csv(written["synthetic"])
    assert list(syn.columns) == report.TIDY_COLUMNS
    assert len(syn) == 5 and set(syn["dataset"]) == {"synthetic"}
    assert pd.read_csv(written["mpdd"])["split"].tolist() == ["test"]
    assert not syn["category"].str.lower().eq("mean").any()
    abl = pd.read_csv(written["ablations"])
    assert list(abl.columns) == report.ABLATION_COLUMNS and len(abl) == 4
    t = report.ablation_table(abl, "image_auroc")
    assert t.loc[("branches", "structural"), "synthetic"] == "80.0 ± 14.1"

    (tmp_path / "runs" / "synthetic" / "plate" / "seed0" / "30_evaluation.html").write_text("<html></html>")
    md = report.write_rendered_tables(tmp_path)
    assert any(p.name == "synthetic_image_auroc.md" for p in md)
    assert "| Mean |" in (tmp_path / "tables" / "synthetic_image_auroc.md").read_text()
    summary = (tmp_path / "tables" / "synthetic_summary.md").read_text()
    assert "image AUROC · val" in summary and "image AUROC · test" in summary
    index = report_html.write_index(tmp_path, title="T <&>")
    text = index.read_text()
    assert "T &lt;&amp;&gt;" in text
    assert 'id="tbl-synthetic-headline"' in text and 'id="tbl-synthetic-image_auroc"' in text
    assert "id='tbl-paper-vs-ours'" in text and "Published but not run here" in text
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


# ----------------------------------------------------------------------------------------------------
# Category pages: a synthetic profile with real PNGs, masks, scores and maps
# ----------------------------------------------------------------------------------------------------
IMG, MAP = 32, 16  # images on disk are 32 px; maps (and so the reloaded masks) are 16 px
NAMES = ["n0", "n1", "n2", "n3", "x0", "x1", "x2", "x3"]
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
# hand-made scores (rank 1 = lowest of the 8), in the order of NAMES: see
# test_hardest_images_mean_rank_over_methods
SCORES = {
    "alpha": [0.1, 0.5, 0.2, 0.9, 0.3, 0.8, 1.0, 0.4],  # ranks 1, 5, 2, 7 | 3, 6, 8, 4
    "beta": [1.0, 7.0, 2.0, 6.0, 3.0, 8.0, 9.0, 5.0],  # ranks 1, 6, 2, 5 | 3, 7, 8, 4
    "gamma": [0.0, 0.6, 0.1, 0.7, 0.2, 0.9, 0.95, 0.3],  # ranks 1, 5, 2, 6 | 3, 7, 8, 4
}


def _scores_df(root: Path, method: str) -> pd.DataFrame:
    return pd.DataFrame({
        "image_path": [str(root / "data" / f"{n}.png") for n in NAMES],
        "category": "plate",
        "defect_type": ["good" if lab == 0 else "hole" for lab in LABELS],
        "label": LABELS,
        "score": SCORES[method],
    })


def make_profile(root: Path, seeds=(0, 1, 2), methods=("alpha", "beta", "gamma")) -> Path:
    """runs/synthetic/plate/seed<k>/: tidy tables (val + test), scores, maps, val scores, a split index."""
    data = root / "data"
    data.mkdir(parents=True)
    index = []
    for name, lab in zip(NAMES, LABELS, strict=True):
        img = np.full((IMG, IMG, 3), 128, np.uint8)
        mask_path = ""
        if lab:
            img[8:16, 8:16] = 255
            mask = np.zeros((IMG, IMG), np.uint8)
            mask[8:16, 8:16] = 255  # -> rows/cols 4:8 at 16 px
            mask_path = str(data / f"{name}_mask.png")
            Image.fromarray(mask).save(mask_path)
        Image.fromarray(img).save(data / f"{name}.png")
        index.append({"image_path": str(data / f"{name}.png"), "mask_path": mask_path, "label": lab,
                      "defect_type": "good" if lab == 0 else "hole", "category": "plate", "split": "test"})
    index.append({"image_path": str(data / "n0.png"), "mask_path": "", "label": 0, "defect_type": "good",
                  "category": "plate", "split": "train"})
    for seed in seeds:
        run = root / "runs" / "synthetic" / "plate" / f"seed{seed}"
        save_csv(run / "splits" / "synthetic_plate.csv", pd.DataFrame(index))
        for j, m in enumerate(methods):
            test = {"image_auroc": [0.90, 0.95, 1.00][seed] - 0.1 * j, "pixel_auroc": 0.9, "au_pro": 0.8,
                    "f1_max": 0.9, "f1_at_threshold": 0.7, "threshold": 0.5}
            val = {"image_auroc": [0.80, 0.85, 0.90][seed] - 0.1 * j, "pixel_auroc": 0.85, "au_pro": 0.7}
            kw = dict(method=m, dataset="synthetic", category="plate", seed=seed, config_hash=f"h{m}",
                      git_sha="s")
            save_csv(run / "tables" / f"metrics_{m}.csv", pd.concat(
                [report.tidy_metrics(val, split="val", **kw), report.tidy_metrics(test, split="test", **kw)]))
            save_csv(run / "tables" / f"timings_{m}.csv", report.tidy_metrics(
                {"fit_s": float(seed + 1), "images_per_s": 10.0}, split="test", **kw))
            ev = run / "eval" / m
            s = _scores_df(root, m)
            save_csv(ev / "scores.csv", s)
            maps = np.zeros((len(NAMES), MAP, MAP), np.float16)
            for i, v in enumerate(SCORES[m]):
                maps[i] = v / 10
                if LABELS[i]:
                    maps[i, 4:8, 4:8] = v  # the defect region scores highest
            np.save(ev / "maps.npy", maps)
            save_csv(ev / "val" / "scores.csv", s.assign(score=s["score"][::-1].to_numpy()))
            (ev / "metrics.json").write_text(json.dumps({"config": {"backbone": "resnet18"},
                                                         "config_hash": f"h{m}"}))
        (run / "30_evaluation.html").write_text("<html><body><h1>30</h1></body></html>")
    return root


def test_hardest_images_mean_rank_over_methods(tmp_path):
    scores = {m: _scores_df(tmp_path, m) for m in SCORES}
    hard = category_report.hardest_images(scores, k_normal=2, k_anomalous=2)
    names = [Path(p).stem for p in hard["image_path"]]
    # normals: mean ranks n3 (7+5+6)/3 = 6, n1 (5+6+5)/3 = 5.33 -> n3 first,
    # although beta alone ranks n1 first
    # anomalies: x0 mean rank 3, x3 mean rank 4
    assert names == ["n3", "n1", "x0", "x3"]
    groups = [category_report.GROUP_NORMAL] * 2 + [category_report.GROUP_ANOMALOUS] * 2
    assert hard["group"].tolist() == groups
    assert hard["mean_rank"].iloc[0] == pytest.approx(6 / 8)
    assert hard["score_beta"].tolist() == [6.0, 7.0, 3.0, 5.0]
    # a method alone picks by its own ranking
    assert Path(category_report.hardest_images({"beta": scores["beta"]}, 1, 0)["image_path"][0]).stem == "n1"


def test_load_items_reloads_masks_at_the_maps_size(tmp_path):
    make_profile(tmp_path, seeds=(0,))
    run = tmp_path / "runs" / "synthetic" / "plate" / "seed0"
    index = category_report.load_test_index(run, "synthetic", "plate")
    assert len(index) == 8  # test rows only
    paths = [str(tmp_path / "data" / f"{n}.png") for n in ("x1", "n0")]
    images, masks = category_report.load_items(index, paths, MAP)
    assert images.shape == (2, 3, MAP, MAP) and masks.shape == (2, MAP, MAP)
    expected = np.zeros((MAP, MAP), np.uint8)
    expected[4:8, 4:8] = 1
    np.testing.assert_array_equal(masks[0], expected)
    assert masks[1].sum() == 0
    _, only_masks = category_report.load_items(index, paths, MAP, with_images=False)
    np.testing.assert_array_equal(only_masks, masks)


def _table(text: str, table_id: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of one table of a page written by report.html_table."""
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', text, re.S)
    assert m, f"no table {table_id}"
    head = re.findall(r"<th>(.*?)</th>", m.group(1))
    trs = re.findall(r"<tr>(.*?)</tr>", m.group(1).split("</thead>")[1])
    body = [re.findall(r"<td>(.*?)</td>", tr) for tr in trs]
    return head, body


def test_category_page_every_method_val_and_test(tmp_path):
    profile = make_profile(tmp_path / "p")
    page = category_report.write_category_page(profile, "synthetic", "plate", k_normal=2, k_anomalous=2)
    assert page == profile / "categories" / "synthetic" / "plate" / "index.html"
    text = page.read_text()
    head, body = _table(text, "tbl-methods")
    for split in ("val", "test"):
        for metric in ("image AUROC", "pixel AUROC", "AU-PRO"):
            assert f"{metric} · {split}" in head
    assert {"seeds", "fit (s)", "images/s"} <= set(head)
    cells = {r[0]: dict(zip(head, r, strict=True)) for r in body}
    assert set(cells) == {"alpha", "beta", "gamma"}  # every method
    # hand computation over the 3 seeds: test .90/.95/1.00 -> 95.0 ± 5.0, val .80/.85/.90 -> 85.0 ± 5.0
    assert cells["alpha"]["image AUROC · test"] == "95.0 ± 5.0"
    assert cells["alpha"]["image AUROC · val"] == "85.0 ± 5.0"
    assert cells["beta"]["image AUROC · test"] == "85.0 ± 5.0"
    assert cells["alpha"]["seeds"] == "3"
    assert cells["alpha"]["fit (s)"] == "2.0 ± 1.0"  # fit_s 1, 2, 3
    dep_head, dep_body = _table(text, "tbl-deployment")
    assert "F1 @ val threshold" in dep_head and "F1-max (oracle: best threshold on test)" in dep_head
    for png in ("roc.png", "roc_val.png", "pro.png", "hardest.png"):
        assert (page.parent / png).is_file() and f"src='{png}'" in text
    _, hard = _table(text, "tbl-hardest")
    assert [Path(r[1]).stem for r in hard] == ["n3", "n1", "x0", "x3"]  # as in the hand-made ranking
    assert "../../../runs/synthetic/plate/seed0/30_evaluation.html" in text
    assert "href='../../../index.html'" in text


def test_category_page_without_maps_or_data_still_renders(tmp_path):
    profile = make_profile(tmp_path / "p", seeds=(0,))
    for f in profile.glob("runs/*/*/seed0/eval/*/maps.npy"):
        f.unlink()
    text = category_report.write_category_page(profile, "synthetic", "plate").read_text()
    assert "No anomaly maps saved" in text and "src='roc.png'" in text and "pro.png" not in text
    profile2 = make_profile(tmp_path / "q", seeds=(0,))
    for f in (profile2 / "data").glob("*.png"):
        f.unlink()  # images gone (e.g. a reference run on another machine)
    text = category_report.write_category_page(profile2, "synthetic", "plate").read_text()
    assert "could not be reloaded" in text and "hardest.png" not in text


def test_index_links_every_category_page(tmp_path):
    profile = make_profile(tmp_path / "p", seeds=(0, 1))
    report.build_tables(profile)
    pages = category_report.write_category_pages(profile)
    assert pages == [profile / "categories" / "synthetic" / "plate" / "index.html"]
    text = report_html.write_index(profile).read_text()
    assert "href='categories/synthetic/plate/index.html'" in text
    assert "runs/synthetic/plate/seed0/30_evaluation.html" in text  # the notebooks stay linked
    assert "categories/synthetic/plate/index.html</a>" not in text  # the page is not listed as a notebook


def test_category_page_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(category_report.CategoryPageError, match="no run folder"):
        category_report.write_category_page(tmp_path, "synthetic", "plate")


def test_pro_curve_figure_legend_is_the_au_pro_of_the_metric():
    from mudenet_core import metrics, viz

    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), np.uint8)
    masks[1, 2:6, 2:6] = 1
    masks[2, 7:11, 1:4] = 1
    maps = rng.random((3, 12, 12)) + 0.5 * masks
    fig = viz.pro_curve_figure({"m": metrics.pro_curve(masks, maps)})
    label = fig.axes[0].get_legend().get_texts()[0].get_text()
    assert label == f"m ({metrics.au_pro(masks, maps, max_fpr=0.3):.3f})"
    assert fig.axes[0].lines[0].get_xdata()[-1] == pytest.approx(0.3)  # the curve reaches the FPR limit


def test_index_ignores_a_script_table_beside_the_dataset_tables(tmp_path):
    """A table of another shape in tables/ (scripts/rgpkd_prompts_at_test.py writes one) is not a metric
    table: the index is still written, from the dataset tables alone (a reference run stopped here).
    """
    _write_run(tmp_path, "mpdd", "metal_plate", 0, "padim", {"image_auroc": 0.6})
    report.build_tables(tmp_path)
    stray = {"method": ["rgpkd"], "variant": ["prompts_at_test=True"], "dataset": ["mpdd"],
             "category": ["metal_plate"], "seed": [0], "split": ["val"], "metric": ["image_auroc"],
             "value": [0.98], "git_sha": ["abc1234"]}
    save_csv(tmp_path / "tables" / "rgpkd_prompts_at_test.csv", pd.DataFrame(stray))
    metrics = report.load_metric_tables(tmp_path)
    assert metrics["method"].tolist() == ["padim"] and metrics["value"].tolist() == [0.6]
    assert "tbl-mpdd-headline" in report_html.write_index(tmp_path, title="T").read_text()
