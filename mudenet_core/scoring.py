"""Anomaly maps from the level maps (Eqs. 9-12): raw maps, normalisation, fusion, upsampling, image score.

Per level l, the structural map is sum_c (X^l - S1^l)^2 and the logical map sum_c (A^l - S2^l)^2 (raw maps,
shape (B, 2, S, h, w): branch 0 structural, branch 1 logical). Each level and branch is normalised with
statistics of the nominal validation split: min-max (default) or EfficientAD's quantile normalisation
(q_a -> 0, q_b -> 0.1). The fused map is the mean over the enabled levels of (structural + logical), upsampled
bilinearly to the input size and optionally blurred; the image score is its maximum. Levels and branches are
switched off in :class:`ScoringConfig` without retraining.

:func:`raw_maps` is the plain formula on the networks' maps; :func:`squared_head_distance` is the same sum for
maps that end in 1x1 heads, computed from the features before the heads without materialising the maps
(MuDeNet's inference path, ``MuDeNetNets.raw_maps``). :func:`anomaly_map` applies the bilinear upsampling and
the blur as one matrix per axis.

Example:
    >>> raw = torch.rand(4, 2, 3, 8, 8)
    >>> cfg = ScoringConfig(blur_sigma=0.0)
    >>> stats = map_statistics(raw, cfg)
    >>> amap = anomaly_map(raw, stats, cfg, image_size=16)
    >>> tuple(amap.shape), float(amap.max()) <= 2.0 + 1e-6
    ((4, 1, 16, 16), True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive

BRANCHES = ("structural", "logical")


@dataclasses.dataclass(frozen=True)
class ScoringConfig(ConfigBase):
    """How raw maps become an anomaly map and an image score (changeable after training).

    Attributes:
        normalization: per level/branch normalisation fitted on the validation split: "minmax" (paper),
            "quantile" (EfficientAD: q_a -> 0, q_b -> 0.1) or "none".
        q_a: lower quantile for "quantile".
        q_b: upper quantile for "quantile".
        levels: 1-based levels to fuse (paper: all).
        use_structural: include the structural branch (X - S1)^2.
        use_logical: include the logical branch (A - S2)^2.
        blur_sigma: Gaussian blur sigma in input pixels after upsampling (0 = none).
    """

    normalization: Literal["minmax", "quantile", "none"] = "minmax"  # per level/branch normalisation
    q_a: float = bounded(0.9, ge=0, le=1)  # quantile mapped to 0 (quantile normalisation)
    q_b: float = bounded(0.995, ge=0, le=1)  # quantile mapped to 0.1 (quantile normalisation)
    levels: tuple[int, ...] = positive((1, 2, 3))  # 1-based levels fused into the final map
    use_structural: bool = True  # structural branch (X - S1)^2
    use_logical: bool = True  # logical branch (A - S2)^2
    blur_sigma: float = nonnegative(4.0)  # Gaussian blur (input pixels) after upsampling; 0 = off

    def __post_init__(self):
        super().__post_init__()  # declared bounds and Literal choices
        if not (self.use_structural or self.use_logical):
            raise ConfigError("ScoringConfig: at least one of use_structural / use_logical must be True")
        if not self.levels:
            raise ConfigError("ScoringConfig: levels must name at least one level (1-based)")
        if not 0.0 <= self.q_a < self.q_b <= 1.0:
            raise ConfigError(f"ScoringConfig: need 0 <= q_a < q_b <= 1, got q_a={self.q_a}, q_b={self.q_b}")


def raw_maps(
    x: Sequence[torch.Tensor],
    s1: Sequence[torch.Tensor],
    a: Sequence[torch.Tensor],
    s2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Per-level structural and logical squared-error maps.

    Args:
        x: teacher maps X^l, S x (B, C, h, w).
        s1: structural student maps, S x (B, C, h, w).
        a: autoencoder maps, S x (B, C, h, w).
        s2: logical student maps, S x (B, C, h, w).

    Returns:
        (B, 2, S, h, w): [:, 0] = sum_c (X^l - S1^l)^2, [:, 1] = sum_c (A^l - S2^l)^2.
    """
    st = torch.stack([(xi - si).pow(2).sum(1) for xi, si in zip(x, s1, strict=True)], dim=1)  # (B, S, h, w)
    lg = torch.stack([(ai - si).pow(2).sum(1) for ai, si in zip(a, s2, strict=True)], dim=1)  # (B, S, h, w)
    return torch.stack([st, lg], dim=1)  # (B, 2, S, h, w)


