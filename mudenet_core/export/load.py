"""Loading exported models behind the detector interface, and the parity check against the torch graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mudenet_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mudenet_core.export.graph import (
    DEFAULT_FILES,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    TORCHSCRIPT_EXTRA,
    ExportError,
    ExportGraph,
)
from mudenet_core.export.write import quiet_export, sidecar_path
from mudenet_core.io import CheckpointError, file_sha256, load_json


# ------------------------------------------------------------------------------------------------------------
# Loading exported models
# ------------------------------------------------------------------------------------------------------------
class ExportedDetector:
    """An exported model behind the detector interface (``predict``) plus a raw-RGB entry point.

    Attributes:
        path: the model file.
        record: its metadata (the sidecar's content).
        threshold: the decision threshold in calibrated units (None when the run had none).
        threshold_raw: the same threshold in the detector's units (``threshold.json``'s).
    """

    def __init__(self, path: Path, record: dict):
        self.path, self.record = Path(path), record
        self.method = record["method"]
        self.image_size = int(record["image_size"])
        self.input_size = tuple(int(v) for v in record["input_size"])
        self.imagenet_normalize = bool(record["imagenet_normalize"])
        self.low = float(record["map_normalization"]["low"])
        self.high = float(record["map_normalization"]["high"])
        self.threshold = record.get("threshold")
        self.threshold_raw = record.get("threshold_raw")

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _as_rgb(self, images) -> np.ndarray:
        """uint8 (B, H0, W0, 3) or float (B, 3, H0, W0) in [0, 1] -> contiguous float32 (B, 3, H0, W0)."""
        a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        h0, w0 = self.input_size
        if a.dtype == np.uint8:
            if a.ndim != 4 or a.shape[1:] != (h0, w0, 3):
                raise ValueError(f"{self.path}: uint8 images must be (B, {h0}, {w0}, 3), got {a.shape}")
            a = a.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (B, H0, W0, 3) -> (B, 3, H0, W0)
        elif np.issubdtype(a.dtype, np.floating):
            if a.ndim != 4 or a.shape[1:] != (3, h0, w0):
                raise ValueError(f"{self.path}: float images must be (B, 3, {h0}, {w0}) in [0, 1], got "
                                 f"{a.shape} (export with --input-size for another size)")
            if a.size and (float(a.min()) < -1e-3 or float(a.max()) > 1 + 1e-3):
                raise ValueError(f"{self.path}: float images must lie in [0, 1], got [{a.min():.4g}, "
                                 f"{a.max():.4g}] (pass uint8, or divide by 255; predict() takes normalised "
                                 "images)")
        else:
            raise ValueError(f"{self.path}: images must be uint8 or float, got {a.dtype}")
        return np.ascontiguousarray(a, dtype=np.float32)

    def predict_rgb(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Raw RGB -> calibrated maps (B, 1, H0, W0) and scores (B,), float32 (see the module docstring).

        Args:
            images: uint8 (B, H0, W0, 3) or float (B, 3, H0, W0) in [0, 1], at the exported input size.
        """
        return self._run(self._as_rgb(images))

    def is_anomalous(self, scores) -> np.ndarray:
        """Decisions (B,) bool: calibrated ``score >= threshold``."""
        if self.threshold is None:
            raise ExportError(f"{self.path}: exported without a threshold")
        return np.asarray(scores, dtype=np.float64) >= float(self.threshold)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detector interface: images (B, 3, S, S), fed as the harness does -> maps (B, 1, S, S), scores (B,).

        The images are ImageNet-normalised (when the run's data config normalises); maps and scores come back
        in the detector's own units (the calibration undone), so ``threshold.json`` applies as it does to the
        torch detector.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        s = self.image_size
        if self.input_size != (s, s) or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"{self.path}: predict() takes (B, 3, {s}, {s}) model-size images, and the "
                             f"export must take them too (its input is {self.input_size}); use predict_rgb "
                             "or export with the default --input-size")
        x = images.detach().float().cpu()
        if self.imagenet_normalize:
            x = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        maps, scores = self._run(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        span = self.high - self.low
        return (torch.from_numpy(maps * span + self.low).float().to(images.device),
                torch.from_numpy(scores * span + self.low).float().to(images.device))


class OnnxDetector(ExportedDetector):
    """An ONNX export run with onnxruntime (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: Path, record: dict, *, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(path, record)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: rgb})
        return maps, scores


class TorchScriptDetector(ExportedDetector):
    """A TorchScript export run with ``torch.jit.load``."""

    def __init__(self, path: Path, record: dict, module: torch.jit.ScriptModule):
        super().__init__(path, record)
        self.module = module.eval()

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            maps, scores = self.module(torch.from_numpy(rgb))
        return maps.numpy(), scores.numpy()


def _find(folder_or_file: str | Path, fmt: str) -> Path:
    """The model file: the path itself, ``<folder>/<default file>`` or ``<folder>/export/<default file>``."""
    p = Path(folder_or_file)
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / DEFAULT_FILES[fmt], p / "export" / DEFAULT_FILES[fmt]):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"no {DEFAULT_FILES[fmt]} in {p} or {p / 'export'} (run `mudenet export "
                                f"--checkpoint {p} --format {fmt}`)")
    raise FileNotFoundError(f"exported model not found: {p}")


def _check_fresh(folder_or_file: str | Path, path: Path, rec: dict) -> None:
    """Refuse an export found in a run folder whose ``model.pt`` is not the one it was exported from."""
    folder = Path(folder_or_file)
    model = folder / "model.pt"
    if not (folder.is_dir() and model.is_file() and rec.get("checkpoint_sha256")):
        return
    actual = file_sha256(model)
    if actual != rec["checkpoint_sha256"]:
        raise ExportError(f"{path} is stale: exported from a model.pt with sha256 "
                          f"{rec['checkpoint_sha256'][:12]}, {model} has {actual[:12]} (trained again "
                          "since); export it again")


def _record_of(path: Path, embedded: str | None) -> dict:
    """The export record: embedded in the model file, else its sidecar; an ExportError naming the file."""
    try:
        rec = json.loads(embedded) if embedded else None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: its embedded export record is not valid JSON ({e})") from None
    if rec is None:
        side = sidecar_path(path)
        if not side.is_file():
            raise ExportError(f"{path}: no export record (metadata {METADATA_KEY!r}) and no sidecar "
                              f"{side.name}")
        rec = load_json(side)
    missing = sorted({"method", "image_size", "input_size", "map_normalization", "imagenet_normalize"}
                     - set(rec if isinstance(rec, dict) else {}))
    if missing:
        raise ExportError(f"{path}: export record lacks {missing}")
    return rec


def load_onnx_model(folder_or_file: str | Path, *, threads: int | None = None,
                    providers: list[str] | None = None) -> OnnxDetector:
    """An ONNX export (a file, or a run/export folder holding ``model.onnx``) ready to ``predict``.

    A folder holding ``model.pt`` must hold the model the export was made from (its SHA-256 is recorded at
    export time): an export left beside a model trained again since is refused.

    Args:
        folder_or_file: ``model.onnx``, its folder, or the run folder (``<run>/export/model.onnx``).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        providers: onnxruntime execution providers (default: CPU).
    """
    import onnx

    path = _find(folder_or_file, "onnx")
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # protobuf DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    rec = _record_of(path, meta.get(METADATA_KEY))
    _check_fresh(folder_or_file, path, rec)
    return OnnxDetector(path, rec, threads=threads, providers=providers)


def load_torchscript_model(folder_or_file: str | Path) -> TorchScriptDetector:
    """A TorchScript export (a file, or a run/export folder holding ``model.torchscript.pt``)."""
    path = _find(folder_or_file, "torchscript")
    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        with quiet_export():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise ExportError(f"{path}: not a readable TorchScript file ({type(e).__name__}: {e})") from None
    rec = _record_of(path, extra[TORCHSCRIPT_EXTRA] or None)
    _check_fresh(folder_or_file, path, rec)
    return TorchScriptDetector(path, rec, module)


def load_run_calibration(checkpoint: str | Path) -> dict:
    """The calibration record of a checkpoint (``threshold.json`` beside it, for this very file).

    Raises:
        CheckpointError: no record, a stale one (another model's hash), or one without ``map_normalization``,
            naming the file and why.
    """
    from mudenet_core.harness import THRESHOLD_FILE, load_calibration

    ckpt = Path(checkpoint)
    rec, why = load_calibration(ckpt.parent, ckpt)
    if rec is None:
        raise CheckpointError(f"{ckpt}: cannot export without its calibration ({why}); `mudenet train` "
                              f"writes {THRESHOLD_FILE} beside model.pt")
    if not (rec.get("map_normalization") or {}).keys() >= {"low", "high"}:
        raise CheckpointError(f"{ckpt.parent / THRESHOLD_FILE}: no map_normalization (written by an older "
                              "version); retrain to calibrate the map range")
    return rec


def parity(graph: ExportGraph, exported: ExportedDetector, rgb: torch.Tensor, *, rtol: float = 1e-3,
           atol: float = 1e-5) -> dict[str, float]:
    """Largest differences between the torch graph and an exported model on images (B, 3, H0, W0) in [0, 1].

    Returns:
        max_abs_map, max_rel_map (relative to max(|torch map|, 1e-6)), max_abs_score, maps_allclose (1.0 when
        every map value is within ``atol + rtol * |torch|``, else 0.0), decisions_differ (images whose
        decision differs, counted only where the score is 1e-4 or more from the threshold).
    """
    with torch.no_grad():
        ref_map, ref_score = graph(rgb.float())
    got_map, got_score = exported.predict_rgb(rgb.float())
    ref_map, ref_score = ref_map.numpy().astype(np.float64), ref_score.numpy().astype(np.float64)
    d = np.abs(got_map - ref_map)
    out = {"max_abs_map": float(d.max()), "max_rel_map": float((d / np.maximum(np.abs(ref_map), 1e-6)).max()),
           "max_abs_score": float(np.abs(got_score - ref_score).max()),
           "maps_allclose": float(np.allclose(got_map, ref_map, rtol=rtol, atol=atol)),
           "decisions_differ": 0.0}
    if exported.threshold is not None:
        clear = np.abs(ref_score - exported.threshold) >= 1e-4
        out["decisions_differ"] = float(((ref_score >= exported.threshold)
                                         != exported.is_anomalous(got_score))[clear].sum())
    return out

