"""Generic pretrained teachers: distil a MuDeNet teacher once on a large varied image set, ship it, load it.

EfficientAD distils its PDN teacher once (60k steps on ImageNet) and ships the weights; the MuDeNet
reproduction distils the teacher per category (``distill.init: scratch``). This module offers the first way
too (``distill.init: pretrained``):

* :func:`distill_generic_teacher` distils a :class:`~mudenet_core.nets.pdn.DescriptorNet` on random crops of
  generic images (ImageNet sample + DTD textures), drawing crops, flips and colour jitter on the fly from a
  seeded generator; the backbone targets E are computed per batch on the augmented crops and z-scored with a
  channel mean/std measured once on a fixed sample of crops (then kept fixed). It checkpoints atomically,
  resumes exactly, stops on a time budget, and measures L_dist on held-out images.
* The result is one small file per architecture in ``mudenet_core/weights/`` (:func:`teacher_file_name`), a
  ``weights_only``-loadable dict: the teacher's ``state_dict``, the buffers ``channel_idx``, ``target_mean``,
  ``target_std``, the :class:`GenericTeacherConfig`, the reproducing command and the git SHA.
* :func:`load_pretrained_teacher` puts such a file into a :class:`~mudenet_core.nets.mudenet.MuDeNetNets`
  (``MuDeNet.fit`` calls it when ``distill.init == "pretrained"``).

Example (the file name a config looks for)::

    >>> teacher_file_name("efficientnet_lite0", image_size=128, out_channels=64, width=32)
    'teacher_efficientnet_lite0_128px_c64_w32.pt'
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mudenet_core import io, losses, train
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.nets.pdn import DescriptorNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped teachers (package data)
FILE_FORMAT = "mudenet_core.generic_teacher/1"  # the "format" entry of a teacher file
SCRIPT = "scripts/distill_generic_teacher.py"  # the command that makes teacher files


class PretrainedTeacherError(ConfigError):
    """No usable pretrained teacher: no file for this architecture, or a file made for another one."""


class TimeBudgetReached(Exception):
    """Raised inside the distillation loop when ``max_minutes`` is spent (right after a checkpoint)."""


@dataclasses.dataclass(frozen=True)
class GenericTeacherConfig(ConfigBase):
    """One generic teacher distillation: the architecture it serves, its data, crops and optimisation."""

    # architecture: must agree with the MuDeNetConfig that loads the teacher (see COMPATIBILITY_KEYS)
    image_size: int = positive(128)  # square crop side H = W (the MuDeNet image_size)
    backbone: str = "efficientnet_lite0"  # distillation backbone (mudenet_core.nets.backbones)
    backbone_layers: tuple[str, ...] | None = None  # None: DEFAULT_LAYERS[backbone]
    pretrained: bool = True  # pretrained backbone weights (False: random backbone, tests only)
    width: int = positive(32)  # teacher block channels
    out_channels: int = positive(64)  # C, descriptor channels per level
    level_blocks: tuple[int, ...] = nonnegative((1, 2, 2))  # residual blocks added per level
    level_kernels: tuple[int, ...] = positive((3, 3, 5))  # kernel size per level
    # seed of the random choice of C backbone channels (as DistillConfig.channel_seed)
    channel_seed: int = nonnegative(0)
    # data (folders relative to the repository root, searched recursively)
    folders: tuple[str, ...] = ("../shared/data/imagenet_sample/images", "../shared/data/dtd/images")
    # images of folders[0] held out of training, for the held-out L_dist
    heldout_images: int = nonnegative(100)
    load_size: int = positive(224)  # images are held in memory as uint8 with this shorter side
    crop_scale: tuple[float, float] = (0.1, 1.0)  # crop area as a fraction of the image (RandomResizedCrop)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)  # crop aspect-ratio range (log-uniform)
    hflip: bool = True  # random horizontal flips
    vflip: bool = True  # random vertical flips (industrial parts and textures have no "up")
    # brightness, contrast and saturation factors in [1 - s, 1 + s]
    color_jitter: float = bounded(0.2, ge=0, lt=1)
    # probability of a grey crop (EfficientAD's pretraining uses 0.1)
    grayscale_p: float = bounded(0.1, ge=0, le=1)
    # crops (from a generator seeded with seed + 1) fixing the target mean/std
    stats_crops: int = positive(256)
    # optimisation
    steps: int = nonnegative(1500)  # optimisation steps
    batch_size: int = positive(8)  # crops per step
    lr: float = positive(1e-3)  # Adam learning rate
    # lr x0.1 after this fraction of steps (None: constant)
    lr_decay_at: float | None = bounded(0.9, gt=0, le=1)
    weight_decay: float = nonnegative(0.0)  # Adam weight decay
    seed: int = nonnegative(0)  # teacher initialisation, held-out choice and crops
    checkpoint_every: int = positive(100)  # steps between checkpoints and held-out evaluations
    eval_batch_size: int = positive(16)  # batch size of target statistics and held-out evaluation

    def __post_init__(self):
        super().__post_init__()  # declared bounds
        if self.image_size % 32 != 0:
            raise ConfigError(f"GenericTeacherConfig.image_size must be a multiple of 32, got "
                              f"{self.image_size}")
        if not self.folders:
            raise ConfigError("GenericTeacherConfig.folders must name at least one image folder")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"GenericTeacherConfig.crop_scale must satisfy 0 < lo <= hi <= 1, got "
                              f"{self.crop_scale}")


# Keys on which a teacher file and a MuDeNetConfig must agree (names shared by both configs).
COMPATIBILITY_KEYS = (
    "image_size", "backbone", "backbone_layers", "pretrained", "width", "out_channels", "level_blocks",
    "level_kernels",
)


def teacher_file_name(backbone: str, *, image_size: int, out_channels: int, width: int) -> str:
    """The shipped file name of a teacher: the architecture keys a config looks it up by."""
    return f"teacher_{backbone}_{image_size}px_c{out_channels}_w{width}.pt"


def _layers(cfg) -> tuple[str, ...]:
    from mudenet_core.nets.backbones import DEFAULT_LAYERS

    return tuple(cfg.backbone_layers or DEFAULT_LAYERS[cfg.backbone])


def _architecture(cfg) -> dict[str, Any]:
    """The compatibility keys of a MuDeNetConfig or GenericTeacherConfig (backbone layers resolved)."""
    out = {k: getattr(cfg, k) for k in COMPATIBILITY_KEYS}
    out["backbone_layers"] = _layers(cfg)
    out["level_blocks"], out["level_kernels"] = tuple(cfg.level_blocks), tuple(cfg.level_kernels)
    return out


# ------------------------------------------------------------------ images and crops
def load_pool(paths: Sequence[Path], load_size: int) -> list[torch.Tensor]:
    """Decode images into memory as uint8 (3, h, w) with shorter side ``load_size`` (antialiased)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = load_size / min(w, h)
            im = im.resize((max(load_size, round(w * s)), max(load_size, round(h * s))), Image.BILINEAR,
                           reducing_gap=None)
            out.append(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous())
    return out


