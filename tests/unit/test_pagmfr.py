"""PAGMFR: CIELAB, losses, the pseudo-anomaly generator, training, resume, batch independence, save/load, CLI.

A tiny configuration (EfficientNet-Lite0, 64 px, narrow networks) is trained once per module on the generated
``plate`` category; the other tests reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.color import deltaE_cie76, rgb2lab
from sklearn.metrics import roc_auc_score

from mudenet_core import cli
from mudenet_core.baselines.pagmfr import (
    CURVES_CSV,
    CURVES_PNG,
    PAGMFR,
    TIMING_JSON,
    TRAIN_CHECKPOINT,
    PAGMFRConfig,
    PseudoAnomalySource,
    feature_reconstruction_loss,
    focal_loss,
    prediction_grid,
    pseudo_anomalies,
    save_prediction_grid,
)
from mudenet_core.config import ConfigError
from mudenet_core.data import (
    MPDD_CATEGORIES,
    MVTEC_AD_CATEGORIES,
    MVTEC_LOCO_CATEGORIES,
    VISA_CATEGORIES,
    DataConfig,
    make_splits,
)
from mudenet_core.data.pseudo_anomaly import (
    ObjectPasteConfig,
    ObjectSource,
    generator_kind,
    object_pseudo_anomalies,
    paste_objects,
    region_masks,
)
from mudenet_core.data.synthesis import derived_generator, validation_set
from mudenet_core.data.transforms import denormalize, normalize
from mudenet_core.methods import get_method, load_config
from mudenet_core.nets.pagmfr import PAGMFRNet, delta_e76, rgb_to_lab

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PAGMFRConfig(backbone="efficientnet_lite0", image_size=64, width=16, skip_levels=1, fused_channels=2,
                    hidden=8, ssim_window=7, epochs=20, batch_size=8, lr=3e-3, map_sigma=1.0,
                    checkpoint_every=1, eval_batch_size=4)


@pytest.fixture(scope="module")
def splits(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate", image_size=64,
                     val_fraction=0.25)
    return make_splits(cfg, show_progress=False)


@pytest.fixture(scope="module")
def fitted(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("pagmfr_fit")
    det = PAGMFR(TINY)
    log = det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False,
                  checkpoint_dir=out)
    return det, log, out


# ----------------------------------------------------------------------------------------- colour and losses
def test_rgb_to_lab_matches_skimage():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    x[0, :, 0, :4] = torch.tensor([0.0, 1.0, 0.04045, 0.002], dtype=torch.float64)[:, None].T  # corners
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # primaries
    x[1, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    x[1, :, 0, 2] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    ours = rgb_to_lab(x).numpy()  # (B, 3, H, W)
    ref = np.stack([rgb2lab(x[i].permute(1, 2, 0).numpy()) for i in range(2)]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # skimage rounds the CIE constants (0.008856, 7.787)
    ours32 = rgb_to_lab(x.float()).numpy()
    np.testing.assert_allclose(ours32, ref, atol=5e-3)
    d = delta_e76(rgb_to_lab(x[:1]), rgb_to_lab(x[1:])).numpy()[0, 0]
    ref_d = deltaE_cie76(ref[0].transpose(1, 2, 0), ref[1].transpose(1, 2, 0))
    np.testing.assert_allclose(d, ref_d, atol=2e-3)


def test_focal_loss_hand_computed():
    z = torch.tensor([2.0, -1.0, 0.5, -3.0]).view(1, 1, 2, 2)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    alpha, gamma = 0.75, 2.0
    expected = []
    for zi, ti in zip(z.flatten().tolist(), t.flatten().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-zi))
        p_t, a_t = (p, alpha) if ti == 1 else (1 - p, 1 - alpha)
        expected.append(-a_t * (1 - p_t) ** gamma * math.log(p_t))
    assert float(focal_loss(z, t, alpha, gamma)) == pytest.approx(np.mean(expected), rel=1e-5)
    # gamma = 0, alpha = 1/2: half the mean binary cross-entropy
    bce = -np.mean([math.log(1 / (1 + math.exp(-2.0))), math.log(1 / (1 + math.exp(1.0))),
                    math.log(1 - 1 / (1 + math.exp(-0.5))), math.log(1 - 1 / (1 + math.exp(3.0)))])
    assert float(focal_loss(z, t, 0.5, 0.0)) == pytest.approx(0.5 * bce, rel=1e-5)


def test_feature_reconstruction_loss_is_two_minus_two_cosine():
    g = torch.Generator().manual_seed(1)
    f, r = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    a, b = f.permute(0, 2, 3, 1).reshape(-1, 5).numpy(), r.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = float(np.mean(2 - 2 * cos))
    assert float(feature_reconstruction_loss([f], [r])) == pytest.approx(expected, rel=1e-5)
    assert float(feature_reconstruction_loss([f, r], [3 * f, 0.5 * r])) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- pseudo-anomalies
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An external image folder of random photos-to-be (PNG, other sizes than the targets)."""
    folder = tmp_path_factory.mktemp("objects")
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = (rng.random((40 + 7 * i, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"obj_{i}.png")
    return folder


@pytest.mark.parametrize("use_folder", [True, False])
def test_object_paste_changes_only_the_mask(use_folder, image_folder):
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 3, 48, 48, generator=g) * 0.2 + 0.4  # mid-grey normal images
    source = ObjectSource(pool, image_folder if use_folder else None)
    assert source.self_regions is (not use_folder)
    idx = torch.arange(6)
    y, m = object_pseudo_anomalies(pool, idx, source, ObjectPasteConfig(), torch.Generator().manual_seed(5))
    assert y.shape == pool.shape and m.shape == (6, 1, 48, 48)
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert (m.flatten(1).sum(1) > 0).all()  # never an empty mask
    outside = (m == 0).expand_as(y)
    assert torch.equal(y[outside], pool[outside])  # bit for bit outside the mask
    inside_change = ((y - pool).abs().amax(1, keepdim=True) > 1e-3) & (m > 0)
    assert (inside_change.flatten(1).sum(1) > 0).all()  # every image really changed inside its mask
    # same seed, same sample; another seed, another one
    y2, m2 = object_pseudo_anomalies(pool, idx, source, ObjectPasteConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(y, y2) and torch.equal(m, m2)
    y3, m3 = object_pseudo_anomalies(pool, idx, source, ObjectPasteConfig(), torch.Generator().manual_seed(6))
    assert not torch.equal(m, m3)


def test_self_regions_never_come_from_the_image_itself():
    pool = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.5, 1.0)])  # three constant images
    src = ObjectSource(pool, None)
    drawn = src.draw(torch.tensor([0, 1, 2, 0, 1, 2] * 5), torch.Generator().manual_seed(0))
    own = pool[torch.tensor([0, 1, 2, 0, 1, 2] * 5)]
    assert not (drawn == own).flatten(1).all(1).any()


