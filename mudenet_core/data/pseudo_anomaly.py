"""PAGMFR's pseudo-anomaly generator: texture fusion for texture categories, pasted regions for objects.

PAGMFR's README (the only specification; ``shared/research/methods_reference.md`` section C.1) names two
strategies and an "adaptive" choice between them by category:

* **texture** categories: "Perlin noise and texture image fusion" (DTD or custom textures). This is the
  shared LAS of :mod:`mudenet_core.data.synthesis` (:func:`~mudenet_core.data.synthesis.synthesize`), used as
  it is: no private copy.
* **object** categories: "extracts object regions from external images" (an external image folder). The
  README gives no recipe; ours (:func:`paste_objects`), every number our choice:

  1. **Region shape**: an ellipse with semi-axes ``U(min_size, max_size) / 2`` of the image side each and a
     uniform orientation, its outline made irregular by smooth value noise: a pixel is inside when
     ``rho + boundary_noise * n < 1``, with ``rho`` the elliptical radius (1 on the ellipse) and ``n`` in
     [-1, 1] bicubically upsampled from a ``noise_cells x noise_cells`` grid. The centre pixel is always
     inside, so the mask is never empty. Centre uniform over the image, at least half a minor axis from the
     border.
  2. **Object region**: taken from the middle of the source image (ImageNet-style photos centre their
     object): source centre ``0.5 + U(-source_jitter, source_jitter)`` (fraction of the side), zoom
     ``U(1/max_zoom, max_zoom)`` source pixels per target pixel, own random rotation; sampled bilinearly
     with reflection at the source borders, so every pasted pixel comes from the image.
  3. **Blend**: ``(1 - beta) * source + beta * image`` inside the mask, ``beta ~ U(0, beta_max)``; outside
     the mask the image is returned bit for bit. The mask is exactly the set of pixels that may change.
  4. **Without a folder** (a user's fresh clone, or an object folder not given): the regions come from
     *other training images* of the pool (never the image itself when the pool holds two or more), from a
     uniform position instead of the middle, with a per-channel colour shift (gain ``1 +- colour_jitter``,
     offset ``+- colour_jitter / 2``) so that a region of a normal image pasted elsewhere still differs.

The choice between the two is :func:`generator_kind`: the categories in :data:`TEXTURE_CATEGORIES` are
textures, every other category is an object (a config can force either). The list:

* MVTec AD: carpet, grid, leather, tile, wood are textures (the dataset's own split); the other ten objects.
* VisA (12 categories): all objects (PCBs, capsules, candles, food items: each image shows countable things).
* MPDD (6 categories): all objects (metal parts on varying backgrounds; ``metal_plate`` fills most of the
  frame but has edges, holes and a pose, so a texture recipe would not describe its normal variation).
* MVTec LOCO (5 categories): all objects (their anomalies are about arrangement and parts).
* The generated dataset (:mod:`mudenet_core.data.synthetic`): ``weave`` is a texture, ``plate`` an object.
* Anything else (a folder dataset, a new category): object.

Every draw uses an explicit ``torch.Generator``; the batch version is vectorised (one ``grid_sample`` and one
noise upsampling for the whole batch).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x, src = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    >>> y, m = paste_objects(x, src, ObjectPasteConfig(), g)
    >>> tuple(y.shape), tuple(m.shape), bool((m.flatten(1).sum(1) > 0).all())
    ((4, 3, 32, 32), (4, 1, 32, 32), True)
    >>> bool(torch.equal(y * (1 - m), x * (1 - m)))
    True
    >>> generator_kind("carpet"), generator_kind("plate"), generator_kind("plate", "texture")
    ('texture', 'object', 'texture')
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from mudenet_core.config import ConfigBase, ConfigError, bounded
from mudenet_core.data.images import DataError
from mudenet_core.data.synthesis import TextureFolder

GeneratorKind = Literal["texture", "object"]

# Categories whose pseudo-anomalies are textures fused into Perlin masks; every other category is an object.
MVTEC_AD_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
SYNTHETIC_TEXTURES = ("weave",)
TEXTURE_CATEGORIES: frozenset[str] = frozenset(MVTEC_AD_TEXTURES + SYNTHETIC_TEXTURES)


def generator_kind(category: str, override: str = "auto") -> GeneratorKind:
    """Which pseudo-anomaly strategy a category gets: ``"texture"`` or ``"object"`` (see module docstring).

    Args:
        category: the category name (the ``category`` of the dataset items).
        override: ``"auto"`` (the documented list), ``"texture"`` or ``"object"``.

    Example:
        >>> [generator_kind(c) for c in ("wood", "weave", "bottle", "metal_plate", "pcb1", "new_part")]
        ['texture', 'texture', 'object', 'object', 'object', 'object']
    """
    if override in ("texture", "object"):
        return override  # type: ignore[return-value]
    if override != "auto":
        raise ConfigError(f"pseudo-anomaly generator must be 'auto', 'texture' or 'object', got {override!r}")
    return "texture" if str(category).lower() in TEXTURE_CATEGORIES else "object"


@dataclasses.dataclass(frozen=True)
class ObjectPasteConfig(ConfigBase):
    """Pasted object regions (our recipe; the README gives none). Sizes are fractions of the image side."""

    source_dir: str = ""  # external image folder (recursive); "" = regions of other training images
    # region axes (full axis, fraction of the side); small, subtle regions (0.05-0.3, beta up to 0.6,
    # colour shift 0.15) fused PAGMFR's maps better on our validation set than large, opaque ones
    # (0.1-0.4, beta up to 0.3, shift 0.3: image AUROC 0.83 vs 0.61, generated plate, 25 epochs)
    min_size: float = bounded(0.05, gt=0, le=1)  # smallest region axis
    max_size: float = bounded(0.3, gt=0, le=1)  # largest region axis
    # outline irregularity: inside when rho + boundary_noise * n < 1 (n in [-1, 1]); < 1 keeps the centre
    boundary_noise: float = bounded(0.35, ge=0, lt=1)
    noise_cells: int = bounded(4, ge=1, le=64)  # value-noise grid of the outline (cells per side)
    max_zoom: float = bounded(1.5, ge=1)  # source pixels per target pixel in U(1/max_zoom, max_zoom)
    source_jitter: float = bounded(0.2, ge=0, le=0.5)  # source centre 0.5 +- this (folder sources)
    beta_max: float = bounded(0.6, ge=0, lt=1)  # opacity of the original inside: beta ~ U(0, beta_max)
    colour_jitter: float = bounded(0.15, ge=0, le=1)  # colour shift of self-regions (no folder)

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        if self.min_size > self.max_size:
            raise ConfigError(
                f"ObjectPasteConfig: need min_size <= max_size, got {self.min_size}, {self.max_size}")


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _value_noise(n: int, size: tuple[int, int], cells: int, g: torch.Generator) -> torch.Tensor:
    """Smooth noise (n, 1, H, W) in [-1, 1]: a uniform (cells + 1)^2 grid, bicubically upsampled, clamped."""
    grid = 2.0 * torch.rand(n, 1, cells + 1, cells + 1, generator=g) - 1.0
    return F.interpolate(grid, size=size, mode="bicubic", align_corners=True).clamp_(-1.0, 1.0)


def region_masks(n: int, size: tuple[int, int], cfg: ObjectPasteConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` irregular elliptical region masks and their centres.

    Args:
        n: how many.
        size: (H, W).
        cfg: sizes and outline noise.
        generator: explicit randomness.

    Returns:
        masks (n, 1, H, W) float in {0, 1}, each non-empty; centres (n, 2) as (y, x) in pixels.
    """
    h, w = int(size[0]), int(size[1])
    side = float(min(h, w))
    ax = _uniform(generator, n, cfg.min_size, cfg.max_size) * side / 2  # semi-axes in pixels (n,)
    ay = _uniform(generator, n, cfg.min_size, cfg.max_size) * side / 2
    theta = _uniform(generator, n, 0.0, math.pi)
    margin = torch.minimum(ax, ay)  # half the minor axis: the centre is at least that far from the border
    cy = margin + torch.rand(n, generator=generator) * (h - 2 * margin)  # (n,)
    cx = margin + torch.rand(n, generator=generator) * (w - 2 * margin)
    noise = _value_noise(n, (h, w), cfg.noise_cells, generator)[:, 0]  # (n, H, W)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5  # pixel centres
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    dy, dx = ys - cy.view(n, 1, 1), xs - cx.view(n, 1, 1)  # (n, H, W) offsets from the centre
    cos, sin = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotated into the ellipse frame
    rho = torch.sqrt((u / ax.view(n, 1, 1)) ** 2 + (v / ay.view(n, 1, 1)) ** 2)  # 1 on the ellipse
    masks = (rho + cfg.boundary_noise * noise < 1.0).float()  # (n, H, W)
    iy = cy.long().clamp(0, h - 1)
    ix = cx.long().clamp(0, w - 1)
    masks[torch.arange(n), iy, ix] = 1.0  # the pixel holding the centre: never an empty mask
    return masks[:, None], torch.stack([cy, cx], dim=1)


