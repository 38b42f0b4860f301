"""MuDeNet's fast inference path computes what the plain formulas of the paper compute.

The fast path (``MuDeNetNets.raw_maps``) fuses the 1x1 heads, the teacher normalisation and the squared
differences (``scoring.squared_head_distance``) on channels-last features, skips the networks and levels the
scoring configuration does not fuse, and ``scoring.anomaly_map`` applies upsampling and blur as two matrices.
The expectations here are written out independently:

* the maps come from the networks' own modules called one by one (stem, residual levels, 1x1 heads;
  encoder, decoders), in float64, with X^l = (T^l - mean) / std, sum_c (X^l - S1^l)^2 and
  sum_c (A^l - S2^l)^2;
* normalisation statistics are min / max (``numpy.quantile`` for "quantile") of those reference maps;
* upsampling is ``F.interpolate`` (bilinear, float64) and the blur is ``scipy.ndimage.gaussian_filter1d``
  (mode "mirror" is torch's "reflect", truncate 4 sigma).

Maps and scores must agree within 1e-5 of the map scale, for the ablation options of ``ScoringConfig``
(branches, levels, normalisation, blur) as well.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from mudenet_core import scoring
from mudenet_core.data import DataConfig, make_splits
from mudenet_core.mudenet import MuDeNet, MuDeNetConfig
from mudenet_core.scoring import ScoringConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
ARCHS = {  # width 8 / 16 below the pdn channels-last threshold, 32 above it; one level without blocks
    "w16": dict(width=16, out_channels=24, latent_dim=8, ae_width=32),
    "w32": dict(width=32, out_channels=16, latent_dim=8, ae_width=16),
    "empty_level": dict(width=8, out_channels=8, latent_dim=4, ae_width=16, level_blocks=(1, 0, 1),
                        level_kernels=(3, 3, 5)),
}
SCORINGS = {
    "paper": ScoringConfig(),
    "structural_only": ScoringConfig(use_logical=False),
    "logical_only": ScoringConfig(use_structural=False),
    "level_2": ScoringConfig(levels=(2,)),
    "levels_1_3_quantile": ScoringConfig(levels=(1, 3), normalization="quantile", blur_sigma=1.5),
    "level_1_logical_no_blur": ScoringConfig(levels=(1,), use_structural=False, blur_sigma=0.0),
    "none_norm": ScoringConfig(normalization="none", blur_sigma=2.0),
}


def _randomise(nets, seed: int) -> None:
    """Non-trivial BatchNorm statistics and teacher statistics, so that every fold is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in nets.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        nets.teacher_mean.copy_(torch.randn(nets.teacher_mean.shape, generator=g) * 0.1)
        nets.teacher_std.copy_(torch.rand(nets.teacher_std.shape, generator=g) * 0.05 + 0.02)


def _detector(arch: str, seed: int = 0) -> MuDeNet:
    torch.manual_seed(seed)
    det = MuDeNet(MuDeNetConfig(image_size=SIZE, pretrained=False, **ARCHS[arch]))
    _randomise(det.nets, seed)
    det.nets.eval()
    det.fitted = True
    return det


@pytest.fixture(scope="module")
def images(synthetic_root):
    """Generated plate test images (normal and defective) and nominal validation images, (N, 3, 64, 64)."""
    splits = make_splits(DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate",
                                    image_size=SIZE), show_progress=False)
    test = torch.stack([splits.test[i]["image"] for i in range(len(splits.test))][:6])
    val = torch.stack([splits.val[i]["image"] for i in range(len(splits.val))][:4])
    return test, val


# --- the plain formulas -------------------------------------------------------------------------------------


def _plain_levels(net, x: torch.Tensor) -> list[torch.Tensor]:
    """A descriptor network's maps from its modules one by one (the unfused eval-mode modules), float64."""
    net = net.double()
    h = net.stem(x)
    out = []
    for level, head in zip(net.levels, net.heads, strict=True):
        h = level(h)
        out.append(head(h))
    return out