def test_region_area_matches_the_ellipse():
    cfg = ObjectPasteConfig(min_size=0.3, max_size=0.3, boundary_noise=0.0)  # circles of diameter 0.3 * side
    masks, centres = region_masks(20, (200, 200), cfg, torch.Generator().manual_seed(0))
    area = masks.flatten(1).sum(1)
    assert torch.allclose(area, torch.full_like(area, math.pi * 30.0**2), rtol=0.03)
    ys, xs = torch.meshgrid(torch.arange(200) + 0.5, torch.arange(200) + 0.5, indexing="ij")
    cy = (masks[:, 0] * ys).flatten(1).sum(1) / area
    assert torch.allclose(cy, centres[:, 0], atol=0.5)  # the mask is centred on the drawn centre
    # the centre is at least half a minor axis from the border (so these circles lie inside the image)
    assert ((centres > 30.0 - 1e-4) & (centres < 170.0 + 1e-4)).all()


def test_paste_is_vectorised_per_image():
    """A batch gives each image its own region: different masks within one call."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, m = paste_objects(x, torch.rand(4, 3, 32, 32), ObjectPasteConfig(), torch.Generator().manual_seed(1))
    assert len({tuple(mi.flatten().tolist()) for mi in m}) == 4


def test_texture_or_object_follows_the_documented_list():
    textures = {"carpet", "grid", "leather", "tile", "wood"}
    for c in MVTEC_AD_CATEGORIES:
        assert generator_kind(c) == ("texture" if c in textures else "object"), c
    for c in VISA_CATEGORIES + MPDD_CATEGORIES + MVTEC_LOCO_CATEGORIES + ("plate", "my_new_part"):
        assert generator_kind(c) == "object", c
    assert generator_kind("weave") == "texture"
    assert generator_kind("carpet", "object") == "object" and generator_kind("plate", "texture") == "texture"
    with pytest.raises(ConfigError, match="auto"):
        generator_kind("plate", "random")


def test_texture_pseudo_anomalies_change_only_the_mask():
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(4, 3, 32, 32, generator=g)
    cfg = PAGMFRConfig(backbone="resnet18", pretrained=False, image_size=32, anomaly_prob=1.0)
    src = PseudoAnomalySource("texture", pool, None)
    y, m = pseudo_anomalies(pool, torch.arange(4), src, cfg, torch.Generator().manual_seed(2))
    assert (m.flatten(1).sum(1) > 0).all() and set(torch.unique(m).tolist()) <= {0.0, 1.0}
    outside = (m == 0).expand_as(y)
    assert torch.equal(y[outside], pool[outside])
    none = dataclasses.replace(cfg, anomaly_prob=0.0)
    y0, m0 = pseudo_anomalies(pool, torch.arange(4), src, none, torch.Generator().manual_seed(2))
    assert torch.equal(y0, pool) and m0.sum() == 0


# ----------------------------------------------------------------------------------------- networks, config
def test_network_shapes_and_inputs():
    net = PAGMFRNet((24, 40, 112), width=16, fused_channels=2, hidden=8, skip_levels=2)
    feats = [torch.randn(2, 24, 16, 16), torch.randn(2, 40, 8, 8), torch.randn(2, 112, 4, 4)]
    logit, rec, rec_img = net(feats, torch.rand(2, 3, 64, 64))
    assert logit.shape == (2, 1, 64, 64) and rec_img.shape == (2, 3, 64, 64)
    assert [tuple(r.shape) for r in rec] == [tuple(f.shape) for f in feats]
    assert 0.0 <= float(rec_img.detach().min()) and float(rec_img.detach().max()) <= 1.0  # sigmoid output
    assert net.anomaly.n_inputs == 3 + 2 + 3 * 2  # cosine per level, colour, structure, MFFM
    # a perfect reconstruction gives zero hand-made maps
    img = torch.rand(1, 3, 64, 64)
    maps = net.anomaly.difference_maps([f[:1] for f in feats], [f[:1] for f in feats], img, img)
    assert maps.shape == (1, 5, 64, 64) and float(maps.abs().max()) < 1e-4


def test_config_checks_and_profiles():
    with pytest.raises(ConfigError, match="unknown key"):
        PAGMFRConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="ssim_window"):
        PAGMFRConfig(ssim_window=10)
    with pytest.raises(ConfigError, match="skip_levels"):
        PAGMFRConfig(skip_levels=3)
    det_cls, cfg_cls = get_method("pagmfr")
    assert det_cls is PAGMFR and cfg_cls is PAGMFRConfig
    paper, cpu, smoke = (load_config("pagmfr", p) for p in ("paper", "cpu", "smoke"))
    assert (paper.backbone, paper.batch_size, paper.lr, paper.weight_decay, paper.epochs) == \
        ("wide_resnet50_2", 32, 1e-3, 1e-5, 600)
    assert (cpu.backbone, cpu.image_size) == ("efficientnet_lite0", 128)
    assert smoke.epochs <= 3 and smoke.image_size == 64


# ----------------------------------------------------------------------------------------- trained detector
def test_training_logs_curves_and_timing(fitted):
    det, log, out = fitted
    assert log["kind"] == "object" and log["category"] == "plate" and len(log["epochs"]) == TINY.epochs
    first, last = log["epochs"][0], log["epochs"][-1]
    assert last["feature"] < 0.7 * first["feature"] and last["image_mse"] < 0.7 * first["image_mse"]
    curves = pd.read_csv(out / CURVES_CSV)
    assert list(curves["epoch"]) == list(range(1, TINY.epochs + 1))
    assert np.allclose(curves["focal"], [r["focal"] for r in log["epochs"]])
    with Image.open(out / CURVES_PNG) as im:
        assert im.size[0] > 100
    timing = json.loads((out / TIMING_JSON).read_text())
    assert timing["epochs_this_call"] == TINY.epochs and timing["train_s"] > 0 and timing["n_train"] == 9
    assert np.isfinite(det.threshold)
    # the threshold is the 0.99 quantile of the normal validation images' scores
    n_normal = 3
    normal_scores = np.asarray(log["val_scores"])[:n_normal]
    assert det.threshold == pytest.approx(float(np.quantile(normal_scores, TINY.threshold_quantile)))


def test_mlp_separates_pseudo_anomalies_on_validation(fitted, splits):
    """The fused map finds the method's own pseudo-anomalies on held-out images; a flipped map would not."""
    det, _, _ = fitted
    x01 = denormalize(torch.stack([splits.val[i]["image"] for i in range(len(splits.val))]))  # (3, 3, H, W)
    pool = denormalize(torch.stack([splits.train[i]["image"] for i in range(len(splits.train))]))
    src = ObjectSource(pool, None)
    images, masks = [], []
    for j in range(4):  # four pseudo-anomalous versions of each validation image
        y, m = object_pseudo_anomalies(x01, torch.zeros(len(x01), dtype=torch.long), src, TINY.objects,
                                       derived_generator("pagmfr-test", j))
        images.append(y)
        masks.append(m)
    y, m = torch.cat(images), torch.cat(masks)
    maps, _ = det.predict(normalize(y))
    # pixel level: pseudo-anomalous pixels against the normal pixels around them (measured 0.83 at 20 epochs)
    pixel = roc_auc_score(m.flatten().numpy(), maps.flatten().numpy())
    assert pixel >= 0.75, pixel
    assert roc_auc_score(m.flatten().numpy(), -maps.flatten().numpy()) < 0.5


