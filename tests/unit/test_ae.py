"""Convolutional-autoencoder baseline: threshold, report, training, checkpoints, resume, harness smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from mudenet_core.baselines.ae import (
    AEConfig,
    ConvAutoencoder,
    ConvAutoencoderDetector,
    classification_report,
    percentile_threshold,
    reconstruction_error_map,
)
from mudenet_core.data import DataConfig, make_splits
from mudenet_core.harness import evaluate
from mudenet_core.methods import get_method, load_config

TINY = AEConfig(
    image_size=64,
    channels=(8, 16, 16, 16),
    latent_dim=16,
    epochs=4,
    batch_size=4,
    lr=3e-3,
    map_sigma=1.0,
    checkpoint_every=1,
)


@pytest.fixture(scope="module")
def splits(synthetic_root):
    cfg = DataConfig(
        dataset="synthetic", root=str(synthetic_root), category="plate", image_size=64, val_fraction=0.25
    )
    return make_splits(cfg)


@pytest.fixture(scope="module")
def fitted(splits):
    det = ConvAutoencoderDetector(TINY)
    log = det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    return det, log


def test_registry_and_profiles():
    det_cls, cfg_cls = get_method("ae")
    assert det_cls is ConvAutoencoderDetector and cfg_cls is AEConfig
    for profile in ("paper", "cpu", "smoke"):
        cfg = load_config("ae", profile)
        assert cfg.latent_dim > 0 and cfg.image_size % 16 == 0
    assert load_config("ae", "paper").latent_dim == 512


def test_network_shapes_and_parameter_count():
    ae = ConvAutoencoder(image_size=32, channels=(4, 8, 8, 8), latent_dim=16)
    assert ae(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert ae.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    # Hand count: encoder convs (no bias) 3*4*16 + 4*8*16 + 8*8*16 + 8*8*16 = 2752, their BN 2*(4+8+8+8) = 56;
    # dense bottleneck 8*2*2=32 -> 16: 32*16+16 = 528, 16 -> 32: 16*32+32 = 544;
    # decoder convT (no bias) 8*8*16 + 8*8*16 + 8*4*16 = 2560, BN 2*(8+8+4) = 40, last convT 4*3*16+3 = 195.
    assert sum(p.numel() for p in ae.parameters()) == 2752 + 56 + 528 + 544 + 2560 + 40 + 195
    conv = ConvAutoencoder(image_size=32, channels=(4, 8, 8, 8), latent_dim=16, bottleneck="conv")
    assert conv.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 2, 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvAutoencoder(image_size=40)


def test_error_map_is_zero_for_perfect_reconstruction_and_sums_channels():
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(reconstruction_error_map(x, x.clone(), sigma=2.0)) == 0
    y = x.clone()
    y[1, 0, 3, 4] += 1.0 / 0.229  # +1 in pixel space, red channel
    y[1, 2, 3, 4] -= 2.0 / 0.225  # -2 in pixel space, blue channel
    m = reconstruction_error_map(x, y, sigma=0)
    assert m.shape == (2, 1, 16, 16)
    assert m[1, 0, 3, 4].item() == pytest.approx(1.0 + 4.0, rel=1e-5)
    assert m.sum().item() == pytest.approx(5.0, rel=1e-5)


def test_percentile_threshold_equals_numpy_percentile(fitted, splits):
    det, log = fitted
    val_scores = det.score_dataset(splits.val)
    assert det.threshold == np.percentile(val_scores, 90.0)
    assert log["threshold"] == det.threshold
    rng = np.random.default_rng(0)
    s = rng.normal(size=37)
    for q in (0.0, 50.0, 90.0, 99.0):
        assert percentile_threshold(s, q) == np.percentile(s, q)
    with pytest.raises(ValueError, match="no validation scores"):
        percentile_threshold(np.zeros(0), 90)


def test_classification_report_agrees_with_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=50)
    scores = rng.normal(size=50) + labels
    thr = 0.4
    pred = (scores >= thr).astype(int)
    rep = classification_report(labels, scores, threshold=thr)
    assert rep["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert rep["precision"] == pytest.approx(precision_score(labels, pred))
    assert rep["recall"] == pytest.approx(recall_score(labels, pred))
    assert rep["f1"] == pytest.approx(f1_score(labels, pred))
    assert rep["auc_roc"] == pytest.approx(roc_auc_score(labels, scores))
    assert rep["auc_pr"] == pytest.approx(average_precision_score(labels, scores))
    # the optimal threshold maximises F1 over the observed scores
    best = max(f1_score(labels, (scores >= t).astype(int)) for t in scores)
    assert rep["f1_max"] == pytest.approx(best)
    assert f1_score(labels, (scores >= rep["optimal_threshold"]).astype(int)) == pytest.approx(best)
    assert "iou" not in rep
    # IoU by hand: 2 anomalous pixels, 3 predicted, 1 overlapping -> 1 / 4
    masks = np.zeros((2, 2, 2), np.uint8)
    masks[1, 0, :] = 1
    maps = np.zeros((2, 2, 2))
    maps[1, 0, 0] = maps[0, 1, 1] = maps[1, 1, 1] = 1.0
    rep = classification_report([0, 1], [0.2, 0.9], masks, maps, threshold=0.5)
    assert rep["iou"] == pytest.approx(0.25)


def test_training_loss_decreases(fitted):
    _, log = fitted
    assert len(log["loss"]) == TINY.epochs
    assert log["loss"][-1] < 0.8 * log["loss"][0]


def test_save_load_round_trip_gives_identical_predictions(fitted, splits, tmp_path):
    det, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(4)])
    maps, scores = det.predict(x)
    det.save(tmp_path / "ae.pt")
    det2 = ConvAutoencoderDetector.load(tmp_path / "ae.pt")
    maps2, scores2 = det2.predict(x)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)
    assert det2.threshold == det.threshold and det2.config == det.config


def test_resume_after_interruption_equals_uninterrupted_run(splits, tmp_path, monkeypatch):
    full = ConvAutoencoderDetector(TINY)
    log_full = full.fit(
        splits.train, splits.val, generator=torch.Generator().manual_seed(3), show_progress=False
    )

    # Crash in the middle of epoch 3 (after two checkpointed epochs).
    steps_per_epoch = -(-len(splits.train) // TINY.batch_size)
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 1:
            raise KeyboardInterrupt("simulated interruption")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        ConvAutoencoderDetector(TINY).fit(
            splits.train,
            splits.val,
            generator=torch.Generator().manual_seed(3),
            show_progress=False,
            checkpoint_dir=tmp_path,
        )
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert (tmp_path / "ae_train.pt").is_file()

    resumed = ConvAutoencoderDetector(TINY)
    log_res = resumed.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(3),
        show_progress=False,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert log_res["resumed_from"] == 2
    assert log_res["loss"] == log_full["loss"]
    for (k, a), b in zip(
        full.autoencoder.state_dict().items(), resumed.autoencoder.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert resumed.threshold == full.threshold


def test_smoke_profile_fit_and_evaluate(splits, tmp_path):
    cfg = load_config("ae", "smoke")
    det = ConvAutoencoderDetector(cfg)
    det.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=tmp_path,
    )
    res = evaluate(det, splits.test, show_progress=False)
    assert res.maps.shape == (len(splits.test), 64, 64)
    assert np.isfinite(res.maps).all()
    assert 0.0 <= res.metrics["image_auroc"] <= 1.0 and 0.0 <= res.metrics["pixel_auroc"] <= 1.0
    rep = det.report(res.scores["label"].to_numpy(), res.scores["score"].to_numpy(), res.masks, res.maps)
    assert {"accuracy", "precision", "recall", "f1", "auc_roc", "auc_pr", "optimal_threshold", "iou"} <= set(
        rep
    )
    assert rep["auc_roc"] == pytest.approx(res.metrics["image_auroc"])
