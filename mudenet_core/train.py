"""MuDeNet's training loops as plain functions: distillation (stage 1) and end-to-end training (stage 2).

Both loops draw batches from images already held in memory (the nominal training sets are small), through an
:class:`EpochSampler` driven by an explicit ``torch.Generator``. Every ``checkpoint_every`` steps they hand
their full loop state (step, optimiser, sampler and generator state, losses so far) to a ``checkpoint``
callback, and a loop started with that ``state`` continues exactly where it stopped: same batches, same
losses, same weights as an uninterrupted run. Training augmentation is drawn on the fly
(:class:`~mudenet_core.data.transforms.BatchAugmenter`): a fresh draw per step, seeded by (seed, step, image),
so resuming needs no extra state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mudenet_core import losses
from mudenet_core.data.transforms import BatchAugmenter
from mudenet_core.nets.mudenet import MuDeNetNets
from mudenet_core.utils import progress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

TEACHER_CACHE_BYTES = 1 << 30  # hold the teacher's maps of the training images in memory up to this size
StepCallback = Callable[[str, int, dict[str, float]], None]


class EpochSampler:
    """Shuffled mini-batches without replacement, epoch after epoch, with a saveable state.

    An incomplete last batch is dropped (a new permutation starts) unless the dataset is smaller than one.

    Example:
        >>> s = EpochSampler(5, 2, torch.Generator().manual_seed(0))
        >>> batches = [s.next() for _ in range(5)]
        >>> len(set(torch.cat(batches[:2]).tolist()))  # an epoch: full batches without repeats
        4
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        assert n > 0 and batch_size > 0, f"need n > 0 and batch_size > 0, got {n}, {batch_size}"
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch (min(batch_size, n),); a new permutation starts when one runs out."""
        if self.pos + self.batch_size > self.n and self.pos > 0:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        """Permutation, position and generator state."""
        return {"perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])
        self.generator.set_state(state["generator"])


def stack_dataset(dataset, max_images: int = 0) -> torch.Tensor:
    """The images of a dataset (items are dicts with "image" (3, H, W)) as one tensor (N, 3, H, W).

    Items come as the dataset returns them: pass an un-augmented dataset (``dataset.without_augment()``) and
    augment on the fly with a :class:`~mudenet_core.data.transforms.BatchAugmenter` instead of freezing one
    augmented draw of every image.
    """
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    assert n > 0, "empty dataset: nothing to train on"
    return torch.stack([dataset[i]["image"] for i in range(n)])


def load_image_folder(
    folder: str | Path, image_size: int, max_images: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images of a folder (recursively), resized to a square and ImageNet-normalised -> (N, 3, H, W).

    With ``max_images`` > 0, a subset chosen with ``generator`` (sorted paths, then a seeded permutation).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    if 0 < max_images < len(paths):
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        paths = [paths[i] for i in sorted(torch.randperm(len(paths), generator=g)[:max_images].tolist())]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        out.append((t - mean) / std)
    return torch.stack(out)


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size]


@torch.no_grad()
def backbone_features(
    backbone: nn.Module,
    layers: Sequence[str],
    images: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    channel_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concatenated backbone maps at the first layer's grid (nearest), optionally only ``channel_idx``.

    Returns:
        (N, K, h1, w1) on the CPU, K = sum C_k or len(channel_idx) (selected batch by batch, so the full
        concatenation of a large backbone never has to fit in memory for the whole set).
    """
    from mudenet_core.nets.backbones import concat_features

    out = []
    for x in _batches(images, batch_size):
        f = concat_features(backbone(x.to(device)), list(layers), mode="nearest")  # (b, sum C_k, h1, w1)
        out.append((f if channel_idx is None else f[:, channel_idx.to(f.device)]).cpu())
    return torch.cat(out)


