"""Resize, normalise and augment images and masks; every random draw uses an explicit ``torch.Generator``.

Images are resized bilinearly (with antialiasing), masks with nearest neighbour, so a mask stays in {0, 1}.
Training augmentations (horizontal/vertical flip, rotation, colour jitter) are chosen per category by
:class:`AugmentConfig`; the per-dataset tables live in ``configs/augment/<dataset>.yaml``.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> cfg = AugmentConfig(hflip=True, vflip=True, rotation_deg=10.0, color_jitter=0.1)
    >>> x, m = torch.rand(3, 8, 8), torch.zeros(1, 8, 8)
    >>> y1, _ = augment(x, m, cfg, torch.Generator().manual_seed(1))
    >>> y2, _ = augment(x, m, cfg, torch.Generator().manual_seed(1))
    >>> bool(torch.equal(y1, y2)), tuple(y1.shape)
    (True, (3, 8, 8))
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from mudenet_core.config import ConfigBase, ConfigError
from mudenet_core.io import REPO_ROOT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_DIR = REPO_ROOT / "configs" / "augment"


@dataclasses.dataclass(frozen=True)
class AugmentConfig(ConfigBase):
    """Training augmentations for one category (all off by default)."""

    hflip: bool = False  # random horizontal flip, p = 0.5
    vflip: bool = False  # random vertical flip, p = 0.5
    rotation_deg: float = 0.0  # random rotation in [-rotation_deg, rotation_deg] degrees (reflection padding)
    color_jitter: float = 0.0  # brightness/contrast/saturation factors drawn from [1 - s, 1 + s]

    def __post_init__(self):
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ConfigError(f"AugmentConfig.rotation_deg must be in [0, 180], got {self.rotation_deg}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError(f"AugmentConfig.color_jitter must be in [0, 1), got {self.color_jitter}")

    @property
    def is_identity(self) -> bool:
        """True when no augmentation is enabled."""
        return not (self.hflip or self.vflip or self.rotation_deg > 0 or self.color_jitter > 0)


def augment_table_path(dataset: str) -> Path:
    """``configs/augment/<dataset>.yaml``."""
    return AUGMENT_DIR / f"{dataset}.yaml"


def augment_for(dataset: str, category: str, path: str | Path | None = None) -> AugmentConfig:
    """The per-category augmentation of a dataset, from its YAML table.

    The table has a ``default`` mapping and a ``categories`` mapping of per-category overrides (partial
    :class:`AugmentConfig` dicts). A category not listed gets the default; a dataset without a table gets
    no augmentation.

    Args:
        dataset: dataset name (``mvtec_ad``, ``mvtec_loco``, ``visa``, ``mpdd``, ``synthetic``, ``folder``).
        category: category name.
        path: explicit table (default ``configs/augment/<dataset>.yaml``).

    Example:
        >>> augment_for("synthetic", "weave").hflip, augment_for("synthetic", "plate").hflip
        (True, False)
    """
    path = Path(path) if path is not None else augment_table_path(dataset)
    if not path.is_file():
        return AugmentConfig()
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    unknown = sorted(set(table) - {"default", "categories"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; expected 'default' and 'categories'")
    base = dict(table.get("default") or {})
    base.update((table.get("categories") or {}).get(category) or {})
    try:
        return AugmentConfig.from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"{path} [{category}]: {e}") from None


def to_tensor(image) -> torch.Tensor:
    """(H, W, 3) float array in [0, 1] -> (3, H, W) float32 tensor."""
    t = torch.as_tensor(image, dtype=torch.float32)
    assert t.ndim == 3 and t.shape[2] == 3, f"expected (H, W, 3), got {tuple(t.shape)}"
    return t.permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) square resize: (3, H, W) -> (3, size, size)."""
    assert x.ndim == 3, f"expected (C, H, W), got {tuple(x.shape)}"
    if tuple(x.shape[-2:]) == (size, size):
        return x
    y = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return y.clamp_(0.0, 1.0)


def resize_mask(m: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour square resize of a mask: (1, H, W) -> (1, size, size), values kept."""
    assert m.ndim == 3, f"expected (1, H, W), got {tuple(m.shape)}"
    if tuple(m.shape[-2:]) == (size, size):
        return m
    return F.interpolate(m[None].float(), size=(size, size), mode="nearest-exact")[0]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of (..., 3, H, W) images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`normalize` for display: (B, 3, H, W) or (3, H, W) -> same shape, clamped to [0, 1].

    Example:
        >>> x = torch.rand(2, 3, 4, 4)
        >>> bool(torch.allclose(denormalize(normalize(x)), x, atol=1e-6))
        True
    """
    assert x.ndim in (3, 4) and x.shape[-3] == 3, f"expected (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}"
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def _rotate(x: torch.Tensor, angle_deg: float, mode: str) -> torch.Tensor:
    """Rotate (C, H, W) about its centre with reflection padding (no black corners)."""
    a = math.radians(angle_deg)
    h, w = x.shape[-2:]
    ys = (2 * torch.arange(h, dtype=torch.float32) + 1) / h - 1  # pixel centres in [-1, 1]
    xs = (2 * torch.arange(w, dtype=torch.float32) + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    # = F.affine_grid(theta), theta = [[cos, -sin, 0], [sin, cos, 0]], built by hand (much faster)
    grid = torch.stack([math.cos(a) * gx - math.sin(a) * gy, math.sin(a) * gx + math.cos(a) * gy], -1)[None]
    return F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="reflection", align_corners=False)[0]


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # (3, H, W) -> (1, H, W)


def augment(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random draw of ``cfg`` to an image in [0, 1] and its mask (same geometry for both).

    Exactly six uniforms are drawn from ``generator`` per call whatever ``cfg`` enables, so the stream does
    not depend on which augmentations are on.

    Args:
        image: (3, H, W) float in [0, 1] (before normalisation).
        mask: (1, H, W) float in {0, 1}.
        cfg: which augmentations are enabled, and how strong.
        generator: the explicit source of randomness.

    Returns:
        image (3, H, W) in [0, 1], mask (1, H, W) in {0, 1}.
    """
    assert image.ndim == 3 and image.shape[0] == 3, f"expected (3, H, W), got {tuple(image.shape)}"
    assert mask.ndim == 3 and mask.shape[0] == 1 and mask.shape[-2:] == image.shape[-2:], \
        f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}"
    u = torch.rand(6, generator=generator).tolist()
    if cfg.hflip and u[0] < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if cfg.vflip and u[1] < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    if cfg.rotation_deg > 0:
        angle = (2.0 * u[2] - 1.0) * cfg.rotation_deg
        image = _rotate(image, angle, "bilinear").clamp(0.0, 1.0)
        mask = _rotate(mask, angle, "nearest")
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        b, c, sat = (1.0 + s * (2.0 * v - 1.0) for v in u[3:6])
        image = (image * b).clamp(0.0, 1.0)  # brightness
        image = ((image - _gray(image).mean()) * c + _gray(image).mean()).clamp(0.0, 1.0)  # contrast
        g = _gray(image)
        image = ((image - g) * sat + g).clamp(0.0, 1.0)  # saturation
    return image.contiguous(), mask.contiguous()
