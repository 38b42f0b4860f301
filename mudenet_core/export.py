"""Export a trained detector to ONNX or TorchScript: raw RGB in, calibrated anomaly map and score out.

The exported graph (:class:`ExportGraph`) holds everything between a decoded image and a decision:

1. input ``rgb``: float32 (B, 3, H0, W0) in [0, 1] at a fixed input size (H0, W0) (default: the model's
   size S x S), with a dynamic batch axis B. This is what :func:`mudenet_core.data.images.load_image` gives
   (transposed), 16-bit images included, so nothing is lost to a uint8 round trip; :meth:`ExportedDetector.
   predict_rgb` also takes uint8 (B, H0, W0, 3) and converts it;
2. resize to (S, S), bilinear with antialiasing and clamped to [0, 1], as the data pipeline does
   (:func:`mudenet_core.data.transforms.resize_image`), then ImageNet normalisation (when the run's data
   config normalises, the default);
3. the method's own scoring path (:data:`SCORERS`; MuDeNet, PatchCore with its k-NN against the memory bank
   as a matmul + top-k, PaDiM, the autoencoder) giving the map (B, 1, S, S) and the image score (B,);
4. the map resized back to (H0, W0) (bilinear, antialiased when shrinking: ``mudenet predict``'s
   :func:`~mudenet_core.cli.predict.resize_map`);
5. the calibrated normalisation of ``threshold.json`` (``map_normalization``, fixed on validation data):
   ``(v - low) / (high - low)`` for the map and the score alike, so 0 is the background of the normal
   validation images and 1 the top of the validation maps. Values are not clipped.

Outputs: ``anomaly_map`` (B, 1, H0, W0) and ``score`` (B,), both calibrated; an image is anomalous when
``score >= threshold``, the validation threshold mapped the same way, stored in the ONNX ``metadata_props``
(in TorchScript: the extra file ``export.json``) and in a sidecar JSON ``<file>.json`` with the raw threshold,
``low``, ``high``, sizes and provenance.

Both resizes are constant matrix products built from ``torch.nn.functional.interpolate`` itself
(:func:`resize_matrix`), so every runtime reproduces torch's antialiased resize to float rounding, with no
reliance on a runtime's own resize kernels.

Exporters (torch 2.14): ``torch.onnx.export(..., dynamo=True)`` (onnxscript) is tried first and works for all
four methods; the TorchScript-based ``dynamo=False`` path (``exporter="legacy"``) is the fallback of
``exporter="auto"``, and fails on PatchCore (``adaptive_avg_pool1d`` with a dynamic batch). TorchScript
files come from ``torch.jit.trace`` (the batch axis stays dynamic; the sizes are fixed); torch 2.14 marks
``torch.jit`` deprecated (a FutureWarning, silenced here), so ONNX is the format to deploy.

Loading: :func:`load_onnx_model` / :func:`load_torchscript_model` give an :class:`ExportedDetector` with
``predict_rgb`` (raw RGB -> calibrated outputs) and ``predict``, the detector interface of
:mod:`mudenet_core.methods` (normalised model-size images -> maps and scores in the detector's own units),
so the harness and the service use an export like the torch detector.

Example:
    >>> m = resize_matrix(4, 2)  # (n_in, n_out): halving, a tent filter of half-width 2 input pixels
    >>> (m.T * 7).round().tolist()
    [[3.0, 3.0, 1.0, 0.0], [0.0, 1.0, 3.0, 3.0]]
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mudenet_core import __version__
from mudenet_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mudenet_core.io import CheckpointError, atomic_path, file_sha256, git_sha, load_json, save_json
from mudenet_core.methods import METHODS

EXPORT_FORMAT_VERSION = 1  # of the sidecar JSON / metadata
FORMATS = ("onnx", "torchscript")
DEFAULT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME = "rgb"
OUTPUT_NAMES = ("anomaly_map", "score")
ONNX_OPSET = 18
METADATA_KEY = "mudenet_export"  # ONNX metadata_props key of the JSON record (the sidecar adds file hashes)
TORCHSCRIPT_EXTRA = "export.json"  # the record inside a TorchScript file
Exporter = Literal["auto", "dynamo", "legacy"]  # legacy: the TorchScript-based dynamo=False


class ExportError(RuntimeError):
    """A detector or file that cannot be exported or loaded as an exported model."""


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The 1-D weights (n_in, n_out) of torch's antialiased bilinear resize from ``n_in`` to ``n_out`` pixels.

    Built by resizing the identity with ``F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)`` in float64, so ``(Mh.T @ x) @ Mw`` equals that resize of x (B, C, H0, W0) to
    (B, C, H, W) up to float rounding (torch's antialiased kernel is separable). Upsampling gives plain
    bilinear weights.
    """
    eye = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, 1, n_in)  # n_in one-hot rows of width n_in
    out = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False, antialias=True)
    return out[0, :, 0, :].float()  # (n_in, n_out)


