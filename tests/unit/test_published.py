"""published.py: the published numbers and paper vs ours against hand-computed numbers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mudenet_core import published


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


def _configs() -> pd.DataFrame:
    return pd.DataFrame([
        {"method": "patchcore", "config_hash": "pc10",
         "config": {"backbone": "wide_resnet50_2", "coreset_ratio": 0.1, "image_size": 256}},
        {"method": "patchcore", "config_hash": "pc_lite",
         "config": {"backbone": "efficientnet_lite0", "coreset_ratio": 0.1, "image_size": 128}},
        {"method": "padim", "config_hash": "r18", "config": {"backbone": "resnet18", "n_features": 100}},
        {"method": "mudenet", "config_hash": "md",
         "config": {"backbone": "wide_resnet50_2", "image_size": 256}},
    ])


def test_paper_vs_ours_delta_config_match_and_dropped_rows():
    df = pd.DataFrame(
        rows("patchcore", "mvtec_ad", "bottle", "image_auroc", {0: 1.0}, h="pc10")
        + rows("patchcore", "mvtec_ad", "screw", "image_auroc", {0: 0.9}, h="pc10")
        + rows("patchcore", "mvtec_ad", "screw", "image_auroc", {0: 0.1}, h="pc10", split="val")
        + rows("patchcore", "mvtec_ad", "bottle", "image_auroc", {0: 0.5}, h="pc_lite")  # other backbone
        + rows("padim", "mvtec_ad", "bottle", "pixel_auroc", {0: 0.97}, h="r18")  # no published R18 row
        + rows("mudenet", "mvtec_ad", "cable", "au_pro", {0: 0.90, 1: 0.92}, h="md")
        + rows("mudenet", "mvtec_ad", "bottle", "au_pro", {0: 0.10}, h="md")  # not the published category
        + rows("patchcore", "synthetic", "plate", "pixel_auroc", {0: 0.99}, h="pc10")  # other dataset
    )
    pvo = published.paper_vs_ours(df, _configs(), profile="paper")
    pc = pvo[(pvo["method"] == "patchcore") & (pvo["metric"] == "image_auroc")]
    assert len(pc) == 1  # the EfficientNet config is not set beside PatchCore-10% (WRN50)
    pc = pc.iloc[0]
    assert pc["ours"] == pytest.approx(95.0) and pc["paper"] == pytest.approx(99.0)
    assert pc["delta"] == pytest.approx(95.0 - 99.0)  # delta = ours - paper
    assert pc["n_categories"] == 2 and pc["n_categories_paper"] == 15 and pc["n_seeds"] == 1
    assert "profile paper" in pc["ours_config"] and "wide_resnet50_2" in pc["ours_config"]
    assert "Roth" in pc["source"] and "Table 1" in pc["source"]
    md = pvo[(pvo["method"] == "mudenet") & (pvo["metric"] == "au_pro")].iloc[0]
    assert md["category"] == "cable" and md["ours"] == pytest.approx(91.0)
    assert md["paper"] == pytest.approx(90.6)
    assert md["delta"] == pytest.approx(0.4) and md["ours_std"] == pytest.approx(100 * math.sqrt(2e-4))
    # PatchCore pixel AUROC: published, but ours only on another dataset -> no ours, no delta
    pix = pvo[(pvo["method"] == "patchcore") & (pvo["metric"] == "pixel_auroc")].iloc[0]
    assert math.isnan(pix["ours"]) and math.isnan(pix["delta"])

    table, sentence = published.render_paper_vs_ours(pvo)
    assert len(table) == 2  # only rows that compare something
    assert set(table["method"]) == {"patchcore", "mudenet"}
    assert table.set_index("method").loc["patchcore", "Δ (ours − paper)"] == "-4.0"
    assert table.set_index("method").loc["patchcore", "categories"] == "2 of 15 (mean)"
    assert "PaDiM-WR50-Rd550" in sentence and "pixel AUROC 98.1" in sentence
    assert "image AUROC 99.0" not in sentence  # that row is compared, so not listed as "not run"


def test_paper_vs_ours_without_configs_compares_nothing():
    df = pd.DataFrame(rows("patchcore", "mvtec_ad", "bottle", "image_auroc", {0: 1.0}, h="pc10"))
    table, sentence = published.render_paper_vs_ours(published.paper_vs_ours(df))
    assert table.empty and sentence.startswith("Published but not run here")


def test_published_numbers_have_one_source_and_a_config_each():
    pub = published.published_table()
    assert pub["source"].str.len().gt(10).all()
    # every row names the pretrained network its config must use (RGPKD calls it the teacher)
    assert pub["match"].map(lambda m: isinstance(m, dict) and ("backbone" in m or "teacher" in m)).all()
    got = {(r.config, r.category, r.metric): r.value for r in pub.itertuples()}
    assert got[("PatchCore-10% (WRN50 layer2+3)", "", "image_auroc")] == 99.0
    assert got[("PatchCore-10% (WRN50 layer2+3)", "", "pixel_auroc")] == 98.1
    assert got[("PaDiM-WR50-Rd550", "", "pixel_auroc")] == 97.5
    assert got[("GLASS-j (WRN50 layer2+3, per-category distribution)", "", "image_auroc")] == 99.9
    assert got[("RGPKD (ResNet-18 teacher, U-Net student)", "", "image_auroc")] == 99.8
    assert got[("MuDeNet (paper settings)", "cable", "au_pro")] == 90.6
    assert not pub.duplicated(["config", "category", "metric"]).any()


def test_config_matches():
    assert published.config_matches({"backbone": "wide_resnet50_2", "coreset_ratio": 0.1},
                                 {"backbone": "wide_resnet50_2", "coreset_ratio": 0.1})
    assert not published.config_matches({"backbone": "wide_resnet50_2", "coreset_ratio": 0.25},
                                     {"coreset_ratio": 0.1})
    assert not published.config_matches({}, {"backbone": "resnet18"})
