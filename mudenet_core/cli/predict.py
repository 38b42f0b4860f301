"""``mudenet predict``: anomaly maps and decisions for new, unlabelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mudenet_core.cli.common import CLIError, load_detector, output_dir, resolve_device_arg, say
from mudenet_core.io import atomic_path, git_sha, save_csv, save_json


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


def _known_threshold(args, detector, ckpt: Path) -> tuple[float | None, str]:
    """The score threshold for ``is_anomalous`` and where it came from (never the test split)."""
    from mudenet_core.harness import THRESHOLD_FILE, load_threshold

    if args.threshold is not None:
        return float(args.threshold), "--threshold"
    rec = load_threshold(ckpt.parent)
    if rec is not None:
        return float(rec["threshold"]), f"{ckpt.parent / THRESHOLD_FILE} (chosen on the validation set)"
    return None, f"none known: no {THRESHOLD_FILE} beside the model (retrain, or pass --threshold)"


def _save_npy(arr: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return path


def _save_rgb(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return path


def cmd_predict(args, overrides: list[str]) -> int:
    """``mudenet predict``: maps (heat-map PNG, overlay PNG, .npy) and predictions.csv of new images."""
    device = resolve_device_arg(args.device)
    if overrides:
        raise CLIError(f"predict takes no key=value overrides, got {list(overrides)}")
    files = _list_inputs(args.input)
    ckpt, run, method, detector = load_detector(args, device)
    out = output_dir(args, ckpt.parent / "predict")
    from mudenet_core import viz
    from mudenet_core.data.images import load_image
    from mudenet_core.data.transforms import normalize, resize_image, to_tensor
    from mudenet_core.utils import progress

    data = (run or {}).get("data_config") or {}
    size = int(getattr(detector.config, "image_size", None) or data.get("image_size") or 256)
    threshold, t_source = _known_threshold(args, detector, ckpt)
    say(f"predict: {len(files)} image(s) with {method} from {ckpt} at {size} px; threshold: "
         + (f"{threshold:.6g} ({t_source})" if threshold is not None else t_source))
    root = args.input if args.input.is_dir() else args.input.parent
    names = ["__".join(f.relative_to(root).with_suffix("").parts) for f in files]
    maps: list[np.ndarray] = []
    shown: list[torch.Tensor] = []
    scores: list[float] = []
    for s in progress(range(0, len(files), args.batch_size), desc="predict", enabled=not args.no_progress):
        batch = [resize_image(to_tensor(load_image(f)), size) for f in files[s:s + args.batch_size]]
        x = torch.stack(batch)  # (B, 3, H, W) in [0, 1]
        x = normalize(x) if data.get("normalize", True) else x
        with torch.no_grad():
            amap, score = detector.predict(x.to(device))  # (B, 1, H, W), (B,)
        assert amap.ndim == 4 and amap.shape[1] == 1, f"expected maps (B,1,H,W), got {tuple(amap.shape)}"
        maps.extend(amap[:, 0].float().cpu().numpy())
        scores.extend(score.double().cpu().tolist())
        shown.extend(batch)
    vmin, vmax = viz.map_range(np.stack(maps))
    for name, m, img in zip(names, maps, shown, strict=True):
        _save_npy(m.astype(np.float32), out / "maps" / f"{name}.npy")  # (H, W)
        viz.save_heatmap_png(m, out / "heatmaps" / f"{name}.png", vmin=vmin, vmax=vmax)
        _save_rgb(viz.overlay(img, m, vmin=vmin, vmax=vmax), out / "overlays" / f"{name}.png")
    df = pd.DataFrame({"image_path": [str(f) for f in files], "score": scores})
    if threshold is not None:
        df["is_anomalous"] = df["score"] >= threshold
    save_csv(out / "predictions.csv", df)
    save_json(out / "predict_info.json", {
        "method": method, "checkpoint": str(ckpt), "input": str(args.input), "n_images": len(files),
        "image_size": size, "threshold": threshold, "threshold_source": t_source,
        "heatmap_range": [vmin, vmax],
        "map_files": {n: f"maps/{n}.npy" for n in names}, "git_sha": git_sha()})
    flagged = f" ({int(df['is_anomalous'].sum())} of {len(df)} anomalous)" if threshold is not None else ""
    say(f"predict: wrote {out / 'predictions.csv'}{flagged}")
    return 0