def squared_head_distance(
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """Per pixel sum_c (base + sum_i f_i W_i + bias)_c^2: a raw map whose maps end in 1x1 heads, fused.

    With ``features = [h_T, h_S1]``, ``weights = [W_T^T, -W_S1^T]`` and ``bias = b_T - b_S1`` this is
    sum_c (X^l - S1^l)^2 of :func:`raw_maps` for 1x1 heads X^l = W_T h_T + b_T, S1^l = W_S1 h_S1 + b_S1;
    with ``base = A^l``, ``features = [h_S2]``, ``weights = [-W_S2^T]``, ``bias = -b_S2`` it is
    sum_c (A^l - S2^l)^2.
    The heads' outputs and their difference are never materialised: each chunk of ``chunk_rows`` pixels is
    one or two matrix products into a reused buffer, squared in place and summed over C.

    Args:
        features: K_i-channel features per pixel, each (N, K_i) (N = B*h*w rows, any strides).
        weights: the matching (K_i, C) matrices.
        bias: (C,).
        base: (N, C) added before squaring, or None.
        out: (N,) result buffer, or None.
        chunk_rows: pixels per chunk.

    Returns:
        (N,) squared norms.

    Example:
        >>> f, w = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, -1.0]])  # N=2, K=1, C=2
        >>> squared_head_distance([f], [w], torch.tensor([0.0, 1.0]))  # (1, 0) and (2, -1)
        tensor([1., 5.])
    """
    assert len(features) == len(weights) >= 1, "need one weight matrix per feature matrix"
    n, c = features[0].shape[0], bias.shape[0]
    out = torch.empty(n, dtype=bias.dtype, device=bias.device) if out is None else out
    assert out.shape == (n,), f"out must be ({n},), got {tuple(out.shape)}"
    buf = torch.empty(min(chunk_rows, n), c, dtype=bias.dtype, device=bias.device)
    for r0 in range(0, n, chunk_rows):
        r1 = min(r0 + chunk_rows, n)
        d = buf[: r1 - r0]  # (R, C)
        if base is None:
            torch.addmm(bias, features[0][r0:r1], weights[0], out=d)
        else:
            torch.addmm(base[r0:r1], features[0][r0:r1], weights[0], out=d).add_(bias)
        for f, w in zip(features[1:], weights[1:], strict=True):
            d.addmm_(f[r0:r1], w)
        torch.sum(d.square_(), dim=1, out=out[r0:r1])
    return out


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile of a flat tensor (exact, via sorting; works beyond torch.quantile's size limit)."""
    v = v.flatten().float().sort().values
    pos = q * (v.numel() - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def map_statistics(raw: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """Normalisation statistics from validation raw maps (N, 2, S, h, w) -> (2, S, 2) of (low, high).

    "minmax": (min, max); "quantile": (q_a-quantile, q_b-quantile); "none": (0, 1).
    """
    assert raw.ndim == 5 and raw.shape[1] == 2, f"expected (N,2,S,h,w), got {tuple(raw.shape)}"
    s = raw.shape[2]
    out = torch.zeros(2, s, 2)
    for b in range(2):
        for lvl in range(s):
            v = raw[:, b, lvl].flatten().float().cpu()
            if cfg.normalization == "minmax":
                out[b, lvl] = torch.stack([v.min(), v.max()])
            elif cfg.normalization == "quantile":
                out[b, lvl] = torch.stack([_quantile(v, cfg.q_a), _quantile(v, cfg.q_b)])
            else:
                out[b, lvl] = torch.tensor([0.0, 1.0])
    return out


def normalize_maps(raw: torch.Tensor, stats: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """Apply per level/branch statistics (2, S, 2) to raw maps (B, 2, S, h, w) -> (B, 2, S, h, w).

    Example (quantile normalisation sends q_a to 0 and q_b to 0.1):
        >>> cfg = ScoringConfig(normalization="quantile")
        >>> stats = torch.tensor([[[2.0, 4.0]], [[0.0, 1.0]]])  # (2, S=1, 2)
        >>> raw = torch.tensor([2.0, 4.0]).view(1, 1, 1, 1, 2).repeat(1, 2, 1, 1, 1)  # (B, 2, S, h, w)
        >>> normalize_maps(raw, stats, cfg)[0, 0]
        tensor([[[0.0000, 0.1000]]])
    """
    lo = stats[..., 0].to(raw)[None, :, :, None, None]  # (1, 2, S, 1, 1)
    hi = stats[..., 1].to(raw)[None, :, :, None, None]
    if cfg.normalization == "none":
        return raw
    scale = 1.0 if cfg.normalization == "minmax" else 0.1
    return scale * (raw - lo) / (hi - lo).clamp_min(1e-12)


def fuse(norm: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """Mean over the enabled levels of the sum of the enabled branches: (B, 2, S, h, w) -> (B, 1, h, w)."""
    s = norm.shape[2]
    bad = [lv for lv in cfg.levels if not 1 <= lv <= s]
    if bad:
        raise ConfigError(f"ScoringConfig.levels: {bad} out of range; the model has levels 1..{s}")
    branches = [b for b, on in enumerate((cfg.use_structural, cfg.use_logical)) if on]
    idx = [lv - 1 for lv in cfg.levels]
    sel = norm[:, branches][:, :, idx]  # (B, nb, nl, h, w)
    return sel.sum(1).mean(1, keepdim=True)  # (B, 1, h, w)


def blur_kernel(sigma: float, size: tuple[int, int], dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian (2r+1,) of :func:`gaussian_blur` for a (H, W) map; ``sigma > 0``.

    r = ceil(4 sigma), at least 1 and at most min(H, W) - 1 (reflect padding needs r < size).
    """
    radius = min(max(1, int(math.ceil(4 * sigma))), size[1] - 1, size[0] - 1)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) with reflect padding (kernel radius 4 sigma)."""
    if sigma <= 0:
        return x
    k = blur_kernel(sigma, tuple(x.shape[-2:]), x.dtype, x.device)  # (2r+1,)
    radius = (k.numel() - 1) // 2
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


@functools.lru_cache(maxsize=32)
def _upsample_blur_matrix(n_in: int, n_out: int, sigma: float, out_size: tuple[int, int]) -> torch.Tensor:
    """One axis of upsampling + blur as an (n_out, n_in) float64 matrix (do not modify: cached).

    Bilinear upsampling n_in -> n_out (``align_corners=False``, as ``F.interpolate``), then, if ``sigma > 0``,
    the Gaussian of :func:`gaussian_blur` on an ``out_size`` (H, W) map (:func:`blur_kernel`, reflect pad).
    """
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]  # (1, 1, n_in, n_in)
    up = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]  # (n_out, n_in)
    if sigma <= 0:
        return up
    k = blur_kernel(sigma, out_size)  # (2r+1,) float64
    radius = (k.numel() - 1) // 2
    t = torch.arange(-radius, radius + 1)
    idx = (torch.arange(n_out)[:, None] + t[None, :]).abs()  # reflect at the start (-1 -> 1) ...
    idx = torch.where(idx > n_out - 1, 2 * (n_out - 1) - idx, idx)  # ... and at the end (n -> n - 2)
    blur = torch.zeros(n_out, n_out, dtype=torch.float64).scatter_add_(1, idx, k.expand(n_out, -1).clone())
    return blur @ up


def anomaly_map(
    raw: torch.Tensor,
    stats: torch.Tensor,
    cfg: ScoringConfig,
    image_size: int | tuple[int, int],
) -> torch.Tensor:
    """Raw maps (B, 2, S, h, w) -> fused, upsampled, blurred anomaly map (B, 1, H, W).

    Upsampling (bilinear) and blur (:func:`gaussian_blur`) are both separable linear maps, applied as one
    (H, h) and one (W, w) matrix: M_y @ fused @ M_x^T (the same map up to float rounding, without the
    upsampled intermediate and the slow single-channel convolutions).
    """
    fused = fuse(normalize_maps(raw, stats, cfg), cfg)  # (B, 1, h, w)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    (h, w), (big_h, big_w) = fused.shape[-2:], size
    sigma = float(cfg.blur_sigma)
    m_y = _upsample_blur_matrix(h, big_h, sigma, size).to(fused)  # (H, h)
    m_x = _upsample_blur_matrix(w, big_w, sigma, size).to(fused)  # (W, w)
    return torch.matmul(torch.matmul(m_y, fused), m_x.t())  # (B, 1, H, W)


def image_scores(amap: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the anomaly map: (B, 1, H, W) -> (B,)."""
    return amap.flatten(1).max(dim=1).values
