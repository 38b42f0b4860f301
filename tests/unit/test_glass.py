"""GLASS: architecture, GAS projection and ascent, losses, the distribution table, fit outputs, exact resume,
save/load, batch independence, input errors and the CLI (tiny Lite0 runs at 64 px on one thread)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from mudenet_core import cli, metrics
from mudenet_core.baselines import glass as G
from mudenet_core.config import ConfigError
from mudenet_core.data import DataConfig, make_splits, synthesis, synthetic
from mudenet_core.data.images import DataError
from mudenet_core.io import CheckpointError, save_checkpoint
from mudenet_core.methods import get_method, load_config
from mudenet_core.nets.glass import Discriminator, GLASSEmbedding, feature_adaptor, local_patches

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny run: Lite0 at 64 px (8 x 8 grid), 32-d features, official GAS / loss settings otherwise.
TINY = G.GLASSConfig(backbone="efficientnet_lite0", image_size=64, pretrain_embed_dim=32, target_embed_dim=32,
                     dsc_hidden=32, epochs=10, batch_size=8, max_samples_per_epoch=0, checkpoint_every=5,
                     val_every=5, val_min_anomalous=20, lr_adaptor=1e-3, lr_discriminator=2e-3)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("glass_plate64")
    synthetic.generate(root, categories=["plate"], image_size=64, n_train=24, n_test_good=4,
                       n_test_per_defect=2, seed=0)
    return make_splits(DataConfig(dataset="synthetic", root=str(root), category="plate", image_size=64,
                                  val_fraction=0.25))


@pytest.fixture(scope="module")
def fitted(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("glass_fit")
    det = G.GLASS(TINY)
    log = det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False,
                  checkpoint_dir=out)
    return det, log, out


# --- configuration, tables, networks ------------------------------------------------------------------------
def test_registry_and_paper_profile_are_the_official_settings():
    det_cls, cfg_cls = get_method("glass")
    assert det_cls is G.GLASS and cfg_cls is G.GLASSConfig
    p = load_config("glass", "paper")
    # cqylunlun/GLASS shell/run-mvtec.sh and glass.py (methods_reference.md A.1-A.4)
    assert (p.backbone, p.image_size, p.patch_size) == ("wide_resnet50_2", 288, 3)
    assert (p.pretrain_embed_dim, p.target_embed_dim, p.dsc_hidden) == (1536, 1536, 1024)
    assert (p.noise_std, p.gas_steps, p.gas_step_size, p.projection_every, p.manifold_r) == (
        0.015, 20, 0.001, 5, 0.5)
    assert (p.radius_quantile, p.ohem_quantile, p.focal_gamma) == (0.75, 0.5, 2.0)
    assert (p.lr_adaptor, p.weight_decay_adaptor, p.lr_discriminator) == (1e-4, 1e-5, 2e-4)
    assert (p.epochs, p.batch_size, p.max_samples_per_epoch, p.distribution) == (640, 8, 392, "auto")
    for profile in ("cpu", "smoke"):
        c = load_config("glass", profile)
        assert c.backbone == "efficientnet_lite0" and c.distribution == "auto"


def test_distribution_table_is_the_official_one():
    hyper = {"bottle", "cable", "pill", "screw", "transistor"}
    for cat in G.KNOWN_CATEGORIES["mvtec_ad"]:
        want = "hypersphere" if cat in hyper else "manifold"
        assert G.default_distribution("mvtec_ad", cat) == want == G.default_distribution(None, cat), cat
    assert len(G.KNOWN_CATEGORIES["mvtec_ad"]) == 15 and len(G.KNOWN_CATEGORIES["mpdd"]) == 6
    assert all(G.default_distribution("mpdd", c) == "manifold" for c in G.KNOWN_CATEGORIES["mpdd"])
    assert not G.KNOWN_CATEGORIES["mvtec_ad"] & G.KNOWN_CATEGORIES["mpdd"]  # a category names its table
    assert G.default_distribution(None, "plate") == "manifold"  # outside the tables: GLASS-m


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="odd"):
        G.GLASSConfig(patch_size=2)
    with pytest.raises(ConfigError, match="val_every"):
        G.GLASSConfig(selection="best_val", val_every=0)
    with pytest.raises(ConfigError, match="distribution"):
        G.GLASSConfig.from_dict({"distribution": "sphere"})
    with pytest.raises(ConfigError, match="unknown key"):
        G.GLASSConfig.from_dict({"noise": 0.1})
    with pytest.raises(ConfigError, match="feature_stride"):
        G.GLASSModel(TINY.replace(synthesis={"feature_stride": 4}))


def test_parameter_counts_of_the_official_networks():
    d = Discriminator(1536, 1024)
    # Linear(1536, 1024) + BatchNorm1d(1024) (weight, bias) + Linear(1024, 1, no bias)
    assert sum(p.numel() for p in d.parameters()) == 1536 * 1024 + 1024 + 2 * 1024 + 1024 == 1_576_960
    assert sum(p.numel() for p in feature_adaptor(1536).parameters()) == 1536 * 1536 + 1536
    assert isinstance(d.body[2], torch.nn.LeakyReLU) and d.body[2].negative_slope == 0.2
    assert d.body[3].bias is None


def test_embedding_equals_the_official_order_of_operations():
    """Official: unfold, upsample the layer3 patches to the layer2 grid, then pool; ours pools first."""
    emb = GLASSEmbedding("resnet18", ["layer2", "layer3"], pretrained=False, pretrain_embed_dim=48,
                         target_embed_dim=24)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = emb(x)  # (B, h, w, D)
        feats = emb.backbone(x)
        ref = []
        for k in ("layer2", "layer3"):
            u = F.unfold(feats[k], 3, padding=1)  # (B, C*9, h_k*w_k)
            b, c9, _ = u.shape
            u = u.reshape(b, c9, *feats[k].shape[-2:])
            u = F.interpolate(u, size=(8, 8), mode="bilinear", align_corners=False)  # patches to layer2 grid
            u = u.permute(0, 2, 3, 1).reshape(-1, c9)  # (B*h*w, C*9)
            ref.append(torch.stack([c.mean(1) for c in torch.tensor_split(u, 48, dim=1)], 1))  # (B*h*w, 48)
        flat = torch.cat(ref, 1)  # layer-major (B*h*w, 96)
        ref = torch.stack([c.mean(1) for c in torch.tensor_split(flat, 24, dim=1)], 1).reshape(2, 8, 8, 24)
    assert ours.shape == (2, 8, 8, 24)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_local_patches_zero_pads_channel_major():
    x = torch.arange(18.0).view(1, 2, 3, 3)
    p = local_patches(x, 3)  # (1, 18, 3, 3)
    assert p[0, :9, 1, 1].tolist() == list(range(9))  # centre position, channel 0: its full window
    assert p[0, 9:, 1, 1].tolist() == list(range(9, 18))
    assert p[0, :9, 0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 3, 4]  # corner: zero padding


# --- losses and GAS -----------------------------------------------------------------------------------------
def test_focal_loss_hand_values_and_bce_limit():
    assert math.isclose(float(G.focal_loss(torch.tensor([0.5]), torch.tensor([1.0]), 2.0, eps=0)),
                        0.25 * math.log(2), rel_tol=1e-6)
    assert math.isclose(float(G.focal_loss(torch.tensor([0.9]), torch.tensor([0.0]), 2.0, eps=0)),
                        0.81 * math.log(10), rel_tol=1e-6)
    p, t = torch.rand(50, generator=torch.Generator().manual_seed(1)), (torch.arange(50) % 2).float()
    torch.testing.assert_close(G.focal_loss(p, t, 0.0, eps=0), F.binary_cross_entropy(p, t))


def test_ohem_keeps_the_hardest_half():
    err = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float()
    keep = G.ohem_mask(err, 0.5)
    assert keep.sum() == 50 and err[keep].min() > err[~keep].max()
    assert G.ohem_mask(err, 0.0).all()


def test_truncated_projection_hand_case():
    u = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])  # unit directions
    anchor = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    pts = anchor + u * torch.tensor([[0.2], [0.7], [3.0]])  # distances 0.2, 0.7 (inside), 3.0
    out = G.truncated_projection(pts, anchor, 0.5, 1.0)
    torch.testing.assert_close(out, anchor + u * torch.tensor([[0.5], [0.7], [1.0]]))


@pytest.mark.parametrize("distribution", ["manifold", "hypersphere"])
def test_gas_ends_exactly_in_the_shell(distribution):
    g = torch.Generator().manual_seed(0)
    true = torch.randn(64, 16, generator=g)
    centre = torch.randn(64, 16, generator=g) * 0.1
    with G.seeded(0):
        d = Discriminator(16, 8).train()
    r_t = torch.quantile((true - centre).norm(dim=1), 0.75)
    anchor, lo, hi = G.gas_shell(distribution, true, centre, r_t, 0.5)
    start = true + 0.015 * torch.randn(64, 16, generator=g)
    gas = G.global_anomaly_features(d, true, start, steps=20, step_size=0.001, every=5, anchor=anchor,
                                    r_min=lo, r_max=hi)
    dist = (gas - anchor).norm(dim=1)
    lo_f, hi_f = float(lo), float(hi)
    assert (dist >= lo_f - 1e-5).all() and (dist <= hi_f + 1e-5).all()
    if distribution == "manifold":
        # noise 0.015 * sqrt(16) = 0.06 < 0.5: the first projection (after step 5) puts every point at 0.5;
        # the 15 later steps of 0.001 can move it at most 0.015 further out, never back in (the projections
        # at steps 10, 15, 20 lift anything below 0.5 back to 0.5)
        assert (dist <= 0.5 + 15 * 0.001 + 1e-5).all()
        assert dist.min() == pytest.approx(0.5, abs=1e-5) or (dist >= 0.5 - 1e-5).all()
    else:
        assert lo_f == pytest.approx(float(r_t)) and hi_f == pytest.approx(2 * float(r_t))
        assert (dist > lo_f + 1e-3).any()  # points already in [r, 2r] keep their distance
    assert all(p.grad is None for p in d.parameters())  # GAS leaves the discriminator's gradients alone


def test_gas_step_length_and_direction():
    """One ascent step moves every feature by exactly step_size, towards a lower anomaly score."""
    g = torch.Generator().manual_seed(2)
    true = torch.randn(128, 8, generator=g)
    with G.seeded(1):
        d = Discriminator(8, 8).eval()  # rows independent (running BN statistics): a per-row check
    start = true + 0.5 * torch.randn(128, 8, generator=g)
    moved = G.global_anomaly_features(d, true, start, steps=1, step_size=0.01, every=100, anchor=true,
                                      r_min=0, r_max=1)
    torch.testing.assert_close((moved - start).norm(dim=1), torch.full((128,), 0.01))
    with torch.no_grad():
        before, after = d(torch.cat([true, start]))[128:], d(torch.cat([true, moved]))[128:]
    assert (after < before).all()  # ascent on BCE(D(f), 1) lowers D(f): towards the normal side


# --- fit, outputs, selection, persistence -------------------------------------------------------------------
def test_discriminator_separates_synthetic_anomalies_on_validation(fitted, splits):
    det, log, _ = fitted
    vset = synthesis.validation_set(splits.val, synthesis.ValidationConfig(min_anomalous=20, seed=7))
    scores = np.concatenate([det.predict(vset[i]["image"][None])[1].numpy() for i in range(len(vset))])
    labels = vset.index["label"].to_numpy()
    auroc = metrics.image_auroc(labels, scores)  # measured 0.868 (seed 0, one thread); untrained: about 0.5
    assert auroc >= 0.75, auroc
    assert metrics.image_auroc(labels, -scores) < 0.75  # a sign flip fails the same check


def test_fit_writes_curves_timings_and_checkpoints(fitted):
    det, log, out = fitted
    curves = pd.read_csv(out / "training_curves.csv")
    assert curves["epoch"].tolist() == list(range(1, 11))
    for col in ("loss", "loss_normal", "loss_gas", "loss_las"):
        assert curves[col].notna().all(), col
    for col in ("val_image_auroc", "val_pixel_auroc"):  # validated every 5 epochs
        assert curves[col].notna().tolist() == [e % 5 == 0 for e in range(1, 11)], col
    parts = curves[["loss_normal", "loss_gas", "loss_las"]].sum(axis=1)
    np.testing.assert_allclose(curves["loss"], parts, rtol=1e-5)
    with Image.open(out / "training_curves.png") as im:
        assert im.size[0] > 200
    timing = json.loads((out / "timing.json").read_text())
    assert [e["epoch"] for e in timing["epochs"]] == list(range(1, 11)) and timing["total_epoch_s"] > 0
    # the kept model is the best validation epoch (image + pixel AUROC), recomputed from the CSV
    best = int(curves["epoch"][(curves["val_image_auroc"] + curves["val_pixel_auroc"]).idxmax()])
    assert det.selected_epoch == log["selected_epoch"] == best
    x = torch.stack([det.predict(torch.zeros(1, 3, 64, 64))[1]])
    assert torch.equal(G.GLASS.load(out / "glass_best.pt").predict(torch.zeros(1, 3, 64, 64))[1], x[0])
    final = G.GLASS.load(out / "glass_final.pt")
    assert final.selected_epoch == det.selected_epoch  # the record of which epoch was kept
    assert log["distribution"] == "manifold"  # "auto" on a category outside the official tables


def test_save_load_round_trip_and_batch_independence(fitted, splits, tmp_path):
    det, _, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(8)])
    maps, scores = det.predict(x)
    assert maps.shape == (8, 1, 64, 64) and scores.shape == (8,)
    with torch.no_grad():
        patch = det.model(x)  # (B, h, w) raw discriminator scores
    assert torch.equal(scores, patch.flatten(1).amax(1))  # image score = max of the raw patch scores
    one = torch.cat([det.predict(x[i:i + 1])[1] for i in range(8)])
    torch.testing.assert_close(one, scores, rtol=1e-6, atol=1e-7)  # eval-mode BN: no batch dependence
    det.save(tmp_path / "g.pt")
    det2 = G.GLASS.load(tmp_path / "g.pt")
    maps2, scores2 = det2.predict(x)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)
    assert det2.config == det.config and det2.distribution == det.distribution
    save_checkpoint(tmp_path / "other.pt", state_dict={}, config={}, method="ae")
    with pytest.raises(CheckpointError, match="not a GLASS checkpoint"):
        G.GLASS.load(tmp_path / "other.pt")


def test_resume_after_interruption_equals_uninterrupted_run(splits, tmp_path, interrupt_training):
    cfg = TINY.replace(epochs=3, checkpoint_every=2, selection="last", val_every=0)
    full = G.GLASS(cfg)
    log_full = full.fit(splits.train, None, generator=torch.Generator().manual_seed(5), show_progress=False)
    steps_per_epoch = -(-len(splits.train) // cfg.batch_size)
    with interrupt_training(torch.optim.AdamW, 2 * steps_per_epoch + 1):  # epoch 3, after 2 checkpoints
        G.GLASS(cfg).fit(splits.train, None, generator=torch.Generator().manual_seed(5), show_progress=False,
                         checkpoint_dir=tmp_path)
    resumed = G.GLASS(cfg)
    log_res = resumed.fit(splits.train, None, generator=torch.Generator().manual_seed(5), show_progress=False,
                          checkpoint_dir=tmp_path, resume=True)
    assert log_res["resumed_from"] == 2
    for k in ("loss", "loss_normal", "loss_gas", "loss_las", "p_gas"):
        assert log_res["train"][k] == log_full["train"][k], k
    sd_full, sd_res = full.model.state_dict(), resumed.model.state_dict()
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k
    with pytest.raises(CheckpointError, match="seed"):  # another seed cannot resume this run
        G.GLASS(cfg).fit(splits.train, None, generator=torch.Generator().manual_seed(6), show_progress=False,
                         checkpoint_dir=tmp_path, resume=True)


# --- inputs ------------------------------------------------------------------------------------------------
def test_foreground_masks_are_read_by_file_name_and_missing_ones_named(splits, tmp_path):
    paths = [splits.train[i]["path"] for i in range(3)]
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 255
    for p in paths[:2]:
        Image.fromarray(half).save(tmp_path / (p.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png"))
    fg = G.load_foreground(paths[:2], tmp_path, 64)
    assert fg.shape == (2, 1, 64, 64) and fg[:, :, :, :32].all() and not fg[:, :, :, 32:].any()
    with pytest.raises(DataError, match=paths[2].rsplit("/", 1)[-1]):
        G.load_foreground(paths, tmp_path, 64)
    with pytest.raises(DataError, match="foreground mask folder not found"):
        G.load_foreground(paths, tmp_path / "nope", 64)


def test_hypersphere_fit_with_foreground_masks_keeps_las_inside(splits, tmp_path, monkeypatch):
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    for i in range(len(splits.train)):
        Image.fromarray(half).save(tmp_path / splits.train[i]["path"].rsplit("/", 1)[-1])
    seen = []
    real = G.las.synthesize

    def recording(image, cfg, generator, **kw):
        out = real(image, cfg, generator, **kw)
        seen.append((out[1], kw["foreground"]))
        return out

    monkeypatch.setattr(G.las, "synthesize", recording)
    cfg = TINY.replace(epochs=1, val_every=0, selection="last", distribution="hypersphere",
                       foreground_dir=str(tmp_path))
    log = G.GLASS(cfg).fit(splits.train, None, generator=torch.Generator().manual_seed(0),
                           show_progress=False)
    assert log["distribution"] == "hypersphere" and math.isfinite(log["train"]["loss"][0])
    assert len(seen) == len(splits.train)  # one LAS image per training image and epoch
    for mask, fg in seen:
        assert mask.sum() > 0 and not (mask[0] * (1 - fg[0])).any()  # the anomaly stays on the foreground


def test_wrong_image_size_and_missing_validation_are_clear_errors(splits):
    with pytest.raises(DataError, match="expects 96 x 96"):
        G.GLASS(TINY.replace(image_size=96, epochs=1)).fit(splits.train, splits.val,
                                                           generator=torch.Generator().manual_seed(0),
                                                           show_progress=False)
    with pytest.raises(DataError, match="val_every=0"):
        G.GLASS(TINY.replace(epochs=1)).fit(splits.train, None, generator=torch.Generator().manual_seed(0),
                                            show_progress=False)


def test_cli_train_smoke_profile(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MUDENET_NO_PROGRESS", "1")
    out = tmp_path / "glass"
    argv = ["train", "--method", "glass", "--profile", "smoke", "--data-root", str(synthetic_root),
            "--category", "plate", "--output-dir", str(out), "--device", "cpu", "epochs=1"]
    assert cli.main(argv) == 0
    run = yaml.safe_load((out / "config.yaml").read_text())
    assert run["method"] == "glass" and run["method_config"]["epochs"] == 1
    det = G.GLASS.load(out / "model.pt")
    assert det.config.to_dict() == run["method_config"]
    assert json.loads((out / "threshold.json").read_text())["n_anomalous"] >= 60  # chosen on validation
    ckpt = out / "checkpoints"
    assert (ckpt / "training_curves.csv").is_file() and (ckpt / "timing.json").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert log["train"]["step"] == [1]
