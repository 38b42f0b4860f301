"""Reading images and masks from disk, with errors that name the file.

Every image is returned as RGB float32 in [0, 1], whatever its mode on disk: grayscale and palette images are
replicated to three channels, the alpha channel of RGBA/LA images is dropped, and 16-bit images are scaled by
1/65535 (not truncated to their high byte). Masks keep their pixel values; :func:`binarize_mask` turns them
into defect pixels by the mask rule below.

Image size. An image with more than ``max_pixels`` pixels (width x height, read from the header before
anything is decoded; :data:`MAX_IMAGE_PIXELS` = 100 megapixels by default, 0 = no limit) is refused with a
:class:`DataError` that names the file, its size and the option to raise. This limit replaces PIL's
process-wide decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) inside these loaders, so there is one
limit and no raw ``DecompressionBombError``. ``load_image(path, reduce_to=S)`` decodes large images at a
reduced scale that still covers ``S x S``: JPEGs are decoded reduced by the codec (``Image.draft``, 1/2, 1/4
or 1/8 scale), so the limit applies to the reduced size; other formats are decoded in full and then
box-averaged by an integer factor (``Image.reduce``), so the limit applies to their full size.

Mask rule (checked when a dataset is indexed, :func:`mask_problem`):

* the background is 0: the most common value on the mask's border (outermost rows and columns) must be 0.
  A defect may cover most of an image (a flipped part), but not most of its border, so a mask whose
  background is another value (3, or 255 for an inverted mask) is wrong;
* it is a label mask, not a picture: at most :data:`MASK_MAX_VALUES` distinct values. MVTec AD, MPDD and the
  generated masks hold {0, 255}, VisA masks {0, class ids}, MVTec LOCO masks one defect value per file; more
  values mean a lossy (JPEG), anti-aliased or grayscale mask;
* defect pixels are the non-zero ones (threshold: value > 0), and a defect image's mask (the union of its
  files for MVTec LOCO) has at least one.

A mask that breaks the first two rules is binarised as well as possible: pixels farther from its background
value than half the largest such distance are defective.

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> p = Path(tempfile.mkdtemp()) / "gray16.png"
    >>> Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(p)
    >>> x = load_image(p); x.shape, x.dtype, float(x.max())
    ((4, 5, 3), dtype('float32'), 1.0)
    >>> load_image(p, max_pixels=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mudenet_core.data.images.DataError: ...gray16.png: the image is 5x4 (20 pixels), above the limit of 10 ...
    >>> m = np.zeros((6, 6), np.uint8); m[2:4, 2:4] = 255
    >>> mask_problem(m) is None, mask_problem(m + 3)
    (True, 'its background (the most common value on its border) is 3, not 0')
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 100_000_000  # default pixel limit of every loader (width x height); 0 = no limit
MASK_MAX_VALUES = 16  # a label mask has at most this many distinct values (background included)
_PIL_LIMIT_LOCK = threading.Lock()  # guards the swap of PIL's process-wide limit around Image.open
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """A dataset that cannot be used as given: missing folders or files, undecodable images, bad masks."""


class DataWarning(UserWarning):
    """Data that is used, but probably not as its author meant (e.g. a mask with a non-zero background)."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension, case-insensitive, hidden files skipped) directly in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _open(path: Path, *, decoding: bool = False) -> Image.Image:
    """``Image.open`` (header only) with PIL's decompression-bomb check off: callers apply ``max_pixels``.

    ``decoding`` words the error for a caller that is about to decode the image.
    """
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        except FileNotFoundError:
            raise DataError(f"image not found: {path}") from None
        except _DECODE_ERRORS as e:
            what = "the image cannot be decoded" if decoding else "not a readable image"
            raise DataError(f"{path}: {what} ({type(e).__name__}: {e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int, *, jpeg: bool = False,
                  reduced: bool = False) -> None:
    """DataError when an image decoding to ``size`` (width, height) has more than ``max_pixels`` pixels."""
    if max_pixels < 0:
        raise ValueError(f"max_pixels must be >= 0 (0 = no limit), got {max_pixels}")
    w, h = size
    if max_pixels == 0 or w * h <= max_pixels:
        return
    hint = "raise it with DataConfig.max_image_pixels or load_image(..., max_pixels=N) (0 = no limit)"
    if jpeg and not reduced:
        hint += ", or decode it reduced (DataConfig.reduce_on_load, load_image(..., reduce_to=SIZE))"
    what = "decodes reduced to" if reduced else "is"
    raise DataError(f"{path}: the image {what} {w}x{h} ({w * h} pixels), above the limit of {max_pixels} "
                    f"pixels (a decompression-bomb guard); {hint}")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (cheap); the error names the file if it is no image."""
    path = Path(path)
    with _open(path) as im:
        return im.size


def _reduce_factor(size: tuple[int, int], reduce_to: int | None) -> int:
    """Largest integer factor that keeps both sides of ``size`` >= ``reduce_to`` (1: no reduction)."""
    if reduce_to is None:
        return 1
    return max(1, min(size) // int(reduce_to))


def _open_planned(path: Path, max_pixels: int, reduce_to: int | None, *,
                  decoding: bool = True) -> tuple[Image.Image, int, tuple[int, int]]:
    """Open ``path``, apply the JPEG draft for ``reduce_to`` and check the pixel limit.

    Returns:
        the opened (not yet decoded) image, the reduce factor still to apply after decoding, and the
        ``(width, height)`` on disk.
    """
    if reduce_to is not None and reduce_to < 1:
        raise ValueError(f"reduce_to must be a positive side length or None, got {reduce_to}")
    im = _open(path, decoding=decoding)
    jpeg = im.format in ("JPEG", "MPO")
    full = im.size
    if reduce_to is not None and jpeg:
        im.draft(im.mode, (int(reduce_to), int(reduce_to)))  # the codec decodes at 1/2, 1/4 or 1/8 scale
    try:
        _check_pixels(path, im.size, max_pixels, jpeg=jpeg, reduced=im.size != full)
    except DataError:
        im.close()
        raise
    return im, _reduce_factor(im.size, reduce_to), full


def check_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
                reduce_to: int | None = None) -> tuple[int, int]:
    """Header-only check that :func:`load_image` with these arguments will not refuse ``path`` for its size.

    Returns:
        ``(width, height)`` of the image on disk (before any reduction).
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        size = _tiff_size(path)
        if size is not None:
            _check_pixels(path, size, max_pixels)
            return size
    im, _, size = _open_planned(path, max_pixels, reduce_to, decoding=False)
    im.close()
    return size


