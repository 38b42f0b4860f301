"""GLASS networks (Chen et al., ECCV 2024): frozen patch embedding, feature adaptor, discriminator.

* :class:`GLASSEmbedding` (frozen): the two mid-level backbone maps (WideResNet-50 ``layer2`` / ``layer3``,
  EfficientNet-Lite0 ``stage3`` / ``stage5``, strides 8 / 16) are each cut into ``p x p`` neighbourhoods
  (``unfold``, stride 1, zero padding: each position gets its ``C_k * p * p`` neighbourhood values,
  channel-major as the official ``PatchMaker``), averaged down to ``pretrain_embed_dim`` values by adaptive
  average pooling over that vector (official ``MeanMapper``), brought to the stride-8 grid (bilinear), stacked
  and pooled again to ``target_embed_dim`` (official ``Aggregator``). Pooling and interpolation act on
  different axes and are both linear, so pooling first (cheaper) gives the official result.
* :func:`feature_adaptor`: one ``Linear(D, D)`` (bias, no activation; official ``Projection`` with
  ``pre_proj=1``).
* :class:`Discriminator`: ``Linear(D, hidden) - BatchNorm1d - LeakyReLU(0.2) - Linear(hidden, 1, no bias) -
  Sigmoid``; it maps feature rows (N, D) to anomaly probabilities (N,).

Linear weights are initialised with Xavier-normal (:func:`init_xavier`), as in the official ``init_weight``.

Example:
    >>> emb = GLASSEmbedding("resnet18", ["layer2", "layer3"], pretrained=False, pretrain_embed_dim=32,
    ...                      target_embed_dim=16)
    >>> f = emb(torch.zeros(2, 3, 64, 64))
    >>> tuple(f.shape)  # (B, h, w, D) on the stride-8 grid
    (2, 8, 8, 16)
    >>> d = Discriminator(16, hidden=8).eval()
    >>> tuple(d(feature_adaptor(16)(f.reshape(-1, 16))).shape)
    (128,)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2  # LeakyReLU slope of the discriminator (official Discriminator)


def local_patches(f: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Every position's ``p x p`` neighbourhood, flattened channel-major: (B, C, h, w) -> (B, C*p*p, h, w).

    Zero padding at the border (``torch.nn.Unfold(p, stride=1, padding=p // 2)``).

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> local_patches(x, 3)[0, :, 0, 0].tolist()  # top-left position: its 3x3 window, zero padded
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 3.0]
    """
    assert f.ndim == 4, f"expected (B, C, h, w), got {tuple(f.shape)}"
    assert patch_size % 2 == 1, f"patch_size must be odd, got {patch_size}"
    if patch_size == 1:
        return f
    b, c, h, w = f.shape
    u = F.unfold(f, kernel_size=patch_size, padding=patch_size // 2)  # (B, C*p*p, h*w)
    return u.reshape(b, c * patch_size * patch_size, h, w)


def pool_channels(f: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling of each position's channel vector: (B, K, h, w) -> (B, dim, h, w).

    Example:
        >>> x = torch.arange(6.0).view(1, 6, 1, 1)
        >>> pool_channels(x, 3).flatten().tolist()
        [0.5, 2.5, 4.5]
    """
    assert f.ndim == 4, f"expected (B, K, h, w), got {tuple(f.shape)}"
    b, k, h, w = f.shape
    x = f.permute(0, 2, 3, 1).reshape(b * h * w, 1, k)  # (B, K, h, w) -> (B*h*w, 1, K)
    x = F.adaptive_avg_pool1d(x, dim)  # (B*h*w, 1, dim)
    return x.reshape(b, h, w, dim).permute(0, 3, 1, 2)  # -> (B, dim, h, w)


class GLASSEmbedding(nn.Module):
    """Frozen backbone + locally aggregated, pooled patch features: images (B, 3, H, W) -> (B, h, w, D).

    Args:
        backbone: registry name (:mod:`mudenet_core.nets.backbones`).
        layers: the two maps (shallow first); the output grid is the first one's.
        pretrained: ImageNet weights (False only for tests and for :meth:`GLASS.load`, which restores them).
        patch_size: neighbourhood p (odd; 1 = none).
        pretrain_embed_dim: per-layer pooled size D'.
        target_embed_dim: final feature size D.
    """

    def __init__(self, backbone: str, layers: Sequence[str], *, pretrained: bool = True, patch_size: int = 3,
                 pretrain_embed_dim: int = 1536, target_embed_dim: int = 1536):
        super().__init__()
        from mudenet_core.nets.backbones import build_backbone

        self.layers = list(layers)
        assert len(self.layers) >= 1, "GLASSEmbedding needs at least one layer"
        self.patch_size = int(patch_size)
        self.pretrain_embed_dim = int(pretrain_embed_dim)
        self.target_embed_dim = int(target_embed_dim)
        self.backbone = build_backbone(backbone, layers=self.layers, pretrained=pretrained)
        self.stride = self.backbone.strides[self.layers[0]]  # of the output grid

    def train(self, mode: bool = True) -> GLASSEmbedding:
        """Stay in eval mode: the embedding is frozen."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features.

        Args:
            images: (B, 3, H, W), ImageNet-normalised.

        Returns:
            features (B, h, w, D) on the grid of the first layer.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        feats = self.backbone(images)
        size = tuple(feats[self.layers[0]].shape[-2:])  # (h, w)
        per_layer = []
        for k in self.layers:
            f = local_patches(feats[k], self.patch_size)  # (B, C_k*p*p, h_k, w_k)
            f = pool_channels(f, self.pretrain_embed_dim)  # (B, D', h_k, w_k)
            if tuple(f.shape[-2:]) != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)  # (B, D', h, w)
            per_layer.append(f)
        f = torch.stack(per_layer, dim=1)  # (B, L, D', h, w)
        b, n_layers, d1, h, w = f.shape
        f = f.permute(0, 3, 4, 1, 2).reshape(b * h * w, 1, n_layers * d1)  # (B*h*w, 1, L*D'), layer-major
        f = F.adaptive_avg_pool1d(f, self.target_embed_dim)  # (B*h*w, 1, D)
        return f.reshape(b, h, w, self.target_embed_dim)


def init_xavier(module: nn.Module) -> None:
    """Xavier-normal weights for every ``Linear`` of ``module`` (biases keep torch's default init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)


def feature_adaptor(dim: int) -> nn.Linear:
    """The feature adaptor: one ``Linear(dim, dim)`` with bias; rows (N, D) -> (N, D)."""
    a = nn.Linear(dim, dim)
    init_xavier(a)
    return a


class Discriminator(nn.Module):
    """MLP discriminator: feature rows (N, D) -> anomaly probability (N,).

    ``Linear(D, hidden) - BatchNorm1d(hidden) - LeakyReLU(0.2) - Linear(hidden, 1, bias=False) - Sigmoid``.
    In training mode BatchNorm uses the statistics of the rows passed together; in eval mode its running
    statistics, so a row's score does not depend on the others.
    """

    def __init__(self, dim: int, hidden: int = 1024):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, 1, bias=False),
        )
        init_xavier(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly probabilities (N,) of feature rows (N, D)."""
        assert x.ndim == 2, f"expected (N, D), got {tuple(x.shape)}"
        return torch.sigmoid(self.body(x))[:, 0]