def _imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(train.IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(train.IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (b, 3, H, W) -> (b, 1, H, W)


def random_crops(
    pool: Sequence[torch.Tensor], idx: torch.Tensor, cfg: GenericTeacherConfig, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crops with flips, colour jitter and grey crops -> ImageNet-normalised (b, 3, H, W).

    Exactly ten uniforms are drawn from ``generator`` per crop whatever ``cfg`` enables, so the stream does
    not depend on which augmentations are on.
    """
    size = cfg.image_size
    u = torch.rand(len(idx), 10, generator=generator)  # (b, 10)
    lo_r, hi_r = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    crops = []
    for i, k in enumerate(idx.tolist()):
        img = pool[k]  # (3, h, w) uint8
        h, w = img.shape[-2:]
        area = h * w * (cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * float(u[i, 0]))
        ratio = math.exp(lo_r + (hi_r - lo_r) * float(u[i, 1]))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        y0 = int(float(u[i, 2]) * (h - ch + 1)) if h > ch else 0
        x0 = int(float(u[i, 3]) * (w - cw + 1)) if w > cw else 0
        c = img[:, y0 : y0 + ch, x0 : x0 + cw].float()[None] / 255.0  # (1, 3, ch, cw)
        c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        crops.append(c.clamp_(0.0, 1.0))
    x = torch.cat(crops)  # (b, 3, H, W) in [0, 1]
    if cfg.hflip:
        f = u[:, 4] < 0.5
        x[f] = x[f].flip(-1)
    if cfg.vflip:
        f = u[:, 5] < 0.5
        x[f] = x[f].flip(-2)
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        bright = (1.0 + s * (2.0 * u[:, 6] - 1.0)).view(-1, 1, 1, 1)
        contrast = (1.0 + s * (2.0 * u[:, 7] - 1.0)).view(-1, 1, 1, 1)
        saturation = (1.0 + s * (2.0 * u[:, 8] - 1.0)).view(-1, 1, 1, 1)
        x = (x * bright).clamp(0.0, 1.0)
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
        x = ((x - m) * contrast + m).clamp(0.0, 1.0)
        g = _gray(x)
        x = ((x - g) * saturation + g).clamp(0.0, 1.0)
    if cfg.grayscale_p > 0:
        f = u[:, 9] < cfg.grayscale_p
        x[f] = _gray(x[f]).expand(-1, 3, -1, -1)
    return _imagenet_normalize(x)


def center_crops(pool: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Fixed crops (held-out set): the central square of each image resized to ``size`` -> (N, 3, H, W)."""
    out = []
    for img in pool:
        h, w = img.shape[-2:]
        s = min(h, w)
        c = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s].float()[None] / 255.0
        c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(c.clamp_(0.0, 1.0))
    return _imagenet_normalize(torch.cat(out))


def split_paths(cfg: GenericTeacherConfig) -> tuple[list[Path], list[Path]]:
    """Training and held-out image paths (``heldout_images`` of ``folders[0]``, a seeded choice, held out)."""
    from mudenet_core.mudenet import resolve_folder

    per_folder = []
    for f in cfg.folders:
        folder = resolve_folder(f)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder} (GenericTeacherConfig.folders: {f!r})")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in train.IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(train.IMAGE_SUFFIXES)}) under {folder}")
        per_folder.append(paths)
    first = per_folder[0]
    if not 0 <= cfg.heldout_images < len(first):
        raise ConfigError(f"heldout_images={cfg.heldout_images} must be below the {len(first)} images of "
                          f"{cfg.folders[0]}")
    perm = torch.randperm(len(first), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = sorted(perm[: cfg.heldout_images])
    held_set = set(held)
    trainp = [p for i, p in enumerate(first) if i not in held_set] + [p for ps in per_folder[1:] for p in ps]
    return trainp, [first[i] for i in held]


# ------------------------------------------------------------------ targets and evaluation
def _backbone(cfg):
    """The frozen backbone of a config, built as ``MuDeNet.distillation_backbone`` builds it."""
    from mudenet_core.nets.backbones import build_backbone

    layers = list(_layers(cfg))
    with torch.random.fork_rng(devices=[]):  # unpretrained (test) backbones: weights fixed by the config
        torch.manual_seed(cfg.channel_seed)
        return build_backbone(cfg.backbone, layers, pretrained=cfg.pretrained), layers


class Targets:
    """Distillation targets E of images: kept backbone channels, z-scored with fixed statistics.

    Args:
        backbone, layers: the frozen backbone and its layers.
        channel_idx: kept channels (C,).
        mean, std: per-channel statistics (C,) (None until :meth:`fix_statistics`).
    """

    def __init__(self, backbone, layers, channel_idx: torch.Tensor, mean=None, std=None):
        self.backbone, self.layers, self.channel_idx = backbone, list(layers), channel_idx
        self.mean, self.std = mean, std

    def features(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images (N, 3, H, W) -> kept backbone channels (N, C, h1, w1)."""
        return train.backbone_features(self.backbone, self.layers, images, batch_size=batch_size,
                                       channel_idx=self.channel_idx)

    def fix_statistics(self, images: torch.Tensor, batch_size: int = 16) -> None:
        """Measure the channel mean/std on ``images`` (N, 3, H, W) once; later targets use them."""
        _, self.mean, self.std = train.distillation_targets(self.features(images, batch_size))

    def __call__(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images (N, 3, H, W) -> targets E (N, C, h1, w1)."""
        assert self.mean is not None, "call fix_statistics first"
        return train.distillation_targets(self.features(images, batch_size), self.mean, self.std)[0]


@torch.no_grad()
def distillation_quality(
    teacher: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 16
) -> dict[str, float]:
    """L_dist of a teacher on fixed images, and the share of the target it explains.

    Args:
        teacher: descriptor network (evaluated in eval mode; its mode is restored).
        images: (N, 3, H, W) ImageNet-normalised.
        targets: their targets E (N, C, h1, w1), in the teacher's own target units.
        batch_size: images per forward pass.

    Returns:
        ``L_dist`` (Eq. 16, summed over levels), ``L_mean`` (L_dist of predicting each channel's mean over
        these images: S x mean variance) and ``explained`` = 1 - L_dist / L_mean.
    """
    was_training = teacher.training
    teacher.eval()
    total, n, levels = 0.0, 0, 0
    s1 = s2 = None  # per-channel sums of the (resized) targets, for L_mean
    for i in range(0, images.shape[0], batch_size):
        xs = teacher(images[i : i + batch_size])  # S x (b, C, h, w)
        e = targets[i : i + batch_size]
        if e.shape[-2:] != xs[0].shape[-2:]:
            e = F.interpolate(e, size=xs[0].shape[-2:], mode="bilinear", align_corners=False)  # (b, C, h, w)
        total += float(losses.distillation_loss(xs, e)) * e.shape[0]
        n, levels = n + e.shape[0], len(xs)
        a, b = e.double().sum(dim=(0, 2, 3)), e.double().pow(2).sum(dim=(0, 2, 3))  # (C,)
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
    teacher.train(was_training)
    cells = n * e.shape[-2] * e.shape[-1]
    l_mean = levels * float((s2 / cells - (s1 / cells).pow(2)).mean())
    l_dist = total / n
    return {"L_dist": l_dist, "L_mean": l_mean, "explained": 1.0 - l_dist / l_mean}


# ------------------------------------------------------------------ distillation
def _curve_frame(train_log: dict, heldout: list[tuple[int, float]]):
    import pandas as pd

    rows = [{"step": s, "split": "train", "L_dist": v} for s, v in
            zip(train_log.get("step", []), train_log.get("L_dist", []), strict=True)]
    rows += [{"step": s, "split": "heldout", "L_dist": v} for s, v in heldout]
    return pd.DataFrame(rows, columns=["step", "split", "L_dist"])


def save_curve(path_stem: Path, train_log: dict, heldout: list[tuple[int, float]], title: str) -> list[Path]:
    """Write the L_dist curve as ``<stem>_curve.csv`` (step, split, L_dist) and ``<stem>_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _curve_frame(train_log, heldout)
    csv = io.save_csv(path_stem.with_name(path_stem.name + "_curve.csv"), df)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = df[df["split"] == "train"]
    if len(tr):
        win = max(1, min(50, len(tr) // 10))
        ax.plot(tr["step"], tr["L_dist"], color="0.8", lw=0.5, label="train (per step)")
        ax.plot(tr["step"], tr["L_dist"].rolling(win, min_periods=1).mean(), color="C0",
                label=f"train (mean of {win})")
    ho = df[df["split"] == "heldout"]
    ax.plot(ho["step"], ho["L_dist"], "o-", color="C3", ms=3, label="held-out (fixed crops)")
    ax.set(xlabel="step", ylabel="L_dist (sum over 3 levels)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = path_stem.with_name(path_stem.name + "_curve.png")
    with io.atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    for p in (csv, png):
        p.chmod(0o644)  # shipped beside the teacher (the atomic write creates files owner-only)
    return [csv, png]


def distill_generic_teacher(
    cfg: GenericTeacherConfig,
    out_path: str | Path,
    *,
    work_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    max_minutes: float | None = None,
    command: str = "",
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Distil a generic teacher and write it to ``out_path`` (plus ``_curve.csv`` / ``_curve.png`` beside it).

    Args:
        cfg: the distillation.
        out_path: the teacher file (see :func:`teacher_file_name` for the name a config looks for).
        work_dir: folder of the resume checkpoint ``last.pt`` (atomic, every ``cfg.checkpoint_every`` steps).
        resume: continue from ``work_dir/last.pt`` (same config required); starts afresh when absent.
        overwrite: allow replacing an existing ``out_path`` or, without ``resume``, a checkpoint.
        max_minutes: stop at the first checkpoint after this much wall time (then rerun with ``resume``).
        command: the command line to record in the file (without the resume flag: resumes are recorded as
            ``resumed_at``, the steps they started from; they do not change the result).
        show_progress: progress bar.
        log: where progress messages go.

    Returns:
        summary: ``status`` ("done" or "stopped"), ``step``, ``time_s``, ``heldout`` [(step, L_dist)], and
        ``path`` when done.
    """
    t_wall = time.perf_counter()
    out_path, work_dir = Path(out_path), Path(work_dir)
    ckpt_path = work_dir / "last.pt"
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to replace it")
    resumed = None
    if ckpt_path.is_file():
        if resume:
            resumed = io.load_checkpoint(ckpt_path, expected_config=cfg)
            log(f"resuming from {ckpt_path} at step {resumed['loop_state']['step']}")
        elif not overwrite:
            raise FileExistsError(f"{ckpt_path} exists: pass resume=True (--resume) to continue it or "
                                  f"overwrite=True (--overwrite) to start again")

    # data: held-out choice and pools
    train_paths, held_paths = split_paths(cfg)
    t0 = time.perf_counter()
    pool = load_pool(train_paths, cfg.load_size)
    held = center_crops(load_pool(held_paths, cfg.load_size), cfg.image_size) if held_paths else None
    log(f"{len(pool)} training images, {len(held_paths)} held out, loaded in "
        f"{time.perf_counter() - t0:.0f} s")

    # targets: channels and their statistics from a fixed crop sample (generator seed + 1), then fixed
    backbone, layers = _backbone(cfg)
    total = sum(backbone.channels[name] for name in layers)
    channel_idx = train.choose_channels(total, cfg.out_channels, cfg.channel_seed)
    targets = Targets(backbone, layers, channel_idx)
    if resumed is not None:
        targets.mean, targets.std = resumed["target_mean"], resumed["target_std"]
    else:
        g_stats = torch.Generator().manual_seed(cfg.seed + 1)
        idx = torch.randint(0, len(pool), (cfg.stats_crops,), generator=g_stats)
        sample = torch.cat([random_crops(pool, idx[i : i + 64], cfg, g_stats)
                            for i in range(0, len(idx), 64)])  # (stats_crops, 3, H, W)
        targets.fix_statistics(sample, cfg.eval_batch_size)
        del sample
    held_targets = targets(held, cfg.eval_batch_size) if held is not None else None

    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        teacher = DescriptorNet(cfg.width, cfg.out_channels, tuple(cfg.level_blocks),
                                tuple(cfg.level_kernels))
    heldout: list[tuple[int, float]] = []
    resumed_at: list[int] = []  # steps at which the run was resumed (recorded in the file)
    if resumed is not None:
        teacher.load_state_dict(resumed["state_dict"])
        generator.set_state(resumed["generator"])
        heldout = [tuple(r) for r in resumed["heldout"]]
        resumed_at = [*resumed.get("resumed_at", []), int(resumed["loop_state"]["step"])]
    elif held is not None:
        heldout.append((0, distillation_quality(teacher, held, held_targets, cfg.eval_batch_size)["L_dist"]))
        log(f"held-out L_dist before distillation: {heldout[0][1]:.4f}")

    def make_batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = random_crops(pool, idx, cfg, generator)  # (b, 3, H, W)
        return x, targets(x, cfg.batch_size)  # (b, C, h1, w1)

    def checkpoint(loop_state: dict) -> None:
        if held is not None:
            q = distillation_quality(teacher, held, held_targets, cfg.eval_batch_size)
            heldout.append((loop_state["step"], q["L_dist"]))
            log(f"step {loop_state['step']}: held-out L_dist {q['L_dist']:.4f} "
                f"(explained {q['explained']:.3f})")
        io.save_checkpoint(ckpt_path, state_dict=teacher.state_dict(), config=cfg, loop_state=loop_state,
                           generator=generator.get_state(), target_mean=targets.mean, target_std=targets.std,
                           heldout=heldout, resumed_at=resumed_at)

    def budget(stage: str, step: int, losses: dict) -> None:
        spent = (time.perf_counter() - t_wall) / 60.0
        if max_minutes is not None and spent >= max_minutes and step % cfg.checkpoint_every == 0 \
                and step < cfg.steps:
            raise TimeBudgetReached(f"stopped at step {step} after {spent:.1f} min")

    try:
        dlog = train.distill_streaming(
            teacher, len(pool), make_batch, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay, lr_decay_at=cfg.lr_decay_at, generator=generator,
            state=resumed["loop_state"] if resumed is not None else None, checkpoint=checkpoint,
            checkpoint_every=cfg.checkpoint_every, callback=budget, show_progress=show_progress,
        )
    except TimeBudgetReached as stop:
        state = io.load_checkpoint(ckpt_path)
        save_curve(out_path.with_suffix(""), state["loop_state"]["log"], heldout,
                   out_path.stem + " (partial)")
        log(f"{stop}; checkpoint {ckpt_path}: continue with --resume")
        return {"status": "stopped", "step": int(state["loop_state"]["step"]), "heldout": heldout,
                "time_s": float(state["loop_state"]["elapsed_s"])}

    payload = {
        "format": FILE_FORMAT,
        "channel_idx": channel_idx.clone(),
        "target_mean": targets.mean.clone(),
        "target_std": targets.std.clone(),
        "command": command,
        "steps": cfg.steps,
        "train_time_s": float(dlog["time_s"]),
        "heldout_L_dist": [[int(s), float(v)] for s, v in heldout],
        "heldout_paths": [p.name for p in held_paths],
        "resumed_at": resumed_at,
        "code_version": __import__("mudenet_core").__version__,
    }
    io.save_checkpoint(out_path, state_dict=teacher.state_dict(), config=cfg, **payload)
    out_path.chmod(0o644)  # a shipped file (the atomic write creates it owner-only)
    save_curve(out_path.with_suffix(""), dlog, heldout, out_path.stem)
    log(f"wrote {out_path} ({out_path.stat().st_size / 1024:.0f} KiB) after {dlog['time_s']:.0f} s "
        "of training")
    return {"status": "done", "step": cfg.steps, "heldout": heldout, "time_s": float(dlog["time_s"]),
            "path": out_path, "L_dist": dlog["L_dist"]}


# ------------------------------------------------------------------ loading into MuDeNet
def load_teacher_file(path: str | Path) -> dict[str, Any]:
    """Read a teacher file with ``torch.load(weights_only=True)``; errors name the file.

    Returns:
        the stored dict (``state_dict``, ``channel_idx``, ``target_mean``, ``target_std``, ``config``,
        ``command``, ``git_sha``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedTeacherError(f"pretrained teacher file not found: {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not weights-only
        msg = f"{path}: not a readable teacher file ({type(e).__name__}: {e})"
        raise PretrainedTeacherError(msg) from None
    missing = [k for k in ("state_dict", "config", "channel_idx", "target_mean", "target_std") if k not in d]
    if d.get("format") != FILE_FORMAT or missing:
        raise PretrainedTeacherError(f"{path}: not a {FILE_FORMAT} file (format {d.get('format')!r}, "
                                     f"missing {missing})")
    return d


def find_pretrained_teacher(cfg, path: str = "") -> Path:
    """The teacher file for a MuDeNetConfig.

    ``path`` if given (relative: to the repo root), else the shipped file named by :func:`teacher_file_name`.

    Raises:
        PretrainedTeacherError: no such file; the message names the expected file, the shipped ones and the
            command that makes one.
    """
    from mudenet_core.mudenet import resolve_folder

    if path:
        p = resolve_folder(path)
        if not p.is_file():
            raise PretrainedTeacherError(f"distill.pretrained_path={path!r}: no such file ({p})")
        return p
    name = teacher_file_name(cfg.backbone, image_size=cfg.image_size, out_channels=cfg.out_channels,
                             width=cfg.width)
    p = WEIGHTS_DIR / name
    if not p.is_file():
        have = sorted(q.name for q in WEIGHTS_DIR.glob("teacher_*.pt")) if WEIGHTS_DIR.is_dir() else []
        raise PretrainedTeacherError(
            f"distill.init='pretrained' needs a teacher distilled for backbone={cfg.backbone}, image_size="
            f"{cfg.image_size}, out_channels={cfg.out_channels}, width={cfg.width}: expected {p}, which does "
            f"not exist. Shipped teachers: {', '.join(have) or 'none'}. Make one with `python {SCRIPT} "
            f"--backbone {cfg.backbone} --image-size {cfg.image_size} --out-channels {cfg.out_channels} "
            f"--width {cfg.width}`, set distill.pretrained_path, or use distill.init=scratch.")
    return p


def check_compatible(stored_config: dict[str, Any], cfg, path: Path) -> None:
    """Raise :class:`PretrainedTeacherError` when a teacher file was made for another architecture."""
    try:
        have = _architecture(GenericTeacherConfig.from_dict(stored_config))
    except ConfigError as e:
        raise PretrainedTeacherError(f"{path}: stored config is not a GenericTeacherConfig ({e})") from None
    want = _architecture(cfg)
    diff = [k for k in COMPATIBILITY_KEYS if have[k] != want[k]]
    if diff:
        details = ", ".join(f"{k}: file={have[k]!r} vs config={want[k]!r}" for k in diff)
        raise PretrainedTeacherError(f"{path}: teacher made for another architecture ({details})")


def load_pretrained_teacher(nets, cfg, path: str = "") -> Path:
    """Put a pretrained teacher into ``nets`` (a MuDeNetNets): weights, ``channel_idx``, ``target_mean/std``.

    Args:
        nets: the networks of a MuDeNet built from ``cfg``.
        cfg: its MuDeNetConfig (the architecture keys must match the file's).
        path: teacher file ("" = the shipped one for the architecture, see :func:`find_pretrained_teacher`).

    Returns:
        the file loaded.
    """
    p = find_pretrained_teacher(cfg, path)
    d = load_teacher_file(p)
    check_compatible(d["config"], cfg, p)
    nets.teacher.load_state_dict(d["state_dict"], strict=True)
    nets.channel_idx.copy_(d["channel_idx"])
    nets.target_mean.copy_(d["target_mean"])
    nets.target_std.copy_(d["target_std"])
    return p
