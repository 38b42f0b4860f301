"""MuDeNet's display helpers for the notebooks: teacher vs distillation target, maps during training.

:func:`load_distilled` reloads the distilled teacher of a run (any stage), :func:`teacher_and_target` computes
what the distillation loss compares and :func:`teacher_target_figure` shows it; :class:`MapSnapshots` is a fit
callback that records raw maps of a few images during training, shown by :func:`snapshot_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mudenet_core import io

if TYPE_CHECKING:
    from mudenet_core.experiment import Run


def teacher_and_target(det, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Distillation target E and the teacher's level maps for some images (for display).

    Rebuilds E as :meth:`MuDeNet.fit` does (same backbone, the stored channel indices and channel statistics)
    and resizes it to the teacher's grid (bilinear), where the distillation loss compares them.

    Returns:
        targets (B, C, h, w) and S x (B, C, h, w) teacher maps.
    """
    import torch.nn.functional as F

    from mudenet_core import train

    cfg, nets = det.config, det.nets
    backbone, layers = det.distillation_backbone()
    feats = train.backbone_features(backbone, layers, images, batch_size=cfg.eval_batch_size,
                                    channel_idx=nets.channel_idx.cpu())  # (B, C, h1, w1)
    targets, _, _ = train.distillation_targets(feats, nets.target_mean.cpu(), nets.target_std.cpu())
    nets.eval()
    with torch.no_grad():
        teacher = [t.cpu() for t in nets.teacher(images.to(det.device))]  # S x (B, C, h, w)
    if targets.shape[-2:] != teacher[0].shape[-2:]:
        targets = F.interpolate(targets, size=teacher[0].shape[-2:], mode="bilinear", align_corners=False)
    return targets, teacher


def load_distilled(run: Run, device: torch.device):
    """The MuDeNet with the distilled teacher from ``<run>/checkpoints/mudenet/last.pt`` (any stage)."""
    from mudenet_core.mudenet import MuDeNet, MuDeNetConfig

    ckpt = io.load_checkpoint(run.checkpoint_dir("mudenet") / MuDeNet.CHECKPOINT_NAME)
    det = MuDeNet(MuDeNetConfig.from_dict(ckpt["config"]))
    det.nets.load_state_dict(ckpt["state_dict"])
    det.device = torch.device(device)
    det.nets.to(det.device).eval()
    return det


def teacher_target_figure(
    targets: torch.Tensor, teacher: Sequence[torch.Tensor], *, channel: int = 0, panel_size: float = 2.0
):
    """One row per image: target E[channel] | teacher level 1..S [channel], each on its own colour scale.

    Args:
        targets: (B, C, h, w) distillation targets.
        teacher: S x (B, C, h, w) teacher level maps.
        channel: descriptor channel to show.
        panel_size: inches per panel.
    """
    from matplotlib.figure import Figure

    b, s = targets.shape[0], len(teacher)
    fig = Figure(figsize=(panel_size * (s + 1), panel_size * b), layout="constrained")
    axes = np.atleast_2d(fig.subplots(b, s + 1, squeeze=False))
    for i in range(b):
        panels = [("target E", targets[i, channel])] + [
            (f"teacher level {j + 1}", teacher[j][i, channel]) for j in range(s)
        ]
        for ax, (title, m) in zip(axes[i], panels, strict=True):
            ax.imshow(m.numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{title} (ch {channel})", fontsize=8)
    return fig


class MapSnapshots:
    """A MuDeNet fit callback that records raw structural and logical maps of a few images during training.

    Every ``every`` steps of stage 2 it runs the networks on ``images`` (B, 3, H, W) and keeps the level-mean
    raw maps (B, 2, h, w); the networks' train/eval modes are restored afterwards.
    """

    def __init__(self, det, images: torch.Tensor, every: int):
        assert images.ndim == 4, f"expected (B,3,H,W), got {tuple(images.shape)}"
        self.det, self.images, self.every = det, images, max(1, int(every))
        self.steps: list[int] = []
        self.maps: list[np.ndarray] = []

    def __call__(self, stage: str, step: int, losses: dict[str, float]) -> None:
        """Record at steps 1, every, 2*every, ... of stage "train"."""
        if stage != "train" or (step != 1 and step % self.every != 0):
            return
        from mudenet_core import scoring
        from mudenet_core.utils import modes_restored

        nets = self.det.nets
        device = next(nets.parameters()).device
        with modes_restored(nets), torch.no_grad():
            nets.eval()
            x, s1, a, s2 = nets(self.images.to(device))
            raw = scoring.raw_maps(x, s1, a, s2).mean(dim=2)  # (B, 2, S, h, w) -> (B, 2, h, w)
        self.steps.append(int(step))
        self.maps.append(raw.cpu().numpy())

    def save(self, path: str | Path) -> Path:
        """Write ``steps`` (T,) and ``maps`` (T, B, 2, h, w) as ``.npz`` atomically."""
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f, steps=np.array(self.steps), maps=np.stack(self.maps) if self.maps else np.zeros(0)
                )
        return Path(path)


def snapshot_figure(steps: np.ndarray, maps: np.ndarray, image: int = 0, panel_size: float = 1.8):
    """Raw structural (top) and logical (bottom) maps of one image across training steps.

    Args:
        steps: (T,) training steps.
        maps: (T, B, 2, h, w) from :class:`MapSnapshots`.
        image: which of the B images.
        panel_size: inches per panel.
    """
    from matplotlib.figure import Figure

    t = len(steps)
    assert t > 0 and maps.ndim == 5, f"expected (T, B, 2, h, w) snapshots, got {maps.shape}"
    fig = Figure(figsize=(panel_size * t, panel_size * 2), layout="constrained")
    axes = fig.subplots(2, t, squeeze=False)
    for j in range(t):
        for r, name in enumerate(("structural", "logical")):
            ax = axes[r, j]
            ax.imshow(maps[j, image, r], cmap="jet")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {int(steps[j])}", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    return fig