class Resize(nn.Module):
    """Antialiased bilinear resize (B, C, H0, W0) -> (B, C, H, W): two constant matmuls, or the identity."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int], clamp: bool = False):
        super().__init__()
        self.size_in, self.size_out = tuple(size_in), tuple(size_out)
        self.identity = self.size_in == self.size_out
        self.clamp = clamp
        rows = resize_matrix(self.size_in[0], self.size_out[0]).T.contiguous()  # (H, H0)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", resize_matrix(self.size_in[1], self.size_out[1]))  # (W0, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H0, W0) -> (B, C, H, W)."""
        if self.identity:
            return x
        y = torch.matmul(torch.matmul(self.rows, x), self.cols)  # (H, H0) @ (B,C,H0,W0) @ (W0, W)
        return y.clamp(0.0, 1.0) if self.clamp else y


# ------------------------------------------------------------------------------------------------------------
# The methods' scoring paths: normalised model-size images (B, 3, S, S) -> map (B, 1, S, S), score (B,)
# ------------------------------------------------------------------------------------------------------------
class MuDeNetScorer(nn.Module):
    """MuDeNet: T, S1, A, S2, per-level normalisation, fusion, blur, max (as ``MuDeNet.predict``)."""

    def __init__(self, detector):
        super().__init__()
        self.nets = detector.nets
        self.scoring_config = detector.config.scoring

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (B, 1, S, S), (B,)."""
        from mudenet_core import scoring

        raw = scoring.raw_maps(*self.nets(x))  # (B, 2, L, h, w)
        amap = scoring.anomaly_map(raw, self.nets.map_stats, self.scoring_config, tuple(x.shape[-2:]))
        return amap, scoring.image_scores(amap)


class AEScorer(nn.Module):
    """Autoencoder: blurred squared reconstruction error in pixel space; max or mean (``predict``)."""

    def __init__(self, detector):
        super().__init__()
        self.autoencoder = detector.autoencoder
        self.sigma = float(detector.config.map_sigma)
        self.reduction = detector.config.score_reduction

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (B, 1, S, S), (B,)."""
        from mudenet_core.baselines.ae import reconstruction_error_map

        amap = reconstruction_error_map(x, self.autoencoder(x), self.sigma)  # (B, 1, S, S)
        flat = amap.flatten(1)  # (B, S*S)
        return amap, (flat.amax(1) if self.reduction == "max" else flat.mean(1))