def _decode(im: Image.Image, path: Path) -> Image.Image:
    try:
        im.load()  # force decoding now, so truncated files fail here and not later
        return im
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: the image cannot be decoded ({type(e).__name__}: {e})") from None


def _tiff_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of a TIFF's first page with ``tifffile``; None without it or when unreadable."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            return int(page.imagewidth), int(page.imagelength)
    except Exception:  # let PIL (or the full read) report the problem
        return None


def _load_tiff(path: Path, max_pixels: int, reduce_to: int | None) -> np.ndarray | None:
    """Full-precision TIFF read with ``tifffile`` (PIL truncates 16-bit RGB); None without it."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            photometric = int(tf.pages[0].photometric)
    except Exception:  # let the full read report the problem
        photometric = None
    if photometric not in (None, 1, 2):  # CMYK, palette, YCbCr, min-is-white...: raw values are not RGB
        return None  # PIL converts these to RGB
    size = _tiff_size(path)
    if size is not None:
        _check_pixels(path, size, max_pixels)
    try:
        arr = tifffile.imread(path)
    except Exception as e:  # corrupt or unsupported TIFF
        raise DataError(f"{path}: the image cannot be decoded ({type(e).__name__}: {e})") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, 2)  # planar (C, H, W) -> (H, W, C)
    if size is None:
        _check_pixels(path, (arr.shape[1], arr.shape[0]), max_pixels)
    if np.issubdtype(arr.dtype, np.integer):
        x = arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    else:
        x = arr.astype(np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise DataError(f"{path}: expected a 2-D image, got an array of shape {arr.shape}")
    x = np.repeat(x[:, :, :1], 3, axis=2) if x.shape[2] < 3 else x[:, :, :3]  # gray(+alpha) / drop alpha
    f = _reduce_factor((x.shape[1], x.shape[0]), reduce_to)
    if f > 1:  # box average over f x f blocks (the last partial row/column of blocks is dropped)
        h, w = x.shape[0] // f, x.shape[1] // f
        x = x[:h * f, :w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))  # (H, W, 3) -> (H/f, W/f, 3)
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS,
               reduce_to: int | None = None) -> np.ndarray:
    """Load any image as RGB float32 in [0, 1].

    Args:
        path: image file (PNG, JPEG, BMP, TIFF; 8- or 16-bit; L, LA, P, RGB, RGBA, I;16...).
        max_pixels: refuse (DataError naming the file and its size) images that would decode to more pixels
            than this, checked from the header before decoding; 0 = no limit.
        reduce_to: None: full resolution. A side length S: decode at the smallest scale that keeps both sides
            >= S (JPEG via the codec's draft mode, others by integer box-averaging after decoding), for
            images that are then resized to S x S anyway. Pixels differ slightly from a full decode.

    Returns:
        array (H, W, 3) float32 in [0, 1] ((H, W) reduced when ``reduce_to`` is given).
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        arr = _load_tiff(path, max_pixels, reduce_to)
        if arr is not None:
            return arr
    im, factor, _ = _open_planned(path, max_pixels, reduce_to)
    im = _decode(im, path)
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        if factor > 1:
            im = (im if mode in ("I", "F") else im.convert("I")).reduce(factor)  # PIL cannot reduce I;16
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
    if factor > 1:
        im = im.reduce(factor)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    assert arr.ndim == 3 and arr.shape[2] == 3, f"{path}: expected (H, W, 3) got {arr.shape}"
    return arr


def load_mask(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Load a mask as its integer pixel values (H, W); :func:`binarize_mask` gives its defect pixels.

    Colour masks are reduced to their maximum over channels. ``max_pixels`` as in :func:`load_image`.
    """
    path = Path(path)
    im, _, _ = _open_planned(path, max_pixels, None)
    arr = np.asarray(_decode(im, path))
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2) if arr.shape[2] >= 3 else arr[:, :, 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def mask_background(arr: np.ndarray) -> int | float:
    """The background value of a mask (H, W): the most common value on its border (outermost rows/columns)."""
    assert arr.ndim == 2, f"expected a mask (H, W), got {arr.shape}"
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    values, counts = np.unique(border, return_counts=True)
    return values[np.argmax(counts)].item()


def mask_problem(arr: np.ndarray) -> str | None:
    """What breaks this module's mask rule in a mask (H, W), or None (emptiness is not checked here)."""
    bg = mask_background(arr)
    if bg != 0:
        return f"its background (the most common value on its border) is {bg}, not 0"
    n = len(np.unique(arr))
    if n > MASK_MAX_VALUES:
        return (f"it holds {n} distinct values (at most {MASK_MAX_VALUES} in a label mask): a lossy (JPEG), "
                f"anti-aliased or grayscale mask")
    return None


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    """Defect pixels of a mask (H, W) -> (H, W) bool: ``arr > 0`` for a valid mask (class ids allowed).

    A mask that :func:`mask_problem` rejects is used as well as possible: pixels farther from its background
    value than half the largest such distance are defective.

    Example:
        >>> m = np.array([[3, 3, 3], [3, 255, 3], [3, 3, 3]], dtype=np.uint8)
        >>> binarize_mask(m).astype(int).tolist()
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    """
    if mask_problem(arr) is None:
        return arr > 0
    dist = np.abs(arr.astype(np.float64) - float(mask_background(arr)))
    top = dist.max()
    return dist > top / 2 if top > 0 else np.zeros(arr.shape, dtype=bool)
