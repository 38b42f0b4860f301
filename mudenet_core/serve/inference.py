"""What the service does with one model and uploaded bytes: decode, score, describe the anomalous regions.

Nothing here knows about HTTP: every user error is a :class:`ServeError` carrying the status code the app
answers with (4xx) and a one-line message; the app turns it into ``{"detail": message}``.

A loaded model (:class:`LoadedModel`) is a registry model folder (:func:`mudenet_core.tracking.resolve_model`)
opened the way ``mudenet predict`` opens a checkpoint: the detector from ``model.pt`` (checked first with
``torch.load(weights_only=True)``: a file holding anything but tensors and plain data is refused), the input
size and ImageNet normalisation from ``config.yaml``, the threshold and heat-map range from ``threshold.json``
(:func:`mudenet_core.harness.load_calibration`, chosen on the validation set).

Regions: the connected components (8-connectivity) of ``map >= threshold`` on the model-size map (h, w), each
with its bounding box ``[x0, y0, x1, y1)`` and ``area`` in map pixels and its ``peak`` map value;
``static/app.js`` computes the same from the quantised map when the threshold slider moves.
"""

from __future__ import annotations

import base64
import io as _io
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DISPLAY_MAX_SIDE = 512  # the image sent back for display is at most this many pixels on its longer side
MAX_PIXELS = 40_000_000  # default decoded-size limit of an upload (width x height; decompression-bomb guard)
MAX_ZIP_MEMBERS = 256  # images in one zip
MAX_ZIP_RATIO = 200  # a member whose uncompressed size exceeds this multiple of its compressed size is a bomb


class ServeError(Exception):
    """A request the service refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), " ".join(str(message).split())


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class LoadedModel:
    """A model ready to score images (see the module docstring)."""

    model_id: str
    method: str
    folder: Path
    predictor: Any  # has predict((B, 3, H, W)) -> (maps (B, 1, H, W), scores (B,))
    image_size: int
    normalize: bool
    threshold: float | None
    threshold_source: str
    map_range: tuple[float, float] | None  # heat-map colour range chosen on validation (low, high)
    runtime: str = "torch"
    device: str = "cpu"
    config_hash: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> dict[str, Any]:
        """What ``/api/status`` says about the model."""
        return {
            "model_id": self.model_id,
            "method": self.method,
            "input_size": self.image_size,
            "normalize": self.normalize,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "map_range": list(self.map_range) if self.map_range else None,
            "runtime": self.runtime,
            "device": self.device,
            "config_hash": self.config_hash,
        }


def _check_weights_only(path: Path) -> None:
    """Refuse a checkpoint that ``torch.load(weights_only=True)`` cannot read (it holds arbitrary objects)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise ServeError(
            422,
            f"refusing {path.name}: it does not load with torch.load(weights_only=True) "
            f"({type(e).__name__}: {msg})",
        ) from None


