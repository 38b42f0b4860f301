"""The RGPKD student: a ResNet-18-like U-Net that regresses a frozen teacher's three levels and reconstructs.

RGPKD (reconstruction-guided, prompt-enhanced asymmetric distillation; Wang, Qin, Chi, Chen, Yu) pairs a
frozen ImageNet teacher with a structurally different student. This file holds the student and its prompt
module; the teacher is a frozen :class:`mudenet_core.nets.backbones.Backbone` and the prompt bank, losses and
scoring live in :mod:`mudenet_core.baselines.rgpkd`.

Student (:class:`RGPKDStudent`), widths ``(w0, w1, w2, w3)`` = (64, 128, 256, 512) for ResNet-18:

* encoder (:class:`ResNetEncoder`, torchvision ``BasicBlock``s, two per stage, named as torchvision names
  them so ImageNet ResNet-18 weights load when the widths are the standard ones):
  ``e1`` = conv7x7/2 + BN + ReLU (w0, H/2); ``e2`` = maxpool + layer1 (w0, H/4); ``e3`` = layer2 (w1, H/8);
  ``e4`` = layer3 (w2, H/16); ``e5`` = layer4 (w3, H/32);
* decoder, mirroring it with skip connections: ``u1`` = ConvT2x2/2 + BN + ReLU of e5 (w2, H/16), then the
  prompt module P1 (optional), then ``d1`` = Conv3x3 + BN + ReLU of ``cat[u1, e4]``; the same for ``d2``
  (w1, H/8, skip e3, prompt P2) and ``d3`` (w0, H/4, skip e2, prompt P3);
* distilled outputs: a linear 1x1 head per level, ``s1 = head1(d3)`` (C1, H/4), ``s2 = head2(d2)`` (C2, H/8),
  ``s3 = head3(d1)`` (C3, H/16), with the teacher's channels C_k (our choice: always a linear head, so one
  student fits ResNet-18's non-negative and EfficientNet-Lite0's signed stage outputs alike);
* reconstruction: ConvT2x2/2 + BN + ReLU (w0/2, H/2), ConvT2x2/2 + Sigmoid (3, H): the input image in
  pixel space [0, 1] (the public sketch stops at H/2 and upsamples bilinearly; we decode to full size).

Prompt module (:class:`PromptModule`, our design; the public sketch's version cannot run, see
``methods_reference.md`` B.5): the decoder feature x (B, C, H, W) and the retrieved normal teacher feature p
(B, Cp, Hp, Wp) are embedded by 1x1 convolutions, ``theta(x)``, ``phi(p)`` (M = C // reduction channels) and
``g(p)``; the affinity A = softmax(theta(x)^T phi(p) / sqrt(M)) over the prompt positions (B, H*W, Hp*Wp)
gathers the prompt's values at every decoder position, ``attended = A g(p)``; the best-match cosine
``max_j cos(theta(x)_i, phi(p)_j)`` adds a one-channel affinity map. ``x + ReLU(BN(Conv1x1(cat[x, attended,
affinity])))`` is the fused feature: a residual, so the decoder without prompts (``prompts=None``) is the same
network with the module skipped.

The input size must be a multiple of 32 (five stride-2 stages).

Example:
    >>> net = RGPKDStudent(teacher_channels=(24, 40, 112), widths=(8, 16, 32, 64))
    >>> x = torch.zeros(2, 3, 64, 96)
    >>> (s1, s2, s3), rec = net(x)
    >>> [tuple(s.shape) for s in (s1, s2, s3)], tuple(rec.shape)
    ([(2, 24, 16, 24), (2, 40, 8, 12), (2, 112, 4, 6)], (2, 3, 64, 96))
    >>> prompts = [torch.zeros(2, 24, 16, 24), torch.zeros(2, 40, 8, 12), torch.zeros(2, 112, 4, 6)]
    >>> tuple(net(x, prompts)[0][0].shape)
    (2, 24, 16, 24)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

RESNET18_WIDTHS = (64, 128, 256, 512)  # the widths at which torchvision ImageNet ResNet-18 weights fit


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Two ``BasicBlock``s (the first one strided, with a 1x1 projection shortcut when the shape changes)."""
    down = None
    if stride != 1 or c_in != c_out:
        down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
    return nn.Sequential(BasicBlock(c_in, c_out, stride, down), BasicBlock(c_out, c_out))


