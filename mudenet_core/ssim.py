"""Structural similarity (SSIM, Wang et al. 2004), Gaussian window per channel, as scikit-image computes it.

Shared by the methods that compare an image with its reconstruction (RGPKD's reconstruction loss, PAGMFR's
loss and its structure-difference map). Public code of both families gets SSIM wrong in small ways (a box
window over all channels at once, a window that is not normalised, the map mean taken over the padding); this
one matches ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L, channel_axis=...)`` per pixel (its ``full=True`` map), including
its border handling: local means are Gaussian filters with symmetric ("reflect" in scipy) padding.

Example:
    >>> x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> round(float(ssim(x, x)), 6), tuple(ssim(x, x * 0.5, reduction="none").shape)
    (1.0, (2, 1, 32, 32))
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03  # the stabilising constants of Wang et al. (2004)


def gaussian_window(window_size: int = 11, sigma: float = 1.5,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian window of odd length ``window_size``.

    Returns:
        window (window_size,), summing to 1.
    """
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = window_size // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _symmetric_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``r`` per side, reflected symmetrically (edge repeated)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable per-channel filtering of (B, C, H, W) with symmetric padding; same size out."""
    b, c, h, w = x.shape
    r = window.numel() // 2
    x = x.index_select(2, _symmetric_index(h, r, x.device)).index_select(3, _symmetric_index(w, r, x.device))
    kh = window.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = window.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)  # (B, C, H, W)


def ssim_map(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of two image batches.

    Args:
        x: images (B, C, H, W).
        y: images (B, C, H, W), same shape.
        window_size: Gaussian window length (odd).
        sigma: Gaussian window standard deviation in pixels.
        data_range: the value range of the images (1 for [0, 1] images).

    Returns:
        SSIM (B, C, H, W), 1 where the local statistics agree.
    """
    assert x.ndim == 4 and x.shape == y.shape, \
        f"expected two (B,C,H,W) of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
    window = gaussian_window(window_size, sigma, dtype=x.dtype).to(x.device)
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x * mu_x
    var_y = _filter(y * y, window) - mu_y * mu_y
    cov = _filter(x * y, window) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """SSIM of two image batches, averaged over channels (and pixels for ``reduction="mean"``).

    Args:
        x: images (B, C, H, W).
        y: images (B, C, H, W).
        window_size: Gaussian window length (odd; 11 with sigma 1.5 is scikit-image's and Wang et al.'s).
        sigma: Gaussian window standard deviation in pixels.
        data_range: the value range of the images.
        reduction: ``"mean"``: one scalar over the batch; ``"none"``: the SSIM map (B, 1, H, W).

    Returns:
        a scalar tensor, or the map (B, 1, H, W). The SSIM loss is ``1 - ssim(x, y)``.
    """
    s = ssim_map(x, y, window_size=window_size, sigma=sigma, data_range=data_range).mean(1, keepdim=True)
    if reduction == "none":
        return s  # (B, 1, H, W)
    if reduction == "mean":
        return s.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
