"""Assembly of MuDeNet's four networks: teacher T, structural student S1, autoencoder A, logical student S2.

The module also holds, as buffers, everything a checkpoint needs besides weights: the distillation target's
chosen backbone channels and their z-score statistics, the teacher's per-level channel mean/std (used to
normalise X^l before the losses and maps, as EfficientAD does) and the per-level, per-branch map
normalisation statistics calibrated on the validation split.

Inference path (eval mode, no autograd, not tracing): ``raw_maps`` never materialises the maps X^l, S1^l,
S2^l. The descriptor networks' folded copies give their level features before the 1x1 heads
(channels-last); the teacher normalisation is folded into the teacher's head (``inference_heads``), and
sum_c (X^l - S1^l)^2 and sum_c (A^l - S2^l)^2 become two (resp. one) matrix products per chunk of pixels,
squared in place (``scoring.squared_head_distance``). Only the levels and branches asked for run. On one CPU
thread (cpu profile, batch 8, 128 px) this takes ``MuDeNet.predict`` from about 27 to 57 images/s; the maps
equal the plain formula up to float32 rounding (tests/unit/test_mudenet_fast_inference.py).

Example:
    >>> nets = MuDeNetNets(image_size=64, width=8, out_channels=4, latent_dim=4, ae_width=8)
    >>> x, s1, a, s2 = nets(torch.zeros(2, 3, 64, 64))
    >>> len(x), tuple(s2[2].shape)
    (3, (2, 4, 32, 32))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mudenet_core import scoring
from mudenet_core.nets.autoencoder import Autoencoder
from mudenet_core.nets.efficientnet_lite import inference_path_enabled, weights_cached
from mudenet_core.nets.pdn import DescriptorNet

# layout of the descriptor networks' features in the fused scoring path (channels-last: faster at width 16
# as well once no contiguous head output is needed; see mudenet_core/nets/pdn.py)
FUSED_CHANNELS_LAST = True


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

    def _inference_path(self, *nets: DescriptorNet) -> bool:
        """True when the fast path may run: ``nets`` (default all three) in eval mode, no autograd/tracing."""
        nets = nets or (self.teacher, self.student, self.logical_student)
        return inference_path_enabled() and not any(n.training for n in nets)

    def inference_heads(self) -> tuple[dict[str, torch.Tensor], ...]:
        """Per level, the 1x1 heads as (width, C) matrices for pixel rows, teacher normalisation folded in.

        ``teacher_w``/``teacher_b``: X^l = h_T W + b with ``(W_T h + b_T - mean) / std`` folded (float64
        arithmetic, cast back); ``student_w = -W_S1^T`` and ``structural_b = b_T' - b_S1`` (so X^l - S1^l is
        two products and one bias); ``logical_w = -W_S2^T``, ``logical_b = -b_S2`` (A^l - S2^l). Cached like
        the folded networks: rebuilt when a head weight or the teacher statistics change; not in the state
        dict.
        """
        def build() -> tuple[dict[str, torch.Tensor], ...]:
            heads = []
            for lv in range(self.num_levels):
                t_head, s_head = self.teacher.heads[lv], self.student.heads[lv]
                l_head = self.logical_student.heads[lv]
                dtype = t_head.weight.dtype
                std, mean = self.teacher_std[lv].double(), self.teacher_mean[lv].double()  # (C,)
                w_t = t_head.weight.double().flatten(1) / std[:, None]  # (C, width)
                b_t = (t_head.bias.double() - mean) / std  # (C,)
                heads.append({
                    "teacher_w": w_t.t().contiguous().to(dtype),  # (width, C)
                    "teacher_b": b_t.to(dtype),
                    "student_w": -s_head.weight.detach().flatten(1).t().contiguous(),
                    "structural_b": (b_t - s_head.bias.double()).to(dtype),
                    "logical_w": -l_head.weight.detach().flatten(1).t().contiguous(),
                    "logical_b": -l_head.bias.detach().clone(),
                })
            return tuple(heads)

        return weights_cached(self, "_heads_cache", build, self.teacher_mean, self.teacher_std,
                              self.teacher.heads, self.student.heads, self.logical_student.heads)

    def teacher_maps(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, ...]:
        """Teacher maps X^l (B, C, h, w), normalised with ``teacher_mean/std`` if ``normalize``.

        On the inference path the normalisation is folded into the teacher's 1x1 heads (same maps up to
        float32 rounding).
        """
        if normalize and self._inference_path(self.teacher):
            heads = self.inference_heads()
            return tuple(
                F.conv2d(h, hd["teacher_w"].t()[:, :, None, None], hd["teacher_b"]).contiguous()
                for h, hd in zip(self.teacher.folded().features(images), heads, strict=True)
            )  # S x (B, C, h, w)
        xs = self.teacher(images)
        if not normalize:
            return xs
        return tuple(
            (x - self.teacher_mean[i][:, None, None]) / self.teacher_std[i][:, None, None]
            for i, x in enumerate(xs)
        )

    def raw_maps(
        self,
        images: torch.Tensor,
        levels: Sequence[int] | None = None,
        structural: bool = True,
        logical: bool = True,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) -> raw maps (B, 2, S, h, w), as ``scoring.raw_maps(*self(images))``.

        [:, 0] = sum_c (X^l - S1^l)^2, [:, 1] = sum_c (A^l - S2^l)^2. Only the 1-based ``levels`` (default
        all) of the enabled branches are computed (networks that no enabled map needs do not run, levels past
        the last one asked for are not computed); the other entries are zero. On the inference path the
        1x1 heads, the teacher normalisation and the squared differences are fused
        (:func:`scoring.squared_head_distance`) on channels-last features; otherwise the networks' maps are
        compared as they are.
        """
        assert images.ndim == 4 and images.shape[-2:] == (self.image_size, self.image_size), (
            f"expected (B,3,{self.image_size},{self.image_size}), got {tuple(images.shape)}"
        )
        s = self.num_levels
        levels = tuple(range(1, s + 1)) if levels is None else tuple(sorted(set(levels)))
        bad = [lv for lv in levels if not 1 <= lv <= s]
        if bad or not levels or not (structural or logical):
            raise ValueError(f"raw_maps: need levels in 1..{s} and a branch, got levels={levels}, "
                             f"structural={structural}, logical={logical}")
        b, size = images.shape[0], self.image_size // 2
        if not self._inference_path():
            raw = scoring.raw_maps(*self(images))  # (B, 2, S, h, w)
            keep = torch.tensor([[float(on and lv in levels) for lv in range(1, s + 1)]
                                 for on in (structural, logical)], dtype=raw.dtype, device=raw.device)
            return raw * keep[None, :, :, None, None]  # (B, 2, S, h, w), the entries not asked for zero
        heads, upto, cl = self.inference_heads(), levels[-1], FUSED_CHANNELS_LAST
        if cl:  # once for all four networks (their own conversions are then no-ops)
            images = images.contiguous(memory_format=torch.channels_last)

        def rows(t: torch.Tensor) -> torch.Tensor:  # (B, K, h, w) -> (B*h*w, K), a view when channels-last
            return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

        out = images.new_zeros(2, s, b * size * size)  # (2, S, B*h*w)
        if structural:
            h_t = self.teacher.folded().features(images, upto, channels_last=cl)
            h_s1 = self.student.folded().features(images, upto, channels_last=cl)
            for lv in levels:
                hd = heads[lv - 1]
                scoring.squared_head_distance([rows(h_t[lv - 1]), rows(h_s1[lv - 1])],
                                              [hd["teacher_w"], hd["student_w"]], hd["structural_b"],
                                              out=out[0, lv - 1])
            del h_t, h_s1
        if logical:
            h_s2 = self.logical_student.folded().features(images, upto, channels_last=cl)
            a = self.autoencoder.channels_last_maps(images, levels)
            for lv, a_lv in zip(levels, a, strict=True):
                hd = heads[lv - 1]
                scoring.squared_head_distance([rows(h_s2[lv - 1])], [hd["logical_w"]], hd["logical_b"],
                                              base=rows(a_lv), out=out[1, lv - 1])
        return out.view(2, s, b, size, size).permute(2, 0, 1, 3, 4).contiguous()  # (B, 2, S, h, w)

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