class ResNetEncoder(nn.Module):
    """ResNet-18-like encoder: (B, 3, H, W) -> e1..e5 at strides 2, 4, 8, 16, 32 (widths w0, w0, w1, w2, w3).

    Module names follow torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so its
    ImageNet state dict (without ``fc``) loads into an encoder of widths (64, 128, 256, 512).
    """

    def __init__(self, widths: Sequence[int] = RESNET18_WIDTHS):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ResNetEncoder: expected 4 stage widths, got {tuple(widths)}")
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(3, w0, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(w0, w0, 1)
        self.layer2 = _stage(w0, w1, 2)
        self.layer3 = _stage(w1, w2, 2)
        self.layer4 = _stage(w2, w3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> (e1, e2, e3, e4, e5) at strides 2, 4, 8, 16, 32."""
        e1 = self.relu(self.bn1(self.conv1(x)))  # (B, w0, H/2, W/2)
        e2 = self.layer1(self.maxpool(e1))  # (B, w0, H/4, W/4)
        e3 = self.layer2(e2)  # (B, w1, H/8, W/8)
        e4 = self.layer3(e3)  # (B, w2, H/16, W/16)
        e5 = self.layer4(e4)  # (B, w3, H/32, W/32)
        return e1, e2, e3, e4, e5


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """ConvTranspose 2x2 stride 2 + BN + ReLU: (B, c_in, h, w) -> (B, c_out, 2h, 2w)."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def _fuse(c_in: int, c_out: int) -> nn.Sequential:
    """Conv 3x3 + BN + ReLU merging the upsampled feature with its skip connection."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class PromptModule(nn.Module):
    """Affinity-based fusion of a retrieved normal teacher feature (the prompt) into a decoder feature.

    Args:
        channels: C of the decoder feature x.
        prompt_channels: Cp of the prompt p (the teacher's channels at this level).
        reduction: the embeddings have M = max(1, C // reduction) channels.

    Example:
        >>> pm = PromptModule(8, 6)
        >>> tuple(pm(torch.randn(2, 8, 4, 6), torch.randn(2, 6, 4, 6)).shape)
        (2, 8, 4, 6)
    """

    def __init__(self, channels: int, prompt_channels: int, reduction: int = 2):
        super().__init__()
        m = max(1, channels // reduction)
        self.mid = m
        self.theta = nn.Conv2d(channels, m, 1)  # query embedding of x
        self.phi = nn.Conv2d(prompt_channels, m, 1)  # key embedding of p
        self.g = nn.Conv2d(prompt_channels, m, 1)  # value embedding of p
        self.fuse = nn.Sequential(nn.Conv2d(channels + m + 1, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Decoder feature x (B, C, H, W) and prompt p (B, Cp, Hp, Wp) -> fused feature (B, C, H, W)."""
        assert x.ndim == 4 and p.ndim == 4 and x.shape[0] == p.shape[0], \
            f"expected x (B,C,H,W) and p (B,Cp,Hp,Wp), got {tuple(x.shape)} and {tuple(p.shape)}"
        b, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (B, M, H, W) -> (B, H*W, M)
        k = self.phi(p).flatten(2)  # (B, M, Hp*Wp)
        v = self.g(p).flatten(2).transpose(1, 2)  # (B, Hp*Wp, M)
        attn = torch.softmax(q @ k / math.sqrt(self.mid), dim=-1)  # (B, H*W, Hp*Wp)
        attended = (attn @ v).transpose(1, 2).reshape(b, self.mid, h, w)  # (B, H*W, M) -> (B, M, H, W)
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=1)  # (B, H*W, Hp*Wp) cosine affinities
        affinity = cos.amax(-1).reshape(b, 1, h, w)  # (B, 1, H, W) best match in the prompt
        return x + self.fuse(torch.cat([x, attended, affinity], 1))


class RGPKDStudent(nn.Module):
    """U-Net student: images (B, 3, H, W) (+ prompts) -> features at strides 4 / 8 / 16 and a reconstruction.

    Args:
        teacher_channels: (C1, C2, C3), the teacher's channels at strides 4, 8, 16.
        widths: encoder stage widths (w0, w1, w2, w3); the decoder mirrors them.
        use_prompts: build the three prompt modules (False: a plain U-Net; ``prompts`` must then be None).
        prompt_reduction: M = C // prompt_reduction channels in the prompt modules.
    """

    def __init__(self, teacher_channels: Sequence[int], widths: Sequence[int] = RESNET18_WIDTHS,
                 use_prompts: bool = True, prompt_reduction: int = 2):
        super().__init__()
        if len(teacher_channels) != 3:
            raise ValueError(f"RGPKDStudent: expected the teacher's 3 channel counts, got {teacher_channels}")
        if len(widths) != 4:
            raise ValueError(f"RGPKDStudent: expected 4 encoder widths, got {tuple(widths)}")
        c1, c2, c3 = (int(c) for c in teacher_channels)
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.encoder = ResNetEncoder(widths)
        self.use_prompts = use_prompts
        self.up1, self.dec1 = _up(w3, w2), _fuse(2 * w2, w2)  # H/16
        self.up2, self.dec2 = _up(w2, w1), _fuse(2 * w1, w1)  # H/8
        self.up3, self.dec3 = _up(w1, w0), _fuse(2 * w0, w0)  # H/4
        if use_prompts:  # P1 fuses the stride-16 prompt into u1, P2 stride 8 into u2, P3 stride 4 into u3
            self.prompt1 = PromptModule(w2, c3, prompt_reduction)
            self.prompt2 = PromptModule(w1, c2, prompt_reduction)
            self.prompt3 = PromptModule(w0, c1, prompt_reduction)
        self.head1 = nn.Conv2d(w0, c1, 1)  # d3 -> s1 (C1, H/4)
        self.head2 = nn.Conv2d(w1, c2, 1)  # d2 -> s2 (C2, H/8)
        self.head3 = nn.Conv2d(w2, c3, 1)  # d1 -> s3 (C3, H/16)
        h0 = max(1, w0 // 2)
        self.reconstruct = nn.Sequential(_up(w0, h0), nn.ConvTranspose2d(h0, 3, 2, stride=2), nn.Sigmoid())

    def forward(self, x: torch.Tensor, prompts: Sequence[torch.Tensor] | None = None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Student features and reconstruction.

        Args:
            x: ImageNet-normalised images (B, 3, H, W), H and W multiples of 32.
            prompts: the retrieved normal teacher features [p1 (B, C1, h1, w1), p2 (B, C2, ..),
                p3 (B, C3, ..)] at strides 4, 8, 16, or None to skip the prompt modules.

        Returns:
            ((s1 (B, C1, H/4, W/4), s2 (B, C2, H/8, W/8), s3 (B, C3, H/16, W/16)), reconstruction (B, 3, H, W)
            in [0, 1]).
        """
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0, \
            f"RGPKDStudent: H and W must be multiples of 32, got {tuple(x.shape[-2:])}"
        if prompts is not None:
            assert self.use_prompts, "RGPKDStudent was built with use_prompts=False: pass prompts=None"
            assert len(prompts) == 3, f"expected 3 prompts (strides 4, 8, 16), got {len(prompts)}"
        e1, e2, e3, e4, e5 = self.encoder(x)
        del e1  # the reconstruction decodes from d3, not from the stride-2 skip (it would copy the input)
        u1 = self.up1(e5)  # (B, w2, H/16, W/16)
        if prompts is not None:
            u1 = self.prompt1(u1, prompts[2])
        d1 = self.dec1(torch.cat([u1, e4], 1))  # (B, w2, H/16, W/16)
        u2 = self.up2(d1)  # (B, w1, H/8, W/8)
        if prompts is not None:
            u2 = self.prompt2(u2, prompts[1])
        d2 = self.dec2(torch.cat([u2, e3], 1))  # (B, w1, H/8, W/8)
        u3 = self.up3(d2)  # (B, w0, H/4, W/4)
        if prompts is not None:
            u3 = self.prompt3(u3, prompts[0])
        d3 = self.dec3(torch.cat([u3, e2], 1))  # (B, w0, H/4, W/4)
        rec = self.reconstruct(d3)  # (B, 3, H, W)
        return (self.head1(d3), self.head2(d2), self.head3(d1)), rec


def load_resnet18_encoder(encoder: ResNetEncoder, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy ImageNet ResNet-18 weights (torchvision names, ``fc`` ignored) into an encoder of widths 64-512.

    Raises:
        ValueError: the encoder has other widths, or the state dict lacks / misshapes an encoder tensor.
    """
    want = encoder.state_dict()
    sd = {k: v for k, v in state_dict.items() if k in want}
    missing = sorted(set(want) - set(sd))
    shapes = [k for k in sd if tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or shapes:
        raise ValueError(f"ResNet-18 weights do not fit this encoder (missing {missing[:3]}, shape mismatch "
                         f"{shapes[:3]}); pretrained student weights need widths {RESNET18_WIDTHS}")
    encoder.load_state_dict(sd)
