"""The exported graph: resize, normalisation, each method's scoring path and the calibration, as one module.

See :mod:`mudenet_core.export` for the contract (inputs, outputs, calibration).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mudenet_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
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