def open_model(model_id: str, folder: Path, *, runtime: str = "torch", device: str = "cpu") -> LoadedModel:
    """Open a resolved registry folder as a :class:`LoadedModel`; :class:`ServeError` (422) if it cannot."""
    from mudenet_core import harness
    from mudenet_core.cli.common import CLIError, load_detector, read_run
    from mudenet_core.config import ConfigError
    from mudenet_core.io import CheckpointError

    ckpt = folder / "model.pt"
    try:
        record = read_run(folder) or {}
    except CLIError as e:
        raise ServeError(422, f"model {model_id}: {e}") from None
    data = record.get("data_config") or {}
    if runtime == "onnx":
        onnx_file = folder / "model.onnx"
        if not onnx_file.is_file():
            raise ServeError(
                422,
                f"model {model_id} has no model.onnx: export it first (mudenet_core.export), "
                "or serve it with --runtime torch",
            )
        try:
            from mudenet_core.export import load_onnx_model
        except ImportError as e:
            raise ServeError(422, f"runtime onnx is not available here ({type(e).__name__}: {e})") from None
        try:
            predictor = load_onnx_model(folder)
        except Exception as e:
            raise ServeError(
                422, f"model {model_id}: model.onnx cannot be loaded ({type(e).__name__})"
            ) from None
        method = str(record.get("method", ""))
        size = int((record.get("method_config") or {}).get("image_size") or data.get("image_size") or 256)
        config_hash = str(record.get("config_hash", ""))
    elif runtime == "torch":
        _check_weights_only(ckpt)
        try:
            _, _, method, predictor = load_detector(
                SimpleNamespace(checkpoint=ckpt, method=None), torch.device(device)
            )
        except (CLIError, CheckpointError, ConfigError, FileNotFoundError, KeyError, ValueError) as e:
            msg = " ".join(str(e).split())[:300]
            raise ServeError(422, f"model {model_id} cannot be loaded: {msg}") from None
        size = int(getattr(predictor.config, "image_size", None) or data.get("image_size") or 256)
        config_hash = predictor.config.config_hash()
    else:
        raise ServeError(400, f"unknown runtime {runtime!r}; choose torch or onnx")
    rec, why = harness.load_calibration(folder, ckpt)
    if rec is not None:
        cfg = rec.get("config") or {}
        threshold = float(rec["threshold"])
        source = (
            f"validation calibration (threshold.json: {cfg.get('mode', '?')}, q={cfg.get('quantile', '?')},"
            f" {rec.get('n_normal', '?')} normal + {rec.get('n_anomalous', '?')} synthetic images)"
        )
        norm = rec.get("map_normalization") or {}
        vrange = (float(norm["low"]), float(norm["high"])) if {"low", "high"} <= set(norm) else None
    else:
        threshold, source, vrange = None, f"none: {why}", None
    return LoadedModel(
        model_id=model_id,
        method=method,
        folder=folder,
        predictor=predictor,
        image_size=size,
        normalize=bool(data.get("normalize", True)),
        threshold=threshold,
        threshold_source=source,
        map_range=vrange,
        runtime=runtime,
        device=str(device),
        config_hash=config_hash,
    )


# ------------------------------------------------------------------------------------------------ decoding


def _header_mode(data: bytes) -> str | None:
    """The PIL mode an image's header declares (nothing is decoded), or None when PIL cannot tell."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(_io.BytesIO(data)) as im:
                return im.mode
    except Exception:
        return None


def decode_image(data: bytes, filename: str, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Uploaded bytes -> RGB float32 (H, W, 3) in [0, 1], through :func:`mudenet_core.data.images.load_image`.

    CMYK, palette, grayscale, 16-bit and alpha images are converted as ``load_image`` converts them. Raises
    :class:`ServeError`: 400 empty, 413 above ``max_pixels`` (checked from the header, before decoding),
    415 not an image / truncated / undecodable.
    """
    from mudenet_core.data.images import DataError, check_image, load_image

    name = Path(filename or "upload").name or "upload"
    if not data:
        raise ServeError(400, f"{name}: empty file")
    suffix = Path(name).suffix.lower()
    if suffix in (".tif", ".tiff") and _header_mode(data) == "CMYK":
        suffix = ".img"  # load_image reads TIFFs with tifffile, which takes C, M, Y for R, G, B; PIL converts
    with tempfile.TemporaryDirectory(prefix="mudenet_upload_") as tmp:
        path = Path(tmp) / f"upload{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
        path.write_bytes(data)
        try:
            check_image(path, max_pixels=max_pixels)
            image = load_image(path, max_pixels=max_pixels)
        except DataError as e:
            msg = str(e).replace(str(path), name)
            status = 413 if "above the limit" in msg else 415
            raise ServeError(status, msg) from None
        except Exception as e:  # anything PIL/tifffile raise on hostile input: never a 500
            raise ServeError(415, f"{name}: the image cannot be decoded ({type(e).__name__})") from None
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ServeError(415, f"{name}: unsupported image layout {image.shape}")
    return image


