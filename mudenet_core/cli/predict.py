"""``mudenet predict``: anomaly maps and decisions for new, unlabelled images.

Outputs, under the output folder, for every input image at its path ``<rel>`` relative to ``--input`` (the
folder, or the file's own folder), extension kept: ``maps/<rel>.npy`` (float32, (H0, W0)),
``heatmaps/<rel>.png`` and ``overlays/<rel>.png``, e.g. ``x/b.png`` -> ``heatmaps/x/b.png.png`` and
``x__b.png`` -> ``heatmaps/x__b.png.png``. The input tree is mirrored, so names are one-to-one by
construction; only names equal but for letter case (which a case-insensitive disk would merge) get a suffix
``~<first 8 hex of sha256(rel)>``. Maps are resized (bilinear) from the model's size back to each input's own
size (H0, W0), and overlays are drawn on the original image. ``predictions.csv`` lists every input's path,
score, decision, size and output files.

Heat maps use the fixed range recorded at calibration time (``map_normalization`` in ``threshold.json``), so
an image's heat map does not depend on the other images of the call; without a record for this model they
fall back, with a warning, to the range of the call's own maps.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mudenet_core.cli.common import CLIError, load_detector, output_dir, resolve_device_arg, say
from mudenet_core.io import atomic_path, git_sha, save_csv, save_json, save_npy

OUTPUT_KINDS = {"map_file": ("maps", ".npy"), "heatmap_file": ("heatmaps", ".png"),
                "overlay_file": ("overlays", ".png")}


def _list_inputs(path: Path) -> list[Path]:
    from mudenet_core.data.images import IMAGE_EXTENSIONS

    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise CLIError(f"--input {path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not path.exists():
        raise CLIError(f"--input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise CLIError(f"--input {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in that folder")
    return files


def output_names(files: list[Path], root: Path) -> list[str]:
    """One output name per input: its POSIX path relative to ``root``, extension kept; unique, deterministic.

    Names that differ only in letter case get ``~`` and the first 8 hex digits of the SHA-256 of the name.

    Example:
        >>> output_names([Path("r/a.png"), Path("r/a.jpg"), Path("r/x/b.png"), Path("r/x__b.png")], Path("r"))
        ['a.png', 'a.jpg', 'x/b.png', 'x__b.png']
        >>> output_names([Path("r/A.png"), Path("r/a.png")], Path("r"))
        ['A.png~28e6ae4e', 'a.png~7f071235']
    """
    names = [f.relative_to(root).as_posix() for f in files]
    folded = Counter(n.casefold() for n in names)
    out = [n if folded[n.casefold()] == 1 else f"{n}~{hashlib.sha256(n.encode()).hexdigest()[:8]}"
           for n in names]
    assert len({n.casefold() for n in out}) == len(out), "output names must be unique"
    return out


def _calibration(args, ckpt: Path) -> tuple[float | None, str, tuple[float, float] | None, str]:
    """(threshold, its source, fixed heat-map range or None, why there is none) for this model.

    The threshold and range come from ``threshold.json`` only when it names this model file's SHA-256
    (never the test split); ``--threshold`` overrides the threshold.
    """
    from mudenet_core.harness import THRESHOLD_FILE, load_calibration

    rec, why = load_calibration(ckpt.parent, ckpt)
    norm = (rec or {}).get("map_normalization") or {}
    vrange = (float(norm["low"]), float(norm["high"])) if {"low", "high"} <= set(norm) else None
    if rec is not None and vrange is None:
        why = f"{ckpt.parent / THRESHOLD_FILE} has no map_normalization"
    if args.threshold is not None:
        threshold, t_source = float(args.threshold), "--threshold"
    elif rec is not None:
        threshold, t_source = float(rec["threshold"]), f"{ckpt.parent / THRESHOLD_FILE} (chosen on val)"
    else:
        threshold, t_source = None, f"none known: {why} (retrain, or pass --threshold)"
    return threshold, t_source, vrange, why


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()


@contextlib.contextmanager
def _writing(out: Path):
    """Turn an OSError while writing outputs into a one-line CLIError naming the folder."""
    try:
        yield
    except OSError as e:
        folder = Path(e.filename).parent if isinstance(e.filename, str) and e.filename else out
        raise CLIError(f"cannot write to {folder}: {_reason(e)} (choose another --output-dir)") from None


def _read(path: Path) -> np.ndarray:
    """The image (H0, W0, 3) in [0, 1]; unreadable files are a one-line CLIError (undecodable: DataError)."""
    from mudenet_core.data.images import load_image

    try:
        return load_image(path)
    except OSError as e:
        raise CLIError(f"cannot read {path}: {_reason(e)}") from None


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map (h, w) to ``size`` = (H0, W0), float32 (antialiased when shrinking).

    Example:
        >>> resize_map(np.zeros((4, 4), np.float32), (6, 10)).shape
        (6, 10)
    """
    assert amap.ndim == 2, f"expected a map (h, w), got {amap.shape}"
    if tuple(amap.shape) == tuple(size):
        return amap.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]  # (1, 1, h, w)
    y = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return y[0, 0].numpy()  # (H0, W0)


