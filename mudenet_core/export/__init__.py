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

The package: :mod:`~mudenet_core.export.graph` (the graph and the methods' scorers),
:mod:`~mudenet_core.export.write` (ONNX / TorchScript files and their records) and
:mod:`~mudenet_core.export.load` (exported models behind the detector interface, parity).

Example:
    >>> m = resize_matrix(4, 2)  # (n_in, n_out): halving, a tent filter of half-width 2 input pixels
    >>> (m.T * 7).round().tolist()
    [[3.0, 3.0, 1.0, 0.0], [0.0, 1.0, 3.0, 3.0]]
"""

from mudenet_core.export.graph import (
    DEFAULT_FILES,
    EXPORT_FORMAT_VERSION,
    FORMATS,
    INPUT_NAME,
    METADATA_KEY,
    ONNX_OPSET,
    OUTPUT_NAMES,
    SCORERS,
    TORCHSCRIPT_EXTRA,
    AEScorer,
    Exporter,
    ExportError,
    ExportGraph,
    MuDeNetScorer,
    PaDiMScorer,
    PatchCoreScorer,
    Resize,
    build_graph,
    method_of,
    resize_matrix,
)
from mudenet_core.export.load import (
    ExportedDetector,
    OnnxDetector,
    TorchScriptDetector,
    load_onnx_model,
    load_run_calibration,
    load_torchscript_model,
    parity,
)
from mudenet_core.export.write import (
    export_detector,
    export_onnx,
    export_record,
    export_torchscript,
    quiet_export,
    sidecar_path,
)

__all__ = [
    "DEFAULT_FILES", "EXPORT_FORMAT_VERSION", "FORMATS", "INPUT_NAME", "METADATA_KEY", "ONNX_OPSET",
    "OUTPUT_NAMES", "SCORERS", "TORCHSCRIPT_EXTRA", "AEScorer", "Exporter", "ExportError", "ExportGraph",
    "ExportedDetector", "MuDeNetScorer", "OnnxDetector", "PaDiMScorer", "PatchCoreScorer", "Resize",
    "TorchScriptDetector", "build_graph", "export_detector", "export_onnx", "export_record",
    "export_torchscript", "load_onnx_model", "load_run_calibration", "load_torchscript_model", "method_of",
    "parity", "quiet_export", "resize_matrix", "sidecar_path",
]