@torch.no_grad()
def plain_raw_maps(det: MuDeNet, x: torch.Tensor) -> torch.Tensor:
    """(B, 2, S, h, w) float64: sum_c ((T - mean) / std - S1)^2 and sum_c (A - S2)^2, per level."""
    nets = copy.deepcopy(det.nets).double().eval()
    x = x.double()
    t = _plain_levels(nets.teacher, x)
    s1 = _plain_levels(nets.student, x)
    s2 = _plain_levels(nets.logical_student, x)
    z = nets.autoencoder.encoder(x)
    a = [dec(z) for dec in nets.autoencoder.decoders]
    mean, std = nets.teacher_mean.double(), nets.teacher_std.double()
    xs = [(t_l - mean[i][:, None, None]) / std[i][:, None, None] for i, t_l in enumerate(t)]
    st = torch.stack([((xl - sl) ** 2).sum(1) for xl, sl in zip(xs, s1, strict=True)], 1)
    lg = torch.stack([((al - sl) ** 2).sum(1) for al, sl in zip(a, s2, strict=True)], 1)
    return torch.stack([st, lg], 1)


def plain_statistics(raw: np.ndarray, cfg: ScoringConfig) -> np.ndarray:
    """(2, S, 2) per branch and level: (min, max), (q_a, q_b) quantiles or (0, 1)."""
    out = np.zeros((2, raw.shape[2], 2))
    for b in range(2):
        for lv in range(raw.shape[2]):
            v = raw[:, b, lv].ravel()
            if cfg.normalization == "minmax":
                out[b, lv] = v.min(), v.max()
            elif cfg.normalization == "quantile":
                out[b, lv] = np.quantile(v, cfg.q_a), np.quantile(v, cfg.q_b)
            else:
                out[b, lv] = 0.0, 1.0
    return out


def plain_anomaly_map(raw: np.ndarray, stats: np.ndarray, cfg: ScoringConfig, size: int) -> np.ndarray:
    """(B, H, W): normalise, mean over levels of the branch sum, bilinear upsampling, Gaussian blur."""
    scale = {"minmax": 1.0, "quantile": 0.1, "none": None}[cfg.normalization]
    branches = [b for b, on in enumerate((cfg.use_structural, cfg.use_logical)) if on]
    levels = [lv - 1 for lv in cfg.levels]
    fused = np.zeros((raw.shape[0],) + raw.shape[-2:])
    for lv in levels:
        for b in branches:
            m = raw[:, b, lv]
            if scale is not None:
                m = scale * (m - stats[b, lv, 0]) / (stats[b, lv, 1] - stats[b, lv, 0])
            fused += m / len(levels)
    up = F.interpolate(torch.from_numpy(fused)[:, None], size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    if cfg.blur_sigma > 0:
        for axis in (1, 2):
            up = ndimage.gaussian_filter1d(up, cfg.blur_sigma, axis=axis, mode="mirror", truncate=4.0)
    return up


def _assert_close_to_scale(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-5) -> None:
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual.double().numpy() - expected).max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x map scale {scale:.3g}"


# --- tests --------------------------------------------------------------------------------------------------


