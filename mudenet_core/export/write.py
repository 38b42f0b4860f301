"""Writing an :class:`~mudenet_core.export.graph.ExportGraph` to ONNX or TorchScript, with its record."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from mudenet_core import __version__
from mudenet_core.export.graph import (
    EXPORT_FORMAT_VERSION,
    FORMATS,
    INPUT_NAME,
    METADATA_KEY,
    ONNX_OPSET,
    OUTPUT_NAMES,
    TORCHSCRIPT_EXTRA,
    Exporter,
    ExportError,
    ExportGraph,
    build_graph,
    method_of,
)
from mudenet_core.io import atomic_path, file_sha256, git_sha, save_json


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
def quiet_export():
    """A context without the exporters' and ``torch.jit``'s tracer and deprecation warnings."""
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
            with quiet_export(), contextlib.redirect_stdout(io.StringIO()):
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
        with quiet_export():
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
    with torch.no_grad(), quiet_export():
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    record["exporter"] = "torch.jit.trace"
    path = Path(path)
    with atomic_path(path) as tmp, quiet_export():
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


