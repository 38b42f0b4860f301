"""Uninformed Students: patch networks, dense evaluation, losses, ensemble scores, checkpoints, smoke run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mudenet_core.baselines.uninformed_students import (
    PatchDescriptorNet,
    ScaleModel,
    UninformedStudents,
    USConfig,
    compactness_loss,
    correlation_matrix,
    describe,
    load_dtd_images,
    predictive_variance,
    regression_error,
    triplet_loss,
)
from mudenet_core.data import DataConfig, make_splits
from mudenet_core.harness import evaluate
from mudenet_core.methods import get_method, load_config

TINY = USConfig(
    image_size=64,
    patch_sizes=(17, 33, 65),
    descriptor_dim=8,
    width=4,
    n_students=3,
    dense_mode="strided",
    kd_backbone="efficientnet_lite0",
    kd_layers=("stage5",),
    kd_pretrained=False,
    kd_input_size=32,
    teacher_steps=2,
    teacher_batch_size=8,
    positive_shift=2,
    student_epochs=1,
    student_batch_size=4,
    student_crop=32,
    map_sigma=1.0,
    eval_batch_size=8,
)


@pytest.fixture(scope="module")
def splits(synthetic_root):
    cfg = DataConfig(
        dataset="synthetic", root=str(synthetic_root), category="plate", image_size=64, val_fraction=0.25
    )
    return make_splits(cfg)


# TINY trains its students for a few steps only (plumbing tests): fit's "have not learnt the teacher" warning
# is expected there and checked on purpose in test_untrained_students_warn
TINY_WARNING = "UninformedStudents p=.*have not learnt the teacher"


@pytest.fixture(scope="module")
def fitted(splits, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("us_ckpt")
    det = UninformedStudents(TINY)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", TINY_WARNING, RuntimeWarning)
        log = det.fit(
            splits.train,
            splits.val,
            generator=torch.Generator().manual_seed(0),
            show_progress=False,
            checkpoint_dir=ckpt_dir,
        )
    return det, log, ckpt_dir


def test_registry_and_profiles():
    det_cls, cfg_cls = get_method("us")
    assert det_cls is UninformedStudents and cfg_cls is USConfig
    paper = load_config("us", "paper")
    assert paper.patch_sizes == (17, 33, 65) and paper.descriptor_dim == 128 and paper.n_students == 3
    for profile in ("cpu", "smoke"):
        assert load_config("us", profile).patch_sizes == (17, 33, 65)


@pytest.mark.parametrize("p, extent, stride", [(17, 17, 1), (33, 32, 4), (65, 60, 8)])
def test_patch_network_maps_a_patch_to_one_descriptor(p, extent, stride):
    net = PatchDescriptorNet(p, descriptor_dim=16, width=8)
    assert (net.extent, net.stride) == (extent, stride)
    assert net(torch.zeros(2, 3, p, p)).shape == (2, 16, 1, 1)


@pytest.mark.parametrize("p", [17, 33, 65])
def test_dilated_dense_output_is_the_patch_network_at_every_pixel(p):
    torch.manual_seed(0)
    net = PatchDescriptorNet(p, descriptor_dim=8, width=4).eval()
    x = torch.randn(1, 3, 40, 44)
    with torch.no_grad():
        dense = describe(net, x, "dilated")  # (1, 8, 40, 44)
        strided = describe(net, x, "strided")
        assert dense.shape == (1, 8, 40, 44)
        s = net.stride
        assert strided.shape == (1, 8, -(-40 // s), -(-44 // s))
        # strided = dense subsampled on the stride grid
        torch.testing.assert_close(strided, dense[..., ::s, ::s], rtol=1e-4, atol=1e-5)
        # one output equals the network applied to its own window of the padded image
        e = net.extent
        lo = (e - 1) // 2
        padded = torch.nn.functional.pad(x, (lo, e - 1 - lo, lo, e - 1 - lo), mode="reflect")
        for i, j in [(0, 0), (7, 13), (39, 43)]:
            window = padded[..., i : i + e, j : j + e]
            torch.testing.assert_close(net(window)[..., 0, 0], dense[..., i, j], rtol=1e-4, atol=1e-5)


def test_variance_is_exactly_zero_when_students_agree():
    torch.manual_seed(0)
    scale = ScaleModel(33, descriptor_dim=8, width=4, n_students=3, dense_mode="dilated").eval()
    for s in scale.students[1:]:
        s.load_state_dict(scale.students[0].state_dict())
    with torch.no_grad():
        e, v = scale.error_and_variance(torch.randn(2, 3, 24, 24))
    assert v.shape == (2, 24, 24) and e.shape == (2, 24, 24)
    assert torch.count_nonzero(v) == 0
    assert (e > 0).all()  # untrained students do not match the teacher


def test_variance_and_error_hand_computed():
    # M = 3 students, d = 2, one pixel: s = (0, 0), (1, 0), (2, 2); mean (1, 2/3)
    preds = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 2.0]]).view(3, 1, 2, 1, 1)
    # v = mean ||s||^2 - ||mean||^2 = (0 + 1 + 8) / 3 - (1 + 4/9) = 14/9
    assert predictive_variance(preds).item() == pytest.approx(14 / 9, rel=1e-6)
    # e = ||mean - y||^2 with y = (1, 0): (0)^2 + (2/3)^2 = 4/9
    assert regression_error(preds, torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)).item() == pytest.approx(4 / 9)
    # the same closed form on random values
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 2, 5, 4, 4, generator=g, dtype=torch.float64)
    ref = p.pow(2).sum(2).mean(0) - p.mean(0).pow(2).sum(1)
    torch.testing.assert_close(predictive_variance(p), ref)


def test_compactness_loss_zero_for_identity_positive_otherwise():
    assert compactness_loss(torch.eye(5)).item() == 0.0
    c = torch.eye(3)
    c[0, 1] = c[1, 0] = 0.3
    assert compactness_loss(c).item() == pytest.approx(2 * 0.09 / 6)
    # correlated descriptors give a positive loss, decorrelated (orthogonal centred columns) zero
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert compactness_loss(correlation_matrix(x)).item() == pytest.approx(0.0, abs=1e-12)
    y = torch.cat([x[:, :1], x[:, :1] + 0.1 * x[:, 1:]], dim=1)
    assert compactness_loss(correlation_matrix(y)).item() > 0.4
    torch.testing.assert_close(correlation_matrix(y), torch.from_numpy(np.corrcoef(y.numpy().T)).float())


def test_triplet_loss_hand_computed():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    n = torch.tensor([[0.0, 1.0], [3.0, 0.0], [1.0, 0.0]])
    # d+ = 1, 0, 4; d- = min(||a-n||^2, ||p-n||^2) = min(1, 2), min(9, 9), min(1, 1) = 1, 9, 1
    # margin 0.5: max(0, 0.5 + d+ - d-) = 0.5, 0, 3.5 -> mean 4/3
    assert triplet_loss(a, p, n, margin=0.5).item() == pytest.approx(4.0 / 3.0)


def test_fit_sets_statistics_and_checkpoints_every_stage(fitted):
    det, log, ckpt_dir = fitted
    for p, scale in zip(TINY.patch_sizes, det.scales, strict=True):
        assert (scale.t_std > 0).all() and scale.e_std > 0 and scale.v_std > 0
        assert log[f"stats_{p}"]["e_mean"] == pytest.approx(scale.e_mean.item())
        assert len(log[f"students_{p}"]) == TINY.student_epochs
    assert (ckpt_dir / "us_train.pt").is_file()


def test_validation_maps_are_standardised(fitted, splits):
    det, _, _ = fitted
    x = torch.stack([splits.val[i]["image"] for i in range(len(splits.val))])
    scale = det.scales[1]
    with torch.no_grad():
        m = scale(x)  # standardised e + v on the validation images: mean 0 per term
    assert abs(m.mean().item()) < 1e-4


def test_resume_with_all_stages_done_reproduces_predictions(fitted, splits):
    det, _, ckpt_dir = fitted
    again = UninformedStudents(TINY)
    log = again.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=ckpt_dir,
        resume=True,
    )
    assert log["resumed_stages"] == [
        "teacher_17",
        "students_17",
        "teacher_33",
        "students_33",
        "teacher_65",
        "students_65",
    ]
    x = torch.stack([splits.test[i]["image"] for i in range(3)])
    assert torch.equal(det.predict(x)[0], again.predict(x)[0])


@pytest.mark.filterwarnings(f"ignore:{TINY_WARNING}:RuntimeWarning")
def test_resume_after_interruption_equals_uninterrupted_run(fitted, splits, tmp_path, monkeypatch):
    import mudenet_core.baselines.uninformed_students as us

    det, _, _ = fitted
    real = us.train_students
    calls = {"n": 0}

    def crash_on_second_scale(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(us, "train_students", crash_on_second_scale)
    with pytest.raises(KeyboardInterrupt):
        UninformedStudents(TINY).fit(
            splits.train,
            splits.val,
            generator=torch.Generator().manual_seed(0),
            show_progress=False,
            checkpoint_dir=tmp_path,
        )
    monkeypatch.setattr(us, "train_students", real)
    resumed = UninformedStudents(TINY)
    log = resumed.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert log["resumed_stages"] == ["teacher_17", "students_17", "teacher_33"]
    for (k, a), b in zip(det.scales.state_dict().items(), resumed.scales.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_save_load_round_trip_gives_identical_predictions(fitted, splits, tmp_path):
    det, _, _ = fitted
    x = torch.stack([splits.test[i]["image"] for i in range(4)])
    maps, scores = det.predict(x)
    assert maps.shape == (4, 1, 64, 64) and scores.shape == (4,)
    det.save(tmp_path / "us.pt")
    det2 = UninformedStudents.load(tmp_path / "us.pt")
    maps2, scores2 = det2.predict(x)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)
    assert det2.config == det.config


def test_dtd_pretraining_pool(dtd_root):
    pool = load_dtd_images(dtd_root, image_size=48, max_images=5)
    assert pool.shape == (5, 3, 48, 48)
    assert pool.mean().abs() < 3  # ImageNet-normalised values


@pytest.mark.slow
def test_smoke_profile_fit_and_evaluate(splits):
    det = UninformedStudents(load_config("us", "smoke"))
    det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    res = evaluate(det, splits.test, show_progress=False)
    assert res.maps.shape == (len(splits.test), 64, 64)
    assert np.isfinite(res.maps).all()
    # trained students localise the defects (measured 0.88; the former 1-epoch schedule gave 0.76)
    assert res.metrics["pixel_auroc"] > 0.8


# ------------------------------------------------------------------------------------------------------------
# the students must learn the teacher (root cause of the below-chance validation AUROC)
# ------------------------------------------------------------------------------------------------------------
STUDENT_SCHEDULE = ("student_epochs", "student_batch_size", "student_crop", "student_lr")


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_profile_student_schedule_regresses_the_teacher(profile, splits):
    """With each profile's student schedule the students explain most of the normalised teacher's variance.

    The normalised teacher descriptors have unit variance per channel, so students that predict their mean
    have a regression error of about d on held-out images. The former schedules (smoke: 1 epoch of 32 px
    windows; cpu: 4 epochs of 48 px windows, 4 per step) left it at 0.7-1.0 of that: the map was then the
    teacher's norm plus the ensemble's initial disagreement, and the image AUROC fell below chance on the
    validation set (MPDD metal_plate, cpu: 0.44). Smoke-sized networks and data, each profile's schedule.
    """
    schedule = {k: getattr(load_config("us", profile), k) for k in STUDENT_SCHEDULE}
    cfg = load_config("us", "smoke").replace(**schedule)
    det = UninformedStudents(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the collapse warning of fit
        log = det.fit(
            splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False
        )
    x = torch.stack([splits.val[i]["image"] for i in range(len(splits.val))])
    ratios = []
    for p, scale in zip(cfg.patch_sizes, det.scales, strict=True):
        with torch.no_grad():
            e, _ = scale.error_and_variance(x)  # (B, h, w)
            target = scale.teacher_target(x)  # (B, d, h, w)
        trivial = (target - target.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum(1).mean().item()
        assert trivial > 0.5 * cfg.descriptor_dim, f"p={p}: teacher nearly constant ({trivial:.2f})"
        assert e.mean().item() == pytest.approx(log[f"stats_{p}"]["e_mean"], rel=1e-4)
        ratios.append(e.mean().item() / trivial)
    # measured: 0.21-0.54 per scale with the new schedules, 0.71-1.0 with the former ones
    assert max(ratios) < 0.65 and np.mean(ratios) < 0.5, f"{profile}: error / teacher-mean error {ratios}"


def test_untrained_students_warn(splits):
    """``fit`` warns when the students end near the teacher's mean (error > COLLAPSE_FRACTION * d)."""
    former_smoke = load_config("us", "smoke").replace(student_epochs=1, student_batch_size=4, student_crop=32)
    with pytest.warns(RuntimeWarning, match="have not learnt the teacher"):
        UninformedStudents(former_smoke).fit(
            splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False
        )


