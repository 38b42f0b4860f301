"""Resize, normalise and augment images and masks; every random draw uses an explicit ``torch.Generator``.

Images are resized bilinearly (with antialiasing), masks with nearest neighbour, so a mask stays in {0, 1}.
Training augmentations (horizontal/vertical flip, rotation, colour jitter) are described by
:class:`AugmentConfig`. Our protocol uses one recipe per profile for every category: no augmentation by
default (``DataConfig.augment_policy="none"``). The per-category tables in ``configs/augment/<dataset>.yaml``
are our own opt-in choices (``augment_policy="table"``), not the MuDeNet paper's (its Tables A.16-A.18 could
not be retrieved). Rotations zoom in just enough that no pixel is padded (:func:`rotation_grid`), and
:class:`BatchAugmenter` gives a fresh, stateless seeded draw every time a training image is used.

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
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import yaml

from mudenet_core.config import ConfigBase, ConfigError, bounded
from mudenet_core.io import REPO_ROOT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_DIR = REPO_ROOT / "configs" / "augment"


@dataclasses.dataclass(frozen=True)
class AugmentConfig(ConfigBase):
    """Training augmentations for one category (all off by default)."""

    hflip: bool = False  # random horizontal flip, p = 0.5
    vflip: bool = False  # random vertical flip, p = 0.5
    # random rotation in [-rotation_deg, rotation_deg] degrees (zoom-in, no pad)
    rotation_deg: float = bounded(0.0, ge=0, le=180)
    # brightness/contrast/saturation factors drawn from [1 - s, 1 + s]
    color_jitter: float = bounded(0.0, ge=0, lt=1)

    @property
    def is_identity(self) -> bool:
        """True when no augmentation is enabled."""
        return not (self.hflip or self.vflip or self.rotation_deg > 0 or self.color_jitter > 0)

    def describe(self) -> str:
        """A short human-readable summary, e.g. for figure titles.

        Example:
            >>> AugmentConfig(hflip=True, rotation_deg=15).describe(), AugmentConfig().describe()
            ('hflip, rotation ±15°', 'none')
        """
        parts = [name for name, on in (("hflip", self.hflip), ("vflip", self.vflip)) if on]
        if self.rotation_deg > 0:
            parts.append(f"rotation ±{self.rotation_deg:g}°")
        if self.color_jitter > 0:
            parts.append(f"colour jitter {self.color_jitter:g}")
        return ", ".join(parts) or "none"


def augment_table_path(dataset: str) -> Path:
    """``configs/augment/<dataset>.yaml``."""
    return AUGMENT_DIR / f"{dataset}.yaml"


def augment_for(dataset: str, category: str, path: str | Path | None = None) -> AugmentConfig:
    """The per-category augmentation of a dataset, from its YAML table (opt-in: ``augment_policy="table"``).

    The tables are our own choices, not the MuDeNet paper's; by default no category is augmented (see
    :class:`~mudenet_core.data.DataConfig`). A table has a ``default`` mapping and a ``categories`` mapping
    of per-category overrides (partial :class:`AugmentConfig` dicts). A category not listed gets the
    default; a dataset without a table gets no augmentation.

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


def rotation_zoom(h: int, w: int, angle_deg: float) -> float:
    """The minimal zoom-in after a rotation by ``angle_deg`` that keeps every sample inside the image.

    The zoom is taken over the hull of the pixel centres (half-extents ``(W - 1) / 2``, ``(H - 1) / 2``), so
    bilinear sampling never reads outside the image; for a square it is ``|cos a| + |sin a|``.

    Example:
        >>> [round(rotation_zoom(9, 9, a), 4) for a in (0.0, 45.0, 90.0)]
        [1.0, 1.4142, 1.0]
    """
    a = math.radians(angle_deg)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    rx, ry = (w - 1) / 2, (h - 1) / 2
    return max(c + s * ry / rx, s * rx / ry + c)


