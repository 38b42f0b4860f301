import numpy as np
import pytest
import torch
from scipy import ndimage

from mudenet_core import scoring
from mudenet_core.config import ConfigError
from mudenet_core.scoring import ScoringConfig


def test_raw_maps_sum_squared_error_over_channels():
    x = [torch.zeros(1, 2, 2, 2) for _ in range(3)]
    s1 = [torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), 2 * torch.ones(1, 2, 2, 2)]
    raw = scoring.raw_maps(x, s1, x, x)
    assert tuple(raw.shape) == (1, 2, 3, 2, 2)
    assert raw[0, 0, :, 0, 0].tolist() == [0.0, 2.0, 8.0]  # sum over 2 channels of 0, 1, 4
    assert float(raw[:, 1].abs().max()) == 0.0  # A == S2: zero logical map


def test_student_equal_teacher_gives_zero_map():
    x = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    raw = scoring.raw_maps(x, x, x, x)
    cfg = ScoringConfig(normalization="none", blur_sigma=0.0)
    amap = scoring.anomaly_map(raw, scoring.map_statistics(raw, cfg), cfg, 16)
    assert float(amap.abs().max()) == 0.0


def test_quantile_normalisation_sends_q_a_to_0_and_q_b_to_0_1():
    val = torch.rand(5, 2, 3, 10, 10, generator=torch.Generator().manual_seed(0)) * 7
    cfg = ScoringConfig(normalization="quantile", q_a=0.9, q_b=0.995)
    stats = scoring.map_statistics(val, cfg)
    v = val[:, 1, 2].flatten().numpy()
    qa, qb = np.quantile(v, 0.9), np.quantile(v, 0.995)
    np.testing.assert_allclose(stats[1, 2].numpy(), [qa, qb], rtol=1e-5)
    probe = torch.zeros(1, 2, 3, 1, 2)
    probe[0, 1, 2, 0] = torch.tensor([qa, qb])
    out = scoring.normalize_maps(probe, stats, cfg)[0, 1, 2, 0]
    np.testing.assert_allclose(out.numpy(), [0.0, 0.1], atol=1e-6)


def test_minmax_normalisation_maps_validation_range_to_unit_interval():
    val = torch.rand(4, 2, 3, 6, 6) * 3 + 1
    cfg = ScoringConfig()
    norm = scoring.normalize_maps(val, scoring.map_statistics(val, cfg), cfg)
    for b in range(2):
        for lv in range(3):
            assert float(norm[:, b, lv].min()) == pytest.approx(0.0, abs=1e-6)
            assert float(norm[:, b, lv].max()) == pytest.approx(1.0, abs=1e-6)


def test_fuse_mean_over_levels_of_branch_sum_and_ablations():
    norm = torch.zeros(1, 2, 3, 1, 1)
    norm[0, 0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # structural per level
    norm[0, 1, :, 0, 0] = torch.tensor([10.0, 20.0, 30.0])  # logical per level
    assert float(scoring.fuse(norm, ScoringConfig())) == pytest.approx((11 + 22 + 33) / 3)
    assert float(scoring.fuse(norm, ScoringConfig(use_logical=False))) == pytest.approx(2.0)
    assert float(scoring.fuse(norm, ScoringConfig(use_structural=False, levels=(1, 3)))) == pytest.approx(
        20.0
    )
    with pytest.raises(ConfigError, match="out of range"):
        scoring.fuse(norm, ScoringConfig(levels=(4,)))
    with pytest.raises(ConfigError, match="at least one"):
        ScoringConfig(use_structural=False, use_logical=False)


def test_gaussian_blur_matches_scipy():
    x = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = scoring.gaussian_blur(x, 2.0)[0, 0].numpy()
    want = ndimage.gaussian_filter(x[0, 0].numpy(), sigma=2.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_anomaly_map_shape_and_image_score_is_max():
    raw = torch.rand(3, 2, 3, 8, 8)
    cfg = ScoringConfig()
    amap = scoring.anomaly_map(raw, scoring.map_statistics(raw, cfg), cfg, (32, 32))
    assert tuple(amap.shape) == (3, 1, 32, 32)
    torch.testing.assert_close(scoring.image_scores(amap), amap.amax(dim=(1, 2, 3)))