def choose_channels(total: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``total`` channel indices, chosen at random with ``seed`` and sorted.

    Example:
        >>> a = choose_channels(10, 4, 0)
        >>> bool((a == choose_channels(10, 4, 0)).all()), len(a)
        (True, 4)
    """
    if k > total:
        raise ValueError(f"cannot keep {k} channels: the backbone layers give only {total}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def distillation_targets(
    features: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets E from the kept backbone channels (N, C, h1, w1): z-scored per channel.

    The targets stay on the backbone grid; :func:`distill` resizes each batch to the teacher grid (bilinear).

    Returns:
        targets (N, C, h1, w1), and the channel mean and std (C,) used (computed over ``features`` when not
        given).
    """
    if mean is None or std is None:
        mean = features.mean(dim=(0, 2, 3))
        std = features.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return (features - mean[:, None, None]) / std[:, None, None], mean, std


def _lr_at(step: int, total: int, lr: float, decay_at: float | None) -> float:
    return lr * (0.1 if decay_at is not None and step >= int(decay_at * total) else 1.0)


def _run_loop(
    name: str,
    total_steps: int,
    step_fn: Callable[[int], dict[str, float]],
    *,
    optimizer: torch.optim.Optimizer,
    sampler: EpochSampler,
    extra_samplers: dict[str, EpochSampler],
    state: dict | None,
    checkpoint: Callable[[dict], None] | None,
    checkpoint_every: int,
    callback: StepCallback | None,
    show_progress: bool,
) -> dict[str, Any]:
    """Shared step loop: resume from ``state``, log, checkpoint, call back."""
    log: dict[str, list] = {"step": []}
    start, elapsed = 0, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        for k, s in extra_samplers.items():
            s.load_state_dict(state["extra_samplers"][k])
        log = {k: list(v) for k, v in state["log"].items()}
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
    t0 = time.perf_counter() - elapsed
    bar = progress(
        range(start, total_steps), desc=name, total=total_steps, initial=start, enabled=show_progress
    )
    for step in bar:
        values = step_fn(step)
        log["step"].append(step + 1)
        for k, v in values.items():
            log.setdefault(k, []).append(v)
        if show_progress:
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)
        done = step + 1
        if (
            checkpoint is not None
            and checkpoint_every > 0
            and (done % checkpoint_every == 0 or done == total_steps)
        ):
            checkpoint(
                {
                    "step": done,
                    "optimizer": optimizer.state_dict(),
                    "sampler": sampler.state_dict(),
                    "extra_samplers": {k: s.state_dict() for k, s in extra_samplers.items()},
                    "log": log,
                    "elapsed_s": time.perf_counter() - t0,
                }
            )
        if callback is not None:
            callback(name, done, values)
    log["time_s"] = time.perf_counter() - t0
    log["steps_per_s"] = (total_steps - start) / max(log["time_s"] - (elapsed if state else 0.0), 1e-9)
    return log


def steps_for(n_images: int, batch_size: int, epochs: int, steps: int) -> int:
    """``steps`` if positive, else ``epochs`` passes over ``n_images`` in batches of ``batch_size``.

    Example:
        >>> steps_for(54, 8, 500, 0), steps_for(54, 8, 500, 1000)
        (3500, 1000)
    """
    return steps if steps > 0 else epochs * math.ceil(n_images / batch_size)


def distill(
    teacher: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    state: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    callback: StepCallback | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Stage 1 (Eq. 16): train the teacher so that every level regresses the backbone target E.

    Args:
        teacher: :class:`~mudenet_core.nets.pdn.DescriptorNet`, trained in place.
        images: distillation images (N, 3, H, W), ImageNet-normalised.
        targets: their targets E (N, C, h1, w1), resized per batch to the teacher grid (H/2, W/2).
        steps: optimisation steps.
        lr: Adam learning rate.
        batch_size: images per step.
        weight_decay: Adam weight decay.
        generator: draws the batches.
        device: where to train.
        state: loop state from a checkpoint, to resume.
        checkpoint: called with the loop state every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (0: none).
        callback: called as ``callback("distill", step, losses)`` after every step.
        show_progress: progress bar with the loss and speed.

    Returns:
        log dict: ``step``, ``L_dist`` (per step), ``time_s``, ``steps_per_s``.
    """
    assert images.shape[0] == targets.shape[0], "one target per image"

    def make_batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[idx].to(device), targets[idx].to(device)  # (b, 3, H, W), (b, C, h1, w1)

    return distill_streaming(teacher, images.shape[0], make_batch, steps=steps, lr=lr, batch_size=batch_size,
                             weight_decay=weight_decay, generator=generator, device=device, state=state,
                             checkpoint=checkpoint, checkpoint_every=checkpoint_every, callback=callback,
                             show_progress=show_progress)


@torch.no_grad()
def teacher_statistics(
    teacher: nn.Module, images: torch.Tensor, *, batch_size: int = 8, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level channel mean and std of the teacher's maps over ``images`` -> two (S, C) tensors."""
    teacher.eval()
    s1 = s2 = None
    n = 0
    for x in _batches(images, batch_size):
        xs = torch.stack(teacher(x.to(device)), dim=1).double()  # (b, S, C, h, w)
        a, b = xs.sum(dim=(0, 3, 4)), xs.pow(2).sum(dim=(0, 3, 4))  # (S, C)
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        n += xs.shape[0] * xs.shape[3] * xs.shape[4]
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.float().cpu(), std.float().clamp_min(1e-6).cpu()


class _bn_stats_frozen:  # noqa: N801 (context manager used like a function)
    """Within the block, BatchNorm layers of ``module`` use batch statistics, keep running ones."""

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch

    def __exit__(self, *exc):
        for m, mom in zip(self.bns, self.saved, strict=True):
            m.momentum = mom


def train_end_to_end(
    nets: MuDeNetNets,
    images: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    weight_decay: float = 0.0,
    detach_ae: bool = True,
    hard_q: float | None = None,
    lr_decay_at: float | None = None,
    penalty_images: torch.Tensor | None = None,
    penalty_weight: float = 1.0,
    augmenter: BatchAugmenter | None = None,
    device: torch.device | str = "cpu",
    state: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    callback: StepCallback | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Stage 2 (Eqs. 3, 5, 7, 8): train S1, A and S2 with one Adam optimiser; T stays frozen in eval mode.

    Args:
        nets: the assembled networks (teacher already distilled, ``teacher_mean/std`` set).
        images: nominal training images (N, 3, H, W), un-augmented (as the networks see them: normalised).
        steps: optimisation steps.
        lr: Adam learning rate.
        batch_size: images per step.
        generator: draws the batches (and penalty batches).
        weight_decay: Adam weight decay.
        detach_ae: stop L2's gradient at A's output.
        hard_q: hard-feature quantile for L1 and L2 (None: plain MSE, paper).
        lr_decay_at: fraction of ``steps`` after which the learning rate drops tenfold (None: paper).
        penalty_images: optional out-of-distribution images (P, 3, H, W); adds ``penalty_weight`` x
            mean(S1(p)^2)
            per step (EfficientAD's ImageNet penalty; not in the paper).
        penalty_weight: weight of the penalty term.
        augmenter: on-the-fly augmentation of the same N images: step t trains on
            ``augmenter.batch(idx, t)``, a fresh draw every time an image is used (stateless, so resuming
            reproduces the draws). The teacher's maps are then computed on every augmented batch instead of
            being cached. None or an identity augmentation: ``images`` as they are (maps cached).
        device: where to train.
        state: loop state from a checkpoint, to resume.
        checkpoint: called with the loop state every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (0: none).
        callback: called as ``callback("train", step, losses)`` after every step.
        show_progress: progress bar with the losses and speed.

    Returns:
        log dict: ``step``, ``L1``, ``LA``, ``L2``, ``L`` (and ``L_pen``) per step, ``time_s``,
        ``steps_per_s``.
    """
    nets.to(device)
    nets.teacher.eval()
    for p in nets.teacher.parameters():
        p.requires_grad_(False)
    trainable = [
        *nets.student.parameters(),
        *nets.autoencoder.parameters(),
        *nets.logical_student.parameters(),
    ]
    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    sampler = EpochSampler(images.shape[0], batch_size, generator)
    extra = {}
    if penalty_images is not None:
        extra["penalty"] = EpochSampler(penalty_images.shape[0], batch_size, generator)
    if augmenter is not None and augmenter.is_identity:
        augmenter = None  # identity: train on ``images`` themselves, teacher maps cached
    if augmenter is not None:
        assert len(augmenter) == images.shape[0], (
            f"augmenter holds {len(augmenter)} images but images has {images.shape[0]}")
        augmenter = augmenter.to(device)  # augment where the networks run
    cache = None  # the frozen teacher's maps of the (un-augmented) training images, computed once if they fit
    s, c, h = nets.num_levels, nets.teacher.out_channels, nets.image_size // 2
    if augmenter is None and images.shape[0] * s * c * h * h * 4 <= TEACHER_CACHE_BYTES:
        with torch.no_grad():
            parts = [nets.teacher_maps(x.to(device)) for x in _batches(images, batch_size)]
        cache = [torch.cat([p[i] for p in parts]) for i in range(s)]  # S x (N, C, h, w)
    for mod in (nets.student, nets.autoencoder, nets.logical_student):
        mod.train()

    def step_fn(step: int) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, lr_decay_at)
        idx = sampler.next()
        if augmenter is not None:
            x_img = augmenter.batch(idx, step)  # (b, 3, H, W) fresh draws, on device
        else:
            x_img = images[idx].to(device)  # (b, 3, H, W)
        if cache is not None:
            x = [c[idx].to(device) for c in cache]  # S x (b, C, h, w)
        else:
            with torch.no_grad():
                x = nets.teacher_maps(x_img)
        s1, a, s2 = nets.student(x_img), nets.autoencoder(x_img), nets.logical_student(x_img)
        terms = losses.mudenet_losses(x, s1, a, s2, detach_ae=detach_ae, hard_q=hard_q)
        total = terms["L"]
        out = {k: v.item() for k, v in terms.items()}
        if penalty_images is not None:
            with _bn_stats_frozen(nets.student):  # penalty images must not enter BN running statistics
                pen = losses.penalty_loss(nets.student(penalty_images[extra["penalty"].next()].to(device)))
            total = total + penalty_weight * pen
            out["L_pen"] = pen.item()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return out

    log = _run_loop(
        "train",
        steps,
        step_fn,
        optimizer=opt,
        sampler=sampler,
        extra_samplers=extra,
        state=state,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        callback=callback,
        show_progress=show_progress,
    )
    nets.eval()
    return log


def distill_streaming(
    teacher: nn.Module,
    n_images: int,
    make_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    lr_decay_at: float | None = None,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    state: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    callback: StepCallback | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Stage 1 (Eq. 16) on images and targets made per batch (random crops of a large set: generic teachers).

    Unlike :func:`distill`, nothing is precomputed: ``make_batch(idx)`` turns the batch's image indices into
    augmented images and their targets E, so every step can see new crops. ``make_batch`` must draw its
    randomness from ``generator`` only: the generator's state is saved with the sampler's in every checkpoint,
    so a resumed run draws the same crops as an uninterrupted one.

    Args:
        teacher: :class:`~mudenet_core.nets.pdn.DescriptorNet`, trained in place.
        n_images: size of the image pool the batches index.
        make_batch: image indices (b,) -> images (b, 3, H, W) and targets E (b, C, h1, w1), on ``device``.
        steps: optimisation steps.
        lr: Adam learning rate.
        batch_size: images per step.
        weight_decay: Adam weight decay.
        lr_decay_at: fraction of ``steps`` after which the learning rate drops tenfold (None: constant).
        generator: draws the batches (and, through ``make_batch``, the augmentations).
        device: where to train.
        state: loop state from a checkpoint, to resume.
        checkpoint: called with the loop state every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (0: none).
        callback: called as ``callback("distill", step, losses)`` after every step.
        show_progress: progress bar with the loss and speed.

    Returns:
        log dict: ``step``, ``L_dist`` (per step), ``time_s``, ``steps_per_s``.
    """
    teacher.train().to(device)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = EpochSampler(n_images, batch_size, generator)

    def step_fn(step: int) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, lr_decay_at)
        x, e = make_batch(sampler.next())  # (b, 3, H, W), (b, C, h1, w1)
        xs = teacher(x)  # S x (b, C, h, w)
        if e.shape[-2:] != xs[0].shape[-2:]:
            e = F.interpolate(e, size=xs[0].shape[-2:], mode="bilinear", align_corners=False)  # (b, C, h, w)
        loss = losses.distillation_loss(xs, e)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"L_dist": loss.item()}

    log = _run_loop(
        "distill",
        steps,
        step_fn,
        optimizer=opt,
        sampler=sampler,
        extra_samplers={},
        state=state,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        callback=callback,
        show_progress=show_progress,
    )
    teacher.eval()
    return log