@pytest.fixture(scope="module")
def plate_64(tmp_path_factory):
    """Generated ``plate`` at smoke size, a test split large enough for an image AUROC (10 good, 20 bad)."""
    from mudenet_core.data import synthetic

    root = tmp_path_factory.mktemp("plate64")
    synthetic.generate(
        root, categories=["plate"], image_size=64, n_train=60, n_test_good=10, n_test_per_defect=4, seed=0
    )
    return make_splits(
        DataConfig(dataset="synthetic", root=str(root), category="plate", image_size=64, val_fraction=0.25),
        show_progress=False,
    )


@pytest.mark.slow
def test_smoke_profile_detects_plate_defects_and_flipped_score_does_not(plate_64):
    """Smoke profile on the generated plate: the test image AUROC is clearly above chance, pixel AUROC high.

    Measured (seed 0): image 0.67, pixel 0.93; with the former smoke schedule 0.41-0.45 and 0.72-0.79 (below
    chance). Colour and spot defects are too faint at 64 px, hence the modest image margin. The sign-flipped
    score must fail the same check.
    """
    from sklearn.metrics import roc_auc_score

    det = UninformedStudents(load_config("us", "smoke"))
    det.fit(plate_64.train, plate_64.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    res = evaluate(det, plate_64.test, show_progress=False)
    labels, scores = res.scores["label"].to_numpy(), res.scores["score"].to_numpy()
    assert labels.sum() == 20 and (labels == 0).sum() == 10
    image_auroc = roc_auc_score(labels, scores)
    assert image_auroc == pytest.approx(res.metrics["image_auroc"])
    assert image_auroc >= 0.6, f"image AUROC {image_auroc:.3f}"
    assert roc_auc_score(labels, -scores) < 0.6  # the flipped sign fails the same check
    masks = res.masks.reshape(-1).astype(bool)
    assert roc_auc_score(masks, res.maps.reshape(-1)) >= 0.85
    assert roc_auc_score(masks, -res.maps.reshape(-1)) < 0.85
