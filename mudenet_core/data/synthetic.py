"""The embedded default dataset: a seeded generator writing an MVTec AD-layout dataset in a few seconds.

Two categories:

* ``weave`` (texture): a plain-weave fabric with pose jitter (thread pitch, angle, phase), per-thread shade
  variation, uneven lighting and sensor noise. Defects: ``scratch`` (a pulled bright fibre), ``stain`` (a dark
  blot), ``color`` (a mis-dyed stretch of a thread), ``hole`` (missing threads).
* ``plate`` (object): a brushed steel plate with four holes and two brass screws in diagonal holes, with pose
  jitter (shift, rotation), screw-slot angle, lighting and noise. Defects: ``scratch``, ``spot`` (a dark pit),
  ``color`` (heat tint), ``missing_screw`` (a missing part) and ``misplaced_screw`` (a screw in the wrong
  hole: every part looks normal locally, only the arrangement is wrong).

Masks are exact: a defect image differs from its clean counterpart (same pose, light and noise) exactly on the
mask's non-zero pixels, every one of them by more than :data:`CHANGE_THRESHOLD` grey levels in some channel
(sub-threshold antialiasing changes at a part's rim are reverted to the clean value). :func:`render_sample`
returns the clean image too, so this can be checked.

Everything is drawn from ``numpy.random.Generator`` objects seeded from ``(seed, category, split, type,
index)``: the same seed writes byte-identical files. :func:`ensure` generates once and records the
parameters in ``synthetic_params.json``; a later call with other parameters regenerates the folder.

Example:
    >>> clean, image, mask = render_sample("plate", "missing_screw", image_size=64, seed=0, index=0)
    >>> image.shape, mask.dtype, bool(((image != clean).any(axis=2) == mask).all())
    ((64, 64, 3), dtype('bool'), True)
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mudenet_core.data.images import DataError
from mudenet_core.io import REPO_ROOT, load_json, save_json

CATEGORIES = ("weave", "plate")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "weave": ("scratch", "stain", "color", "hole"),
    "plate": ("scratch", "spot", "color", "missing_screw", "misplaced_screw"),
}
GENERATOR_VERSION = 1  # bump when the rendering changes: old folders then regenerate
PARAMS_FILE = "synthetic_params.json"
CHANGE_THRESHOLD = 4  # grey levels (of 255): smaller changes are reverted, larger ones are in the mask
DEFAULTS = {"image_size": 256, "n_train": 60, "n_test_good": 20, "n_test_per_defect": 8, "seed": 0}
_SPLIT_CODE = {"train": 0, "test": 1}


def default_root() -> Path:
    """``<repo>/data/synthetic`` (git-ignored)."""
    return REPO_ROOT / "data" / "synthetic"


# -------------------------------------------------------------------------------------------- drawing helpers
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (H, W) float32, in pixels."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="ij")


def _interp_weights(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index (size,) and smoothstep weight (size,) of each pixel centre on a coarse grid of ``cells``."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    k = np.minimum(np.floor(t).astype(np.int64), cells - 1)
    f = t - k
    return k, f * f * (3 - 2 * f)  # smoothstep: continuous slope across cells


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean noise (H, W) with ~unit std: a (cells+1)^2 Gaussian grid, smoothly interpolated."""
    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    k, f = _interp_weights(size, cells)
    rows = g[k] * (1 - f)[:, None] + g[k + 1] * f[:, None]  # (H, cells + 1)
    return rows[:, k] * (1 - f)[None, :] + rows[:, k + 1] * f[None, :]  # (H, W)


def _segment_distance(y, x, p0, p1) -> np.ndarray:
    """Distance (H, W) from every pixel to the segment p0-p1 ((y, x) tuples)."""
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    L2 = dy * dy + dx * dx + 1e-9
    t = np.clip(((y - p0[0]) * dy + (x - p0[1]) * dx) / L2, 0.0, 1.0)
    return np.hypot(y - (p0[0] + t * dy), x - (p0[1] + t * dx))


