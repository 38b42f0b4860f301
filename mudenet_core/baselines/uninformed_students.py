"""Uninformed Students (Bergmann et al., CVPR 2020): student-teacher anomaly detection with patch descriptors.

Per patch size p in {17, 33, 65} (one *scale*):

1. **Teacher pretraining.** A patch network T^ maps a p x p patch to a descriptor of size d = 128 (the paper's
   architectures, table in :data:`PATCH_ARCHS`; LeakyReLU(5e-3) after every convolution but the last). It is
   trained on random patches with three losses (all pure functions below): knowledge distillation, where a
   linear decoder regresses the pretrained backbone's (standardised) descriptor of the patch
   (:func:`distillation_loss`; the paper used ResNet-18's 512-d pooled features of the patch resized to 224);
   a triplet loss with positives from augmented copies of the anchor patch (:func:`triplet_loss`); and a
   decorrelation (compactness) loss on the descriptors' correlation matrix (:func:`compactness_loss`).
   Patches come from the category's training images (default) or the DTD textures (``teacher_source="dtd"``).
2. **Students.** An ensemble of M = 3 students with the teacher's architecture regresses the teacher's dense
   descriptors, normalised with the per-channel mean/std over the training images (buffers ``t_mean``,
   ``t_std``), with the squared error. They must be trained until they explain most of that variance: students
   left near the teacher's mean (error ~ d) give e ~ ||y||^2, which does not single out anomalies (``fit``
   warns when the validation error exceeds ``COLLAPSE_FRACTION * d``).
3. **Scoring.** Regression error e = ||mean_m S_m - y||^2 (:func:`regression_error`) and predictive
   variance v = 1/M sum_m ||S_m||^2 - ||mean_m S_m||^2 (:func:`predictive_variance`) at every pixel; each is
   standardised with its mean/std over all pixels of the validation images (buffers), their sum is the
   scale's map, the maps are upsampled to the input size and averaged over scales, then Gaussian-blurred;
   the image score is the map's maximum.

Dense evaluation (``dense_mode``): the patch networks contain 2x2 stride-2 max-pools, so applied to a whole
image they give descriptors only every ``stride`` = 2^(number of pools) pixels.

* ``"dilated"`` (exact, the paper's dense output): each pool becomes a stride-1 pool and every later layer is
  dilated by the accumulated stride (the "a trous" equivalence of Bailer et al.'s fast dense feature
  extraction), which gives the patch network's output centred on *every* pixel. Cost grows with stride^2.
* ``"strided"`` (cheap): the network is run with its pools, giving descriptors at stride 1 / 4 / 8 for
  p = 17 / 33 / 65, and the score maps are bilinearly upsampled. These are exactly the dilated outputs at
  every ``stride``-th pixel (tested), so this is a subsampling of the dense output, not another model.

In both modes the image is padded (reflect) by the network's extent so the output grid covers the image.
The receptive field (extent) is 17 / 32 / 60 pixels: the floor of the stride-2 pools drops the last rows of
the 33 and 65 patches, exactly as in the paper's tables.

Inference path (:meth:`ScaleModel.fused_layers`, used by :meth:`ScaleModel.forward` and so by ``predict`` when
autograd is off and the scale is in eval mode): the teacher and the M students of a scale see the same padded
image, so they run as one network: the first convolutions concatenated along the output channels, every later
one a grouped convolution (groups = M + 1), the teacher normalisation folded into the teacher's last layer,
each LeakyReLU moved behind the max-pool that follows it (max commutes with a non-decreasing function), on
channels-last tensors, one image at a time (the activations stay in cache). Error and variance are then read
off the (M + 1) d output channels. The same maps as the plain per-network modules up to float32 rounding
(``tests/unit/test_us_fast_inference.py``); training, :meth:`ScaleModel.error_and_variance` (the calibration
statistics) and the state dict do not use or hold the fused copy.

Example:
    >>> net = PatchDescriptorNet(65, descriptor_dim=8, width=4)
    >>> net.extent, net.stride, tuple(net(torch.zeros(1, 3, 65, 65)).shape)
    (60, 8, (1, 8, 1, 1))
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mudenet_core.baselines.ae import draw_seed, seeded
from mudenet_core.baselines.common import gaussian_blur, iterate_images
from mudenet_core.config import ConfigBase, ConfigError, nonnegative, positive
from mudenet_core.io import REPO_ROOT, CheckpointError, load_checkpoint, load_weights, save_checkpoint
from mudenet_core.nets.efficientnet_lite import inference_path_enabled, weights_cached
from mudenet_core.utils import progress, resolve_device

LEAKY_SLOPE = 5e-3  # the paper's LeakyReLU slope

# The paper's patch networks: ("conv", kernel, width) with width in {"w", "2w", "d"} (w = 128, d = 128 in the
# paper), or ("pool",) for a 2x2 stride-2 max-pool.
PATCH_ARCHS: dict[int, list[tuple]] = {
    17: [("conv", 6, "w"), ("conv", 5, "2w"), ("conv", 5, "2w"), ("conv", 4, "d")],
    33: [("conv", 5, "w"), ("pool",), ("conv", 5, "2w"), ("pool",), ("conv", 2, "2w"), ("conv", 4, "d")],
    65: [
        ("conv", 5, "w"),
        ("pool",),
        ("conv", 5, "w"),
        ("pool",),
        ("conv", 5, "w"),
        ("pool",),
        ("conv", 4, "2w"),
        ("conv", 1, "d"),
    ],
}

# fit warns when the students' validation regression error exceeds this fraction of d (the error of predicting
# the normalised teacher's mean): such students are untrained and their maps do not detect anomalies
COLLAPSE_FRACTION = 0.6

# Config keys that fix the networks' shapes (checked when resuming).
ARCH_KEYS = ["image_size", "patch_sizes", "descriptor_dim", "width", "n_students", "dense_mode"]


@dataclasses.dataclass(frozen=True)
class USConfig(ConfigBase):
    """Configuration of the Uninformed Students detector (defaults: the ``paper`` profile)."""

    image_size: int = positive(256)  # H = W of the input images
    patch_sizes: tuple[int, ...] = positive((17, 33, 65))  # one teacher + student ensemble per patch size
    descriptor_dim: int = positive(128)  # d, descriptor size
    width: int = positive(128)  # base width w of the patch networks (their 256-channel layers use 2w)
    n_students: int = positive(3)  # M, ensemble size per scale
    dense_mode: Literal["dilated", "strided"] = "dilated"  # exact dense output, or strided + upsampling
    # teacher pretraining
    teacher_source: Literal["train", "dtd"] = "train"  # where the pretraining patches come from
    dtd_root: str = ""  # DTD folder for teacher_source="dtd" ("": <repo>/../shared/data/dtd)
    dtd_max_images: int = positive(200)  # DTD images loaded for pretraining
    kd_backbone: str = "resnet18"  # registry backbone that provides the distillation target
    kd_layers: tuple[str, ...] = ("layer4",)  # its layers, global-average-pooled and concatenated
    kd_pretrained: bool = True  # ImageNet weights for the backbone (False: random, for tests only)
    kd_input_size: int = positive(224)  # patches are resized to this before the backbone
    teacher_steps: int = positive(50_000)  # optimisation steps per teacher
    teacher_batch_size: int = positive(64)  # patches per step
    teacher_lr: float = positive(2e-4)  # Adam learning rate
    teacher_weight_decay: float = nonnegative(1e-5)  # Adam weight decay
    lambda_kd: float = nonnegative(1.0)  # weight of the distillation loss
    lambda_metric: float = nonnegative(1.0)  # weight of the triplet loss
    lambda_compact: float = nonnegative(1.0)  # weight of the decorrelation loss
    triplet_margin: float = nonnegative(1.0)  # margin delta of the triplet loss
    positive_shift: int = nonnegative(4)  # positives: anchor window shifted by up to this many pixels ...
    positive_noise: float = nonnegative(0.1)  # ... plus Gaussian noise of this std (normalised image units)
    # students
    student_epochs: int = positive(100)  # passes over train/good per student ensemble
    student_batch_size: int = positive(1)  # images per step
    student_crop: int = nonnegative(0)  # train on random crop x crop windows of each image (0: whole images)
    student_lr: float = positive(1e-4)  # Adam learning rate
    student_weight_decay: float = nonnegative(1e-5)  # Adam weight decay
    # scoring
    map_sigma: float = nonnegative(4.0)  # Gaussian blur of the final map, in pixels (0: none)
    eval_batch_size: int = positive(4)  # batch size of statistics, calibration passes

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        bad = [p for p in self.patch_sizes if p not in PATCH_ARCHS]
        if bad or not self.patch_sizes:
            raise ConfigError(f"USConfig.patch_sizes must be one or more of {sorted(PATCH_ARCHS)}, got "
                              f"{self.patch_sizes}")


# ------------------------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------------------------
class PatchDescriptorNet(nn.Module):
    """The paper's patch network for patch size p: a p x p patch (B, 3, p, p) -> descriptor (B, d, 1, 1).

    Applied to a larger input it is fully convolutional: ``forward`` gives descriptors every ``stride``
    pixels, :meth:`dense` (dilated) at every pixel; both are "valid" (no padding); see :func:`describe`.

    Args:
        patch_size: 17, 33 or 65.
        descriptor_dim: d.
        width: w (128 in the paper).

    Attributes:
        extent: receptive field (pixels) of one output; <= patch_size.
        stride: 2 ** number of pools (1, 4, 8).
    """

    def __init__(self, patch_size: int, descriptor_dim: int = 128, width: int = 128):
        super().__init__()
        if patch_size not in PATCH_ARCHS:
            raise ValueError(
                f"PatchDescriptorNet: patch_size must be one of {sorted(PATCH_ARCHS)}, got {patch_size}"
            )
        self.patch_size = patch_size
        widths = {"w": width, "2w": 2 * width, "d": descriptor_dim}
        layers: list[nn.Module] = []
        c_in, span, dil = 3, 0, 1
        arch = PATCH_ARCHS[patch_size]
        n_conv = sum(1 for a in arch if a[0] == "conv")
        i_conv = 0
        for a in arch:
            if a[0] == "pool":
                layers.append(nn.MaxPool2d(2, stride=2))
                span += dil
                dil *= 2
                continue
            _, k, wname = a
            layers.append(nn.Conv2d(c_in, widths[wname], k))
            span += (k - 1) * dil
            c_in = widths[wname]
            i_conv += 1
            if i_conv < n_conv:
                layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        self.layers = nn.Sequential(*layers)
        self.extent = span + 1
        self.stride = dil
        self.descriptor_dim = descriptor_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strided, valid: (B, 3, H, W) -> (B, d, (H - extent) // stride + 1, ...)."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        return self.layers(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated (stride-1 equivalent), valid: (B, 3, H, W) -> (B, d, H - extent + 1, W - extent + 1).

        Output (i, j) equals ``forward`` of the window x[..., i:i+extent, j:j+extent].
        """
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        dil = 1
        for layer in self.layers:
            if isinstance(layer, nn.MaxPool2d):
                x = F.max_pool2d(x, 2, stride=1, dilation=dil)
                dil *= 2
            elif isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, layer.weight, layer.bias, dilation=dil)
            else:
                x = layer(x)
        return x


