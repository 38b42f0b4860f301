"""The multi-level descriptor network shared by the teacher T and the students S1, S2 (same architecture).

A 7x7 stem (3 -> ``width``, stride 1, then 2x2 average pooling) brings the image to half resolution; three
cumulative levels of residual blocks follow (level 1: one 3x3 block, level 2: two 3x3 blocks, level 3: two 5x5
blocks at paper defaults), giving receptive fields 16 / 32 / 64 pixels. Each level's output passes through its
own 1x1 head (``width`` -> ``out_channels``, no activation), so the network returns S maps X^l of shape
(B, C, H/2, W/2). At paper defaults (width 64, C 128) one network has 666,496 parameters.

Inference path: in eval mode without gradients (``torch.no_grad`` / ``torch.inference_mode``, not tracing),
``forward`` runs a cached copy with every BatchNorm folded into its convolution and in-place ReLU / residual
additions, in channels-last layout from ``width >= CHANNELS_LAST_MIN_WIDTH`` (measured on 1 CPU thread, batch
8: channels-last is 1.46x faster at width 64 / 256 px and 18 % slower at width 16 / 128 px). The copy is
rebuilt whenever a weight changes and is not part of the state dict; the maps equal the unfolded ones up to
float32 rounding and are returned contiguous. Training (train mode, or gradients on) runs the modules as they
are. ``FoldedDescriptorNet.features`` gives the level features before the 1x1 heads (optionally only the
first levels, in a chosen layout): MuDeNet's scoring fuses the heads into its distances
(``MuDeNetNets.raw_maps``) and runs them channels-last at every width, since without the heads' contiguous
outputs channels-last is the faster layout at width 16 too (1 thread, batch 8, 128 px: 32 vs 44 ms).

Example:
    >>> net = DescriptorNet()
    >>> sum(p.numel() for p in net.parameters())
    666496
    >>> [tuple(x.shape) for x in DescriptorNet(width=8, out_channels=4)(torch.zeros(1, 3, 64, 64))]
    [(1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mudenet_core.nets.efficientnet_lite import FoldedConv2d, inference_path_enabled, weights_cached

CHANNELS_LAST_MIN_WIDTH = 32  # folded inference runs channels-last from this width on (see module docstring)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + identity, then ReLU; 'same' padding, no bias; (B, c, h, w) -> same."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        assert kernel_size % 2 == 1, f"kernel_size must be odd for 'same' padding, got {kernel_size}"
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) -> (B, c, h, w)."""
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + x)


class FoldedResidualBlock(nn.Module):
    """``ResidualBlock`` for frozen inference: both BatchNorms folded, in-place ReLU and residual addition."""

    def __init__(self, block: ResidualBlock):
        super().__init__()
        self.conv1 = FoldedConv2d(block.conv1, block.bn1, "relu")
        self.conv2 = FoldedConv2d(block.conv2, block.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) -> (B, c, h, w); ``x`` is not modified."""
        return self.conv2(self.conv1(x)).add_(x).relu_()


class FoldedDescriptorNet(nn.Module):
    """Inference copy of a ``DescriptorNet`` (BatchNorm folded); same maps up to float32 rounding."""

    def __init__(self, net: DescriptorNet):
        super().__init__()
        self.stem = FoldedConv2d(net.stem[0], None, "relu")
        self.levels = nn.ModuleList(nn.Sequential(*(FoldedResidualBlock(b) for b in level))
                                    for level in net.levels)
        self.heads = nn.ModuleList(FoldedConv2d(head, None) for head in net.heads)
        self.channels_last = net.stem[0].out_channels >= CHANNELS_LAST_MIN_WIDTH

    def features(
        self, x: torch.Tensor, num_levels: int | None = None, channels_last: bool | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Image (B, 3, H, W) -> the level features before the 1x1 heads, each (B, width, H/2, W/2).

        Args:
            x: images (B, 3, H, W).
            num_levels: compute only the first ``num_levels`` levels (default: all).
            channels_last: layout of the computation and of the returned features (default: this copy's
                ``channels_last``).
        """
        if self.channels_last if channels_last is None else channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = F.avg_pool2d(self.stem(x), 2)  # (B, width, H/2, W/2)
        outs = []
        for level in self.levels[:num_levels]:
            h = level(h)  # a new tensor: the previous level's features stay as they are
            outs.append(h)
        return tuple(outs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Image (B, 3, H, W) -> S descriptor maps, each (B, C, H/2, W/2), contiguous."""
        return tuple(head(h).contiguous() for h, head in zip(self.features(x), self.heads, strict=True))


class DescriptorNet(nn.Module):
    """Teacher / student network: image (B, 3, H, W) -> tuple of S maps (B, C, H/2, W/2), one per level.

    Args:
        width: channels of the stem and residual blocks (64 in the paper).
        out_channels: C, channels of every level's descriptor map (128 in the paper).
        level_blocks: residual blocks added at each level (cumulative), paper (1, 2, 2).
        level_kernels: kernel size of the blocks of each level, paper (3, 3, 5).
    """

    def __init__(
        self,
        width: int = 64,
        out_channels: int = 128,
        level_blocks: tuple[int, ...] = (1, 2, 2),
        level_kernels: tuple[int, ...] = (3, 3, 5),
    ):
        super().__init__()
        assert len(level_blocks) == len(level_kernels) >= 1, (
            "level_blocks and level_kernels must have equal length"
        )
        self.out_channels = out_channels
        self.num_levels = len(level_blocks)
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, padding=3, bias=True), nn.ReLU(inplace=True), nn.AvgPool2d(2)
        )
        self.levels = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(width, k) for _ in range(n)])
            for n, k in zip(level_blocks, level_kernels, strict=True)
        )
        self.heads = nn.ModuleList(nn.Conv2d(width, out_channels, 1, bias=True) for _ in level_blocks)

    def folded(self) -> FoldedDescriptorNet:
        """The inference copy that ``forward`` uses in eval mode without gradients.

        Cached and rebuilt when any weight or running statistic changes; not registered, so the state dict is
        unchanged.
        """
        return weights_cached(self, "_folded_cache", lambda: FoldedDescriptorNet(self))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Image (B, 3, H, W) -> S descriptor maps, each (B, C, H/2, W/2)."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        if not self.training and inference_path_enabled():
            return self.folded()(x)
        h = self.stem(x)  # (B, width, H/2, W/2)
        outs = []
        for level, head in zip(self.levels, self.heads, strict=True):
            h = level(h)  # cumulative: each level continues from the previous one
            outs.append(head(h))  # (B, C, H/2, W/2)
        return tuple(outs)


def receptive_fields(
    level_blocks: tuple[int, ...] = (1, 2, 2), level_kernels: tuple[int, ...] = (3, 3, 5)
) -> list[int]:
    """Receptive field (input pixels) of each level's output.

    Example:
        >>> receptive_fields()
        [16, 32, 64]
    """
    rf, jump = 7, 1  # stem conv
    rf, jump = rf + (2 - 1) * jump, 2  # 2x2 avg pool
    out = []
    for n, k in zip(level_blocks, level_kernels, strict=True):
        rf += 2 * n * (k - 1) * jump  # two convs per block
        out.append(rf)
    return out
