"""Reading images and masks from disk, with errors that name the file.

Every image is returned as RGB float32 in [0, 1], whatever its mode on disk: grayscale and palette images are
replicated to three channels, the alpha channel of RGBA/LA images is dropped, and 16-bit images are scaled by
1/65535 (not truncated to their high byte). Masks keep their pixel values (any non-zero pixel is defective).

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> p = Path(tempfile.mkdtemp()) / "gray16.png"
    >>> Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(p)
    >>> x = load_image(p); x.shape, x.dtype, float(x.max())
    ((4, 5, 3), dtype('float32'), 1.0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset that cannot be used as given: missing folders or files, undecodable images, bad masks."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension, case-insensitive, hidden files skipped) directly in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (cheap); the error names the file if it is no image."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _open_decoded(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # force decoding now, so truncated files fail here and not later
        return im
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: the image cannot be decoded ({type(e).__name__}: {e})") from None


def _load_tiff(path: Path) -> np.ndarray | None:
    """Full-precision TIFF read with ``tifffile`` (PIL truncates 16-bit RGB); None without it."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        arr = tifffile.imread(path)
    except Exception as e:  # corrupt or unsupported TIFF
        raise DataError(f"{path}: the image cannot be decoded ({type(e).__name__}: {e})") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, 2)  # planar (C, H, W) -> (H, W, C)
    if np.issubdtype(arr.dtype, np.integer):
        x = arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    else:
        x = arr.astype(np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise DataError(f"{path}: expected a 2-D image, got an array of shape {arr.shape}")
    x = np.repeat(x[:, :, :1], 3, axis=2) if x.shape[2] < 3 else x[:, :, :3]  # gray(+alpha) / drop alpha
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)


def load_image(path: str | Path) -> np.ndarray:
    """Load any image as RGB float32 in [0, 1].

    Args:
        path: image file (PNG, JPEG, BMP, TIFF; 8- or 16-bit; L, LA, P, RGB, RGBA, I;16...).

    Returns:
        array (H, W, 3) float32 in [0, 1].
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        arr = _load_tiff(path)
        if arr is not None:
            return arr
    im = _open_decoded(path)
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":  # float images: assume already in [0, 1] (clip to be safe)
            scale = 1.0
        else:  # 16-bit (PIL's 'I' is how some 16-bit PNG/TIFF load; 8-bit data never arrives as 'I')
            scale = 1.0 / 65535.0
        arr = np.clip(arr * scale, 0.0, 1.0).astype(np.float32)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return np.ascontiguousarray(arr[:, :, :3])
    if mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if mode in ("P", "PA") else im.convert("RGB")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    assert arr.ndim == 3 and arr.shape[2] == 3, f"{path}: expected (H, W, 3) got {arr.shape}"
    return arr


def load_mask(path: str | Path) -> np.ndarray:
    """Load a mask as its integer pixel values (H, W); any non-zero value marks a defect.

    Colour masks are reduced to their maximum over channels. Use ``load_mask(p) > 0`` for a boolean mask.
    """
    path = Path(path)
    im = _open_decoded(path)
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2) if arr.shape[2] >= 3 else arr[:, :, 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr
