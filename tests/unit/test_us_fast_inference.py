"""Uninformed Students' fast inference path computes what the plain formulas of the paper compute.

The fast path (``ScaleModel.fused_layers`` / ``fused_error_and_variance``, taken by ``ScaleModel.forward`` and
so by ``UninformedStudents.predict`` in eval mode without autograd) runs the teacher and the M students of a
scale as one grouped network, with the teacher normalisation folded into its last layer and every LeakyReLU
moved behind the max-pool that follows it. The expectations here are written out independently, in float64,
from the plain per-network modules (``describe`` of the teacher and of each student):

* y = (T - t_mean) / t_std, e = ||mean_m S_m - y||^2 and v = 1/M sum_m ||S_m||^2 - ||mean_m S_m||^2 (the
  paper's form of the variance, not the pairwise one either implementation uses);
* the scale's map (e - e_mean) / e_std + (v - v_mean) / v_std, upsampled with ``grid_to_image``, averaged
  over the scales and blurred with ``scipy.ndimage.gaussian_filter`` (mode "mirror" is torch's "reflect");
  the image score is the map's maximum.

Maps must agree within 1e-5 of their scale. Every statistic is set to a non-trivial value, so that a wrong
fold (a missing or misplaced t_mean / t_std, the teacher in another group, a dropped activation) fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from mudenet_core.baselines.uninformed_students import (
    ScaleModel,
    UninformedStudents,
    USConfig,
    describe,
    grid_to_image,
    max_pool_2x2,
    train_students,
)
from mudenet_core.data import DataConfig, make_splits

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
D, WIDTH, M = 8, 4, 3  # descriptor size, width, students: tiny networks, every architecture of the paper
TINY = USConfig(
    image_size=SIZE,
    patch_sizes=(17, 33, 65),
    descriptor_dim=D,
    width=WIDTH,
    n_students=M,
    dense_mode="strided",
    kd_backbone="efficientnet_lite0",
    kd_layers=("stage5",),
    kd_pretrained=False,
    kd_input_size=32,
    teacher_steps=2,
    teacher_batch_size=8,
    student_epochs=1,
    student_batch_size=4,
    student_crop=0,
    map_sigma=1.5,
    eval_batch_size=8,
)


@pytest.fixture(scope="module")
def splits(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate", image_size=SIZE)
    return make_splits(cfg, show_progress=False)


@pytest.fixture(scope="module")
def images(splits):
    """Three generated test images (good and defective), (3, 3, 64, 64)."""
    test = splits.test
    return torch.stack([test[i]["image"] for i in (0, len(test) // 2, len(test) - 1)])


def _randomise_stats(scale: ScaleModel, seed: int) -> ScaleModel:
    """Non-trivial teacher and score statistics (the defaults 0 / 1 would hide a missing fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scale.t_mean.copy_(torch.randn(D, generator=g) * 0.1)
        scale.t_std.copy_(torch.rand(D, generator=g) * 0.2 + 0.05)  # normalised descriptors of size ~1-10
        scale.e_mean.fill_(float(torch.rand((), generator=g)) * 10)
        scale.e_std.fill_(float(torch.rand((), generator=g)) * 5 + 0.5)
        scale.v_mean.fill_(float(torch.rand((), generator=g)))
        scale.v_std.fill_(float(torch.rand((), generator=g)) * 2 + 0.2)
    return scale.eval()


def _scale(patch_size: int, mode: str, seed: int) -> ScaleModel:
    torch.manual_seed(seed)
    return _randomise_stats(ScaleModel(patch_size, D, WIDTH, M, mode), seed)


def _detector(seed: int = 0) -> UninformedStudents:
    det = UninformedStudents(TINY)
    torch.manual_seed(seed)
    det.scales = det._build()
    for i, scale in enumerate(det.scales):
        _randomise_stats(scale, seed + i)
    return det


def reference_error_and_variance(scale: ScaleModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e and v (B, h, w) in float64 from the per-network modules and the paper's formulas."""
    s64 = copy.deepcopy(scale).double()
    x64 = x.double()
    with torch.no_grad():
        y = (describe(s64.teacher, x64, s64.dense_mode) - s64.t_mean.view(1, -1, 1, 1)) / s64.t_std.view(
            1, -1, 1, 1
        )  # (B, d, h, w)
        preds = [describe(s, x64, s64.dense_mode) for s in s64.students]  # M x (B, d, h, w)
    mean = sum(preds) / len(preds)
    e = (mean - y).pow(2).sum(1)
    v = sum(p.pow(2).sum(1) for p in preds) / len(preds) - mean.pow(2).sum(1)
    return e, v


def reference_scale_map(scale: ScaleModel, x: torch.Tensor) -> torch.Tensor:
    """The standardised map (B, 1, h, w) of one scale, float64."""
    e, v = reference_error_and_variance(scale, x)
    e_mean, e_std, v_mean, v_std = (
        getattr(scale, k).double() for k in ("e_mean", "e_std", "v_mean", "v_std")
    )
    return ((e - e_mean) / e_std + (v - v_mean) / v_std).unsqueeze(1)


def reference_predict(det: UninformedStudents, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Maps (B, H, W) and scores (B,) in float64: per-scale maps, grid_to_image, mean, scipy blur, max."""
    size = x.shape[-2:]
    total = 0
    for scale in det.scales:
        stride = scale.teacher.stride if scale.dense_mode == "strided" else 1
        total = total + grid_to_image(reference_scale_map(scale, x), stride, size)
    amap = (total / len(det.scales))[:, 0].numpy()  # (B, H, W)
    sigma = det.config.map_sigma
    blurred = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in amap])
    return blurred, blurred.reshape(len(blurred), -1).max(1)


def assert_maps_close(actual: torch.Tensor, expected, rel: float = 1e-5) -> None:
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    scale = float(expected.abs().max())
    assert scale > 0
    err = float((actual.double() - expected).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x map scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------------------
# one scale: error, variance and map against the float64 plain formulas
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["strided", "dilated"])
@pytest.mark.parametrize("patch_size", [17, 33, 65])
def test_fused_error_and_variance_equal_the_plain_formulas(patch_size, mode, images):
    scale = _scale(patch_size, mode, seed=patch_size)
    x = images[:2]
    e_ref, v_ref = reference_error_and_variance(scale, x)
    with torch.no_grad():
        e, v = scale.fused_error_and_variance(x)
        e_plain, v_plain = scale.error_and_variance(x)
        amap = scale(x)
    assert e.shape == e_ref.shape == v.shape and amap.shape == (2, 1, *e.shape[-2:])
    assert e.dtype == v.dtype == torch.float32
    assert_maps_close(e, e_ref)
    assert_maps_close(v, v_ref)
    assert (v >= 0).all()
    assert_maps_close(e_plain, e_ref)  # the plain float32 path is as close
    assert_maps_close(amap, reference_scale_map(scale, x))
    assert "_fused_cache" in scale.__dict__  # forward took the fused path


def test_fused_variance_is_exactly_zero_when_students_agree(images):
    scale = _scale(33, "strided", seed=1)
    for s in scale.students[1:]:
        s.load_state_dict(scale.students[0].state_dict())
    with torch.no_grad():
        e, v = scale.fused_error_and_variance(images[:1])
    assert torch.count_nonzero(v) == 0 and (e > 0).all()


@pytest.mark.parametrize("size", [(9, 8), (16, 16), (7, 13)])
@pytest.mark.parametrize(("stride", "dilation"), [(2, 1), (1, 1), (1, 2), (1, 4)])
def test_max_pool_2x2_equals_the_torch_pool(size, stride, dilation):
    x = torch.randn(2, 5, *size)
    x[0, 0, 0, 0] = float("nan")
    expected = F.max_pool2d(x, 2, stride=stride, dilation=dilation)
    torch.testing.assert_close(max_pool_2x2(x, stride, dilation), expected, equal_nan=True, rtol=0, atol=0)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(max_pool_2x2(cl, stride, dilation), expected, equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# the detector: final map and image score
# ------------------------------------------------------------------------------------------------------------
def test_predict_equals_the_float64_reference_on_generated_images(images):
    det = _detector(seed=3)
    amap, score = det.predict(images)
    ref_map, ref_score = reference_predict(det, images)
    assert amap.shape == (len(images), 1, SIZE, SIZE) and score.shape == (len(images),)
    assert_maps_close(amap[:, 0], ref_map)
    assert_maps_close(score, ref_score)


def test_batching_does_not_change_the_maps(images):
    det = _detector(seed=4)
    amap, score = det.predict(images)
    one, one_score = det.predict(images[1:2])
    torch.testing.assert_close(one, amap[1:2], rtol=0, atol=1e-6 * float(amap.abs().max()))
    torch.testing.assert_close(one_score, score[1:2], rtol=0, atol=1e-6 * float(amap.abs().max()))


def test_cache_follows_weight_and_statistic_changes(images):
    det = _detector(seed=5)
    before, _ = det.predict(images)
    scale = det.scales[0]
    plan = scale.fused_layers()
    assert scale.fused_layers() is plan  # cached while nothing changes
    with torch.no_grad():
        scale.students[1].layers[0].weight.mul_(1.5)  # in place: the version counter moves
    changed, _ = det.predict(images)
    assert scale.fused_layers() is not plan
    assert float((changed - before).abs().max()) > 1e-3 * float(before.abs().max())
    assert_maps_close(changed[:, 0], reference_predict(det, images)[0])
    with torch.no_grad():
        det.scales[2].t_std.mul_(0.5)  # a statistic folded into the teacher's last layer
    assert_maps_close(det.predict(images)[0][:, 0], reference_predict(det, images)[0])
    other = _detector(seed=6)  # load_state_dict copies in place: the cache must follow
    det.scales.load_state_dict(other.scales.state_dict())
    torch.testing.assert_close(det.predict(images)[0], other.predict(images)[0], rtol=0, atol=0)


def test_state_dict_and_checkpoint_are_unchanged_by_the_cache(images, tmp_path):
    det = _detector(seed=7)
    keys = list(det.scales.state_dict())
    amap, _ = det.predict(images)
    assert list(det.scales.state_dict()) == keys
    assert not any("fused" in k for k in keys)
    again = UninformedStudents.load(det.save(tmp_path / "us.pt"))
    torch.testing.assert_close(again.predict(images)[0], amap, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# autograd and training with the cache present
# ------------------------------------------------------------------------------------------------------------
def test_gradients_flow_through_forward_with_the_cache_present(images):
    scale = _scale(17, "strided", seed=8)
    x = images[:1]
    with torch.no_grad():
        cached = scale(x)  # builds the fused copy
    assert "_fused_cache" in scale.__dict__
    out = scale(x)  # autograd on: the per-network modules
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), cached, rtol=0, atol=1e-5 * float(cached.abs().max()))
    out.sum().backward()
    for net in (*scale.students, scale.teacher):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    scale.train()  # train mode without no_grad is the plain path too
    with torch.no_grad():
        torch.testing.assert_close(scale(x), cached, rtol=0, atol=1e-5 * float(cached.abs().max()))


def test_training_after_predict_moves_the_students_and_the_next_predict_follows(splits, images):
    det = _detector(seed=9)
    before, _ = det.predict(images)
    scale = det.scales[0]
    w0 = [p.detach().clone() for p in scale.students.parameters()]
    t0 = [p.detach().clone() for p in scale.teacher.parameters()]
    losses = train_students(
        scale, splits.train, TINY, seed=0, device=torch.device("cpu"), show_progress=False
    )
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert all(not torch.equal(a, b) for a, b in zip(w0, scale.students.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(t0, scale.teacher.parameters(), strict=True))  # frozen
    scale.eval()
    after, _ = det.predict(images)
    assert float((after - before).abs().max()) > 0
    assert_maps_close(after[:, 0], reference_predict(det, images)[0])