def test_validation_set_metrics_in_log(fitted, splits):
    det, log, _ = fitted
    v = log["validation"]
    vset = validation_set(splits.val, TINY.validation)
    assert len(log["val_scores"]) == len(vset)
    labels = vset.index["label"].to_numpy()
    assert v["image_auroc"] == pytest.approx(roc_auc_score(labels, log["val_scores"]))


def test_scores_do_not_depend_on_the_batch(fitted, splits):
    det, _, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(8)])
    maps8, scores8 = det.predict(x)
    singles = [det.predict(x[i: i + 1]) for i in range(8)]
    maps1 = torch.cat([m for m, _ in singles])
    scores1 = torch.cat([s for _, s in singles])
    # equal up to float rounding of batched convolutions (a batch statistic, e.g. BatchNorm left in training
    # mode, would move these logits of size ~5 by 0.1 or more)
    assert float((maps1 - maps8).abs().max()) < 1e-4
    assert float((scores1 - scores8).abs().max()) < 1e-4
    assert torch.equal(det.predict(x[[3, 0, 5]])[1], det.predict(x[[3, 0, 5]])[1])  # deterministic


def test_save_load_round_trip(fitted, splits, tmp_path):
    det, _, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(4)])
    maps, scores = det.predict(x)
    det.save(tmp_path / "pagmfr.pt")
    det2 = PAGMFR.load(tmp_path / "pagmfr.pt")
    maps2, scores2 = det2.predict(x)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)
    assert det2.threshold == det.threshold and det2.kind == det.kind and det2.config == det.config
    assert det2.classify(scores2).tolist() == (scores.numpy() >= det.threshold).astype(int).tolist()
    from mudenet_core.baselines.ae import AEConfig, ConvAutoencoderDetector  # another method's checkpoint

    ae_cfg = AEConfig(image_size=32, channels=(4, 4, 4, 4), latent_dim=4)
    ConvAutoencoderDetector(ae_cfg).save(tmp_path / "ae.pt")
    with pytest.raises(Exception, match="not a PAGMFR checkpoint"):
        PAGMFR.load(tmp_path / "ae.pt")


