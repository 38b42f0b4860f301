"""RGPKD: network shapes, frozen teacher, retrieval, prompts, losses, maps, batch independence, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from skimage.metrics import structural_similarity
from torchvision.models import resnet18

from mudenet_core import cli
from mudenet_core.baselines.rgpkd import (
    RGPKD,
    TRAIN_CHECKPOINT,
    RGPKDConfig,
    RGPKDModel,
    anomaly_map,
    feature_loss,
    nearest_prompt,
    retrieval_keys,
    rgpkd_loss,
)
from mudenet_core.config import ConfigError
from mudenet_core.data import DataConfig, make_splits
from mudenet_core.io import CheckpointError
from mudenet_core.methods import get_method, load_config
from mudenet_core.nets.backbones import build_backbone
from mudenet_core.nets.rgpkd import PromptModule, ResNetEncoder, RGPKDStudent, load_resnet18_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

# A test-sized recipe: the smoke profile (Lite0 teacher, 64 px, narrow student), 3 epochs.
TINY = load_config("rgpkd", "smoke").replace(epochs=3, batch_size=4, checkpoint_every=1)
LITE0 = (24, 40, 112)  # EfficientNet-Lite0 stage2 / stage3 / stage5 channels (strides 4 / 8 / 16)


@pytest.fixture(scope="module")
def splits(synthetic_root):
    return make_splits(DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate",
                                  image_size=64), show_progress=False)


@pytest.fixture(scope="module")
def fitted(splits):
    det = RGPKD(TINY)
    log = det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    return det, log


def _images(n: int, size=(64, 64), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# --- networks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (64, 160)])
@pytest.mark.parametrize("teacher", ["efficientnet_lite0", "resnet18"])
def test_student_matches_the_teacher_at_every_level(size, teacher):
    bb = build_backbone(teacher, pretrained=False)
    student = RGPKDStudent(tuple(bb.channels.values()), widths=(8, 16, 32, 64)).eval()
    x = _images(2, size)
    h, w = size
    with torch.no_grad():
        t = list(bb(x).values())
        prompts = [f[[1, 0]] for f in t]  # another image's maps as prompts
        for p in (None, prompts):
            s, rec = student(x, p)
            assert [tuple(f.shape) for f in s] == [tuple(f.shape) for f in t]
            grids = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16)]
            assert [tuple(f.shape[-2:]) for f in s] == grids
            assert tuple(rec.shape) == (2, 3, h, w)
        enc = student.encoder(x)
    assert [tuple(e.shape) for e in enc] == [(2, 8, h // 2, w // 2), (2, 8, h // 4, w // 4),
                                             (2, 16, h // 8, w // 8), (2, 32, h // 16, w // 16),
                                             (2, 64, h // 32, w // 32)]


def test_student_rejects_sizes_that_are_not_multiples_of_32():
    with pytest.raises(AssertionError, match="multiples of 32"):
        RGPKDStudent(LITE0, widths=(8, 16, 32, 64))(torch.zeros(1, 3, 80, 64))


def test_encoder_is_resnet18_and_takes_its_weights():
    tv = resnet18(weights=None).eval()
    enc = ResNetEncoder().eval()
    n_tv = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in enc.parameters()) == n_tv == 11_176_512
    load_resnet18_encoder(enc, tv.state_dict())
    x = _images(1, (64, 64))
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        assert torch.equal(enc(x)[-1], ref)
    with pytest.raises(ValueError, match="widths"):
        load_resnet18_encoder(ResNetEncoder((8, 16, 32, 64)), tv.state_dict())


def test_prompt_switch_changes_the_decoder_output():
    torch.manual_seed(0)
    student = RGPKDStudent(LITE0, widths=(8, 16, 32, 64)).eval()
    x = _images(2)
    p_a = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(LITE0, (4, 8, 16), strict=True)]
    p_b = [torch.randn_like(p) for p in p_a]
    with torch.no_grad():
        plain = student(x)[0]
        with_a, with_a_again, with_b = student(x, p_a)[0], student(x, p_a)[0], student(x, p_b)[0]
    for k in range(3):
        assert not torch.allclose(plain[k], with_a[k], atol=1e-4)  # prompts on vs off
        assert not torch.allclose(with_a[k], with_b[k], atol=1e-4)  # the prompt's content matters
        assert torch.equal(with_a[k], with_a_again[k])  # deterministic
    with pytest.raises(AssertionError, match="use_prompts=False"):
        RGPKDStudent(LITE0, widths=(8, 16, 32, 64), use_prompts=False)(x, p_a)


def test_prompt_module_attends_to_the_prompt_positions():
    """With one prompt position, the attended value is g(p) at every decoder position (softmax over one)."""
    torch.manual_seed(0)
    pm = PromptModule(4, 3).eval()
    x, p = torch.randn(1, 4, 2, 2), torch.randn(1, 3, 1, 1)
    g = pm.g(p)  # (1, M, 1, 1)
    q, k = pm.theta(x), pm.phi(p)
    cos = torch.nn.functional.cosine_similarity(q, k.expand_as(q), dim=1).unsqueeze(1)  # (1, 1, 2, 2)
    expected = x + pm.fuse(torch.cat([x, g.expand(1, -1, 2, 2), cos], 1))
    assert torch.allclose(pm(x, p), expected, atol=1e-6)


# --- retrieval ----------------------------------------------------------------------------------------------


def test_retrieval_returns_the_nearest_bank_image_flattened_not_pooled():
    # three bank images' coarse maps (C=1, 2x2): a left-bright image, a right-bright one, a dark one
    bank = torch.tensor([[[[4.0, 0.0], [4.0, 0.0]]], [[[0.0, 4.0], [0.0, 4.0]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    keys = retrieval_keys(bank)
    assert torch.allclose(keys.norm(dim=1), torch.ones(3))
    query = torch.tensor([[[[0.0, 3.0], [0.5, 3.0]]]])  # right-bright
    # cosines by hand, times |q|: image 0: 2 / 5.657 = 0.35, image 1: 24 / 5.657 = 4.24, image 2: 0.65 / 0.2
    # = 3.25. Pooled maps (one channel: one positive value per image) would tie all three and return 0.
    assert nearest_prompt(retrieval_keys(query), keys).tolist() == [1]
    assert nearest_prompt(retrieval_keys(query), keys, exclude=torch.tensor([1])).tolist() == [2]
    # a batch, each query excluding "itself"
    both = torch.cat([bank[:1], bank[1:2]])
    assert nearest_prompt(retrieval_keys(both), keys, exclude=torch.tensor([0, 1])).tolist() == [2, 2]


def test_model_prompts_are_the_retrieved_bank_entries():
    cfg = TINY.replace(pretrained=False)
    model = RGPKDModel(cfg, pretrained=False).eval()
    x = _images(4)
    with torch.no_grad():
        t = model.teacher_features(x)
    model.bank1, model.bank2, model.bank3 = (f.clone() for f in t)
    model.bank_keys = retrieval_keys(model.bank3)
    same = model.prompts(t)  # every query's nearest is itself
    assert all(torch.equal(p, f) for p, f in zip(same, t, strict=True))
    sims = retrieval_keys(t[2]) @ retrieval_keys(t[2]).T  # (4, 4), by hand
    sims.fill_diagonal_(-2.0)
    expected = sims.argmax(1)
    other = model.prompts(t, exclude=torch.arange(4))
    for p, f in zip(other, t, strict=True):
        assert torch.equal(p, f[expected])
    assert (expected != torch.arange(4)).all()


# --- losses and maps ----------------------------------------------------------------------------------------


def test_losses_by_hand_and_against_skimage_ssim():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 2, 2, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 2, 2, generator=g)]
    by_hand = sum(float(((a - b) ** 2).mean()) for a, b in zip(s, t, strict=True))
    assert float(feature_loss(s, t)) == pytest.approx(by_hand, rel=1e-6)
    rec, img = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    parts = rgpkd_loss(s, t, rec, img, w_feature=2.0, w_reconstruction=3.0, w_ssim=0.5)
    # skimage's per-pixel map (full=True), averaged over every pixel (its scalar crops the border)
    ref_ssim = np.mean([structural_similarity(
        img[i].permute(1, 2, 0).numpy(), rec[i].permute(1, 2, 0).numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=2, full=True)[1].mean() for i in range(2)])
    assert float(parts["ssim"]) == pytest.approx(1 - ref_ssim, abs=1e-4)
    assert float(parts["reconstruction"]) == pytest.approx(float(((rec - img) ** 2).mean()), rel=1e-6)
    total = 2.0 * by_hand + 3.0 * float(parts["reconstruction"]) + 0.5 * float(parts["ssim"])
    assert float(parts["loss"]) == pytest.approx(total, rel=1e-5)
    same = rgpkd_loss(t, t, img, img)
    assert float(same["loss"]) == pytest.approx(0.0, abs=1e-6)


def test_anomaly_map_is_one_minus_cosine_summed_over_levels():
    t = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 1, 1)]
    t[0][:, 0] = 1.0
    t[1][:, 0] = 1.0
    s = [t[0].clone(), t[1].clone()]
    assert float(anomaly_map(t, s, (4, 4), sigma=0).abs().max()) < 1e-6  # student == teacher: zero map
    s[0][0, :, 0, 0] = torch.tensor([0.0, 1.0])  # orthogonal at one stride-2 position: 1 - cos = 1
    s[1][0, :, 0, 0] = torch.tensor([-1.0, 0.0, 0.0])  # opposite at the single coarse position: 2
    m = anomaly_map(t, s, (4, 4), sigma=0)
    assert tuple(m.shape) == (1, 1, 4, 4)
    assert float(m[0, 0, 0, 0]) == pytest.approx(3.0)  # top-left corner: 1 (level 1, no blend) + 2
    assert float(m[0, 0, 3, 3]) == pytest.approx(2.0)  # far corner: only the coarse level
    assert float(anomaly_map(t, s, (4, 4), sigma=2.0).sum()) == pytest.approx(float(m.sum()), rel=1e-5)


# --- config -------------------------------------------------------------------------------------------------


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ConfigError, match="student_pretrained"):
        RGPKDConfig(student_widths=(8, 16, 32, 64), student_pretrained=True)
    with pytest.raises(ConfigError, match="multiple of 32"):
        RGPKDConfig(image_size=80)
    with pytest.raises(ConfigError, match="use_prompts"):
        RGPKDConfig(use_prompts=False, prompts_at_test=True)
    with pytest.raises(ConfigError, match="unknown key"):
        RGPKDConfig.from_dict({"prompt_at_test": True})
    for profile in ("paper", "cpu", "smoke"):
        assert isinstance(load_config("rgpkd", profile), RGPKDConfig)
    assert get_method("rgpkd") == (RGPKD, RGPKDConfig)


# --- detector -----------------------------------------------------------------------------------------------


def test_teacher_stays_bit_identical_through_training(fitted, splits):
    det, log = fitted
    fresh = build_backbone(TINY.teacher, pretrained=True)
    trained = det.model.teacher.state_dict()
    ref = fresh.state_dict()
    assert list(trained) == list(ref) and any("running_mean" in k for k in ref)
    for k, v in ref.items():
        assert torch.equal(trained[k], v), k  # weights and BatchNorm statistics
    det.model.train()
    assert not det.model.teacher.training and det.model.student.training
    det.model.eval()
    assert all(not p.requires_grad for p in det.model.teacher.parameters())
    assert len(log["loss"]) == TINY.epochs and log["bank_size"] == len(splits.train)


def test_training_lowers_the_loss(fitted):
    _, log = fitted
    assert log["loss"][-1] < log["loss"][0]


@pytest.mark.parametrize("prompts_at_test", [False, True])
def test_scores_do_not_depend_on_the_batch(fitted, splits, prompts_at_test):
    det, _ = fitted
    det.config = TINY.replace(prompts_at_test=prompts_at_test)
    x = torch.stack([splits.test[i]["image"] for i in range(8)])
    maps8, scores8 = det.predict(x)
    singles = [det.predict(x[i:i + 1]) for i in range(8)]
    assert torch.allclose(torch.cat([s for _, s in singles]), scores8, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.cat([m for m, _ in singles]), maps8, rtol=1e-5, atol=1e-6)
    assert torch.allclose(scores8, maps8.flatten(1).amax(1))
    det.config = TINY


def test_prompts_at_test_changes_the_prediction(fitted, splits):
    det, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(2)])
    det.config = TINY.replace(prompts_at_test=False)
    off = det.predict(x)[0]
    det.config = TINY.replace(prompts_at_test=True)
    on = det.predict(x)[0]
    det.config = TINY
    assert not torch.allclose(on, off, atol=1e-5)


def test_save_and_load_reproduce_the_predictions(fitted, splits, tmp_path):
    det, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(3)])
    for pat in (True, False):
        det.config = TINY.replace(prompts_at_test=pat)
        path = det.save(tmp_path / f"model_{pat}.pt")
        loaded = RGPKD.load(path)
        assert loaded.config == det.config and loaded.model.bank_size == (len(splits.train) if pat else 0)
        for a, b in zip(det.predict(x), loaded.predict(x), strict=True):
            assert torch.equal(a, b)
    det.config = TINY
    bad = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "config": {}, "method": "ae"}, bad)
    with pytest.raises(CheckpointError, match="not an RGPKD checkpoint"):
        RGPKD.load(bad)


def test_resume_after_interruption_equals_uninterrupted_run(fitted, splits, tmp_path, interrupt_training):
    det_full, log_full = fitted
    steps_per_epoch = -(-len(splits.train) // TINY.batch_size)
    with interrupt_training(torch.optim.SGD, 2 * steps_per_epoch + 1):  # epoch 3, after two checkpoints
        RGPKD(TINY).fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0),
                        show_progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / TRAIN_CHECKPOINT).is_file()
    resumed = RGPKD(TINY)
    log = resumed.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0),
                      show_progress=False, checkpoint_dir=tmp_path, resume=True)
    assert log["resumed_from"] == 2 and log["loss"] == log_full["loss"]
    full_state, resumed_state = det_full.model.state_dict(), resumed.model.state_dict()
    for k, v in full_state.items():
        assert torch.equal(v, resumed_state[k]), k
    with pytest.raises(CheckpointError, match="incompatible"):  # another recipe cannot resume this run
        RGPKD(TINY.replace(lr=0.5)).fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0),
                                        show_progress=False, checkpoint_dir=tmp_path, resume=True)


def test_cli_train_smoke_profile(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MUDENET_NO_PROGRESS", "1")
    out = tmp_path / "rgpkd"
    argv = ["train", "--method", "rgpkd", "--profile", "smoke", "--data-root", str(synthetic_root),
            "--category", "plate", "--output-dir", str(out), "--device", "cpu", "epochs=1"]
    assert cli.main(argv) == 0
    run = yaml.safe_load((out / "config.yaml").read_text())
    assert run["method"] == "rgpkd" and run["method_config"]["epochs"] == 1
    det = RGPKD.load(out / "model.pt")
    assert det.config.to_dict() == run["method_config"]
    assert (out / "threshold.json").is_file()
    good = synthetic_root / "plate" / "test" / "good"
    assert cli.main(["predict", "--checkpoint", str(out), "--input", str(good), "--method", "rgpkd"]) == 0