class PaDiMScorer(nn.Module):
    """PaDiM: per-position Mahalanobis distance, upsampled and blurred; max (``PaDiM.predict``)."""

    def __init__(self, detector):
        super().__init__()
        self.model = detector.model
        self.grid = tuple(int(v) for v in self.model.grid)  # (h, w), fixed at fit time
        self.sigma = float(detector.config.blur_sigma)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (B, 1, S, S), (B,)."""
        from mudenet_core.baselines.common import upsample_and_blur
        from mudenet_core.baselines.padim import mahalanobis

        emb = self.model.embed(x)  # (B, h, w, d)
        b, h, w, d = emb.shape
        assert (h, w) == self.grid, f"feature grid {(h, w)} differs from the fitted {self.grid}"
        dist = mahalanobis(emb.reshape(b, h * w, d).float(), self.model.mean, self.model.inv_cov)  # (B, h*w)
        amap = upsample_and_blur(dist.reshape(b, 1, h, w), tuple(x.shape[-2:]), self.sigma)  # (B, 1, S, S)
        return amap, amap.flatten(1).amax(1)


class PatchCoreScorer(nn.Module):
    """PatchCore: nearest memory-bank distance per patch (matmul + top-k) and the reweighted image score.

    The same arithmetic as ``PatchCore.predict`` with the torch search (``nearest_neighbors``): squared
    distances ``|q|^2 - 2 q.m + |m|^2`` pick the neighbours, and the distances returned are recomputed from
    the differences. All (B*h*w, M) distances are one block, so memory grows with batch x bank size.
    """

    def __init__(self, detector):
        super().__init__()
        self.model = detector.model
        bank = self.model.memory_bank
        if bank.shape[0] == 0:
            raise ExportError("PatchCore is not fitted (empty memory bank)")
        self.register_buffer("bank_sq", (bank * bank).sum(1))  # (M,)
        self.b = min(int(detector.config.reweight_neighbors), bank.shape[0])
        self.sigma = float(detector.config.blur_sigma)

    def _sq_dist(self, q: torch.Tensor) -> torch.Tensor:
        bank = self.model.memory_bank
        return (q * q).sum(1, keepdim=True) - 2 * q @ bank.T + self.bank_sq  # (Q, D) -> (Q, M)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (B, 1, S, S), (B,)."""
        from mudenet_core.baselines.common import upsample_and_blur

        bank = self.model.memory_bank  # (M, D)
        f = self.model(x)  # (B, h, w, D)
        b, h, w, d = f.shape
        q = f.reshape(b * h * w, d)  # (B*h*w, D)
        idx = torch.topk(self._sq_dist(q), 1, dim=1, largest=False).indices[:, 0]  # (B*h*w,)
        patch = torch.linalg.vector_norm(q - bank[idx], dim=-1).reshape(b, h * w)  # (B, h*w)
        worst = patch.argmax(1, keepdim=True)  # (B, 1): m_test*
        s_star = patch.gather(1, worst)[:, 0]  # (B,)
        if self.b >= 2:
            query = q.reshape(b, h * w, d).gather(1, worst[:, :, None].expand(b, 1, d))[:, 0]  # (B, D)
            m_star = bank[idx.reshape(b, h * w).gather(1, worst)[:, 0]]  # (B, D): its nearest bank element
            cand = torch.topk(self._sq_dist(m_star), self.b, dim=1, largest=False).indices  # (B, b)
            order = torch.linalg.vector_norm(m_star[:, None] - bank[cand], dim=-1).argsort(dim=1)
            support = cand.gather(1, order)  # N_b(m*), nearest first (m* itself)
            dist = torch.linalg.vector_norm(query[:, None] - bank[support], dim=-1)  # (B, b)
            weight = 1 - torch.softmax(dist.double(), dim=1)[:, 0]  # (B,)
            score = (weight * s_star.double()).to(s_star.dtype)
        else:
            score = s_star
        amap = upsample_and_blur(patch.reshape(b, 1, h, w), tuple(x.shape[-2:]), self.sigma)  # (B, 1, S, S)
        return amap, score


# registry name -> scorer; every other method is refused with the list of these
SCORERS: dict[str, Callable[[Any], nn.Module]] = {
    "mudenet": MuDeNetScorer, "patchcore": PatchCoreScorer, "padim": PaDiMScorer, "ae": AEScorer}


def method_of(detector: Any) -> str:
    """The registry name of a detector object (:data:`mudenet_core.methods.METHODS`).

    Example:
        >>> from mudenet_core.baselines.padim import PaDiM
        >>> method_of(PaDiM())
        'padim'
    """
    cls = type(detector)
    for name, (mod, cls_name, _) in METHODS.items():
        if cls.__module__ == mod and cls.__name__ == cls_name:
            return name
    raise ExportError(f"{cls.__module__}.{cls.__name__} is not a registered detector")


