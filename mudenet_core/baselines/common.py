"""Small helpers the baselines share: Gaussian smoothing and upsampling of anomaly maps, image batches.

PaDiM, PatchCore and the other baselines all turn a feature-grid score map (B, 1, h, w) into an image-size
map (B, 1, H, W) the same way: bilinear upsampling, then a Gaussian blur (sigma = 4 in both papers).

Example:
    >>> import torch
    >>> m = torch.zeros(1, 1, 8, 8); m[0, 0, 4, 4] = 1.0
    >>> out = upsample_and_blur(m, (32, 32), sigma=2.0)
    >>> tuple(out.shape), round(float(out.sum()), 3)
    ((1, 1, 32, 32), 16.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mudenet_core.utils import progress


def gaussian_kernel1d(sigma: float, truncate: float = 4.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of radius ``int(truncate * sigma + 0.5)`` (scipy.ndimage's convention).

    Returns:
        kernel (2 * radius + 1,), summing to 1.
    """
    assert sigma > 0, f"sigma must be > 0, got {sigma}"
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of anomaly maps, with mirror padding at the borders.

    Matches ``scipy.ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=truncate)`` per map (mirror =
    reflect without repeating the edge pixel, torch's ``"reflect"``); maps smaller than the kernel radius fall
    back to edge replication. ``sigma <= 0`` returns the input unchanged.

    Args:
        maps: (B, 1, H, W) (any channel count works; channels are blurred independently).
        sigma: standard deviation in pixels.
        truncate: kernel radius in standard deviations.

    Returns:
        blurred maps (B, 1, H, W), same dtype.
    """
    assert maps.ndim == 4, f"expected (B, 1, H, W), got {tuple(maps.shape)}"
    if sigma <= 0:
        return maps
    b, c, h, w = maps.shape
    k = gaussian_kernel1d(sigma, truncate, dtype=maps.dtype).to(maps.device)
    r = (k.numel() - 1) // 2
    x = maps.reshape(b * c, 1, h, w)  # channels blurred independently
    mode_h = "reflect" if r < h else "replicate"
    mode_w = "reflect" if r < w else "replicate"
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode_h), k.view(1, 1, -1, 1))  # along H
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode_w), k.view(1, 1, 1, -1))  # along W
    return x.reshape(b, c, h, w)


def upsample_and_blur(maps: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Bilinear upsampling of feature-grid maps to the image size, then a Gaussian blur.

    Args:
        maps: (B, 1, h, w) scores on the feature grid.
        size: (H, W) target size.
        sigma: blur standard deviation in image pixels (4 in PaDiM and PatchCore); 0 disables it.

    Returns:
        maps (B, 1, H, W).
    """
    assert maps.ndim == 4, f"expected (B, 1, h, w), got {tuple(maps.shape)}"
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps, sigma)


def iterate_images(dataset: Dataset, *, batch_size: int, device: torch.device | str = "cpu",
                   show_progress: bool = True, desc: str = "") -> Iterator[torch.Tensor]:
    """Yield the dataset's ``"image"`` entries in order, batched and moved to ``device``.

    Yields:
        images (B, 3, H, W).
    """
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    total = math.ceil(len(dataset) / batch_size) if hasattr(dataset, "__len__") else None
    for batch in progress(loader, desc=desc, total=total, enabled=show_progress):
        images = batch["image"] if isinstance(batch, dict) else batch
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        yield images.to(device)