def _affine_sample(sources: torch.Tensor, tgt_centre: torch.Tensor, src_centre: torch.Tensor,
                   zoom: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Resample ``sources`` (n, 3, H, W) so that ``src_centre`` lands on ``tgt_centre``.

    Centres are pixels (n, 2) as (y, x); ``zoom`` is source pixels per target pixel, ``angle`` in radians.

    Returns:
        the resampled sources (n, 3, H, W).
    """
    n, _, h, w = sources.shape
    # pixel coordinates p (x, y) of the target map to q = c_s + zoom * R (p - c_t) in the source;
    # normalised coordinates (align_corners=False): x_n = 2 x / W - 1 (x measured from the left edge)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
    a = rot * zoom.view(n, 1, 1)
    s = torch.tensor([w / 2.0, h / 2.0])
    a_n = a * s.view(1, 1, 2) / s.view(1, 2, 1)  # S^-1 A S: (n, 2, 2) in normalised coordinates
    ct = torch.stack([tgt_centre[:, 1], tgt_centre[:, 0]], 1) / s - 1.0  # (n, 2) as (x, y), normalised
    cs = torch.stack([src_centre[:, 1], src_centre[:, 0]], 1) / s - 1.0
    t = cs - torch.einsum("nij,nj->ni", a_n, ct)  # q_n = A_n p_n + t
    theta = torch.cat([a_n, t[:, :, None]], dim=2)  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def paste_objects(images: torch.Tensor, sources: torch.Tensor, cfg: ObjectPasteConfig,
                  generator: torch.Generator, *,
                  self_regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one region of ``sources[i]`` into ``images[i]``, for the whole batch at once.

    Args:
        images: normal images (B, 3, H, W) in [0, 1] (not normalised).
        sources: one source image per target (B, 3, H, W) in [0, 1], e.g. from :class:`ObjectSource`.
        cfg: the recipe (module docstring).
        generator: explicit randomness (masks, placement, zoom, rotation, blend).
        self_regions: the sources are other normal images (no folder): region from a uniform position and a
            colour shift, instead of the middle of an object photo.

    Returns:
        images (B, 3, H, W) in [0, 1], equal to ``images`` outside the masks; masks (B, 1, H, W) in {0, 1}.
    """
    assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
    assert sources.shape == images.shape, \
        f"sources {tuple(sources.shape)} must match images {tuple(images.shape)}"
    n, _, h, w = images.shape
    sources = sources.to(images.dtype)
    masks, centres = region_masks(n, (h, w), cfg, generator)  # (B, 1, H, W), (B, 2)
    if self_regions:
        src_centre = torch.rand(n, 2, generator=generator) * torch.tensor([float(h), float(w)])
    else:
        jitter = _uniform(generator, 2 * n, -cfg.source_jitter, cfg.source_jitter).view(n, 2)
        src_centre = (0.5 + jitter) * torch.tensor([float(h), float(w)])
    log_zoom = _uniform(generator, n, -math.log(cfg.max_zoom), math.log(cfg.max_zoom))
    angle = _uniform(generator, n, -math.pi, math.pi)
    patch = _affine_sample(sources, centres, src_centre, torch.exp(log_zoom), angle)  # (B, 3, H, W)
    if self_regions:
        j = cfg.colour_jitter
        gain = 1.0 + j * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
        shift = 0.5 * j * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
        patch = patch * gain + shift
    patch = patch.clamp(0.0, 1.0)
    beta = _uniform(generator, n, 0.0, cfg.beta_max).view(n, 1, 1, 1)
    blended = (1.0 - beta) * patch + beta * images
    out = torch.where(masks > 0.5, blended, images)  # exactly ``images`` outside the mask
    return out, masks


class ObjectSource:
    """Where pasted regions come from: an external image folder, or the pool of normal training images.

    Folder images are decoded lazily (:class:`~mudenet_core.data.synthesis.TextureFolder`: shorter side
    resized to the image size, kept as uint8) and centre-cropped to the image size.

    Args:
        pool: the normal training images (N, 3, H, W) in [0, 1]; they fix the size and are the fallback.
        folder: an image folder ("" or None: the pool).
    """

    def __init__(self, pool: torch.Tensor, folder: str | Path | None = None):
        assert pool.ndim == 4 and pool.shape[1] == 3, f"expected pool (N,3,H,W), got {tuple(pool.shape)}"
        if pool.shape[0] == 0:
            raise DataError("object pseudo-anomalies: the training split holds no image")
        self.pool = pool
        self.size = (int(pool.shape[-2]), int(pool.shape[-1]))
        self.folder = TextureFolder(folder, max(self.size)) if folder else None

    @property
    def self_regions(self) -> bool:
        """Whether the regions come from other training images (no folder)."""
        return self.folder is None

    def _crop(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        top, left = (h - self.size[0]) // 2, (w - self.size[1]) // 2
        return t[:, top: top + self.size[0], left: left + self.size[1]]

    def draw(self, exclude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One source image per target: (len(exclude), 3, H, W) in [0, 1].

        Args:
            exclude: pool index of each target image (self-regions come from another image when N > 1).
            generator: explicit randomness.
        """
        n = int(exclude.numel())
        if self.folder is not None:
            idx = torch.randint(0, len(self.folder), (n,), generator=generator).tolist()
            return torch.stack([self._crop(self.folder[i]) for i in idx])
        m = self.pool.shape[0]
        if m == 1:
            return self.pool[torch.zeros(n, dtype=torch.long)]
        offset = torch.randint(1, m, (n,), generator=generator)  # never the image itself
        return self.pool[(exclude.long() + offset) % m]


def object_pseudo_anomalies(images: torch.Tensor, indices: torch.Tensor, source: ObjectSource,
                            cfg: ObjectPasteConfig,
                            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Object pseudo-anomalies for a batch: draw the sources, then :func:`paste_objects`.

    Args:
        images: (B, 3, H, W) in [0, 1].
        indices: (B,) pool indices of the images.
        source: the :class:`ObjectSource`.
        cfg: the recipe.
        generator: explicit randomness.

    Returns:
        images (B, 3, H, W) and masks (B, 1, H, W).
    """
    if images.shape[0] == 0:
        return images, images.new_zeros(0, 1, *images.shape[-2:])
    sources = source.draw(indices, generator).to(images.device)
    return paste_objects(images, sources, cfg, generator, self_regions=source.self_regions)