class ExportGraph(nn.Module):
    """Raw RGB (B, 3, H0, W0) in [0, 1] -> calibrated anomaly map (B, 1, H0, W0) and score (B,).

    Args:
        scorer: the method's scoring path (:data:`SCORERS`), on normalised (B, 3, S, S) images.
        input_size: (H0, W0) of the graph's input.
        image_size: S, the model's square size.
        low: ``map_normalization["low"]`` of the calibration record.
        high: ``map_normalization["high"]`` (> low).
        imagenet_normalize: ImageNet mean/std normalisation after the resize (the run's data config).
    """

    def __init__(self, scorer: nn.Module, *, input_size: tuple[int, int], image_size: int, low: float,
                 high: float, imagenet_normalize: bool = True):
        super().__init__()
        if not high > low:
            raise ExportError(f"map_normalization needs high > low, got low={low}, high={high}")
        self.scorer = scorer
        self.input_size, self.image_size = (int(input_size[0]), int(input_size[1])), int(image_size)
        self.resize_in = Resize(self.input_size, (self.image_size, self.image_size), clamp=True)
        self.resize_out = Resize((self.image_size, self.image_size), self.input_size)
        self.low, self.high = float(low), float(high)
        self.imagenet_normalize = bool(imagenet_normalize)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def calibrate(self, v: torch.Tensor) -> torch.Tensor:
        """Raw map or score values -> ``(v - low) / (high - low)``."""
        return (v - self.low) / (self.high - self.low)

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H0, W0) float in [0, 1] -> anomaly map (B, 1, H0, W0), score (B,), both calibrated."""
        assert rgb.ndim == 4 and rgb.shape[1] == 3 and tuple(rgb.shape[-2:]) == self.input_size, \
            f"expected (B,3,{self.input_size[0]},{self.input_size[1]}), got {tuple(rgb.shape)}"
        x = self.resize_in(rgb)  # (B, 3, S, S)
        if self.imagenet_normalize:
            x = (x - self.mean) / self.std
        amap, score = self.scorer(x)  # (B, 1, S, S), (B,)
        return self.calibrate(self.resize_out(amap)), self.calibrate(score)


def build_graph(detector: Any, *, calibration: dict, input_size: tuple[int, int] | None = None,
                imagenet_normalize: bool = True) -> ExportGraph:
    """The export graph of a fitted detector (CPU, eval mode) with a calibration record's map range.

    Args:
        detector: a fitted mudenet / patchcore / padim / ae detector.
        calibration: the ``threshold.json`` record (:func:`mudenet_core.harness.load_calibration`), with
            ``map_normalization``.
        input_size: (H0, W0) of the raw input; default: the model's size.
        imagenet_normalize: as the run's data config (``normalize``).
    """
    method = method_of(detector)
    if method not in SCORERS:
        raise ExportError(f"export supports {', '.join(SCORERS)}; {method!r} has no export graph")
    norm = (calibration or {}).get("map_normalization") or {}
    if not {"low", "high"} <= set(norm):
        raise ExportError("the calibration record has no map_normalization (low, high)")
    size = int(detector.config.image_size)
    scorer = copy.deepcopy(SCORERS[method](detector))  # the caller's detector keeps its device and modes
    graph = ExportGraph(scorer, input_size=tuple(input_size or (size, size)), image_size=size,
                        low=float(norm["low"]), high=float(norm["high"]),
                        imagenet_normalize=imagenet_normalize)
    return graph.cpu().eval()


def export_record(graph: ExportGraph, *, method: str, calibration: dict, fmt: str, exporter: str,
                  checkpoint: str | Path | None = None, method_config: dict | None = None) -> dict:
    """The metadata of an exported model: sizes, calibration, threshold in both units, provenance."""
    thr = calibration.get("threshold")
    norm = calibration["map_normalization"]
    rec = {
        "format_version": EXPORT_FORMAT_VERSION, "format": fmt, "exporter": exporter, "method": method,
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0],
                  "shape": ["batch", 3, *graph.input_size]},
        "outputs": {OUTPUT_NAMES[0]: ["batch", 1, *graph.input_size], OUTPUT_NAMES[1]: ["batch"]},
        "input_size": list(graph.input_size), "image_size": graph.image_size,
        "imagenet_normalize": graph.imagenet_normalize,
        "map_normalization": {k: float(v) for k, v in norm.items()},
        "threshold": None if thr is None else (float(thr) - graph.low) / (graph.high - graph.low),
        "threshold_raw": None if thr is None else float(thr),
        "threshold_source": calibration.get("source"),
        "calibration_model_sha256": calibration.get("model_sha256"),
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "method_config": method_config,
        "torch_version": str(torch.__version__), "mudenet_core_version": __version__, "git_sha": git_sha(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if checkpoint is not None:
        rec["checkpoint"] = str(checkpoint)
        rec["checkpoint_sha256"] = file_sha256(checkpoint)
    return rec


def sidecar_path(model_file: str | Path) -> Path:
    """``<file>.json`` beside an exported model file."""
    p = Path(model_file)
    return p.with_name(p.name + ".json")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


@contextlib.contextmanager
def _quiet_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # legacy exporter's notes on Slice
        yield


def _onnx_proto(graph: ExportGraph, example: torch.Tensor, exporter: str):
    """(ModelProto, exporter used): ``dynamo=True`` first under "auto", then the TorchScript-based path."""
    import onnx

    errors = []
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet_export(), contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(
                    graph, (example,), None, dynamo=True, opset_version=ONNX_OPSET, input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES), dynamic_shapes={"rgb": {0: torch.export.Dim("batch")}},
                    verbose=False)
            return prog.model_proto, "torch.onnx.export(dynamo=True)"
        except Exception as e:  # the fallback below (or the error) says why
            if exporter == "dynamo":
                raise ExportError(f"torch.onnx.export(dynamo=True) failed: {type(e).__name__}: "
                                  f"{_first_line(e)}") from e
            errors.append(f"dynamo=True: {type(e).__name__}: {_first_line(e)}")
            warnings.warn(f"ONNX export with dynamo=True failed ({errors[-1]}); trying dynamo=False",
                          stacklevel=3)
    buf = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}}
    try:
        with _quiet_export():
            torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=axes)
    except Exception as e:
        errors.append(f"dynamo=False: {type(e).__name__}: {_first_line(e)}")
        raise ExportError(f"ONNX export failed ({'; '.join(errors)})") from e
    return onnx.load_from_string(buf.getvalue()), "torch.onnx.export(dynamo=False)"


def export_onnx(graph: ExportGraph, path: str | Path, record: dict, *, exporter: Exporter = "auto") -> Path:
    """Write ``graph`` as one ONNX file (weights inside) with ``record`` in ``metadata_props``; atomic.

    ``record["exporter"]`` is set to the path that worked. Returns the file written.
    """
    import onnx

    if exporter not in ("auto", "dynamo", "legacy"):
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose auto, dynamo or legacy")
    example = torch.rand(2, 3, *graph.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        proto, used = _onnx_proto(graph, example, exporter)
    record["exporter"] = used
    flat = {METADATA_KEY: json.dumps(record), "threshold": record["threshold"],
            "threshold_raw": record["threshold_raw"], "method": record["method"],
            "map_low": record["map_normalization"]["low"], "map_high": record["map_normalization"]["high"],
            "input_size": record["input_size"], "image_size": record["image_size"]}
    del proto.metadata_props[:]
    for k, v in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def export_torchscript(graph: ExportGraph, path: str | Path, record: dict) -> Path:
    """Write ``torch.jit.trace(graph)`` with ``record`` as the extra file ``export.json``; atomic."""
    example = torch.rand(2, 3, *graph.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _quiet_export():
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    record["exporter"] = "torch.jit.trace"
    path = Path(path)
    with atomic_path(path) as tmp, _quiet_export():
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(record)})
    return path


def export_detector(detector: Any, path: str | Path, *, fmt: Literal["onnx", "torchscript"],
                    calibration: dict, input_size: tuple[int, int] | None = None,
                    imagenet_normalize: bool = True, exporter: Exporter = "auto",
                    checkpoint: str | Path | None = None) -> dict:
    """Export a fitted detector to ``path`` and write the sidecar ``<path>.json``; returns the record."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    graph = build_graph(detector, calibration=calibration, input_size=input_size,
                        imagenet_normalize=imagenet_normalize)
    cfg = detector.config.to_dict() if hasattr(detector.config, "to_dict") else None
    record = export_record(graph, method=method_of(detector), calibration=calibration, fmt=fmt, exporter="",
                           checkpoint=checkpoint, method_config=cfg)
    if fmt == "onnx":
        export_onnx(graph, path, record, exporter=exporter)
    else:
        export_torchscript(graph, path, record)
    record["file"] = Path(path).name
    record["file_sha256"] = file_sha256(path)
    save_json(sidecar_path(path), record)
    return record


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
        with _quiet_export():
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