def pad_image(images: torch.Tensor, extent: int) -> torch.Tensor:
    """Pad (reflect; replicate for tiny images) so a valid network of this extent covers every pixel.

    Returns:
        (B, 3, H + extent - 1, W + extent - 1).
    """
    lo, hi = (extent - 1) // 2, extent - 1 - (extent - 1) // 2
    h, w = images.shape[-2:]
    mode = "reflect" if max(lo, hi) < min(h, w) else "replicate"
    return F.pad(images, (lo, hi, lo, hi), mode=mode)


def max_pool_2x2(x: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
    """``F.max_pool2d(x, 2, stride, dilation=dilation)`` as three maxima of strided views.

    The same values (NaN propagates as in the pool); several times faster than the pool on CPU for NCHW
    tensors and faster on channels-last ones too, and the output keeps the input's memory format.

    Args:
        x: (B, C, h, w).
        stride: 2 (the strided networks) or 1 (the dilated ones).
        dilation: distance of the two taps per axis.

    Returns:
        (B, C, (h - dilation - 1) // stride + 1, (w - dilation - 1) // stride + 1).

    Example:
        >>> x = torch.randn(2, 3, 9, 8)
        >>> torch.equal(max_pool_2x2(x, 2, 1), F.max_pool2d(x, 2, 2))
        True
    """
    assert x.ndim == 4, f"expected (B, C, h, w), got {tuple(x.shape)}"
    h, w = ((n - dilation - 1) // stride + 1 for n in x.shape[-2:])

    def tap(i: int, j: int) -> torch.Tensor:  # (B, C, h', w'): the window element at offset (i, j)
        return x[..., i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride]

    return torch.maximum(
        torch.maximum(tap(0, 0), tap(0, dilation)), torch.maximum(tap(dilation, 0), tap(dilation, dilation))
    )


def run_net(net: PatchDescriptorNet, padded: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply ``net`` to a padded image in the given dense mode (``"dilated"`` or ``"strided"``)."""
    if mode == "dilated":
        return net.dense(padded)
    if mode == "strided":
        return net(padded)
    raise ValueError(f"dense_mode must be 'dilated' or 'strided', got {mode!r}")


def describe(net: PatchDescriptorNet, images: torch.Tensor, mode: str) -> torch.Tensor:
    """Descriptors of ``net`` over a whole image, padded so the output grid covers the image.

    Args:
        net: a patch network.
        images: (B, 3, H, W).
        mode: ``"dilated"`` -> (B, d, H, W), one descriptor centred on every pixel; ``"strided"`` ->
            (B, d, ceil(H / s), ceil(W / s)), output (i, j) centred on pixel (s i, s j).

    Returns:
        descriptors (B, d, h, w).
    """
    return run_net(net, pad_image(images, net.extent), mode)


def grid_to_image(maps: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear interpolation of maps on a network's output grid to image pixels.

    Output (i, j) of :func:`describe` is centred on pixel (stride i, stride j) (to within half a pixel for the
    even extents 32 and 60), so pixel (y, x) reads the grid at (y / stride, x / stride); pixels past the last
    grid row or column take its value. ``F.interpolate(..., align_corners=False)``, used before, puts grid
    cell i at pixel stride i + (stride - 1) / 2 instead: every strided map was shifted by 1.5 px (p = 33) and
    3.5 px (p = 65) down and to the right.

    Args:
        maps: (B, C, h, w) with h = ceil(H / stride), w = ceil(W / stride).
        stride: the grid's stride in pixels (1: the dense grid, returned unchanged).
        size: (H, W).

    Returns:
        (B, C, H, W).

    Example:
        >>> m = torch.zeros(1, 1, 4, 4); m[0, 0, 1, 2] = 1.0
        >>> up = grid_to_image(m, 8, (32, 32))
        >>> divmod(int(up.flatten().argmax()), 32), float(up[0, 0, 12, 16])
        ((8, 16), 0.5)
    """
    assert maps.ndim == 4, f"expected (B, C, h, w), got {tuple(maps.shape)}"
    size = (int(size[0]), int(size[1]))
    grid = tuple(-(-n // stride) for n in size)
    assert tuple(maps.shape[-2:]) == grid, (
        f"a stride-{stride} grid of {size} is {grid}, got {tuple(maps.shape)}")
    if stride == 1:
        return maps

    def weights(n_grid: int, n_pix: int) -> torch.Tensor:  # (n_pix, n_grid) interpolation matrix
        pos = (torch.arange(n_pix, dtype=torch.float64) / stride).clamp(max=n_grid - 1)  # grid coordinate
        i0 = pos.floor().long()
        i1 = (i0 + 1).clamp(max=n_grid - 1)
        frac = pos - i0
        a = torch.zeros(n_pix, n_grid, dtype=torch.float64)
        rows = torch.arange(n_pix)
        a.index_put_((rows, i0), 1 - frac, accumulate=True)
        a.index_put_((rows, i1), frac, accumulate=True)
        return a.to(maps)

    return torch.einsum("yh,bchw,xw->bcyx", weights(grid[0], size[0]), maps, weights(grid[1], size[1]))


class ScaleModel(nn.Module):
    """One scale: teacher, M students and the statistics that normalise its descriptors and scores.

    Buffers: ``t_mean``, ``t_std`` (d,) teacher descriptor statistics over the training images; ``e_mean``,
    ``e_std``, ``v_mean``, ``v_std`` () regression-error / variance statistics over the validation pixels.
    """

    def __init__(self, patch_size: int, descriptor_dim: int, width: int, n_students: int, dense_mode: str):
        super().__init__()
        self.dense_mode = dense_mode
        self.teacher = PatchDescriptorNet(patch_size, descriptor_dim, width)
        self.students = nn.ModuleList(
            PatchDescriptorNet(patch_size, descriptor_dim, width) for _ in range(n_students)
        )
        self.register_buffer("t_mean", torch.zeros(descriptor_dim))
        self.register_buffer("t_std", torch.ones(descriptor_dim))
        for k in ("e_mean", "v_mean"):
            self.register_buffer(k, torch.tensor(0.0))
        for k in ("e_std", "v_std"):
            self.register_buffer(k, torch.tensor(1.0))

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        """Teacher descriptors (B, d, h, w) -> (y - t_mean) / t_std, per channel."""
        return (y - self.t_mean.view(1, -1, 1, 1)) / self.t_std.view(1, -1, 1, 1)

    def teacher_target(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised teacher descriptors (B, d, h, w) of images (B, 3, H, W)."""
        return self.normalise(describe(self.teacher, images, self.dense_mode))

    def student_preds(self, images: torch.Tensor) -> torch.Tensor:
        """Stacked student predictions (M, B, d, h, w)."""
        return torch.stack([describe(s, images, self.dense_mode) for s in self.students])

    def error_and_variance(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw regression error and predictive variance, each (B, h, w), from the per-network modules."""
        preds = self.student_preds(images)
        return regression_error(preds, self.teacher_target(images)), predictive_variance(preds)

    def _inference_path(self) -> bool:
        """True when :meth:`forward` may run the fused copy: eval mode, no autograd, not tracing."""
        return inference_path_enabled() and not any(m.training for m in self.modules())

    def fused_layers(self) -> tuple[tuple, ...]:
        """The teacher and the M students as one network on the (M + 1) w-channel stack, for inference.

        Steps, in order: ``("conv", weight, bias, groups, dilation)`` with the per-network weights stacked
        along the output channels (students 0 .. M-1, then the teacher; ``groups`` 1 for the first layer,
        which all networks apply to the same image, M + 1 after it); ``("pool", stride, dilation)``;
        ``("leaky",)``. A LeakyReLU followed by a pool is moved behind it (max commutes with a
        non-decreasing function: the same values on a quarter of the pixels in the strided mode). The
        teacher's last layer has the normalisation folded in: (W y + b - t_mean) / t_std, computed in float64
        and cast back. The dilations are those of ``dense_mode``.

        Cached like ``MuDeNetNets.inference_heads``: rebuilt whenever a parameter or buffer of the scale is
        replaced, moved or written in place
        (:func:`~mudenet_core.nets.efficientnet_lite.weights_cached`); kept out of the state dict.
        """

        def build() -> tuple[tuple, ...]:
            nets = [*self.students, self.teacher]
            dilated = self.dense_mode == "dilated"
            i_last = max(i for i, layer in enumerate(self.teacher.layers) if isinstance(layer, nn.Conv2d))
            steps: list[tuple] = []
            dil = 1
            for i, layer in enumerate(self.teacher.layers):
                if isinstance(layer, nn.MaxPool2d):
                    step = ("pool", 1, dil) if dilated else ("pool", 2, 1)
                    if dilated:  # later layers read their inputs dil pixels apart (PatchDescriptorNet.dense)
                        dil *= 2
                    if steps and steps[-1][0] == "leaky":  # leaky(pool(y)) == pool(leaky(y)), on fewer pixels
                        steps.insert(len(steps) - 1, step)
                    else:
                        steps.append(step)
                elif isinstance(layer, nn.Conv2d):
                    weights = [n.layers[i].weight.detach() for n in nets]  # each (c_out, c_in, k, k)
                    biases = [n.layers[i].bias.detach() for n in nets]  # each (c_out,)
                    if i == i_last:  # the teacher's normalisation, folded into its last layer
                        std, mean = self.t_std.double(), self.t_mean.double()  # (d,)
                        weights[-1] = (weights[-1].double() / std.view(-1, 1, 1, 1)).to(weights[-1].dtype)
                        biases[-1] = ((biases[-1].double() - mean) / std).to(biases[-1].dtype)
                    # ((M + 1) c_out, c_in, k, k), channels-last like the activations (no copy per call)
                    w = torch.cat(weights).contiguous(memory_format=torch.channels_last)
                    steps.append(("conv", w, torch.cat(biases), 1 if not steps else len(nets), dil))
                else:
                    assert isinstance(layer, nn.LeakyReLU), f"unexpected layer {layer}"
                    steps.append(("leaky",))
            return tuple(steps)

        return weights_cached(self, "_fused_cache", build)

    def fused_error_and_variance(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`error_and_variance` through :meth:`fused_layers` (inference only, no autograd).

        Args:
            images: (B, 3, H, W).

        Returns:
            regression error and predictive variance, each (B, h, w).
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        plan = self.fused_layers()
        m, d = len(self.students), self.teacher.descriptor_dim
        errors, variances = [], []
        # on CPU one image at a time: its activations stay in cache (measured ~1.2x over a batch of 8)
        for x in images.split(1) if images.device.type == "cpu" else (images,):
            y = pad_image(x, self.teacher.extent).contiguous(memory_format=torch.channels_last)
            for step in plan:
                if step[0] == "conv":
                    _, w, b, groups, dil = step
                    y = F.conv2d(y, w, b, dilation=dil, groups=groups)  # (b, (M + 1) c, h', w')
                elif step[0] == "pool":
                    y = max_pool_2x2(y, step[1], step[2])
                else:
                    y = F.leaky_relu_(y, LEAKY_SLOPE)  # y is this step's own fresh tensor
            # channels-last (b, (M + 1) d, h, w) -> a view (b, h, w, M + 1, d): students 0 .. M-1, then the
            # normalised teacher; error and variance reduced over the contiguous last axis (on a permuted
            # (M, b, d, h, w) view the same reductions run ~4x slower)
            s = y.permute(0, 2, 3, 1).unflatten(-1, (m + 1, d))
            preds = s[..., :m, :]  # (b, h, w, M, d)
            errors.append(regression_error(preds, s[..., m, :], member_dim=-2, channel_dim=-1))  # (b, h, w)
            variances.append(predictive_variance(preds, member_dim=-2, channel_dim=-1))
        return torch.cat(errors), torch.cat(variances)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised score map e~ + v~ (B, 1, h, w) on this scale's grid.

        Runs :meth:`fused_error_and_variance` in eval mode without autograd, :meth:`error_and_variance`
        otherwise.
        """
        if self._inference_path():
            e, v = self.fused_error_and_variance(images)
        else:
            e, v = self.error_and_variance(images)
        return ((e - self.e_mean) / self.e_std + (v - self.v_mean) / self.v_std).unsqueeze(1)


# ------------------------------------------------------------------------------------------------------------
# losses and scores (pure functions)
# ------------------------------------------------------------------------------------------------------------
def distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Knowledge distillation ||D(T^(p)) - P(p)||^2 / C, averaged over the batch.

    Divided by the target width C (i.e. the mean squared error) so that the loss does not grow with the
    backbone's width (512 for ResNet-18's layer4, 320 for Lite0's stage7) and stays commensurate with the
    triplet and decorrelation terms at the paper's weights of 1.

    Args:
        decoded: decoder outputs D(T^(p)) (B, C).
        target: standardised backbone descriptors P(p) (B, C).
    """
    assert decoded.shape == target.shape, f"shape mismatch {tuple(decoded.shape)} vs {tuple(target.shape)}"
    return (decoded - target).pow(2).mean()


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    """The paper's metric-learning loss, averaged over the batch.

    L_m = max(0, margin + d+ - d-), d+ = ||a - p||^2, d- = min(||a - n||^2, ||p - n||^2) (squared Euclidean).

    Args:
        anchor: descriptors of the anchor patches (B, d).
        positive: descriptors of their augmented copies (B, d).
        negative: descriptors of other random patches (B, d).
        margin: delta > 0.

    Example:
        >>> a, p, n = torch.tensor([[0., 0.]]), torch.tensor([[1., 0.]]), torch.tensor([[0., 1.]])
        >>> float(triplet_loss(a, p, n, margin=1.0))
        1.0
    """
    assert anchor.shape == positive.shape == negative.shape and anchor.ndim == 2, (
        "expected three (B, d) tensors"
    )
    d_pos = (anchor - positive).pow(2).sum(1)  # (B,)
    d_neg = torch.minimum((anchor - negative).pow(2).sum(1), (positive - negative).pow(2).sum(1))  # (B,)
    return F.relu(margin + d_pos - d_neg).mean()


def correlation_matrix(descriptors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation (d, d) between the descriptor dimensions over a batch (N, d)."""
    assert descriptors.ndim == 2 and descriptors.shape[0] > 1, (
        f"expected (N>1, d), got {tuple(descriptors.shape)}"
    )
    x = descriptors - descriptors.mean(0, keepdim=True)  # (N, d)
    x = x / (x.pow(2).sum(0, keepdim=True).sqrt() + eps)
    return x.T @ x  # (d, d)


def compactness_loss(corr: torch.Tensor) -> torch.Tensor:
    """Decorrelation loss on a correlation matrix (d, d): the mean squared off-diagonal entry.

    Zero exactly for the identity and positive for any other correlation matrix. The paper writes
    sum_{i != j} c_ij; squaring keeps the loss bounded below by 0 (negative correlations are penalised
    too) and the mean keeps its scale independent of d.

    Example:
        >>> float(compactness_loss(torch.eye(3))), float(compactness_loss(torch.tensor([[1., .5], [.5, 1.]])))
        (0.0, 0.25)
    """
    assert corr.ndim == 2 and corr.shape[0] == corr.shape[1] > 1, f"expected (d, d), got {tuple(corr.shape)}"
    d = corr.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / (d * (d - 1))


def regression_error(
    preds: torch.Tensor, target: torch.Tensor, *, member_dim: int = 0, channel_dim: int = 1
) -> torch.Tensor:
    """E = ||mean_m S_m - y||^2 summed over the descriptor channels.

    Args:
        preds: student predictions (M, B, d, h, w) (another layout: ``member_dim``, ``channel_dim``).
        target: normalised teacher descriptors (B, d, h, w), ``preds`` without the member axis.
        member_dim: the students' axis of ``preds``.
        channel_dim: the descriptor axis of ``target`` (and of ``preds`` once ``member_dim`` is removed).

    Returns:
        (B, h, w) (``target``'s shape without ``channel_dim``).
    """
    mean = preds.mean(member_dim)
    assert preds.ndim == 5 and mean.shape == target.shape, (
        f"preds (M,B,d,h,w) {tuple(preds.shape)} and target (B,d,h,w) {tuple(target.shape)} disagree"
    )
    return (mean - target).pow(2).sum(channel_dim)


def predictive_variance(preds: torch.Tensor, *, member_dim: int = 0, channel_dim: int = 1) -> torch.Tensor:
    """V = 1/M sum_m ||S_m||^2 - ||mean_m S_m||^2, the ensemble's variance summed over channels.

    Computed as 1/M^2 sum_{m<n} ||S_m - S_n||^2 (the same quantity), which is exactly zero when the students
    agree and never negative.

    Args:
        preds: (M, B, d, h, w) (another layout: ``member_dim``, ``channel_dim``).
        member_dim: the students' axis.
        channel_dim: the descriptor axis of one student's (B, d, h, w) prediction.

    Returns:
        (B, h, w).

    Example:
        >>> p = torch.tensor([[1., 0.], [3., 0.]]).view(2, 1, 2, 1, 1)  # M=2 students, d=2
        >>> float(predictive_variance(p))
        1.0
    """
    assert preds.ndim == 5, f"expected (M, B, d, h, w), got {tuple(preds.shape)}"
    students = preds.unbind(member_dim)
    m = len(students)
    total = torch.zeros_like(students[0].select(channel_dim, 0))  # (B, h, w)
    for i in range(m):
        for j in range(i + 1, m):
            total = total + (students[i] - students[j]).pow(2).sum(channel_dim)
    return total / (m * m)


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
def load_images(dataset: Dataset, batch_size: int = 8) -> torch.Tensor:
    """All ``"image"`` entries of a dataset as one tensor (N, 3, H, W) (the pretraining patch pool)."""
    out = list(iterate_images(dataset, batch_size=batch_size, show_progress=False))
    if not out:
        raise ValueError("load_images: the dataset is empty")
    return torch.cat(out)


def load_dtd_images(root: str | Path | None, image_size: int, max_images: int) -> torch.Tensor:
    """DTD texture images (N, 3, S, S), ImageNet-normalised, for teacher pretraining on textures.

    Uses :class:`mudenet_core.data.dtd.DTDTextures` on ``root`` (default ``<repo>/../shared/data/dtd``) and
    takes up to ``max_images`` images spread evenly over its sorted list (deterministic, no RNG).
    """
    from mudenet_core.data.dtd import DTDTextures
    from mudenet_core.data.transforms import normalize

    root = Path(root) if root else REPO_ROOT.parent / "shared" / "data" / "dtd"
    tex = DTDTextures(root, size=image_size)
    idx = np.unique(np.linspace(0, len(tex) - 1, min(max_images, len(tex))).round().astype(int))
    return torch.stack([normalize(tex[int(i)]) for i in idx])  # (N, 3, S, S)


def sample_patches(
    pool: torch.Tensor, n: int, size: int, generator: torch.Generator, shift: int = 0, noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random square patches from a reflect-padded image pool; optionally their augmented positives.

    Args:
        pool: images (N, 3, H, W).
        n: number of patches.
        size: patch side p.
        generator: RNG.
        shift: positives are the anchor's window moved by up to ``shift`` pixels in each direction ...
        noise: ... plus Gaussian noise of this standard deviation. With ``shift = noise = 0`` no positives.

    Returns:
        anchors (n, 3, p, p), positives (n, 3, p, p) or None.
    """
    pad = size // 2 + shift
    mode = "reflect" if pad < min(pool.shape[-2:]) else "replicate"
    padded = F.pad(pool, (pad, pad, pad, pad), mode=mode)  # (N, 3, H + 2 pad, W + 2 pad)
    h, w = pool.shape[-2:]
    idx = torch.randint(0, pool.shape[0], (n,), generator=generator)
    ys = torch.randint(0, h, (n,), generator=generator) + shift  # top-left in padded coordinates
    xs = torch.randint(0, w, (n,), generator=generator) + shift
    anchors = torch.stack(
        [padded[i, :, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs, strict=True)]
    )
    if shift == 0 and noise == 0.0:
        return anchors, None
    dy = torch.randint(-shift, shift + 1, (n,), generator=generator)
    dx = torch.randint(-shift, shift + 1, (n,), generator=generator)
    pos = torch.stack(
        [
            padded[i, :, y + a : y + a + size, x + b : x + b + size]
            for i, y, x, a, b in zip(idx, ys, xs, dy, dx, strict=True)
        ]
    )
    pos = pos + noise * torch.randn(pos.shape, generator=generator)
    return anchors, pos


def _kd_target(backbone: nn.Module, patches: torch.Tensor, size: int) -> torch.Tensor:
    """Backbone descriptor of each patch: resized to ``size``, layers pooled and concatenated -> (B, C)."""
    x = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)
    feats = backbone(x)
    return torch.cat([f.mean(dim=(2, 3)) for f in feats.values()], dim=1)


def pretrain_teacher(
    teacher: PatchDescriptorNet,
    pool: torch.Tensor,
    backbone: nn.Module | None,
    cfg: USConfig,
    *,
    seed: int,
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, list[float]]:
    """Train T^ with distillation + triplet + decorrelation losses on random patches from ``pool``.

    The distillation decoder (Linear d -> C) is built here and discarded; the backbone's descriptors are
    standardised with their mean/std over ``4 x teacher_batch_size`` patches drawn before training.

    Returns:
        log with per-step ``loss``, ``kd``, ``metric``, ``compact``.
    """
    g = torch.Generator().manual_seed(seed)
    p = teacher.patch_size
    bs = cfg.teacher_batch_size
    teacher.train()
    decoder, kd_mean, kd_std = None, None, None
    params = list(teacher.parameters())
    if backbone is not None and cfg.lambda_kd > 0:
        with torch.no_grad():
            sample, _ = sample_patches(pool, 4 * bs, p, g)
            t = _kd_target(backbone, sample.to(device), cfg.kd_input_size)  # (4 bs, C)
            kd_mean, kd_std = t.mean(0), t.std(0).clamp_min(1e-6)
        with seeded(seed + 1):
            decoder = nn.Linear(cfg.descriptor_dim, t.shape[1]).to(device)
        params += list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.teacher_lr, weight_decay=cfg.teacher_weight_decay)
    log: dict[str, list[float]] = {"loss": [], "kd": [], "metric": [], "compact": []}
    for _ in progress(range(cfg.teacher_steps), desc=f"teacher p={p}", enabled=show_progress):
        anchors, positives = sample_patches(pool, bs, p, g, cfg.positive_shift, cfg.positive_noise)
        negatives, _ = sample_patches(pool, bs, p, g)
        x = torch.cat([anchors, positives, negatives]).to(device)  # (3 bs, 3, p, p)
        desc = teacher(x).flatten(1)  # (3 bs, d, 1, 1) -> (3 bs, d)
        a, pos, neg = desc[:bs], desc[bs : 2 * bs], desc[2 * bs :]
        loss_m = triplet_loss(a, pos, neg, cfg.triplet_margin)
        loss_c = compactness_loss(correlation_matrix(a))
        loss_k = a.new_zeros(())
        if decoder is not None:
            with torch.no_grad():
                target = (_kd_target(backbone, anchors.to(device), cfg.kd_input_size) - kd_mean) / kd_std
            loss_k = distillation_loss(decoder(a), target)
        loss = cfg.lambda_kd * loss_k + cfg.lambda_metric * loss_m + cfg.lambda_compact * loss_c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in (("loss", loss), ("kd", loss_k), ("metric", loss_m), ("compact", loss_c)):
            log[k].append(v.item())
    teacher.eval()
    return log


@torch.no_grad()
def descriptor_stats(
    scale: ScaleModel, dataset: Dataset, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (d,) of the teacher's dense descriptors over every pixel of ``dataset``."""
    s1 = s2 = None
    n = 0
    if hasattr(dataset, "set_epoch"):  # deterministic augmentation stream (resume gives the same statistics)
        dataset.set_epoch(0)
    for x in iterate_images(dataset, batch_size=batch_size, device=device, show_progress=False):
        y = describe(scale.teacher, x, scale.dense_mode).double()  # (B, d, h, w)
        y = y.transpose(0, 1).flatten(1)  # (d, B*h*w)
        s1 = y.sum(1) if s1 is None else s1 + y.sum(1)
        s2 = y.pow(2).sum(1) if s2 is None else s2 + y.pow(2).sum(1)
        n += y.shape[1]
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def random_window(
    padded: torch.Tensor, crop: int, extent: int, stride: int, g: torch.Generator
) -> tuple[torch.Tensor, int]:
    """A random training window of a padded batch that covers every output position equally often.

    The window is ``n = ceil(crop / stride)`` outputs square, its top-left output drawn uniformly from
    ``-(n - 1) .. n_out - 1`` (``n_out = ceil(H / stride)`` outputs per side) and then intersected with the
    image. Every output position therefore lies in exactly ``n`` of the ``n_out + n - 1`` offsets per axis,
    the
    same for border and centre pixels. (Drawing only windows that fit inside the image, as before, trained the
    outputs at the image border up to 1 / n as often as the centre ones: 1/48 for p = 17, 48 px crops, so the
    students never learnt the periphery and the maps lit up there.) Offsets are multiples of ``stride``, so a
    strided network's outputs on the window are exactly its outputs on the whole image there.

    Args:
        padded: (B, 3, H + extent - 1, W + extent - 1) from :func:`pad_image`.
        crop: nominal window side in image pixels (> 0).
        extent: the network's extent.
        stride: the network's output stride (1 for the dilated mode).
        g: RNG.

    Returns:
        the window (B, 3, s (h' - 1) + extent, s (w' - 1) + extent), whose output is h' x w' (<= n x n), and
        ``n * n``, the nominal output count to divide the summed loss by (so that every output position gets
        the same expected weight, whatever the size of the clipped window it falls in).
    """
    assert crop > 0, f"crop must be > 0, got {crop}"
    n_out = [-(-(d - extent + 1) // stride) for d in padded.shape[-2:]]  # outputs per side: ceil(H / s)
    n = -(-crop // stride)
    sl = []
    for size in n_out:
        if n >= size:  # the window spans this axis: take all of it
            r0, r1 = 0, size
        else:
            r0 = int(torch.randint(-(n - 1), size, (1,), generator=g))  # first output row (may be < 0)
            r1 = min(r0 + n, size)  # one past the last output row
            r0 = max(r0, 0)
        sl.append(slice(stride * r0, stride * (r1 - 1) + extent))  # padded rows feeding outputs r0 .. r1 - 1
    return padded[..., sl[0], sl[1]], min(n, n_out[0]) * min(n, n_out[1])


def train_students(
    scale: ScaleModel,
    train_ds: Dataset,
    cfg: USConfig,
    *,
    seed: int,
    device: torch.device,
    show_progress: bool = True,
) -> list[float]:
    """Train the scale's students (jointly, one optimiser each) to regress the normalised teacher descriptors.

    Returns:
        mean loss over students per epoch.
    """
    opts = [
        torch.optim.Adam(s.parameters(), lr=cfg.student_lr, weight_decay=cfg.student_weight_decay)
        for s in scale.students
    ]
    scale.teacher.eval()
    scale.students.train()
    stride = scale.teacher.stride if scale.dense_mode == "strided" else 1
    losses = []
    for epoch in progress(
        range(cfg.student_epochs), desc=f"students p={scale.teacher.patch_size}", enabled=show_progress
    ):
        total, n = 0.0, 0
        if hasattr(train_ds, "set_epoch"):  # mudenet_core.data: augmentation stream of this epoch
            train_ds.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + epoch)  # datasets that draw from the global RNG
            g = torch.Generator().manual_seed(seed + epoch)
            loader = DataLoader(
                train_ds, batch_size=cfg.student_batch_size, shuffle=True, generator=g, num_workers=0
            )
            for batch in loader:
                x = batch["image"].to(device)  # (B, 3, H, W)
                xp = pad_image(x, scale.teacher.extent)  # (B, 3, H + e - 1, W + e - 1)
                n_nominal = None  # whole images: the plain mean over outputs
                if cfg.student_crop > 0:  # random window; offsets on the stride grid keep outputs aligned
                    xp, n_nominal = random_window(xp, cfg.student_crop, scale.teacher.extent, stride, g)
                with torch.no_grad():
                    y = scale.normalise(run_net(scale.teacher, xp, scale.dense_mode))  # (B, d, h, w)
                for student, opt in zip(scale.students, opts, strict=True):
                    err = (run_net(student, xp, scale.dense_mode) - y).pow(2).sum(1)  # (B, h', w')
                    loss = err.mean() if n_nominal is None else err.sum((1, 2)).mean() / n_nominal
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * x.shape[0]
                n += x.shape[0] * len(opts)
        losses.append(total / max(n, 1))
    scale.students.eval()
    return losses


@torch.no_grad()
def score_stats(
    scale: ScaleModel, dataset: Dataset, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean and std of the regression error and the predictive variance over every pixel of ``dataset``."""
    acc = np.zeros(5)  # n, sum e, sum e^2, sum v, sum v^2
    for x in iterate_images(dataset, batch_size=batch_size, device=device, show_progress=False):
        e, v = (t.double() for t in scale.error_and_variance(x))
        acc += [e.numel(), e.sum().item(), e.pow(2).sum().item(), v.sum().item(), v.pow(2).sum().item()]
    n = acc[0]
    if n == 0:
        raise ValueError("score_stats: the validation split is empty")
    e_mean, v_mean = acc[1] / n, acc[3] / n
    e_std = max(float(np.sqrt(max(acc[2] / n - e_mean**2, 0.0))), 1e-12)
    v_std = max(float(np.sqrt(max(acc[4] / n - v_mean**2, 0.0))), 1e-12)
    return {"e_mean": float(e_mean), "e_std": e_std, "v_mean": float(v_mean), "v_std": v_std}


# ------------------------------------------------------------------------------------------------------------
# detector
# ------------------------------------------------------------------------------------------------------------
class UninformedStudents:
    """Detector-contract wrapper: per scale, pretrain a teacher, train M students, calibrate on validation.

    Attributes:
        config: the :class:`USConfig`.
        scales: ``nn.ModuleList`` of :class:`ScaleModel`, one per patch size.
    """

    def __init__(self, config: USConfig | None = None):
        self.config = config if config is not None else USConfig()
        if not isinstance(self.config, USConfig):
            raise ConfigError(f"UninformedStudents needs a USConfig, got {type(self.config).__name__}")
        c = self.config
        bad = [p for p in c.patch_sizes if p not in PATCH_ARCHS]
        if bad or not c.patch_sizes:
            raise ConfigError(
                f"USConfig.patch_sizes: {list(c.patch_sizes)}; each must be one of {sorted(PATCH_ARCHS)}"
            )
        if c.n_students < 2:
            raise ConfigError(
                f"USConfig.n_students must be >= 2 for a predictive variance, got {c.n_students}"
            )
        self.scales = self._build()
        self.device = torch.device("cpu")

    def _build(self) -> nn.ModuleList:
        c = self.config
        return nn.ModuleList(
            ScaleModel(p, c.descriptor_dim, c.width, c.n_students, c.dense_mode) for p in c.patch_sizes
        ).eval()

    def _pretraining_pool(self, train_ds: Dataset) -> torch.Tensor:
        c = self.config
        if c.teacher_source == "dtd":
            return load_dtd_images(c.dtd_root, c.image_size, c.dtd_max_images)
        if hasattr(train_ds, "set_epoch"):  # the same augmentation stream whenever the pool is loaded
            train_ds.set_epoch(0)
        return load_images(train_ds, batch_size=c.eval_batch_size)

    def _backbone(self) -> nn.Module | None:
        c = self.config
        if c.lambda_kd <= 0:
            return None
        from mudenet_core.nets.backbones import build_backbone

        with seeded(0):  # random (kd_pretrained=False) weights are the same in every run
            return build_backbone(c.kd_backbone, layers=list(c.kd_layers) or None, pretrained=c.kd_pretrained)

    def fit(
        self,
        train_ds: Dataset,
        val_ds: Dataset,
        *,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
        show_progress: bool = True,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Pretrain teachers, train students, compute descriptor and score statistics.

        Args:
            train_ds: training split (normal images).
            val_ds: validation split (normal images) for the score normalisation.
            generator: the run's RNG; every stage's seed is drawn from it up front.
            device: torch device.
            show_progress: progress bars.
            checkpoint_dir: if given, ``us_train.pt`` there is written after every stage (teacher, students of
                each scale); ``resume=True`` skips the stages it records.
            resume: continue from ``checkpoint_dir/us_train.pt`` when it exists.

        Returns:
            log dict: per scale ``teacher`` losses, ``students`` losses per epoch, ``stats``; ``fit_time_s``.
        """
        t0 = time.perf_counter()
        c = self.config
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        seeds = {
            p: [draw_seed(generator) % 2**40 for _ in range(2)] for p in c.patch_sizes
        }  # teacher, students
        init = draw_seed(generator)
        with seeded(init):
            self.scales = self._build().to(self.device)
        ckpt_path = Path(checkpoint_dir) / "us_train.pt" if checkpoint_dir is not None else None
        done: list[str] = []
        resumed: list[str] = []
        log: dict[str, Any] = {}
        if resume and ckpt_path is not None and ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path, c, keys=ARCH_KEYS)
            if ckpt.get("seeds") != {str(k): v for k, v in seeds.items()}:
                raise CheckpointError(f"{ckpt_path}: made with another generator seed; start without resume")
            self.scales.load_state_dict(ckpt["state_dict"])
            done, log = list(ckpt["stages_done"]), dict(ckpt["log"])
            resumed = list(done)

        def checkpoint(stage: str) -> None:
            done.append(stage)
            if ckpt_path is not None:
                save_checkpoint(
                    ckpt_path,
                    state_dict=self.scales.state_dict(),
                    config=c,
                    stages_done=done,
                    log=log,
                    seeds={str(k): v for k, v in seeds.items()},
                )

        pool = backbone = None
        for p, scale in zip(c.patch_sizes, self.scales, strict=True):
            s_teacher, s_students = seeds[p]
            if f"teacher_{p}" not in done:
                if pool is None:
                    pool = self._pretraining_pool(train_ds)
                    backbone = self._backbone()
                    backbone = backbone.to(self.device) if backbone is not None else None
                tlog = pretrain_teacher(
                    scale.teacher,
                    pool,
                    backbone,
                    c,
                    seed=s_teacher,
                    device=self.device,
                    show_progress=show_progress,
                )
                mean, std = descriptor_stats(scale, train_ds, c.eval_batch_size, self.device)
                scale.t_mean.copy_(mean)
                scale.t_std.copy_(std)
                log[f"teacher_{p}"] = {
                    k: [v[0], v[-1]] if v else [] for k, v in tlog.items()
                }  # first/last step
                checkpoint(f"teacher_{p}")
            if f"students_{p}" not in done:
                log[f"students_{p}"] = train_students(
                    scale, train_ds, c, seed=s_students, device=self.device, show_progress=show_progress
                )
                stats = score_stats(scale, val_ds, c.eval_batch_size, self.device)
                for k, v in stats.items():
                    getattr(scale, k).fill_(v)
                if stats["e_mean"] > COLLAPSE_FRACTION * c.descriptor_dim:
                    warnings.warn(
                        f"UninformedStudents p={p}: the students' validation regression error "
                        f"{stats['e_mean']:.1f} is {stats['e_mean'] / c.descriptor_dim:.0%} of the "
                        f"normalised teacher's variance d={c.descriptor_dim} (predicting its mean gives d): "
                        "the students have not learnt the teacher and the map is mostly the teacher's norm; "
                        "train longer (student_epochs) on whole images (student_crop=0)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                log[f"stats_{p}"] = stats
                checkpoint(f"students_{p}")
        self.scales.eval()
        log["fit_time_s"] = time.perf_counter() - t0
        log["resumed_stages"] = resumed
        return log

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, 1, H, W) and image scores (B,) (map maximum) of images (B, 3, H, W)."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        x = images.to(self.device)
        size = x.shape[-2:]
        total = None
        for scale in self.scales:
            stride = scale.teacher.stride if scale.dense_mode == "strided" else 1
            m = grid_to_image(scale(x), stride, size)  # (B, 1, h, w) -> (B, 1, H, W)
            total = m if total is None else total + m
        amap = gaussian_blur(total / len(self.scales), self.config.map_sigma)  # (B, 1, H, W)
        return amap, amap.flatten(1).amax(1)

    def save(self, path: str | Path) -> Path:
        """Save every scale's weights and statistics with the config (atomic)."""
        sd = {k: v.detach().cpu() for k, v in self.scales.state_dict().items()}
        return save_checkpoint(path, state_dict=sd, config=self.config, method="us")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> UninformedStudents:
        """Rebuild a detector saved with :meth:`save`."""
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != "us":
            raise CheckpointError(
                f"{path}: not an UninformedStudents checkpoint (method={ckpt.get('method')!r})"
            )
        det = cls(USConfig.from_dict(ckpt["config"]))
        load_weights(det.scales, ckpt["state_dict"], path)
        det.device = torch.device(device)
        det.scales.to(det.device).eval()
        return det