def _save_rgb(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return path


def _write_maps(out: Path, files: dict[str, str], image: np.ndarray, amap: np.ndarray,
                vrange: tuple[float, float]) -> None:
    """Write one input's map at its own size (H0, W0): .npy, heat-map PNG, overlay on the original image."""
    from mudenet_core import viz

    h0, w0 = image.shape[:2]
    m = resize_map(amap, (h0, w0))  # (h, w) -> (H0, W0)
    vmin, vmax = vrange
    save_npy(out / files["map_file"], m)
    viz.save_heatmap_png(m, out / files["heatmap_file"], vmin=vmin, vmax=vmax)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (H0, W0, 3) -> (3, H0, W0)
    _save_rgb(viz.overlay(img, m, vmin=vmin, vmax=vmax), out / files["overlay_file"])


def cmd_predict(args, overrides: list[str]) -> int:
    """``mudenet predict``: maps (heat-map PNG, overlay PNG, .npy) and predictions.csv of new images."""
    device = resolve_device_arg(args.device)
    if overrides:
        raise CLIError(f"predict takes no key=value overrides, got {list(overrides)}")
    files = _list_inputs(args.input)
    ckpt, run, method, detector = load_detector(args, device)
    default_out = ckpt.parent / "predict"
    with _writing(args.output_dir if args.output_dir is not None else default_out):
        out = output_dir(args, default_out)
    from mudenet_core import harness, viz
    from mudenet_core.data.transforms import normalize, resize_image, to_tensor
    from mudenet_core.utils import progress

    data = (run or {}).get("data_config") or {}
    size = int(getattr(detector.config, "image_size", None) or data.get("image_size") or 256)
    threshold, t_source, vrange, why = _calibration(args, ckpt)
    say(f"predict: {len(files)} image(s) with {method} from {ckpt} at {size} px; threshold: "
         + (f"{threshold:.6g} ({t_source})" if threshold is not None else t_source))
    if vrange is None:
        say(f"predict: warning: no heat-map range for this model ({why}); heat maps are scaled to this "
            "call's maps, so they change with the other images given")
    root = args.input if args.input.is_dir() else args.input.parent
    names = output_names(files, root)
    outputs = [{k: f"{d}/{n}{ext}" for k, (d, ext) in OUTPUT_KINDS.items()} for n in names]
    scores: list[float] = []
    sizes: list[tuple[int, int]] = []
    pending: list[np.ndarray] = []  # model-size maps (h, w), kept only without a fixed range
    # --batch-size images per forward pass (default 1): batched convolutions can change a map in its last
    # float bits with the other images of the batch, so with 1 an input's outputs depend on it alone
    todo = list(zip(files, outputs, strict=True))
    chunks = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    for chunk in progress(chunks, desc="predict", enabled=not args.no_progress):
        images = [_read(f) for f, _ in chunk]  # (H0, W0, 3) each
        x = torch.stack([resize_image(to_tensor(im), size) for im in images])  # (B, 3, H, W) in [0, 1]
        x = normalize(x) if data.get("normalize", True) else x
        with torch.no_grad():
            amap, score = detector.predict(x.to(device))  # (B, 1, H, W), (B,)
        assert amap.ndim == 4 and amap.shape[:2] == (len(chunk), 1), f"expected (B,1,H,W), got {amap.shape}"
        for (_, o), image, m, sc in zip(chunk, images, amap[:, 0].float().cpu().numpy(),
                                        score.double().cpu().tolist(), strict=True):
            scores.append(float(sc))
            sizes.append(image.shape[:2])
            if vrange is None:
                pending.append(m)  # (H, W)
                continue
            with _writing(out):
                _write_maps(out, o, image, m, vrange)
    if vrange is None:  # per-call range (old records): second pass, re-reading the images
        vrange = viz.map_range(np.stack(pending))
        r_source = "this call's maps (viz.map_range: minimum, 0.999 quantile)"
        with _writing(out):
            for f, o, m in zip(files, outputs, pending, strict=True):
                _write_maps(out, o, _read(f), m, vrange)
    else:
        r_source = f"{ckpt.parent / harness.THRESHOLD_FILE} map_normalization (validation maps)"
    df = pd.DataFrame({"image_path": [str(f) for f in files], "score": scores})
    if threshold is not None:
        df["is_anomalous"] = df["score"] >= threshold
    df["height"] = [h for h, _ in sizes]
    df["width"] = [w for _, w in sizes]
    for k in OUTPUT_KINDS:
        df[k] = [o[k] for o in outputs]
    with _writing(out):
        save_csv(out / "predictions.csv", df)
        save_json(out / "predict_info.json", {
            "method": method, "checkpoint": str(ckpt), "input": str(args.input), "n_images": len(files),
            "image_size": size, "threshold": threshold, "threshold_source": t_source,
            "heatmap_range": [float(vrange[0]), float(vrange[1])], "heatmap_range_source": r_source,
            "map_files": {str(f): o["map_file"] for f, o in zip(files, outputs, strict=True)},
            "git_sha": git_sha()})
    flagged = f" ({int(df['is_anomalous'].sum())} of {len(df)} anomalous)" if threshold is not None else ""
    say(f"predict: wrote {out / 'predictions.csv'}{flagged}")
    return 0
