"""The autoencoder A: a global latent of size Z, decoded separately for each level.

Encoder: five 3x3 stride-2 convolutions (3 -> 32 -> 64 -> 128 -> 128 -> 128 at paper widths) take the image
(B, 3, H, W) to (B, 128, H/32, W/32); a last convolution with kernel H/32 gives the latent (B, Z, 1, 1).
Decoder (one per level): a 4x4 stride-4 transposed convolution (Z -> 128) to 4x4, then stride-2 transposed
convolutions (k3, p1, output_padding 1) doubling up to the teacher grid (H/2: 4 -> 8 -> ... -> 128 for 256 px
input, five layers); the last one outputs C channels. ReLU between layers, none after the last.

Inference path: without gradients (and not tracing) the forward pass runs in channels-last layout, where the
CPU's transposed convolutions are much faster (measured on 1 thread, batch 8: 1.8x at 128 px / width 64,
2.5x at 256 px / width 128); the maps are returned contiguous and equal up to float32 rounding. There is no
BatchNorm to fold. With gradients on (training) nothing changes.

Example:
    >>> ae = Autoencoder(image_size=64, out_channels=8, latent_dim=4, width=16)
    >>> [tuple(a.shape) for a in ae(torch.zeros(2, 3, 64, 64))]
    [(2, 8, 32, 32), (2, 8, 32, 32), (2, 8, 32, 32)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mudenet_core.nets.efficientnet_lite import inference_path_enabled


def _decoder(latent_dim: int, width: int, out_channels: int, n_up: int) -> nn.Sequential:
    """ConvT Z->width (k4, s4), then ``n_up`` ConvT (k3, s2, p1, op1); the last outputs ``out_channels``."""
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, width if n_up else out_channels, 4, stride=4)]
    for i in range(n_up):
        layers.append(nn.ReLU(inplace=True))
        c_out = out_channels if i == n_up - 1 else width
        layers.append(nn.ConvTranspose2d(width, c_out, 3, stride=2, padding=1, output_padding=1))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """Image (B, 3, H, W) -> tuple of S reconstructions (B, C, H/2, W/2) of the teacher maps.

    Args:
        image_size: H = W of the input; H/32 must be an integer and H/8 a power of two.
        out_channels: C, channels of each level's output.
        latent_dim: Z, size of the global latent code (32 in the paper).
        width: channels of the deeper encoder layers and of the decoders (128 in the paper); the first two
            encoder layers use width/4 and width/2.
        num_levels: S, number of decoders.
    """

    def __init__(
        self,
        image_size: int = 256,
        out_channels: int = 128,
        latent_dim: int = 32,
        width: int = 128,
        num_levels: int = 3,
    ):
        super().__init__()
        if image_size % 32 != 0:
            raise ValueError(f"Autoencoder: image_size must be a multiple of 32, got {image_size}")
        grid = image_size // 2  # teacher grid
        n_up = math.log2(grid / 4)
        if n_up != int(n_up) or n_up < 0:
            raise ValueError(f"Autoencoder: image_size/8 must be a power of two, got image_size={image_size}")
        self.image_size = image_size
        chans = [3, max(width // 4, 1), max(width // 2, 1), width, width, width]
        enc: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(width, latent_dim, image_size // 32))  # (B, Z, 1, 1)
        self.encoder = nn.Sequential(*enc)
        self.decoders = nn.ModuleList(
            _decoder(latent_dim, width, out_channels, int(n_up)) for _ in range(num_levels)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> latent (B, Z, 1, 1)."""
        assert x.ndim == 4 and x.shape[-1] == self.image_size, (
            f"expected (B,3,{self.image_size},{self.image_size}), got {tuple(x.shape)}"
        )
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Image (B, 3, H, W) -> S maps (B, C, H/2, W/2)."""
        if inference_path_enabled():  # channels-last: the same maps, faster transposed convolutions
            return tuple(a.contiguous() for a in self.channels_last_maps(x))  # S x (B, C, H/2, W/2)
        z = self.encode(x)  # (B, Z, 1, 1)
        return tuple(dec(z) for dec in self.decoders)  # S x (B, C, H/2, W/2)

    def channels_last_maps(
        self, x: torch.Tensor, levels: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Image (B, 3, H, W) -> maps (B, C, H/2, W/2) of the 1-based ``levels`` (default all), channels-last.

        The inference layout (see the module docstring), for consumers that read the maps per pixel (MuDeNet's
        fused scoring) and need no contiguous copy.
        """
        z = self.encode(x.contiguous(memory_format=torch.channels_last))  # (B, Z, 1, 1)
        z = z.contiguous(memory_format=torch.channels_last)
        levels = range(1, len(self.decoders) + 1) if levels is None else levels
        return tuple(self.decoders[lv - 1](z) for lv in levels)  # len(levels) x (B, C, H/2, W/2)