def _polyline(rng, y, x, size, length, width, n_seg=3) -> np.ndarray:
    """A hard-edged random polyline of total ``length`` and ``width`` pixels: (H, W) bool."""
    p = np.array([rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size])
    ang = rng.uniform(0, 2 * math.pi)
    d = np.full(y.shape, np.inf, dtype=np.float32)
    for _ in range(n_seg):
        ang += rng.normal(0, 0.35)
        q = p + (length / n_seg) * np.array([math.sin(ang), math.cos(ang)])
        d = np.minimum(d, _segment_distance(y, x, p, q))
        p = q
    return d <= width / 2.0


def _blob(rng, y, x, size, radius, roughness=0.35) -> np.ndarray:
    """A hard-edged irregular blob (an ellipse with a noisy rim) of about ``radius`` pixels: (H, W) bool."""
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    ry, rx = radius * rng.uniform(0.7, 1.3, size=2)
    a = rng.uniform(0, math.pi)
    u = ((x - cx) * math.cos(a) + (y - cy) * math.sin(a)) / rx
    v = (-(x - cx) * math.sin(a) + (y - cy) * math.cos(a)) / ry
    return np.hypot(u, v) <= 1.0 + roughness * 0.5 * _smooth_noise(rng, size, 6)


def _apply_delta(img: np.ndarray, region: np.ndarray, delta) -> np.ndarray:
    """Add ``delta`` (3,) or (H, W, 3) on ``region``; where clipping would hide it, subtract it instead."""
    out = img.copy()
    delta = np.broadcast_to(np.asarray(delta, dtype=np.float32), img.shape)
    plus = np.clip(img + delta, 0, 1)
    minus = np.clip(img - delta, 0, 1)
    use_plus = np.abs(plus - img).max(axis=2) >= np.abs(minus - img).max(axis=2)
    cand = np.where(use_plus[..., None], plus, minus)
    out[region] = cand[region]
    return out


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ weave
def _weave_params(rng: np.random.Generator, size: int) -> dict:
    tone = (1 + 0.04 * rng.standard_normal()) * (1 + 0.015 * rng.standard_normal(3))  # brightness, slight hue
    hue = np.array([0.80, 0.70, 0.52], dtype=np.float32) * tone.astype(np.float32)
    return {
        "pitch": float(size / rng.uniform(19.0, 23.0)),  # pixels per thread
        "angle": math.radians(rng.uniform(-4.0, 4.0)),
        "phase": [float(t) for t in rng.uniform(0, 2, size=2)],
        "warp": hue,
        "weft": hue * np.array([0.92, 0.93, 0.97], dtype=np.float32),
        "gain_u": (1 + 0.07 * rng.standard_normal(64)).astype(np.float32),
        "gain_v": (1 + 0.07 * rng.standard_normal(64)).astype(np.float32),
        # uneven light (coarse) times natural fibre density variation (fine)
        "light": ((1 + 0.07 * _smooth_noise(rng, size, 3)) * (1 + 0.035 * _smooth_noise(rng, size, 14))
                  ).astype(np.float32),
        "tilt": [float(t) for t in rng.uniform(-0.08, 0.08, size=2)],
        "noise": np.float32(0.015) * rng.standard_normal((size, size, 3), dtype=np.float32),
    }


def _weave_geometry(p: dict, size: int):
    y, x = _grid(size)
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    u = (x * c + y * s) / p["pitch"] + p["phase"][0]  # across warp threads
    v = (-x * s + y * c) / p["pitch"] + p["phase"][1]  # across weft threads
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    warp_top = (i + j) % 2 == 0
    return y, x, u, v, i, j, warp_top