def test_squared_head_distance_equals_the_plain_formula_across_chunks():
    g = torch.Generator().manual_seed(0)
    n, c = 1000, 7
    f1, f2 = torch.randn(n, 5, generator=g), torch.randn(3, n, generator=g).t()  # the second one strided
    w1, w2 = torch.randn(5, c, generator=g), torch.randn(3, c, generator=g)
    bias, base = torch.randn(c, generator=g), torch.randn(n, c, generator=g)
    d = f1.double() @ w1.double() + f2.double() @ w2.double() + bias.double()
    expected = (d**2).sum(1)
    got = scoring.squared_head_distance([f1, f2], [w1, w2], bias, chunk_rows=96)  # 1000 = 10 x 96 + 40
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    out = torch.full((n,), float("nan"))
    got = scoring.squared_head_distance([f1], [w1], bias, base=base, out=out, chunk_rows=333)
    assert got is out
    expected = ((base.double() + f1.double() @ w1.double() + bias.double()) ** 2).sum(1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_raw_maps_equal_the_plain_formula(arch, images):
    det = _detector(arch)
    x = images[0]
    expected = plain_raw_maps(det, x)
    fast = det.predict_components(x)  # inference path: fused heads, channels-last features
    with torch.enable_grad():  # autograd on: the networks' maps as they are, compared by scoring.raw_maps
        unfused = det.nets.raw_maps(x).detach()
    assert fast.shape == expected.shape == (x.shape[0], 2, 3, SIZE // 2, SIZE // 2)
    assert float(expected.std()) > 0  # a non-degenerate map
    for got in (fast, unfused):
        for b in range(2):  # each branch has its own scale
            _assert_close_to_scale(got[:, b], expected[:, b].numpy())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_teacher_maps_fold_the_normalisation_exactly(arch, images):
    det = _detector(arch, seed=1)
    x = images[0][:2]
    ref_nets = copy.deepcopy(det.nets).double()
    t = _plain_levels(ref_nets.teacher, x.double())
    with torch.no_grad():
        got = det.nets.teacher_maps(x)
    for i, (g_l, t_l) in enumerate(zip(got, t, strict=True)):
        exp = (t_l - ref_nets.teacher_mean[i][:, None, None]) / ref_nets.teacher_std[i][:, None, None]
        assert g_l.is_contiguous()
        _assert_close_to_scale(g_l, exp.detach().numpy())


@pytest.mark.parametrize("name", sorted(SCORINGS))
def test_predict_equals_the_plain_pipeline_for_every_scoring_option(name, images):
    cfg = SCORINGS[name]
    det = _detector("w16")
    det.config = det.config.replace(scoring=cfg)
    test, val = images
    stats = plain_statistics(plain_raw_maps(det, val).numpy(), cfg)
    det.calibrate([{"image": v} for v in val])  # the detector's own statistics, from its fast path
    np.testing.assert_allclose(det.nets.map_stats.double().numpy(), stats, rtol=1e-5,
                               atol=1e-5 * np.abs(stats).max())
    expected = plain_anomaly_map(plain_raw_maps(det, test).numpy(), stats, cfg, SIZE)
    amap, scores = det.predict(test)
    assert amap.shape == (test.shape[0], 1, SIZE, SIZE) and scores.shape == (test.shape[0],)
    _assert_close_to_scale(amap[:, 0], expected)
    _assert_close_to_scale(scores, expected.reshape(len(expected), -1).max(1))


def test_predict_follows_changed_weights_and_teacher_statistics(images):
    """The cached fused heads and folded copies are rebuilt when a weight or a statistic changes."""
    det = _detector("w16")
    cfg = ScoringConfig(normalization="none", blur_sigma=0.0)
    det.config = det.config.replace(scoring=cfg)
    x = images[0][:3]
    det.predict(x)  # builds the caches
    with torch.no_grad():
        det.nets.teacher_std.mul_(1.7)
        det.nets.teacher_mean.add_(0.05)
        det.nets.student.heads[1].weight.mul_(-0.5)
        det.nets.logical_student.heads[2].bias.add_(0.3)
        det.nets.teacher.levels[0][0].bn1.running_var.mul_(2.0)
    expected = plain_anomaly_map(plain_raw_maps(det, x).numpy(), np.zeros((2, 3, 2)), cfg, SIZE)
    _assert_close_to_scale(det.predict(x)[0][:, 0], expected)


def test_predict_skips_the_networks_and_levels_it_does_not_fuse(images, monkeypatch):
    """Structural level 1 only: the autoencoder and S2 never run, nor levels 2 and 3 of T and S1."""
    det = _detector("w16")
    det.config = det.config.replace(scoring=ScoringConfig(use_logical=False, levels=(1,)))
    x = images[0][:2]
    expected = det.predict(x)[0]
    folded_t, folded_s = det.nets.teacher.folded(), det.nets.student.folded()

    def forbidden(*args, **kwargs):
        raise AssertionError("ran a network the scoring configuration does not use")

    monkeypatch.setattr(det.nets.autoencoder, "forward", forbidden)
    monkeypatch.setattr(det.nets.autoencoder, "channels_last_maps", forbidden, raising=False)
    monkeypatch.setattr(det.nets.logical_student, "forward", forbidden)
    monkeypatch.setattr(det.nets.logical_student, "folded", forbidden)
    for folded in (folded_t, folded_s):
        for level in folded.levels[1:]:
            monkeypatch.setattr(level, "forward", forbidden)
    torch.testing.assert_close(det.predict(x)[0], expected)
