"""Anomaly synthesis (GLASS's LAS, after DRAEM): Perlin-noise masks filled with a texture, with exact masks.

One module serves the validation protocol (synthetic anomalies on held-out normal training images, see
:func:`validation_set`) and the methods that learn from synthesised anomalies (GLASS, PAGMFR). Everything is
seeded through explicit ``torch.Generator`` objects, so a sample is a pure function of its seed.

The recipe follows the official GLASS code (``datasets/mvtec.py``, ``perlin.py``; see
``../shared/research/methods_reference.md`` section A.2):

1. **Texture**: a random image of a texture folder (DTD), resized (shorter side) to the image size, then
   3 of 9 texture augmentations drawn without replacement and applied in drawn order, then a centre crop.
   Without a folder (a fresh clone), a *self-texture*: a random crop of another normal image, tiled,
   flipped and colour-shifted, so synthesis always works offline.
2. **Mask**: two Perlin noises with scales ``2**k`` (k uniform in ``[min_scale_exp, max_scale_exp]``, drawn
   independently per axis), each rotated by U(-90, 90) degrees (zero fill) and thresholded at 0.5; then
   union, intersection or the first mask alone with probability 1/3 each; times an optional foreground
   mask; redrawn until the feature-level mask (max-pooled with the feature stride) is non-empty.
3. **Overlay**: ``x (1 - m) + (1 - beta) t m + beta x m`` with ``beta ~ N(0.5, 0.1^2)`` clipped to
   ``[0.2, 0.8]``.

Outside the mask the image is unchanged, bit for bit; the returned mask is exactly the set of pixels the
overlay may change.

Also here: :func:`load_foreground` (optional foreground masks, matched to images by file name) and GLASS's
feature-level synthesis, GAS (:func:`global_anomaly_features`: gradient ascent from noisy normal features with
a :func:`truncated_projection` onto a distance shell, see :mod:`mudenet_core.baselines.glass`).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(3, 64, 64)
    >>> cfg = SynthesisConfig()
    >>> y, m = synthesize(x, cfg, g, texture=torch.rand(3, 64, 64))
    >>> tuple(y.shape), tuple(m.shape), bool(m.sum() > 0), bool(torch.equal(y[:, m[0] == 0], x[:, m[0] == 0]))
    ((3, 64, 64), (1, 64, 64), True, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.data.images import IMAGE_EXTENSIONS, DataError, binarize_mask, load_image, load_mask
from mudenet_core.data.transforms import denormalize, normalize, resize_mask, to_tensor
from mudenet_core.utils import progress

SELF_TEXTURE = "self"
N_TEXTURE_AUGS = 9


@dataclasses.dataclass(frozen=True)
class SynthesisConfig(ConfigBase):
    """Local anomaly synthesis (GLASS LAS). Defaults = the official GLASS code."""

    texture_dir: str = ""  # folder of texture images (recursive, e.g. DTD images/); "" = self-texture
    # Perlin scales 2**k per axis, k in [min_scale_exp, max_scale_exp] (GLASS: 0..5)
    min_scale_exp: int = bounded(0, ge=0, le=10)
    max_scale_exp: int = bounded(5, ge=0, le=10)
    # Perlin noise threshold (GLASS: 0.5); the noise is in about [-1, 1]: from 1 up no pixel would pass (every
    # draw rejected), below -1 every pixel does (full masks, which tests use)
    threshold: float = bounded(0.5, lt=1)
    # noise rotated by U(-rotate_deg, rotate_deg) (GLASS: imgaug rotate (-90, 90))
    rotate_deg: float = bounded(90.0, ge=0, le=180)
    # overlay opacity beta ~ N(beta_mean, beta_std^2) clipped to [beta_min, beta_max]
    beta_mean: float = bounded(0.5, ge=0, le=1)
    beta_std: float = nonnegative(0.1)
    beta_min: float = bounded(0.2, gt=0, lt=1)
    beta_max: float = bounded(0.8, gt=0, lt=1)
    # texture augmentations drawn (without replacement) from the 9 of GLASS
    n_texture_augs: int = bounded(3, ge=0, le=N_TEXTURE_AUGS)
    # stride of the feature-level label (GLASS: 8); the mask must be non-empty there
    feature_stride: int = positive(8)
    # mask redraws before giving up (an error: the foreground mask is too small)
    max_tries: int = positive(200)

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        if not self.min_scale_exp <= self.max_scale_exp:
            raise ConfigError(
                "SynthesisConfig: need 0 <= min_scale_exp <= max_scale_exp <= 10, got "
                f"{self.min_scale_exp}, {self.max_scale_exp}"
            )
        if not self.beta_min <= self.beta_max:
            raise ConfigError(
                f"SynthesisConfig: need 0 < beta_min <= beta_max < 1, got {self.beta_min}, {self.beta_max}"
            )


# ------------------------------------------------------------------------------------------ random helpers
def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (both included)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def derived_generator(*key: object) -> torch.Generator:
    """A generator seeded from a tuple of values by hashing (independent streams per key).

    Example:
        >>> a = torch.rand(2, generator=derived_generator(0, "val", 3))
        >>> b = torch.rand(2, generator=derived_generator(0, "val", 3))
        >>> c = torch.rand(2, generator=derived_generator(0, "val", 4))
        >>> bool(torch.equal(a, b)), bool(torch.equal(a, c))
        (True, False)
    """
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ------------------------------------------------------------------------------------------ Perlin masks
def _fade(t: torch.Tensor) -> torch.Tensor:
    return ((6 * t - 15) * t + 10) * t**3


def perlin_noise(size: tuple[int, int], res: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """2-D gradient (Perlin) noise with ``res`` cells per axis, values in about [-1, 1] (DRAEM's scaling).

    Args:
        size: (H, W) output size; need not be a multiple of ``res`` (computed on a larger grid, cropped).
        res: (ry, rx) number of noise cells along H and W.
        generator: source of the random gradient angles.

    Returns:
        noise (H, W) float32.
    """
    h, w = int(size[0]), int(size[1])
    ry, rx = int(res[0]), int(res[1])
    assert ry >= 1 and rx >= 1, f"res must be >= 1, got {res}"
    dy, dx = math.ceil(h / ry), math.ceil(w / rx)  # pixels per cell
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1, rx+1, 2)
    ys = torch.arange(h, dtype=torch.float32) / dy  # cell coordinates
    xs = torch.arange(w, dtype=torch.float32) / dx
    iy, ix = ys.long(), xs.long()  # (H,), (W,) cell index
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]  # (H, 1), (1, W) position inside the cell

    def corner(oy: int, ox: int) -> torch.Tensor:
        g = grads[iy + oy][:, ix + ox]  # (H, W, 2)
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)  # dot(gradient, offset)  (H, W)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2.0) * torch.lerp(top, bottom, ty)


def _rotate_zero_fill(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate (H, W) about its centre, zero outside the source (imgaug's constant mode)."""
    if angle_deg == 0.0:
        return x
    a = math.radians(angle_deg)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])[None]
    grid = F.affine_grid(theta, [1, 1, *x.shape], align_corners=False)
    return F.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        0, 0
    ]