def _render_weave(p: dict, size: int, *, hole: np.ndarray | None = None,
                  tint: tuple | None = None) -> np.ndarray:
    y, x, u, v, i, j, warp_top = _weave_geometry(p, size)
    fu, fv = u - i, v - j
    across_u, across_v = np.sin(math.pi * fu), np.sin(math.pi * fv)  # bright thread centres, dark gaps
    shade_warp = (0.55 + 0.45 * across_u) * (0.78 + 0.22 * across_v) * p["gain_u"][i % 64]
    shade_weft = (0.55 + 0.45 * across_v) * (0.78 + 0.22 * across_u) * p["gain_v"][j % 64]
    warp_col = np.broadcast_to(p["warp"], (size, size, 3)).copy()
    if tint is not None:  # mis-dyed stretch of warp thread(s): (region, colour multiplier)
        region, mult = tint
        warp_col[region] = warp_col[region] * mult
    img = np.where(warp_top[..., None], shade_warp[..., None] * warp_col, shade_weft[..., None] * p["weft"])
    if hole is not None:  # missing threads: the dark backing shows through
        img[hole] = np.array([0.07, 0.06, 0.06], dtype=np.float32)
    light = p["light"] * (1 + p["tilt"][0] * (y / size - 0.5) + p["tilt"][1] * (x / size - 0.5))
    return np.clip(img * light[..., None] + p["noise"], 0, 1).astype(np.float32)


def _weave_defect(rng, p: dict, size: int, kind: str, clean: np.ndarray) -> np.ndarray:
    y, x = _grid(size)
    if kind == "scratch":  # a pulled, bright fibre
        region = _polyline(rng, y, x, size, length=rng.uniform(0.15, 0.35) * size, width=max(1.0, size / 160))
        return _apply_delta(clean, region, np.full(3, rng.uniform(0.07, 0.12)))
    if kind == "stain":  # a faint brownish blot
        region = _blob(rng, y, x, size, radius=max(1.5, rng.uniform(0.02, 0.045) * size))
        return _apply_delta(clean, region, -rng.uniform(0.05, 0.08) * np.array([0.8, 1.0, 1.2]))
    if kind == "color":  # a stretch of 1-2 warp threads dyed another colour
        _, _, u, v, i, j, warp_top = _weave_geometry(p, size)
        i0 = int(rng.integers(int(np.percentile(i, 20)), int(np.percentile(i, 80)) + 1))
        v0 = rng.uniform(np.percentile(v, 15), np.percentile(v, 60))
        band = (i >= i0) & (i < i0 + int(rng.integers(1, 3))) & (v >= v0) & (v < v0 + rng.uniform(3, 7))
        shift = np.array([0.16, -0.10, -0.30], dtype=np.float32)
        mult = np.float32(1.0) + np.float32(rng.choice([-1, 1]) * rng.uniform(0.5, 0.9)) * shift
        return _render_weave(p, size, tint=(band & warp_top, mult))
    if kind == "hole":  # missing threads
        region = _blob(rng, y, x, size, radius=max(1.5, rng.uniform(0.012, 0.025) * size), roughness=0.2)
        return _render_weave(p, size, hole=region)
    raise ValueError(f"unknown weave defect {kind!r}")


# ------------------------------------------------------------------------------------------------------ plate
_HOLES = ((-1, -1), (1, -1), (-1, 1), (1, 1))  # (sign of u, sign of v) of the holes; screws in 0 and 3


def _plate_params(rng: np.random.Generator, size: int) -> dict:
    steel = np.array([0.62, 0.64, 0.67], dtype=np.float32) * np.float32(1 + 0.05 * rng.standard_normal())
    return {
        "centre": [float(t) for t in size * (0.5 + 0.02 * rng.standard_normal(2))],
        "angle": math.radians(rng.uniform(-5.0, 5.0)),
        "half": [float(t) for t in size * np.array([0.36, 0.28]) * (1 + 0.02 * rng.standard_normal(2))],
        "steel": steel,
        "streaks": (0.035 * rng.standard_normal(4 * size)).astype(np.float32),
        "slots": rng.uniform(0, math.pi, size=4),
        "bg": (0.13 + 0.02 * _smooth_noise(rng, size, 4)).astype(np.float32),
        "light": (1 + 0.06 * _smooth_noise(rng, size, 3)).astype(np.float32),
        "tilt": [float(t) for t in rng.uniform(-0.10, 0.10, size=2)],
        "noise": np.float32(0.012) * rng.standard_normal((size, size, 3), dtype=np.float32),
    }


