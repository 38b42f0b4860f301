"""MuDeNet's losses as pure functions of lists of per-level maps (each (B, C, h, w)).

Paper equations: distillation L_dist = sum_l ||E - X^l||^2 (Eq. 16); end to end L1 = sum_l ||X^l - S1^l||^2,
LA = sum_l ||X^l - A^l||^2, L2 = sum_l ||A^l - S2^l||^2 and L = L1 + LA + L2 (Eqs. 3, 5, 7, 8). ``||.||^2`` is
the mean squared error over (B, C, h, w), summed over levels.
Two non-paper options (off in the paper profile):
EfficientAD's hard-feature mining (``hard_q``) and a penalty on the students' outputs for out-of-distribution
images (:func:`penalty_loss`).

Example:
    >>> t = [torch.ones(1, 2, 3, 3)] * 3
    >>> float(level_mse([torch.zeros(1, 2, 3, 3)] * 3, t))
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def hard_mse(pred: torch.Tensor, target: torch.Tensor, q: float) -> torch.Tensor:
    """Mean of the largest ``(1 - q)`` fraction of the squared errors (EfficientAD's hard-feature loss).

    Args:
        pred: prediction (B, C, h, w).
        target: target (B, C, h, w).
        q: quantile in [0, 1); 0 keeps every element (plain MSE); at least one element is always kept.

    Example:
        >>> float(hard_mse(torch.arange(10.).view(1, 1, 1, 10), torch.zeros(1, 1, 1, 10), q=0.8))
        72.5
    """
    assert pred.shape == target.shape, f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}"
    assert 0.0 <= q < 1.0, f"q must be in [0, 1), got {q}"
    d = (pred - target).pow(2).flatten()  # (B*C*h*w,)
    k = max(1, int(math.ceil((1.0 - q) * d.numel() - 1e-9)))
    return d.topk(k, sorted=False).values.mean()


def level_mse(
    preds: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    hard_q: float | None = None,
) -> torch.Tensor:
    """Sum over levels of the mean squared error (or :func:`hard_mse` when ``hard_q`` is given)."""
    assert len(preds) == len(targets) > 0, (
        f"need equal, non-empty level lists ({len(preds)} vs {len(targets)})"
    )
    total = preds[0].new_zeros(())
    for p, t in zip(preds, targets, strict=True):
        assert p.shape == t.shape, f"level shape mismatch {tuple(p.shape)} vs {tuple(t.shape)}"
        total = total + (hard_mse(p, t, hard_q) if hard_q else (p - t).pow(2).mean())
    return total


def distillation_loss(teacher_maps: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Eq. 16: every level of the teacher (B, C, h, w) regresses the same target E (B, C, h, w)."""
    return level_mse(teacher_maps, [target] * len(teacher_maps))


def penalty_loss(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the mean squared output, for out-of-distribution (penalty) images.

    EfficientAD's ImageNet penalty: pushing the students' outputs towards zero on unrelated images keeps them
    from imitating the teacher outside the nominal distribution.
    """
    return level_mse(maps, [torch.zeros_like(m) for m in maps])


def mudenet_losses(
    x: Sequence[torch.Tensor],
    s1: Sequence[torch.Tensor],
    a: Sequence[torch.Tensor],
    s2: Sequence[torch.Tensor],
    *,
    detach_ae: bool = True,
    hard_q: float | None = None,
) -> dict[str, torch.Tensor]:
    """Stage-2 losses (Eqs. 3, 5, 7, 8) from the level maps of T (X), S1, A and S2.

    Args:
        x: teacher maps (no gradient expected), S x (B, C, h, w).
        s1: structural student maps, S x (B, C, h, w).
        a: autoencoder maps, S x (B, C, h, w).
        s2: logical student maps, S x (B, C, h, w).
        detach_ae: stop L2's gradient from reaching A (A then learns only from LA).
        hard_q: hard-feature quantile for L1 (None: plain MSE as in the paper).

    Returns:
        dict with scalar tensors ``L1``, ``LA``, ``L2`` and ``L`` = L1 + LA + L2.
    """
    loss_1 = level_mse(s1, x, hard_q)
    loss_a = level_mse(a, x)
    loss_2 = level_mse(s2, [m.detach() for m in a] if detach_ae else a, hard_q)
    return {"L1": loss_1, "LA": loss_a, "L2": loss_2, "L": loss_1 + loss_a + loss_2}
