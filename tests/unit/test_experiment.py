"""experiment.py and ablations.py: fit-or-load really reloads, tidy outputs, re-scoring equals the harness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mudenet_core import ablations, experiment, report


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    run, g, dev = experiment.start_run(tmp_path_factory.mktemp("run"), dataset="synthetic", category="plate",
                                       seed=0, device="cpu")
    splits = experiment.build_splits(run, synthetic_root, 64)
    cfg = experiment.method_config("mudenet", "smoke", image_size=64)
    dlog = experiment.distill_mudenet(cfg, splits, run, generator=g, device=dev, reuse=False)
    det, info = experiment.fit_or_load("mudenet", cfg, splits, run, generator=g, device=dev, reuse=False,
                                       resume=True)
    return run, splits, cfg, dlog, det, info


def test_distill_then_resume_training(trained):
    run, _, cfg, dlog, _, info = trained
    assert len(dlog["L_dist"]) == cfg.distill.steps and np.isfinite(dlog["L_dist"]).all()
    assert not info["loaded"]
    # the training notebook continued from the distilled checkpoint: the distillation log came with it
    assert info["log"]["distill"]["L_dist"] == dlog["L_dist"]
    assert len(info["log"]["train"]["L"]) == cfg.train.steps
    assert (run.checkpoint_dir("mudenet") / "model.pt").is_file()
    frame = experiment.log_frame(info["log"]["train"])
    assert {"step", "L1", "LA", "L2", "L"} <= set(frame.columns) and len(frame) == cfg.train.steps


def test_fit_or_load_reloads_the_same_model(trained):
    run, splits, cfg, _, det, _ = trained
    again, info = experiment.fit_or_load("mudenet", cfg, splits, run, generator=torch.Generator(),
                                         device="cpu", reuse=True)
    assert info["loaded"]
    x = torch.stack([splits.test[i]["image"] for i in range(3)])
    m1, s1 = det.predict(x)
    m2, s2 = again.predict(x)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(s1, s2)


def test_evaluate_writes_tidy_tables_and_rescoring_matches(trained):
    run, splits, cfg, _, det, info = trained
    result, tidy = experiment.evaluate_method(det, "mudenet", splits, run, device="cpu", config=det.config,
                                              fit_info=info)
    saved = pd.read_csv(run.table("metrics_mudenet.csv"))
    report.validate_tidy(saved)
    assert set(saved["config_hash"]) == {det.config.config_hash()} and (saved["category"] == "plate").all()
    assert "images_per_s" not in set(saved["metric"])
    timings = pd.read_csv(run.table("timings_mudenet.csv")).set_index("metric")["value"]
    assert timings["fit_s"] > 0 and timings["images_per_s"] > 0 and "train_s" in timings
    # the unchanged scoring config, re-calibrated from cached network outputs, reproduces the harness
    variants = ablations.scoring_variants(det.config.scoring, branches=["both", "logical"])
    abl = ablations.run_scoring_ablations(det, splits, run, variants, config_hash="h")
    assert list(abl.columns) == report.ABLATION_COLUMNS
    both = abl[abl["variant"] == "both"].set_index("metric")["value"]
    for k in ("image_auroc", "pixel_auroc", "au_pro"):
        assert both[k] == pytest.approx(result.metrics[k], abs=1e-6)
    per_defect = experiment.per_defect_auroc(result.scores)
    assert set(per_defect["defect_type"]) == set(result.scores.query("label == 1")["defect_type"])