def _coverage(sd: np.ndarray) -> np.ndarray:
    """Antialiased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sd, 0.0, 1.0)


def _plate_local(p: dict, size: int):
    y, x = _grid(size)
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    dy, dx = y - p["centre"][0], x - p["centre"][1]
    u, v = dx * c + dy * s, -dx * s + dy * c  # plate coordinates (pixels), u along the long side
    return y, x, u, v


def _render_plate(p: dict, size: int, screws: tuple[int, ...] = (0, 3)) -> np.ndarray:
    y, x, u, v = _plate_local(p, size)
    a, b = p["half"]
    r = 0.06 * size
    qx, qy = np.abs(u) - (a - r), np.abs(v) - (b - r)  # rounded-box signed distance
    sd_plate = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r
    cov_plate = _coverage(sd_plate)
    streak = p["streaks"][np.clip(((v + b) * 4).astype(np.int64), 0, 4 * size - 1)]
    bevel = np.clip(-sd_plate / (0.015 * size), 0, 1)
    steel = p["steel"] * ((1 + streak) * (0.82 + 0.18 * bevel))[..., None]
    bg = np.broadcast_to(p["bg"][..., None] * np.array([0.95, 1.0, 1.12], dtype=np.float32), (size, size, 3))
    img = (bg * (1 - cov_plate[..., None]) + steel * cov_plate[..., None]).astype(np.float32)
    hole_r, head_r = 0.045 * size, 0.058 * size
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    for k, (su, sv) in enumerate(_HOLES):
        hu, hv = su * 0.68 * a, sv * 0.62 * b
        hx, hy = p["centre"][1] + hu * c - hv * s, p["centre"][0] + hu * s + hv * c  # hole centre (pixels)
        y0, y1 = max(0, int(hy - head_r) - 2), min(size, int(hy + head_r) + 3)
        x0, x1 = max(0, int(hx - head_r) - 2), min(size, int(hx + head_r) + 3)
        if y0 >= y1 or x0 >= x1:
            continue
        win = (slice(y0, y1), slice(x0, x1))  # only the hole's neighbourhood changes
        uu, vv, sub = u[win] - hu, v[win] - hv, img[win]
        d = np.hypot(uu, vv)
        cov = _coverage(d - hole_r)[..., None]
        sub = sub * (1 - cov) + 0.6 * bg[win] * cov  # the hole: shadowed background
        if k in screws:
            cov_h = _coverage(d - head_r)[..., None]
            rad = np.clip(d / head_r, 0, 1)
            brass = np.array([0.80, 0.63, 0.30], dtype=np.float32) * (1 - 0.3 * rad ** 2)[..., None]
            phi = p["slots"][k]
            across = np.abs(-uu * math.sin(phi) + vv * math.cos(phi))
            cov_slot = _coverage(across - 0.012 * size)[..., None] * cov_h
            brass = brass * (1 - cov_slot) + np.array([0.45, 0.33, 0.14], dtype=np.float32) * cov_slot
            sub = sub * (1 - cov_h) + brass * cov_h
        img[win] = sub
    light = p["light"] * (1 + p["tilt"][0] * (y / size - 0.5) + p["tilt"][1] * (x / size - 0.5))
    return np.clip(img * light[..., None] + p["noise"], 0, 1).astype(np.float32)


def _plate_surface(p: dict, size: int) -> np.ndarray:
    """Pixels (H, W) bool of bare plate: inside, off the bevel, away from every hole and screw."""
    _, _, u, v = _plate_local(p, size)
    a, b = p["half"]
    inside = (np.abs(u) < a - 0.04 * size) & (np.abs(v) < b - 0.04 * size)
    for su, sv in _HOLES:
        inside &= np.hypot(u - su * 0.68 * a, v - sv * 0.62 * b) > 0.075 * size
    return inside


def _plate_defect(rng, p: dict, size: int, kind: str, clean: np.ndarray) -> np.ndarray:
    y, x = _grid(size)
    surface = _plate_surface(p, size)
    if kind == "scratch":
        region = _polyline(rng, y, x, size, length=rng.uniform(0.12, 0.3) * size, width=max(1.0, size / 180))
        return _apply_delta(clean, region & surface, np.full(3, rng.uniform(0.18, 0.26)))
    if kind == "spot":
        region = _blob(rng, y, x, size, radius=max(1.5, rng.uniform(0.015, 0.035) * size))
        return _apply_delta(clean, region & surface, -rng.uniform(0.14, 0.22) * np.array([1.0, 1.0, 0.9]))
    if kind == "color":  # heat tint: warmer, less blue
        region = _blob(rng, y, x, size, radius=max(1.5, rng.uniform(0.04, 0.07) * size))
        return _apply_delta(clean, region & surface, clean * np.array([0.10, -0.04, -0.22], dtype=np.float32))
    if kind == "missing_screw":
        return _render_plate(p, size, screws=((3,) if rng.random() < 0.5 else (0,)))
    if kind == "misplaced_screw":  # one screw moved to an empty hole
        return _render_plate(p, size, screws=((1, 3) if rng.random() < 0.5 else (0, 2)))
    raise ValueError(f"unknown plate defect {kind!r}")


# ------------------------------------------------------------------------------------------------- sampling
def _rng(seed: int, category: str, split: str, defect_type: str, index: int) -> np.random.Generator:
    types = ("good",) + DEFECT_TYPES[category]
    key = [int(seed), CATEGORIES.index(category), _SPLIT_CODE[split], types.index(defect_type), int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def render_sample(category: str, defect_type: str = "good", *, image_size: int = 256, seed: int = 0,
                  index: int = 0, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image exactly as :func:`generate` writes it.

    Args:
        category: one of :data:`CATEGORIES`.
        defect_type: ``"good"`` or one of ``DEFECT_TYPES[category]``.
        image_size: square side in pixels.
        seed: the dataset seed.
        index: the image's number within its folder.
        split: ``"train"`` or ``"test"``.

    Returns:
        clean (H, W, 3) uint8 (the same object without the defect), image (H, W, 3) uint8, mask (H, W) bool
        (exactly the pixels where ``image != clean``; all False for good images).
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {CATEGORIES}")
    if defect_type != "good" and defect_type not in DEFECT_TYPES[category]:
        raise ValueError(f"unknown defect type {defect_type!r} for {category}; "
                         f"choose from {DEFECT_TYPES[category]}")
    if split not in _SPLIT_CODE or (split == "train" and defect_type != "good"):
        raise ValueError(f"invalid split {split!r} for defect type {defect_type!r}")
    rng = _rng(seed, category, split, defect_type, index)
    size = int(image_size)
    if category == "weave":
        params, render, defect = _weave_params(rng, size), _render_weave, _weave_defect
    else:
        params, render, defect = _plate_params(rng, size), _render_plate, _plate_defect
    clean_f = render(params, size)
    clean = _to_uint8(clean_f)
    if defect_type == "good":
        return clean, clean.copy(), np.zeros((size, size), dtype=bool)
    min_area = max(3, (size * size) // 4000)
    for _ in range(50):  # redraw a defect that landed (almost) nowhere, e.g. a scratch off the plate
        image = _to_uint8(defect(rng, params, size, defect_type, clean_f))
        diff = np.abs(image.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
        mask = diff > CHANGE_THRESHOLD
        if mask.sum() >= min_area:
            image[~mask] = clean[~mask]  # revert sub-threshold (antialiasing) changes: the mask is exact
            return clean, image, mask
    raise RuntimeError(f"could not place a {defect_type} defect on {category} (seed {seed}, index {index})")


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=1)


def _params(categories, image_size, n_train, n_test_good, n_test_per_defect, seed) -> dict:
    return {"generator_version": GENERATOR_VERSION, "categories": list(categories),
            "image_size": int(image_size), "n_train": int(n_train), "n_test_good": int(n_test_good),
            "n_test_per_defect": int(n_test_per_defect), "seed": int(seed)}


def generate(root: str | Path, categories: list[str] | tuple[str, ...] | None = None, image_size: int = 256,
             n_train: int = 60, n_test_good: int = 20, n_test_per_defect: int = 8, seed: int = 0) -> Path:
    """Write the dataset in MVTec AD layout under ``root`` (replacing an earlier generation there).

    Layout: ``<root>/<category>/train/good/NNN.png``, ``test/good/NNN.png``, ``test/<defect>/NNN.png``,
    ``ground_truth/<defect>/NNN_mask.png`` (0/255), and ``<root>/synthetic_params.json``, written last.

    Args:
        root: output folder; must be empty, absent, or a folder written by this generator.
        categories: subset of :data:`CATEGORIES` (default: all).
        image_size: square side in pixels.
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_per_defect: test images per defect type and category.
        seed: dataset seed (same seed -> byte-identical files).

    Returns:
        ``root``.
    """
    root = Path(root)
    categories = tuple(categories) if categories is not None else CATEGORIES
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {CATEGORIES}")
    if image_size < 16 or n_train < 1 or n_test_good < 1 or n_test_per_defect < 1:
        raise ValueError("need image_size >= 16 and at least one image per folder")
    params_path = root / PARAMS_FILE
    if root.exists():
        for stale in root.glob(".generating-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        if any(root.iterdir()) and not params_path.is_file():
            raise DataError(f"{root} is not empty and holds no {PARAMS_FILE}: refusing to write a generated "
                            "dataset over it; pass an empty or new folder")
    old = load_json(params_path).get("categories", []) if params_path.is_file() else []
    tmp = root / f".generating-{os.getpid()}"
    for cat in categories:
        base = tmp / cat
        for i in range(n_train):
            _save_png(base / "train" / "good" / f"{i:03d}.png",
                      render_sample(cat, "good", image_size=image_size, seed=seed, index=i, split="train")[1])
        for i in range(n_test_good):
            _save_png(base / "test" / "good" / f"{i:03d}.png",
                      render_sample(cat, "good", image_size=image_size, seed=seed, index=i, split="test")[1])
        for t in DEFECT_TYPES[cat]:
            for i in range(n_test_per_defect):
                _, img, mask = render_sample(cat, t, image_size=image_size, seed=seed, index=i, split="test")
                _save_png(base / "test" / t / f"{i:03d}.png", img)
                _save_png(base / "ground_truth" / t / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    if params_path.is_file():
        params_path.unlink()  # the folder is invalid until the new parameters are written
    for cat in sorted(set(old) | set(categories)):
        if cat in CATEGORIES:
            shutil.rmtree(root / cat, ignore_errors=True)
    for cat in categories:
        os.replace(tmp / cat, root / cat)
    shutil.rmtree(tmp, ignore_errors=True)
    save_json(params_path, _params(categories, image_size, n_train, n_test_good, n_test_per_defect, seed))
    return root


def ensure(root: str | Path | None = None, **kw) -> Path:
    """Generate the dataset once and reuse it afterwards.

    Args:
        root: folder (default :func:`default_root`).
        **kw: :func:`generate`'s parameters (``categories``, ``image_size``, ``n_train``, ``n_test_good``,
            ``n_test_per_defect``, ``seed``); unknown names are an error.

    Returns:
        ``root``. If ``synthetic_params.json`` there matches the requested parameters nothing is written;
        otherwise (absent, or other parameters) the folder is (re)generated, with a warning when it replaces
        an earlier generation.
    """
    allowed = {"categories", *DEFAULTS}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(f"ensure(): unknown parameter(s) {unknown}; valid: {sorted(allowed)}")
    root = Path(root) if root is not None else default_root()
    args = {**DEFAULTS, "categories": list(CATEGORIES), **kw}
    want = _params(args["categories"], args["image_size"], args["n_train"], args["n_test_good"],
                   args["n_test_per_defect"], args["seed"])
    params_path = root / PARAMS_FILE
    if params_path.is_file():
        have = load_json(params_path)
        if have == want:
            return root
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        warnings.warn(f"{params_path}: generated with other parameters ({diff}); regenerating", stacklevel=2)
    return generate(root, **{k: args[k] for k in allowed})


def resolve_root(root: str | Path | None) -> Path:
    """The folder of a ``dataset="synthetic"`` config.

    ``""``/None -> :func:`ensure` at the default root; a given folder must hold a generated dataset (any
    parameters).
    """
    if root is None or str(root) == "":
        return ensure()
    root = Path(root).expanduser()
    if not (root / PARAMS_FILE).is_file():
        raise DataError(f"{root}: no generated dataset here (no {PARAMS_FILE}); create one with "
                        "mudenet_core.data.synthetic.ensure(root) or leave DataConfig.root empty")
    return root
