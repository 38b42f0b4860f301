"""SSIM against scikit-image's reference implementation, per pixel, and its defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from mudenet_core.ssim import gaussian_window, ssim, ssim_map


def _skimage_map(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """skimage's full SSIM map (H, W, C) for one (C, H, W) pair, Gaussian weights as Wang et al."""
    _, s = structural_similarity(
        x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(), gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2, full=True,
    )
    return s


@pytest.mark.parametrize("size", [(24, 24), (17, 30), (11, 13)])
def test_map_matches_skimage_per_pixel_including_borders(size):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *size, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim_map(x, y)
    for i in range(2):
        expected = _skimage_map(x[i], y[i])
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_identical_images_score_one_and_noise_lowers_it_monotonically():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(x.shape, generator=g)
    values = [float(ssim(x, (x + s * noise).clamp(0, 1))) for s in (0.0, 0.05, 0.2, 0.5)]
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert values == sorted(values, reverse=True) and values[-1] < 0.5


def test_none_reduction_is_the_channel_mean_map_and_symmetric():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 2, 3, 20, 20, generator=g)
    m = ssim(x, y, reduction="none")
    assert m.shape == (2, 1, 20, 20)
    torch.testing.assert_close(m, ssim_map(x, y).mean(1, keepdim=True))
    torch.testing.assert_close(m, ssim(y, x, reduction="none"))
    assert float(ssim(x, y)) == pytest.approx(float(m.mean()))


def test_window_is_normalised_gaussian_and_bad_arguments_are_refused():
    w = gaussian_window(11, 1.5, dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[5] / w[6]) == pytest.approx(np.exp(0.5 / 1.5 ** 2))
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)
    with pytest.raises(ValueError, match="reduction"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), reduction="sum")