def rotation_grid(h: int, w: int, angle_deg: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sampling grid of a rotation about the centre followed by the minimal zoom-in (no padding at all).

    Output pixel centres, rotated by ``angle_deg`` and shrunk by :func:`rotation_zoom`, land inside the hull
    of the source's pixel centres: every coordinate is in [-1, 1] for
    ``F.grid_sample(..., align_corners=True)``, so rotated images carry no padded (reflected or constant)
    structure at their borders and corners.
    0 degrees is the identity grid, and 90 degrees of a square is :func:`torch.rot90`.

    Returns:
        grid (1, H, W, 2) of (x, y) source coordinates.

    Example:
        >>> g = rotation_grid(8, 8, 30.0)
        >>> tuple(g.shape), bool(g.abs().max() <= 1.0)
        ((1, 8, 8, 2), True)
    """
    assert h >= 2 and w >= 2, f"rotation needs H, W >= 2, got {h}x{w}"
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    rx, ry = (w - 1) / 2, (h - 1) / 2  # half-extents of the pixel-centre hull, in pixels
    zoom = rotation_zoom(h, w, angle_deg)
    ys = torch.arange(h, dtype=torch.float64, device=device) - ry  # pixel centres, pixels from the centre
    xs = torch.arange(w, dtype=torch.float64, device=device) - rx
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    # = F.affine_grid(theta) with theta = [[cos, -sin], [sin, cos]] / zoom, built by hand (much faster)
    sx, sy = (c * gx - s * gy) / (zoom * rx), (s * gx + c * gy) / (zoom * ry)
    return torch.stack([sx, sy], -1).clamp_(-1.0, 1.0).float()[None]  # rounding must not step outside


def _rotate(x: torch.Tensor, angle_deg: float, mode: str) -> torch.Tensor:
    """Rotate (C, H, W) about its centre and zoom in (:func:`rotation_grid`): sampled only inside ``x``."""
    if angle_deg % 360.0 == 0.0:
        return x.clone()
    grid = rotation_grid(x.shape[-2], x.shape[-1], angle_deg, x.device)  # (1, H, W, 2)
    return F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True)[0]


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # (3, H, W) -> (1, H, W)


def augment(image: torch.Tensor, mask: torch.Tensor | None, cfg: AugmentConfig,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one random draw of ``cfg`` to an image in [0, 1] and its mask (same geometry for both).

    Exactly six uniforms are drawn from ``generator`` per call whatever ``cfg`` enables, so the stream does
    not depend on which augmentations are on.

    Args:
        image: (3, H, W) float in [0, 1] (before normalisation).
        mask: (1, H, W) float in {0, 1}, or None (training images: no mask to move).
        cfg: which augmentations are enabled, and how strong.
        generator: the explicit source of randomness.

    Returns:
        image (3, H, W) in [0, 1], mask (1, H, W) in {0, 1} (None when ``mask`` is None).
    """
    assert image.ndim == 3 and image.shape[0] == 3, f"expected (3, H, W), got {tuple(image.shape)}"
    assert mask is None or (mask.ndim == 3 and mask.shape[0] == 1 and mask.shape[-2:] == image.shape[-2:]), \
        f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}"
    u = torch.rand(6, generator=generator).tolist()
    if cfg.hflip and u[0] < 0.5:
        image, mask = image.flip(-1), (mask.flip(-1) if mask is not None else None)
    if cfg.vflip and u[1] < 0.5:
        image, mask = image.flip(-2), (mask.flip(-2) if mask is not None else None)
    if cfg.rotation_deg > 0:
        angle = (2.0 * u[2] - 1.0) * cfg.rotation_deg
        image = _rotate(image, angle, "bilinear").clamp(0.0, 1.0)
        mask = _rotate(mask, angle, "nearest") if mask is not None else None
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        b, c, sat = (1.0 + s * (2.0 * v - 1.0) for v in u[3:6])
        image = (image * b).clamp(0.0, 1.0)  # brightness
        image = ((image - _gray(image).mean()) * c + _gray(image).mean()).clamp(0.0, 1.0)  # contrast
        g = _gray(image)
        image = ((image - g) * sat + g).clamp(0.0, 1.0)  # saturation
    return image.contiguous(), (mask.contiguous() if mask is not None else None)


# ------------------------------------------------------------------------------------- on-the-fly draws
def derive_seed(*parts) -> int:
    """A 63-bit seed derived from ``parts`` (SHA-256 of their ``-``-joined text): stateless, order-free.

    Example:
        >>> derive_seed(0, 3, 1) == derive_seed(0, 3, 1) != derive_seed(0, 4, 1)
        True
    """
    key = "-".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


