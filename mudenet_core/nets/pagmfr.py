"""PAGMFR's networks: MFRM (feature reconstruction), MFFM (feature fusion) and the anomaly calculation.

PAGMFR has no public code; its README (``shared/research/methods_reference.md`` section C.1) names the
modules and what they do, and everything below the names is our design (recorded here and in
:mod:`mudenet_core.baselines.pagmfr`). A frozen backbone gives S = 3 maps ``f_k`` (B, C_k, h_k, w_k) at
strides 4 / 8 / 16 of the (possibly pseudo-anomalous) image.

* **MFRM** (:class:`MFRM`, "multi-layer feature decoder, reconstructs original feature representations"):
  each ``f_k`` is projected to ``width`` channels (1x1 conv, BN, ReLU), average-pooled to the stride-16 grid,
  concatenated and compressed (1x1 then 3x3 conv) into a bottleneck (B, width, h_3, w_3); a hierarchical
  decoder (two 3x3 conv blocks per level) goes back up 16 -> 8 -> 4 and, at each level, a linear 1x1 head
  gives the reconstruction ``r_k`` (B, C_k, h_k, w_k). No skips by default (``skip_levels``): the
  bottleneck keeps the network from copying an anomaly through (RD4AD bottleneck idea). An image head
  (a 3x3 conv block, a 3x3 conv to 3 x 16 channels, a x4 pixel shuffle, sigmoid: cheap on a CPU) decodes the
  stride-4 level into the reconstructed image ``rec_img`` (B, 3, H, W) in [0, 1]: the README's ``rec_img``
  of the "dual spaces" (image and feature space).
* **MFFM** (:class:`MFFM`, "fuses original and reconstructed features", "channel concatenation",
  "adaptive feature selection"): per level, ``cat(f_k, r_k)`` (2 C_k channels) is gated channel-wise by a
  squeeze-and-excitation block (global average pool, MLP with ratio ``se_ratio``, sigmoid: the adaptive
  selection, per image) and reduced by a 1x1 conv + ReLU to ``fused_channels`` channels.
* **Anomaly calculation** (:class:`AnomalyCalculation`, the README's ``forward(features, rec_features,
  img, rec_img)``): per pixel of the image grid, the inputs are
  the S feature maps ``1 - cos(f_k, r_k)`` (bilinearly upsampled), the CIELAB colour difference
  ``DeltaE76(img, rec_img) / 100`` (:func:`rgb_to_lab`, exact sRGB D65), the structure difference
  ``(1 - SSIM(img, rec_img)) / 2`` (:func:`mudenet_core.ssim.ssim`, 11 x 11 Gaussian window, sigma 1.5,
  averaged over RGB), and the MFFM descriptors (S x ``fused_channels``, upsampled). All inputs are
  standardised per channel (BatchNorm without affine parameters: running statistics at inference), then a
  per-pixel MLP (1x1 convs, ``hidden`` units, two hidden layers, ReLU) plus a linear skip over the S + 2
  difference maps gives one logit. The skip starts as the mean of the standardised difference maps (bias
  ``logit(0.01)``: anomalies are rare, RetinaNet's prior) and the MLP's output layer at zero, so training
  starts from "every difference counts equally" and learns the fusion from there. (Measured on our
  validation set: a plain MLP from random initialisation fused the maps worse than any single map did.)

``forward`` of :class:`PAGMFRNet` maps features and the image to tensors only (logit map, reconstructed
features, reconstructed image); losses and pseudo-anomalies live in :mod:`mudenet_core.baselines.pagmfr`.

Example:
    >>> net = PAGMFRNet(channels=(8, 16, 32), width=16, fused_channels=2, hidden=8)
    >>> feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    >>> logit, rec_feats, rec_img = net(feats, torch.rand(2, 3, 64, 64))
    >>> tuple(logit.shape), [tuple(r.shape[1:]) for r in rec_feats], tuple(rec_img.shape)
    ((2, 1, 64, 64), [(8, 16, 16), (16, 8, 8), (32, 4, 4)], (2, 3, 64, 64))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mudenet_core.ssim import ssim

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, and the D65 white (2 degree observer); scikit-image's values
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
LAB_EPSILON = 216.0 / 24389.0  # (6/29)^3: below it f(t) is linear (CIE exact value; 0.008856 rounded)
LAB_KAPPA = 24389.0 / 27.0  # 903.3: the slope of L* below epsilon, i.e. f(t) = (kappa t + 16) / 116


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Exact sRGB (D65) -> CIELAB of images in [0, 1].

    sRGB decoding ``((c + 0.055) / 1.055) ** 2.4`` above 0.04045, ``c / 12.92`` below; the sRGB matrix to XYZ;
    division by the D65 white; ``f(t) = t ** (1/3)`` above ``(6/29)^3``, ``(kappa t + 16) / 116`` below;
    ``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))``.

    Args:
        rgb: (B, 3, H, W) sRGB in [0, 1] (clamped).

    Returns:
        Lab (B, 3, H, W): L in [0, 100], a and b roughly in [-128, 128].

    Example:
        >>> lab = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))  # sRGB red
        >>> [round(float(v), 1) for v in lab.flatten()]
        [53.2, 80.1, 67.2]
    """
    assert rgb.ndim == 4 and rgb.shape[1] == 3, f"expected (B,3,H,W), got {tuple(rgb.shape)}"
    c = rgb.clamp(0.0, 1.0)
    lin = torch.where(c > 0.04045, ((c + 0.055) / 1.055).clamp_min(1e-12) ** 2.4, c / 12.92)
    m = torch.tensor(XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)  # (B, 3, H, W)
    t = xyz / torch.tensor(D65_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(t > LAB_EPSILON, t.clamp_min(LAB_EPSILON) ** (1.0 / 3.0), (LAB_KAPPA * t + 16.0) / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def delta_e76(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIE76 colour difference: Euclidean distance in Lab, (B, 3, H, W) x 2 -> (B, 1, H, W).

    Example:
        >>> a = torch.zeros(1, 3, 1, 1); b = torch.tensor([3.0, 4.0, 0.0]).view(1, 3, 1, 1)
        >>> float(delta_e76(a, b))
        5.0
    """
    assert lab1.shape == lab2.shape and lab1.ndim == 4, f"{tuple(lab1.shape)} vs {tuple(lab2.shape)}"
    return (lab1 - lab2).pow(2).sum(1, keepdim=True).add(1e-12).sqrt()


def cosine_distance_map(f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``1 - cos(f, r)`` over channels: (B, C, h, w) x 2 -> (B, 1, h, w), in [0, 2]."""
    assert f.shape == r.shape and f.ndim == 4, f"{tuple(f.shape)} vs {tuple(r.shape)}"
    return 1.0 - F.cosine_similarity(f, r, dim=1, eps=1e-8)[:, None]


def _conv_bn(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn(c_in, c_out), _conv_bn(c_out, c_out))


class MFRM(nn.Module):
    """Multi-scale feature reconstruction: S backbone maps -> S reconstructed maps and an image.

    Args:
        channels: C_k of the S backbone maps, shallow to deep (strides 4, 8, 16, ...).
        width: channels of the projections, bottleneck and decoder.
        skip_levels: how many of the shallower levels also receive their own projected input (U-Net skips,
            deepest-but-one first; 0 = bottleneck only).
    """

    def __init__(self, channels: Sequence[int], width: int = 64, skip_levels: int = 0):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        s = len(self.channels)
        assert s >= 1, "MFRM needs at least one feature map"
        self.project = nn.ModuleList([_conv_bn(c, width, 1) for c in self.channels])
        self.compress = nn.Sequential(_conv_bn(s * width, width, 1), _conv_bn(width, width))
        assert 0 <= skip_levels < max(s, 1), f"skip_levels must be in [0, {s - 1}], got {skip_levels}"
        self.skip_levels = int(skip_levels)
        # decoder level i (deepest first); levels 1 .. skip_levels also get their projected input
        self.decode = nn.ModuleList([_block(2 * width if 0 < i <= skip_levels else width, width)
                                     for i in range(s)])
        self.heads = nn.ModuleList([nn.Conv2d(width, c, 1) for c in self.channels])
        self.image_head = nn.Sequential(_conv_bn(width, width), nn.Conv2d(width, 3 * 16, 3, padding=1),
                                        nn.PixelShuffle(4))  # (B, 3 * 16, h_1, w_1) -> (B, 3, 4 h_1, 4 w_1)

    def forward(self, features: Sequence[torch.Tensor],
                image_size: tuple[int, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Reconstruct the features and the image.

        Args:
            features: S maps (B, C_k, h_k, w_k), shallow to deep.
            image_size: (H, W) of the reconstructed image.

        Returns:
            reconstructed features, S maps (B, C_k, h_k, w_k); reconstructed image (B, 3, H, W) in [0, 1].
        """
        assert len(features) == len(self.channels), f"expected {len(self.channels)} maps, got {len(features)}"
        for f, c in zip(features, self.channels, strict=True):
            assert f.ndim == 4 and f.shape[1] == c, f"expected (B,{c},h,w), got {tuple(f.shape)}"
        deep = tuple(features[-1].shape[-2:])
        pooled = [F.adaptive_avg_pool2d(p(f), deep) for p, f in zip(self.project, features, strict=True)]
        z = self.compress(torch.cat(pooled, dim=1))  # (B, width, h_S, w_S): the bottleneck
        rec: list[torch.Tensor] = [torch.empty(0)] * len(features)
        for i, k in enumerate(reversed(range(len(features)))):  # deepest level first
            size = tuple(features[k].shape[-2:])
            if tuple(z.shape[-2:]) != size:
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            if 0 < i <= self.skip_levels:
                z = torch.cat([z, self.project[k](features[k])], dim=1)  # (B, 2 width, h_k, w_k): skip
            z = self.decode[i](z)  # (B, width, h_k, w_k)
            rec[k] = self.heads[k](z)  # (B, C_k, h_k, w_k)
        img = self.image_head(z)  # from the shallowest level, (B, 3, 4 h_1, 4 w_1)
        if tuple(img.shape[-2:]) != tuple(image_size):
            img = F.interpolate(img, size=tuple(image_size), mode="bilinear", align_corners=False)
        return rec, torch.sigmoid(img)


class MFFM(nn.Module):
    """Multi-scale feature fusion: per level, SE-gated ``cat(f_k, r_k)`` reduced to a few channels.

    Args:
        channels: C_k of the S levels.
        fused_channels: output channels per level.
        se_ratio: channel reduction of the squeeze-and-excitation MLP.
    """

    def __init__(self, channels: Sequence[int], fused_channels: int = 8, se_ratio: int = 4):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.gates = nn.ModuleList([
            nn.Sequential(nn.Linear(2 * c, max(2 * c // se_ratio, 4)), nn.ReLU(inplace=True),
                          nn.Linear(max(2 * c // se_ratio, 4), 2 * c), nn.Sigmoid())
            for c in self.channels])
        self.reduce = nn.ModuleList([nn.Sequential(nn.Conv2d(2 * c, fused_channels, 1), nn.ReLU(inplace=True))
                                     for c in self.channels])

    def forward(self, features: Sequence[torch.Tensor],
                rec_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """S fused maps (B, fused_channels, h_k, w_k) from features and reconstructions (B, C_k, h_k, w_k)."""
        out = []
        for f, r, gate, reduce in zip(features, rec_features, self.gates, self.reduce, strict=True):
            assert f.shape == r.shape, f"features {tuple(f.shape)} vs reconstruction {tuple(r.shape)}"
            x = torch.cat([f, r], dim=1)  # (B, 2 C_k, h, w): channel concatenation
            g = gate(x.mean(dim=(2, 3)))  # (B, 2 C_k): adaptive selection, per image
            out.append(reduce(x * g[:, :, None, None]))  # (B, fused_channels, h, w)
        return out


class AnomalyCalculation(nn.Module):
    """Per-pixel MLP over feature-level (cosine), image-level (CIELAB, SSIM) and MFFM maps -> logit map.

    Args:
        channels: C_k of the S levels.
        fused_channels: MFFM channels per level.
        hidden: units of the two hidden layers.
        se_ratio: MFFM's squeeze-and-excitation reduction.
        ssim_window: SSIM Gaussian window length (odd).
        prior: initial anomaly probability (sets the output bias).
    """

    def __init__(self, channels: Sequence[int], fused_channels: int = 8, hidden: int = 32, se_ratio: int = 4,
                 ssim_window: int = 11, prior: float = 0.01):
        super().__init__()
        s = len(channels)
        self.mffm = MFFM(channels, fused_channels, se_ratio)
        self.ssim_window = int(ssim_window)
        self.n_maps = s + 2  # the hand-made difference maps
        self.n_inputs = self.n_maps + s * fused_channels
        # inputs standardised per channel (running statistics: per image at inference, batch-independent)
        self.norm = nn.BatchNorm2d(self.n_inputs, affine=False)
        self.mlp = nn.Sequential(nn.Conv2d(self.n_inputs, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))
        # linear skip over the difference maps, starting as their mean; the MLP starts at zero output
        self.linear = nn.Conv2d(self.n_maps, 1, 1)
        nn.init.constant_(self.linear.weight, 1.0 / self.n_maps)
        nn.init.constant_(self.linear.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def difference_maps(self, features: Sequence[torch.Tensor], rec_features: Sequence[torch.Tensor],
                        img: torch.Tensor, rec_img: torch.Tensor) -> torch.Tensor:
        """The S + 2 hand-made maps (B, S + 2, H, W): cosine per level, colour, structure."""
        size = tuple(img.shape[-2:])
        maps = [F.interpolate(cosine_distance_map(f, r), size=size, mode="bilinear", align_corners=False)
                for f, r in zip(features, rec_features, strict=True)]
        maps.append(delta_e76(rgb_to_lab(img), rgb_to_lab(rec_img)) / 100.0)  # (B, 1, H, W)
        maps.append((1.0 - ssim(img, rec_img, window_size=self.ssim_window, reduction="none")) / 2.0)
        return torch.cat(maps, dim=1)

    def forward(self, features: Sequence[torch.Tensor], rec_features: Sequence[torch.Tensor],
                img: torch.Tensor, rec_img: torch.Tensor) -> torch.Tensor:
        """Anomaly logits (B, 1, H, W).

        Args:
            features: S backbone maps (B, C_k, h_k, w_k).
            rec_features: their reconstructions, same shapes.
            img: the image (B, 3, H, W) in [0, 1].
            rec_img: its reconstruction (B, 3, H, W) in [0, 1].
        """
        assert img.shape == rec_img.shape and img.ndim == 4 and img.shape[1] == 3, \
            f"expected two (B,3,H,W), got {tuple(img.shape)}, {tuple(rec_img.shape)}"
        size = tuple(img.shape[-2:])
        fused = [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                 for m in self.mffm(features, rec_features)]
        x = torch.cat([self.difference_maps(features, rec_features, img, rec_img), *fused], dim=1)
        assert x.shape[1] == self.n_inputs, f"expected {self.n_inputs} maps, got {x.shape[1]}"
        x = self.norm(x)  # (B, n_inputs, H, W), standardised
        return self.linear(x[:, : self.n_maps]) + self.mlp(x)  # (B, 1, H, W)


class PAGMFRNet(nn.Module):
    """MFRM + MFFM + anomaly calculation on top of (frozen, external) backbone features.

    Args:
        channels: C_k of the S backbone maps, shallow to deep.
        width: MFRM width.
        fused_channels: MFFM channels per level.
        hidden: MLP hidden units.
        se_ratio: MFFM squeeze-and-excitation reduction.
        ssim_window: SSIM window of the structure map.
        detach_reconstruction: the anomaly branch sees the reconstructions without gradient, so the focal
            loss trains MFFM and the MLP only and MFRM stays a pure reconstructor (our choice).
        skip_levels: MFRM's skip connections (see :class:`MFRM`).
    """

    def __init__(self, channels: Sequence[int], width: int = 64, fused_channels: int = 8, hidden: int = 32,
                 se_ratio: int = 4, ssim_window: int = 11, detach_reconstruction: bool = True,
                 skip_levels: int = 0):
        super().__init__()
        self.mfrm = MFRM(channels, width, skip_levels)
        self.anomaly = AnomalyCalculation(channels, fused_channels, hidden, se_ratio, ssim_window)
        self.detach_reconstruction = bool(detach_reconstruction)

    def forward(self, features: Sequence[torch.Tensor],
                img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Logit map (B, 1, H, W), reconstructed features [(B, C_k, h_k, w_k)] and image (B, 3, H, W).

        Args:
            features: S backbone maps of ``img``, (B, C_k, h_k, w_k).
            img: the image (B, 3, H, W) in [0, 1] (not normalised).
        """
        assert img.ndim == 4 and img.shape[1] == 3, f"expected (B,3,H,W), got {tuple(img.shape)}"
        rec, rec_img = self.mfrm(features, tuple(img.shape[-2:]))
        if self.detach_reconstruction:
            r_in, img_in = [r.detach() for r in rec], rec_img.detach()
        else:
            r_in, img_in = rec, rec_img
        logit = self.anomaly(features, r_in, img, img_in)
        return logit, rec, rec_img