def test_prediction_grid(fitted, splits, tmp_path):
    det, _, _ = fitted
    fig = prediction_grid(det, splits.test, n=3)
    assert len(fig.axes) == 3 * 4 + 1  # image | ground truth | heat map | overlay, plus the colour bar
    path = save_prediction_grid(det, splits.test, tmp_path / "grid.png", indices=[0, 5])
    with Image.open(path) as im:
        assert im.size[0] > 200


def test_resume_after_interruption_equals_uninterrupted_run(splits, tmp_path, interrupt_training):
    cfg = dataclasses.replace(TINY, epochs=3, checkpoint_every=1)
    full = PAGMFR(cfg)
    log_full = full.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(3),
                        show_progress=False)
    steps_per_epoch = -(-len(splits.train) // cfg.batch_size)
    with interrupt_training(torch.optim.Adam, 2 * steps_per_epoch + 1):  # epoch 3, after two checkpoints
        PAGMFR(cfg).fit(splits.train, splits.val, generator=torch.Generator().manual_seed(3),
                        show_progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / TRAIN_CHECKPOINT).is_file()
    resumed = PAGMFR(cfg)
    log_res = resumed.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(3),
                          show_progress=False, checkpoint_dir=tmp_path, resume=True)
    assert log_res["resumed_from"] == 2
    terms = ("loss", "feature", "image_mse", "image_ssim", "focal", "lr")
    rows = [[r[k] for k in terms] for r in log_res["epochs"]]
    assert rows == [[r[k] for k in terms] for r in log_full["epochs"]]
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert resumed.threshold == full.threshold
    # a checkpoint of another run (other seed) is refused
    with pytest.raises(Exception, match="seed"):
        PAGMFR(cfg).fit(splits.train, None, generator=torch.Generator().manual_seed(4), show_progress=False,
                        checkpoint_dir=tmp_path, resume=True)


def test_texture_category_gets_the_texture_generator(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="weave", image_size=64)
    sp = make_splits(cfg, show_progress=False)
    det = PAGMFR(dataclasses.replace(TINY, epochs=1))
    log = det.fit(sp.train, None, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert log["kind"] == "texture" and det.kind == "texture" and math.isnan(det.threshold)
    with pytest.raises(RuntimeError, match="threshold"):
        det.classify(np.zeros(2))


def test_cli_train_smoke_profile(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MUDENET_NO_PROGRESS", "1")
    out = tmp_path / "run"
    argv = ["train", "--method", "pagmfr", "--profile", "smoke", "--data-root", str(synthetic_root),
            "--category", "plate", "--device", "cpu", "--output-dir", str(out), "epochs=1"]
    assert cli.main(argv) == 0
    det = PAGMFR.load(out / "model.pt")
    assert det.config.epochs == 1 and det.kind == "object"
    ck = out / "checkpoints"
    assert (ck / TRAIN_CHECKPOINT).is_file() and (ck / TIMING_JSON).is_file()
    assert len(pd.read_csv(out / "checkpoints" / CURVES_CSV)) == 1
    assert np.isfinite(json.loads((out / "threshold.json").read_text())["threshold"])
