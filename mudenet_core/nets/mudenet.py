"""Assembly of MuDeNet's four networks: teacher T, structural student S1, autoencoder A, logical student S2.

The module also holds, as buffers, everything a checkpoint needs besides weights: the distillation target's
chosen backbone channels and their z-score statistics, the teacher's per-level channel mean/std (used to
normalise X^l before the losses and maps, as EfficientAD does) and the per-level, per-branch map
normalisation statistics calibrated on the validation split.

Example:
    >>> nets = MuDeNetNets(image_size=64, width=8, out_channels=4, latent_dim=4, ae_width=8)
    >>> x, s1, a, s2 = nets(torch.zeros(2, 3, 64, 64))
    >>> len(x), tuple(s2[2].shape)
    (3, (2, 4, 32, 32))
"""

from __future__ import annotations

import torch
from torch import nn

from mudenet_core.nets.autoencoder import Autoencoder
from mudenet_core.nets.pdn import DescriptorNet


class MuDeNetNets(nn.Module):
    """T, S1, A, S2 and their statistics; ``forward`` maps images to the four sets of level maps.

    Buffers:
        channel_idx (C,) long: backbone channels kept for the distillation target (chosen with a saved seed).
        target_mean, target_std (C,): z-score statistics of those channels over the distillation images.
        teacher_mean, teacher_std (S, C): per-level channel statistics of the teacher (training images).
        map_stats (2, S, 2): per branch (structural, logical) and level, the (low, high) normalisation values.
    """

    def __init__(
        self,
        image_size: int = 256,
        width: int = 64,
        out_channels: int = 128,
        latent_dim: int = 32,
        ae_width: int = 128,
        level_blocks: tuple[int, ...] = (1, 2, 2),
        level_kernels: tuple[int, ...] = (3, 3, 5),
    ):
        super().__init__()
        kw = dict(
            width=width, out_channels=out_channels, level_blocks=level_blocks, level_kernels=level_kernels
        )
        self.teacher = DescriptorNet(**kw)
        self.student = DescriptorNet(**kw)
        self.autoencoder = Autoencoder(
            image_size, out_channels, latent_dim, ae_width, num_levels=len(level_blocks)
        )
        self.logical_student = DescriptorNet(**kw)
        s, c = len(level_blocks), out_channels
        self.num_levels = s
        self.image_size = image_size
        self.register_buffer("channel_idx", torch.arange(c, dtype=torch.long))
        self.register_buffer("target_mean", torch.zeros(c))
        self.register_buffer("target_std", torch.ones(c))
        self.register_buffer("teacher_mean", torch.zeros(s, c))
        self.register_buffer("teacher_std", torch.ones(s, c))
        self.register_buffer("map_stats", torch.stack([torch.zeros(2, s), torch.ones(2, s)], dim=-1))

    def teacher_maps(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, ...]:
        """Teacher maps X^l (B, C, h, w), normalised with ``teacher_mean/std`` if ``normalize``."""
        xs = self.teacher(images)
        if not normalize:
            return xs
        return tuple(
            (x - self.teacher_mean[i][:, None, None]) / self.teacher_std[i][:, None, None]
            for i, x in enumerate(xs)
        )

    def forward(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Images (B, 3, H, W) -> (X, S1, A, S2), each a tuple of S maps (B, C, H/2, W/2)."""
        assert images.ndim == 4 and images.shape[-2:] == (self.image_size, self.image_size), (
            f"expected (B,3,{self.image_size},{self.image_size}), got {tuple(images.shape)}"
        )
        return (
            self.teacher_maps(images),
            self.student(images),
            self.autoencoder(images),
            self.logical_student(images),
        )