def zip_members(
    data: bytes, *, max_member_bytes: int, max_total_bytes: int
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The image files of a zip archive as (name, bytes), and the names skipped (not images, hidden).

    Raises :class:`ServeError` 415 for a broken archive, 413 for a zip bomb: more than
    :data:`MAX_ZIP_MEMBERS` images, a member above ``max_member_bytes`` or a compression ratio above
    :data:`MAX_ZIP_RATIO`, or more than ``max_total_bytes`` uncompressed in all (sizes are checked against the
    header and again while reading, so a lying header does not help).
    """
    try:
        zf = zipfile.ZipFile(_io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ServeError(415, "not a readable zip archive") from None
    out: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    total = 0
    with zf:
        for info in zf.infolist():
            name = info.filename
            base = Path(name).name
            if info.is_dir():
                continue
            if (
                base.startswith(".")
                or name.startswith("__MACOSX")
                or Path(base).suffix.lower() not in IMAGE_SUFFIXES
            ):
                skipped.append(name)
                continue
            if len(out) >= MAX_ZIP_MEMBERS:
                raise ServeError(413, f"zip holds more than {MAX_ZIP_MEMBERS} images")
            if info.file_size > max_member_bytes or (
                info.compress_size > 0
                and info.file_size / info.compress_size > MAX_ZIP_RATIO
                and info.file_size > 1 << 20
            ):
                raise ServeError(
                    413,
                    f"zip member {name}: {info.file_size} bytes uncompressed from "
                    f"{info.compress_size} (a zip bomb?); the limit is {max_member_bytes} bytes",
                )
            try:
                with zf.open(info) as f:
                    blob = f.read(max_member_bytes + 1)
            except Exception as e:  # bad CRC, encrypted, unsupported compression
                raise ServeError(415, f"zip member {name} cannot be read ({type(e).__name__})") from None
            if len(blob) > max_member_bytes:
                raise ServeError(413, f"zip member {name} is above {max_member_bytes} bytes")
            total += len(blob)
            if total > max_total_bytes:
                raise ServeError(413, f"zip holds more than {max_total_bytes} bytes of images uncompressed")
            out.append((name, blob))
    return out, skipped


# ------------------------------------------------------------------------------------------------ scoring


def preprocess(images: list[np.ndarray], model: LoadedModel) -> torch.Tensor:
    """Images (H0, W0, 3) in [0, 1] -> the model's input (B, 3, S, S), as ``mudenet predict`` builds it."""
    from mudenet_core.data.transforms import normalize, resize_image, to_tensor

    x = torch.stack([resize_image(to_tensor(im), model.image_size) for im in images])  # (B, 3, S, S)
    return normalize(x) if model.normalize else x


def predict(
    model: LoadedModel, images: list[np.ndarray], *, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, h, w) float32 and scores (N,) float64 of decoded images, ``batch_size`` per forward pass."""
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i : i + batch_size], model)  # (B, 3, S, S)
        with model.lock, torch.no_grad():
            amap, score = model.predictor.predict(x.to(model.device) if model.runtime == "torch" else x)
        amap = torch.as_tensor(amap)
        assert amap.ndim == 4 and amap.shape[1] == 1, f"expected maps (B,1,H,W), got {tuple(amap.shape)}"
        maps.append(amap[:, 0].float().cpu().numpy())  # (B, h, w)
        scores.append(torch.as_tensor(score).double().cpu().numpy().reshape(-1))  # (B,)
    return np.concatenate(maps), np.concatenate(scores)


def regions(amap: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Connected regions (8-connectivity) of ``amap >= threshold``, largest first.

    Each: ``x0, y0, x1, y1`` (bounding box, half-open, map pixels), ``area`` (pixels) and ``peak`` (largest
    map value inside).

    Example:
        >>> m = np.zeros((5, 6)); m[1:3, 1:3] = 2.0; m[4, 5] = 3.0
        >>> [(r["x0"], r["y0"], r["x1"], r["y1"], r["area"], r["peak"]) for r in regions(m, 1.0)]
        [(1, 1, 3, 3, 4, 2.0), (5, 4, 6, 5, 1, 3.0)]
    """
    from scipy import ndimage

    assert amap.ndim == 2, f"expected a map (h, w), got {amap.shape}"
    labels, n = ndimage.label(amap >= threshold, structure=np.ones((3, 3), bool))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[sl] == i
        out.append(
            {
                "x0": int(sl[1].start),
                "y0": int(sl[0].start),
                "x1": int(sl[1].stop),
                "y1": int(sl[0].stop),
                "area": int(inside.sum()),
                "peak": float(amap[sl][inside].max()),
            }
        )
    return sorted(out, key=lambda r: (-r["area"], r["y0"], r["x0"]))


def quantise(amap: np.ndarray) -> dict[str, Any]:
    """The map as uint8 (base64, row-major) with its range: ``value = min + q / 255 * (max - min)``.

    Example:
        >>> q = quantise(np.array([[0.0, 1.0], [2.0, 4.0]], np.float32))
        >>> q["shape"], q["min"], q["max"], list(base64.b64decode(q["data"]))
        ([2, 2], 0.0, 4.0, [0, 64, 128, 255])
    """
    lo, hi = float(amap.min()), float(amap.max())
    scale = (hi - lo) if hi > lo else 1.0
    q = np.clip(np.round((amap - lo) / scale * 255.0), 0, 255).astype(np.uint8)
    return {
        "encoding": "uint8",
        "shape": [int(s) for s in amap.shape],
        "min": lo,
        "max": hi,
        "data": base64.b64encode(q.tobytes()).decode("ascii"),
    }


def png_base64(rgb: np.ndarray) -> str:
    """An RGB array (H, W, 3) in [0, 1] as a base64 PNG."""
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def display_image(image: np.ndarray) -> np.ndarray:
    """The decoded image shrunk to at most :data:`DISPLAY_MAX_SIDE` on its longer side, (h, w, 3)."""
    h, w = image.shape[:2]
    f = max(h, w) / DISPLAY_MAX_SIDE
    if f <= 1:
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    y = torch.nn.functional.interpolate(
        t,
        size=(max(1, round(h / f)), max(1, round(w / f))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return y[0].permute(1, 2, 0).clamp(0, 1).numpy()


def describe(
    model: LoadedModel,
    image: np.ndarray,
    amap: np.ndarray,
    score: float,
    *,
    filename: str,
    threshold: float | None,
    threshold_source: str,
    include_images: bool = True,
) -> dict[str, Any]:
    """The JSON answer for one image (see ``/api/test_image`` in :mod:`mudenet_core.serve.app`)."""
    from mudenet_core import viz

    out: dict[str, Any] = {
        "filename": filename,
        "model_id": model.model_id,
        "method": model.method,
        "score": float(score),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "image_size": [int(image.shape[0]), int(image.shape[1])],
        "map_size": [int(amap.shape[0]), int(amap.shape[1])],
    }
    if threshold is not None:
        out["is_anomalous"] = bool(score >= threshold)
        out["decision"] = "anomalous" if score >= threshold else "normal"
        out["regions"] = regions(amap, threshold)
    else:
        out.update(is_anomalous=None, decision="unknown (no threshold)", regions=[])
    if include_images:
        vmin, vmax = model.map_range or (float(amap.min()), float(amap.max()))
        out["map_range"] = [vmin, vmax]
        out["anomaly_map_png"] = png_base64(viz.colorize(amap, vmin, vmax))
        out["image_png"] = png_base64(display_image(image))
        out["map"] = quantise(amap)
    return out