class BatchAugmenter:
    """On-the-fly training augmentation of in-memory images: a fresh seeded draw every time one is used.

    The draw of image ``i`` at training step ``t`` comes from a generator seeded with
    ``derive_seed(seed, t, i)`` and nothing else, so the augmenter holds no state: a resumed run reproduces
    the draws of an uninterrupted one, and the draws do not depend on batch order or batch size.

    Args:
        images: the un-augmented, un-normalised base images (N, 3, H, W) in [0, 1].
        cfg: the augmentation.
        seed: base seed; derive it from the run's generator, so that training seeds draw differently.
        normalize: ImageNet-normalise the returned batches (as the dataset would).

    The arithmetic runs where ``images`` lie (:meth:`to` moves them, e.g. to the training GPU); only the six
    uniforms per draw come from CPU generators.

    Example:
        >>> aug = BatchAugmenter(torch.rand(4, 3, 8, 8), AugmentConfig(hflip=True, rotation_deg=10), seed=0)
        >>> idx = torch.tensor([2, 0])
        >>> tuple(aug.batch(idx, step=0).shape), bool(torch.equal(aug.batch(idx, 0), aug.batch(idx, 0)))
        ((2, 3, 8, 8), True)
    """

    def __init__(self, images: torch.Tensor, cfg: AugmentConfig, seed: int, *, normalize: bool = True):
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (N, 3, H, W), got {tuple(images.shape)}"
        self.images = images
        self.cfg = cfg
        self.seed = int(seed)
        self.normalize = bool(normalize)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def is_identity(self) -> bool:
        """True when the augmentation does nothing (batches are the base images)."""
        return self.cfg.is_identity

    def to(self, device: torch.device | str) -> BatchAugmenter:
        """The same augmenter (same draws) with its base images on ``device``."""
        return BatchAugmenter(self.images.to(device), self.cfg, self.seed, normalize=self.normalize)

    def generator(self, step: int, index: int) -> torch.Generator:
        """The generator of image ``index``'s draw at ``step``."""
        return torch.Generator().manual_seed(derive_seed(self.seed, int(step), int(index)))

    def base(self) -> torch.Tensor:
        """The un-augmented images as training sees them (normalised if ``normalize``): (N, 3, H, W)."""
        return normalize(self.images) if self.normalize else self.images

    def batch(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        """Fresh draws of images ``idx`` (b,) for training step ``step`` -> (b, 3, H, W)."""
        if self.is_identity:
            x = self.images[idx]
        else:
            x = torch.stack([augment(self.images[i], None, self.cfg, self.generator(step, i))[0]
                             for i in idx.tolist()])  # (b, 3, H, W) in [0, 1]
        return normalize(x) if self.normalize else x


# -------------------------------------------------------------------------------------------- figures
DEMO_AUGMENT = AugmentConfig(hflip=True, vflip=True, rotation_deg=15.0, color_jitter=0.1)  # illustration only


def augmentation_example(used: AugmentConfig | None, dataset: str,
                         category: str) -> tuple[AugmentConfig, str]:
    """The augmentation to illustrate for a category, with a title that says where it comes from.

    In order: ``used`` (what the run trains with) if it does anything; else the category's opt-in table entry
    (``configs/augment/<dataset>.yaml``: our choice, not the paper's) if it does anything; else
    :data:`DEMO_AUGMENT`, labelled as a demonstration.

    Example:
        >>> cfg, title = augmentation_example(None, "synthetic", "plate")
        >>> cfg == DEMO_AUGMENT, title.startswith("DEMONSTRATION")
        (True, True)
    """
    if used is not None and not used.is_identity:
        return used, f"Training augmentation of this run: {used.describe()}"
    table = augment_for(dataset, category)
    if not table.is_identity:
        return table, (f"Opt-in table configs/augment/{dataset}.yaml [{category}] (our choice, not the "
                       f"paper's; NOT used in this run): {table.describe()}")
    return DEMO_AUGMENT, f"DEMONSTRATION only, not used in training: {DEMO_AUGMENT.describe()}"


def augmentation_grid(images: torch.Tensor, cfg: AugmentConfig, *, n_draws: int = 4, seed: int = 0,
                      title: str | None = None, panel_size: float = 1.8) -> Figure:
    """Each image (one row) as it is and in ``n_draws`` draws of ``cfg``.

    The draws are those of a :class:`BatchAugmenter` with ``seed`` at steps ``0 .. n_draws - 1``.

    Args:
        images: un-augmented images (N, 3, H, W) in [0, 1].
        cfg: the augmentation to draw.
        n_draws: draws per image.
        seed: base seed of the draws.
        title: figure title (say whether the augmentation is used in training).
        panel_size: inches per panel.

    Returns:
        ``matplotlib.figure.Figure`` with N rows and 1 + ``n_draws`` columns.
    """
    from matplotlib.figure import Figure  # noqa: F811 (imported here: matplotlib only when drawing)

    assert images.ndim == 4 and images.shape[1] == 3, f"expected (N, 3, H, W), got {tuple(images.shape)}"
    n = images.shape[0]
    assert n > 0 and n_draws > 0, "need at least one image and one draw"
    aug = BatchAugmenter(images, cfg, seed, normalize=False)
    draws = [aug.batch(torch.arange(n), step) for step in range(n_draws)]  # n_draws x (N, 3, H, W)
    fig = Figure(figsize=((1 + n_draws) * panel_size, n * panel_size + (0.4 if title else 0.0)),
                 layout="constrained")
    axes = fig.subplots(n, 1 + n_draws, squeeze=False)
    for i in range(n):
        for j in range(1 + n_draws):
            x = images[i] if j == 0 else draws[j - 1][i]
            ax = axes[i, j]
            ax.imshow(x.detach().cpu().permute(1, 2, 0).clamp(0.0, 1.0).numpy())  # (3, H, W) -> (H, W, 3)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("original" if j == 0 else f"draw {j}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