def feature_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Feature-level label: the mask max-pooled to the feature grid, (..., 1, H, W) -> (..., 1, H/s, W/s).

    Example:
        >>> m = torch.zeros(1, 8, 8); m[0, 5, 2] = 1
        >>> feature_mask(m, 4)[0].tolist()
        [[0.0, 0.0], [1.0, 0.0]]
    """
    batched = mask.ndim == 4
    x = mask if batched else mask[None]
    out = F.max_pool2d(x.float(), kernel_size=stride, stride=stride, ceil_mode=True)
    return out if batched else out[0]


def perlin_mask(
    size: tuple[int, int],
    cfg: SynthesisConfig,
    generator: torch.Generator,
    foreground: torch.Tensor | None = None,
) -> torch.Tensor:
    """A binary anomaly mask from two thresholded Perlin noises (GLASS ``perlin_mask``).

    Args:
        size: (H, W).
        cfg: scales, threshold, rotation, feature stride, redraw limit.
        generator: explicit randomness.
        foreground: optional (H, W) or (1, H, W) mask; anomalies are kept inside it.

    Returns:
        mask (1, H, W) float in {0, 1}, non-empty at the feature-level stride.

    Raises:
        DataError: no non-empty mask after ``cfg.max_tries`` draws (e.g. an empty foreground mask).
    """
    return perlin_mask_and_kind(size, cfg, generator, foreground)[0]


def combination_kind(u: float) -> str:
    """Which combination of the two Perlin masks a uniform draw ``u`` selects (1/3 each).

    Example:
        >>> [combination_kind(u) for u in (0.1, 0.5, 0.9)]
        ['single', 'intersection', 'union']
    """
    return "union" if u > 2.0 / 3.0 else ("intersection" if u > 1.0 / 3.0 else "single")


def perlin_mask_and_kind(
    size: tuple[int, int],
    cfg: SynthesisConfig,
    generator: torch.Generator,
    foreground: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str]:
    """:func:`perlin_mask` and the combination that made it ("union", "intersection" or "single")."""
    h, w = int(size[0]), int(size[1])
    fg = None
    if foreground is not None:
        fg = (foreground.reshape(h, w) > 0.5).float()
    for _ in range(cfg.max_tries):
        masks = []
        for _k in range(2):
            res = (
                2 ** _randint(generator, cfg.min_scale_exp, cfg.max_scale_exp),
                2 ** _randint(generator, cfg.min_scale_exp, cfg.max_scale_exp),
            )
            noise = perlin_noise((h, w), res, generator)
            angle = _uniform(generator, -cfg.rotate_deg, cfg.rotate_deg)
            masks.append((_rotate_zero_fill(noise, angle) > cfg.threshold).float())
        kind = combination_kind(_uniform(generator))
        if kind == "union":
            m = torch.maximum(masks[0], masks[1])
        elif kind == "intersection":
            m = masks[0] * masks[1]
        else:
            m = masks[0]
        if fg is not None:
            m = m * fg
        if feature_mask(m[None], cfg.feature_stride).sum() > 0:
            return m[None], kind  # (1, H, W)
    raise DataError(f"perlin_mask: no non-empty mask in {cfg.max_tries} draws (foreground mask too small?)")


# ------------------------------------------------------------------------------------------ textures
def texture_augment(t: torch.Tensor, generator: torch.Generator, n: int = 3) -> torch.Tensor:
    """``n`` of GLASS's 9 texture augmentations, drawn without replacement, applied in drawn order.

    The nine (official ``rand_augmenter``): contrast U(0.8, 1.2); brightness U(0.8, 1.2); saturation
    U(0.8, 1.2) with hue U(-0.2, 0.2); horizontal flip; vertical flip; grayscale; autocontrast; equalize;
    rotation U(-45, 45) degrees (zero fill).

    Args:
        t: texture (3, H, W) in [0, 1].
        generator: explicit randomness.
        n: how many augmentations.

    Returns:
        texture (3, H, W) in [0, 1].
    """
    assert t.ndim == 3 and t.shape[0] == 3, f"expected (3, H, W), got {tuple(t.shape)}"
    order = torch.randperm(N_TEXTURE_AUGS, generator=generator)[:n].tolist()
    for k in order:
        if k == 0:
            t = TF.adjust_contrast(t, _uniform(generator, 0.8, 1.2))
        elif k == 1:
            t = TF.adjust_brightness(t, _uniform(generator, 0.8, 1.2))
        elif k == 2:
            t = TF.adjust_saturation(t, _uniform(generator, 0.8, 1.2))
            t = TF.adjust_hue(t, _uniform(generator, -0.2, 0.2))
        elif k == 3:
            t = t.flip(-1)
        elif k == 4:
            t = t.flip(-2)
        elif k == 5:
            t = TF.rgb_to_grayscale(t, num_output_channels=3)
        elif k == 6:
            t = TF.autocontrast(t)
        elif k == 7:
            t = TF.equalize((t * 255).round().to(torch.uint8)).float() / 255.0
        else:
            t = TF.rotate(t, _uniform(generator, -45.0, 45.0), interpolation=TF.InterpolationMode.BILINEAR)
    return t.clamp(0.0, 1.0)


def _resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    s = size / min(h, w)
    out = (max(size, round(h * s)), max(size, round(w * s)))
    if out == (h, w):
        return x
    return F.interpolate(x[None], size=out, mode="bilinear", align_corners=False, antialias=True)[0].clamp(
        0, 1
    )


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


class TextureFolder:
    """Texture images of a folder (recursive, sorted), decoded once and kept as uint8 at the working size.

    Args:
        folder: e.g. DTD's ``images/``.
        size: shorter side after resizing (the synthesis image size).
    """

    def __init__(self, folder: str | Path, size: int):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise DataError(f"texture folder not found: {self.folder}")
        self.paths = sorted(
            p
            for p in self.folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise DataError(f"no images under texture folder {self.folder}")
        self.size = int(size)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Texture ``i`` resized (shorter side = size): (3, h, w) float in [0, 1]."""
        if i not in self._cache:
            t = _resize_shorter(to_tensor(load_image(self.paths[i])), self.size)
            self._cache[i] = (t * 255).round().to(torch.uint8)
        return self._cache[i].float() / 255.0


def self_texture(pool: torch.Tensor, exclude: int, generator: torch.Generator) -> torch.Tensor:
    """A texture made from another normal image: a random crop, tiled to full size, flipped, colour-shifted.

    Args:
        pool: normal images (N, 3, H, W) in [0, 1].
        exclude: index of the image being corrupted (not used as the source when N > 1).
        generator: explicit randomness.

    Returns:
        texture (3, H, W) in [0, 1].
    """
    n, _, h, w = pool.shape
    j = _randint(generator, 0, n - 1)
    if n > 1 and j == exclude:
        j = (j + 1 + _randint(generator, 0, n - 2)) % n
    ch, cw = (
        _randint(generator, max(4, h // 8), max(4, h // 2)),
        _randint(generator, max(4, w // 8), max(4, w // 2)),
    )
    top, left = _randint(generator, 0, h - ch), _randint(generator, 0, w - cw)
    crop = pool[j, :, top : top + ch, left : left + cw]
    tiles = crop.repeat(1, math.ceil(h / ch), math.ceil(w / cw))[:, :h, :w]
    gain = 1.0 + 0.6 * (torch.rand(3, 1, 1, generator=generator) - 0.5)  # per-channel colour shift
    shift = 0.3 * (torch.rand(3, 1, 1, generator=generator) - 0.5)
    return (tiles * gain + shift).clamp(0.0, 1.0)


def draw_texture(
    source: TextureFolder | torch.Tensor,
    size: tuple[int, int],
    cfg: SynthesisConfig,
    generator: torch.Generator,
    exclude: int = -1,
) -> torch.Tensor:
    """One augmented texture (3, H, W): from a :class:`TextureFolder`, or a self-texture from a pool."""
    if isinstance(source, TextureFolder):
        t = source[_randint(generator, 0, len(source) - 1)]
    else:
        t = self_texture(source, exclude, generator)
    t = texture_augment(t, generator, cfg.n_texture_augs)
    if tuple(t.shape[-2:]) != tuple(size):
        t = _center_crop(_resize_shorter(t, max(size)), size)
    return t


def overlay(image: torch.Tensor, texture: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``x (1 - m) + (1 - beta) t m + beta x m``; exactly ``x`` where ``m == 0``.

    Args:
        image: (3, H, W) in [0, 1].
        texture: (3, H, W) in [0, 1].
        mask: (1, H, W) in {0, 1}.
        beta: opacity of the original image inside the mask.
    """
    blended = (1.0 - beta) * texture + beta * image
    return torch.where(mask > 0.5, blended, image)


def synthesize(
    image: torch.Tensor,
    cfg: SynthesisConfig,
    generator: torch.Generator,
    *,
    texture: torch.Tensor | None = None,
    source: TextureFolder | torch.Tensor | None = None,
    exclude: int = -1,
    foreground: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic anomaly on a normal image.

    Args:
        image: (3, H, W) in [0, 1] (not normalised).
        cfg: the synthesis settings.
        generator: explicit randomness (mask, texture, beta).
        texture: a ready texture (3, H, W); else drawn from ``source``.
        source: a :class:`TextureFolder` or a pool (N, 3, H, W) of normal images for self-textures.
        exclude: the image's index in the pool (self-textures come from other images).
        foreground: optional (H, W) foreground mask.

    Returns:
        image (3, H, W) in [0, 1] and its mask (1, H, W) in {0, 1}.
    """
    assert image.ndim == 3 and image.shape[0] == 3, f"expected (3, H, W), got {tuple(image.shape)}"
    size = tuple(image.shape[-2:])
    mask = perlin_mask(size, cfg, generator, foreground)
    if texture is None:
        if source is None:
            raise ValueError("synthesize needs a texture or a texture source")
        texture = draw_texture(source, size, cfg, generator, exclude)
    beta = float(
        np.clip(
            cfg.beta_mean + cfg.beta_std * float(torch.randn(1, generator=generator)),
            cfg.beta_min,
            cfg.beta_max,
        )
    )
    return overlay(image, texture, mask, beta), mask


def texture_source(
    cfg: SynthesisConfig, pool: torch.Tensor, size: int, base_dir: str | Path | None = None
) -> TextureFolder | torch.Tensor:
    """The texture folder of ``cfg`` (relative paths: to ``base_dir``), or the normal-image pool."""
    if not cfg.texture_dir:
        return pool
    p = Path(cfg.texture_dir).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return TextureFolder(p, size)


# ------------------------------------------------------------------------------------------ foreground masks
def load_foreground(paths: list[str], folder: str | Path, size: int) -> torch.Tensor:
    """Foreground masks (N, 1, H, W) in {0, 1} for training images, from files named like them in ``folder``.

    Raises:
        DataError: the folder or a mask is missing (naming the image and where it was looked for).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"foreground mask folder not found: {folder}")
    out = []
    for p in map(Path, paths):
        cands = [folder / p.name, *(folder / f"{p.stem}{ext}" for ext in sorted(IMAGE_EXTENSIONS))]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            raise DataError(f"foreground mask for {p} not found: expected {folder / p.name} (or "
                            f"{p.stem}.<image extension>) in {folder}")
        m = torch.from_numpy(binarize_mask(load_mask(hit))).float()[None]  # (1, H0, W0)
        out.append((resize_mask(m, size) > 0.5).float())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------- feature level (GAS)
GAS_EPS = 1e-10  # guards the gradient and projection norms (official GLASS value)


def truncated_projection(points: torch.Tensor, anchor: torch.Tensor, r_min, r_max) -> torch.Tensor:
    """Move each point along its ray from ``anchor`` so that its distance lies in [r_min, r_max].

    Args:
        points: (N, D).
        anchor: (N, D) (true features for the manifold, the centre for the hypersphere).
        r_min: smallest distance (float or 0-d tensor).
        r_max: largest distance (float or 0-d tensor).

    Returns:
        (N, D); points already in the shell are unchanged.
    """
    h = points - anchor  # (N, D)
    n = h.norm(dim=1, keepdim=True)  # (N, 1)
    lo = torch.as_tensor(r_min, dtype=n.dtype, device=n.device)
    hi = torch.as_tensor(r_max, dtype=n.dtype, device=n.device)
    return anchor + h * (torch.minimum(torch.maximum(n, lo), hi) / (n + GAS_EPS))


def gas_shell(distribution: str, true: torch.Tensor, centre: torch.Tensor, r_t: torch.Tensor,
              manifold_r: float) -> tuple[torch.Tensor, float | torch.Tensor, float | torch.Tensor]:
    """The GAS projection target: (anchor (N, D), r_min, r_max) of the manifold or the hypersphere."""
    if distribution == "hypersphere":
        return centre, r_t, 2 * r_t
    return true, manifold_r, 2 * manifold_r


def global_anomaly_features(discriminator: Callable[[torch.Tensor], torch.Tensor], true: torch.Tensor,
                            start: torch.Tensor, *, steps: int, step_size: float, every: int,
                            anchor: torch.Tensor, r_min, r_max) -> torch.Tensor:
    """GAS: gradient ascent of BCE(D(f), 1) from ``start``, with a truncated projection every ``every`` steps.

    The discriminator sees ``[true; f]`` together at every step, as in training (BatchNorm in training mode
    uses the statistics of both); only ``f`` moves. Nothing reaches the discriminator's parameters' grads.

    Args:
        discriminator: maps (N, D) -> (N,) probabilities.
        true: the normal features (N, D), detached.
        start: the noisy features (N, D).
        steps: ascent steps.
        step_size: length of each step (along the normalised gradient).
        every: projection period (steps).
        anchor: the shell's anchor (N, D) (see :func:`gas_shell`).
        r_min: the shell's inner radius.
        r_max: the shell's outer radius.

    Returns:
        the synthesised anomalous features (N, D), detached.
    """
    assert true.shape == start.shape and true.ndim == 2, f"{tuple(true.shape)} vs {tuple(start.shape)}"
    f = start.detach()
    n = true.shape[0]
    for step in range(steps):
        f.requires_grad_(True)
        p = discriminator(torch.cat([true.detach(), f]))[n:]  # (N,)
        loss = F.binary_cross_entropy(p, torch.ones_like(p))
        (grad,) = torch.autograd.grad(loss, [f])
        with torch.no_grad():
            f = f + step_size * grad / (grad.norm(dim=1, keepdim=True) + GAS_EPS)
            if (step + 1) % every == 0:
                f = truncated_projection(f, anchor, r_min, r_max)
    return f.detach()


# ------------------------------------------------------------------------------------------ validation set
@dataclasses.dataclass(frozen=True)
class ValidationConfig(ConfigBase):
    """The synthetic-anomaly validation set: held-out normal images plus anomalies synthesised on them."""

    # at least this many anomalous images (several versions of each normal image)
    min_anomalous: int = positive(60)
    seed: int = nonnegative(0)  # fixed per split: the same validation set for every method and training seed
    synthesis: SynthesisConfig = SynthesisConfig()



class SyntheticAnomalySet(Dataset):
    """Normal images and seeded synthetic anomalies made on them, generated once, in the data contract.

    Items ``0 .. N-1`` are the normal images (label 0, defect_type ``"good"``); then ``k`` anomalous
    versions of each (label 1, defect_type ``"synthetic"``, path ``<image>#synthetic<j>``), with
    ``k = ceil(min_anomalous / N)``. Sample ``j`` of image ``i`` is generated from its own generator, seeded
    from ``(seed, i, j)``, so it does not depend on the other samples.

    Args:
        normal: a dataset of the data contract (its ``image`` may be normalised; ``normalize`` says so).
        cfg: the validation settings.
        base_dir: where a relative ``texture_dir`` is resolved.
        show_progress: progress bar while generating.
    """

    def __init__(
        self,
        normal,
        cfg: ValidationConfig = ValidationConfig(),
        *,
        base_dir: str | Path | None = None,
        show_progress: bool = False,
    ):
        n = len(normal)
        if n == 0:
            raise DataError("synthetic validation set: the validation split holds no normal image")
        items = [normal[i] for i in range(n)]
        was_normalized = bool(getattr(normal, "normalize", True))
        pool = torch.stack([it["image"] for it in items])  # (N, 3, H, W)
        if was_normalized:
            pool = denormalize(pool)
        self.normalize = was_normalized
        self.cfg = cfg
        self.per_image = math.ceil(cfg.min_anomalous / n)
        source = texture_source(cfg.synthesis, pool, pool.shape[-1], base_dir)
        images, masks, rows = [], [], []
        for i, it in enumerate(items):
            images.append(pool[i])
            masks.append(torch.zeros(1, *pool.shape[-2:]))
            rows.append(
                {
                    "image_path": it["path"],
                    "mask_path": "",
                    "label": 0,
                    "defect_type": "good",
                    "category": it["category"],
                    "split": "val",
                }
            )
        todo = [(i, j) for j in range(self.per_image) for i in range(n)]
        for i, j in progress(todo, desc="synthetic validation anomalies", enabled=show_progress):
            g = derived_generator(cfg.seed, i, j)
            x, m = synthesize(pool[i], cfg.synthesis, g, source=source, exclude=i)
            images.append(x)
            masks.append(m)
            rows.append(
                {
                    "image_path": f"{items[i]['path']}#synthetic{j}",
                    "mask_path": "",
                    "label": 1,
                    "defect_type": "synthetic",
                    "category": items[i]["category"],
                    "split": "val",
                }
            )
        self.images = torch.stack(images)  # (N * (1 + k), 3, H, W) in [0, 1]
        self.masks = torch.stack(masks)  # (N * (1 + k), 1, H, W)
        self.index = pd.DataFrame(rows)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        image = self.images[i]
        return {
            "image": normalize(image) if self.normalize else image,
            "label": int(row["label"]),
            "mask": self.masks[i],
            "path": str(row["image_path"]),
            "category": str(row["category"]),
            "defect_type": str(row["defect_type"]),
        }

    def normal_indices(self) -> list[int]:
        """Positions of the normal images."""
        return np.flatnonzero(self.index["label"].to_numpy() == 0).tolist()


def validation_set(normal, cfg: ValidationConfig = ValidationConfig(), **kwargs) -> SyntheticAnomalySet:
    """The synthetic-anomaly validation set of a normal split (see :class:`SyntheticAnomalySet`)."""
    return SyntheticAnomalySet(normal, cfg, **kwargs)


def sample_grid(
    dataset: SyntheticAnomalySet, n: int = 6, panel_size: float = 1.6, indices: Sequence[int] | None = None
):
    """Figure: synthetic anomalies (top row) and their masks (bottom row) for the first ``n`` of them."""
    from matplotlib.figure import Figure

    anomalous = np.flatnonzero(dataset.index["label"].to_numpy() == 1)
    pick = list(indices) if indices is not None else anomalous[:n].tolist()
    fig = Figure(figsize=(panel_size * len(pick), panel_size * 2.1), layout="constrained")
    axes = fig.subplots(2, len(pick), squeeze=False)
    for c, i in enumerate(pick):
        axes[0, c].imshow(dataset.images[i].permute(1, 2, 0).numpy())
        axes[1, c].imshow(dataset.masks[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, c].set_title(Path(str(dataset.index.iloc[i]["image_path"])).name, fontsize=6)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("synthetic anomaly", fontsize=7)
    axes[1, 0].set_ylabel("mask", fontsize=7)
    return fig
