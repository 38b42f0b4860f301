"""PAGMFR (Wang, Qin et al.): pseudo-anomaly generation and multi-scale feature reconstruction.

"PAGMFR: Collaborative Purification in Dual Spaces for Industrial Anomaly Detection via Hierarchical
Reconstruction". No code was ever published (``Altmannnnnn/PAGMFR`` holds a README only) and the paper was not
found, so the README is the specification (``shared/research/methods_reference.md`` section C) and everything
it leaves open is our choice, listed below and in the profile comments (``configs/pagmfr/*.yaml``).

Pipeline (README names; networks in :mod:`mudenet_core.nets.pagmfr`, generator in
:mod:`mudenet_core.data.pseudo_anomaly`):

1. **Pseudo-anomaly generator**, chosen per category
   (:func:`~mudenet_core.data.pseudo_anomaly.generator_kind`, config ``generator: auto | texture | object``):
   textures get the shared Perlin + texture LAS
   (:mod:`mudenet_core.data.synthesis`, a DTD folder in ``texture.texture_dir`` or self-textures), objects get
   regions pasted from an external image folder (``objects.source_dir``; without one, regions of other
   training images). Each training image is made anomalous with probability ``anomaly_prob``; the others
   stay normal (DRAEM's 0.5), so the networks also see normal inputs.
2. **Frozen backbone** (WideResNet-50-2 ``layer1-3`` in the paper profile, EfficientNet-Lite0 ``stage2/3/5``
   on the CPU): S = 3 maps at strides 4 / 8 / 16 of the (pseudo-anomalous) image.
3. **MFRM** reconstructs the *clean* image's features from the pseudo-anomalous image's features through a
   bottleneck, and the clean image itself ("dual spaces": feature and image purification).
4. **MFFM** fuses original and reconstructed features (channel concatenation, squeeze-and-excitation gates).
5. **Anomaly calculation**: per pixel, an MLP over ``1 - cos`` feature maps, the CIELAB DeltaE76 and the SSIM
   structure difference between the image and its reconstruction, and the MFFM descriptors -> a logit map.

Losses (pure functions below): reconstruction ``L_rec = feature_weight * sum_k MSE(n(r_k), n(f_k))``
(``n`` = unit channel vectors, i.e. ``2 - 2 cos``) ``+ image_weight * (MSE(rec_img, x) + 1 - SSIM(rec_img,
x))``, the targets being the clean image and its features; anomaly ``L_focal`` = alpha-balanced binary focal
loss of the logit map against the pseudo-anomaly mask (``focal_alpha`` on anomalous pixels, ``focal_gamma``).
Total ``L_rec + focal_weight * L_focal``. Adam (lr 1e-3, weight decay 1e-5), cosine annealing per epoch to
``min_lr``, batch 32, 600 epochs (README).

Inference: the logit map, Gaussian-blurred (``map_sigma``) is the anomaly map (logits, not probabilities,
so scores do not saturate at 1); the image score is its maximum. Every operation is per image (BatchNorm in
eval mode, per-image SE pooling), so scores do not depend on the batch.

Our choices where the sources are silent (beyond the networks' own, see :mod:`mudenet_core.nets.pagmfr`):

* Image size 256 px in the paper profile (the RGPKD template of the same group); 128 px on the CPU.
* The final-epoch model is kept: the README trains a fixed 600 epochs with cosine annealing, and selecting a
  checkpoint on our synthetic validation set would favour the recipe that made it (for textures, the same
  Perlin + texture family as the training pseudo-anomalies). No test data is used for anything.
* Calibration: after training the detector scores the synthetic-anomaly validation set built from ``val_ds``
  (:func:`mudenet_core.data.synthesis.validation_set`, ``validation`` config) and sets ``threshold`` to the
  ``threshold_quantile`` of its normal images' scores (:func:`mudenet_core.harness.choose_threshold`, the
  harness's default rule); the validation metrics go into the fit log.
* The focal loss trains MFFM and the MLP only (reconstructions detached, ``detach_reconstruction``).
* Outputs in ``checkpoint_dir``: ``pagmfr_train.pt`` (exact resume every ``checkpoint_every`` epochs),
  ``training_curves.csv`` / ``.png`` (loss terms per epoch) and ``timing.json``.

Example:
    >>> cfg = PAGMFRConfig(backbone="resnet18", pretrained=False, image_size=64, width=8, epochs=1)
    >>> det = PAGMFR(cfg)
    >>> maps, scores = det.predict(torch.zeros(2, 3, 64, 64))
    >>> tuple(maps.shape), tuple(scores.shape)
    ((2, 1, 64, 64), (2,))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mudenet_core.baselines.common import gaussian_blur
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.data.pseudo_anomaly import (
    GeneratorKind,
    ObjectPasteConfig,
    ObjectSource,
    generator_kind,
    object_pseudo_anomalies,
)
from mudenet_core.data.synthesis import (
    SynthesisConfig,
    ValidationConfig,
    derived_generator,
    synthesize,
    texture_source,
    validation_set,
)
from mudenet_core.data.transforms import denormalize, normalize
from mudenet_core.io import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_csv,
    save_json,
)
from mudenet_core.nets.backbones import BACKBONES, build_backbone
from mudenet_core.nets.pagmfr import PAGMFRNet
from mudenet_core.ssim import ssim
from mudenet_core.utils import progress

TRAIN_CHECKPOINT = "pagmfr_train.pt"
CURVES_CSV = "training_curves.csv"
CURVES_PNG = "training_curves.png"
TIMING_JSON = "timing.json"
LOSS_TERMS = ("loss", "feature", "image_mse", "image_ssim", "focal")
# Config keys that fix the networks' shapes or the training stream: a checkpoint made with other values cannot
# be resumed.
ARCH_KEYS = ["backbone", "layers", "image_size", "width", "skip_levels", "fused_channels", "hidden",
             "se_ratio", "ssim_window", "detach_reconstruction"]
RESUME_KEYS = ARCH_KEYS + ["generator", "texture", "objects", "anomaly_prob", "epochs", "batch_size", "lr",
                           "weight_decay", "min_lr", "feature_weight", "image_weight", "focal_weight",
                           "focal_alpha", "focal_gamma"]


@dataclasses.dataclass(frozen=True)
class PAGMFRConfig(ConfigBase):
    """PAGMFR settings; defaults are the ``paper`` profile (README training settings, our architecture)."""

    backbone: str = "wide_resnet50_2"  # registry name (mudenet_core.nets.backbones); frozen
    layers: tuple[str, ...] = ()  # S maps, shallow to deep; () = the backbone's strides 4 / 8 / 16
    pretrained: bool = True  # ImageNet weights (False only for tests)
    image_size: int = bounded(256, ge=32)  # H = W the profile is meant for (the data pipeline resizes to it)
    width: int = positive(256)  # MFRM channels (projections, bottleneck, decoder)
    skip_levels: int = bounded(0, ge=0, le=4)  # MFRM U-Net skips into the shallower levels (0: none)
    fused_channels: int = positive(8)  # MFFM output channels per level
    hidden: int = positive(32)  # per-pixel MLP hidden units (two hidden layers)
    se_ratio: int = positive(4)  # MFFM squeeze-and-excitation channel reduction
    ssim_window: int = positive(11)  # SSIM Gaussian window (odd; sigma 1.5) of the loss and the structure map
    detach_reconstruction: bool = True  # the focal loss does not reach MFRM
    # pseudo-anomalies: "auto" = by category (mudenet_core.data.pseudo_anomaly.TEXTURE_CATEGORIES)
    generator: Literal["auto", "texture", "object"] = "auto"
    texture: SynthesisConfig = SynthesisConfig()  # texture categories: the shared LAS (texture_dir: DTD)
    objects: ObjectPasteConfig = ObjectPasteConfig()  # object categories: source_dir = external image folder
    anomaly_prob: float = bounded(0.5, ge=0, le=1)  # probability that a training image gets a pseudo-anomaly
    epochs: int = positive(600)  # README: 600
    batch_size: int = positive(32)  # README: 32
    lr: float = positive(1e-3)  # README: Adam 0.001
    weight_decay: float = nonnegative(1e-5)  # README: 1e-5
    min_lr: float = nonnegative(0.0)  # cosine annealing floor (eta_min)
    feature_weight: float = nonnegative(1.0)  # weight of the feature reconstruction loss
    image_weight: float = nonnegative(1.0)  # weight of the image MSE + (1 - SSIM) loss
    focal_weight: float = nonnegative(1.0)  # weight of the focal loss
    focal_alpha: float = bounded(0.75, gt=0, lt=1)  # focal weight of anomalous pixels (1 - alpha: normal)
    focal_gamma: float = nonnegative(2.0)  # focal focusing exponent
    map_sigma: float = nonnegative(4.0)  # Gaussian blur of the logit map, pixels (0: none)
    threshold_quantile: float = bounded(0.99, gt=0, le=1)  # threshold: this quantile of normal val scores
    validation: ValidationConfig = ValidationConfig()  # the synthetic validation set built from val_ds
    checkpoint_every: int = positive(10)  # epochs between resume checkpoints (with a checkpoint_dir)
    eval_batch_size: int = positive(8)  # images per forward pass when scoring

    def __post_init__(self):
        super().__post_init__()  # the declared bounds and Literal choices
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"PAGMFRConfig.backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.ssim_window % 2 == 0:
            raise ConfigError(f"PAGMFRConfig.ssim_window must be odd, got {self.ssim_window}")
        if self.skip_levels >= len(self.resolved_layers):
            raise ConfigError(f"PAGMFRConfig.skip_levels must be below the number of levels "
                              f"({len(self.resolved_layers)}), got {self.skip_levels}")
        if self.min_lr > self.lr:
            raise ConfigError(f"PAGMFRConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    @property
    def resolved_layers(self) -> tuple[str, ...]:
        """The backbone layers used (``layers``, or the backbone's stride-4/8/16 defaults)."""
        return tuple(self.layers) if self.layers else BACKBONES[self.backbone].default_layers


# ------------------------------------------------------------------------------------------------ losses
def feature_reconstruction_loss(features: Sequence[torch.Tensor],
                                rec_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the MSE between unit channel vectors (``2 - 2 cos`` per position, averaged).

    Args:
        features: S target maps (B, C_k, h_k, w_k).
        rec_features: S reconstructions, same shapes.

    Example:
        >>> f = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)]; r = [torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)]
        >>> float(feature_reconstruction_loss(f, r)), float(feature_reconstruction_loss(f, [2 * f[0]]))
        (2.0, 0.0)
    """
    assert len(features) == len(rec_features) > 0, f"{len(features)} vs {len(rec_features)} levels"
    total = features[0].new_zeros(())
    for f, r in zip(features, rec_features, strict=True):
        assert f.shape == r.shape, f"level shape mismatch {tuple(f.shape)} vs {tuple(r.shape)}"
        d = F.normalize(f, dim=1, eps=1e-8) - F.normalize(r, dim=1, eps=1e-8)  # (B, C, h, w)
        total = total + d.pow(2).sum(1).mean()
    return total


def image_reconstruction_loss(rec_img: torch.Tensor, img: torch.Tensor,
                              window_size: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """The image terms: MSE and ``1 - SSIM`` of the reconstruction (B, 3, H, W) against the image, in [0, 1].

    Example:
        >>> x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> [round(float(v), 6) for v in image_reconstruction_loss(x, x)]
        [0.0, 0.0]
    """
    assert rec_img.shape == img.shape and img.ndim == 4, f"{tuple(rec_img.shape)} vs {tuple(img.shape)}"
    return F.mse_loss(rec_img, img), 1.0 - ssim(rec_img, img, window_size=window_size)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75,
               gamma: float = 2.0) -> torch.Tensor:
    """Alpha-balanced binary focal loss (Lin et al. 2017), mean over pixels.

    ``FL = -alpha_t (1 - p_t)^gamma log p_t`` with ``p_t = sigmoid(logit)`` for anomalous pixels (``alpha_t =
    alpha``) and ``1 - sigmoid(logit)`` for normal ones (``alpha_t = 1 - alpha``); computed from
    ``binary_cross_entropy_with_logits`` (stable for large logits).

    Args:
        logits: (B, 1, H, W).
        target: (B, 1, H, W) in {0, 1}.
        alpha: weight of the anomalous class.
        gamma: focusing exponent (0: alpha-weighted cross-entropy).

    Example:
        >>> z = torch.zeros(1, 1, 1, 2); t = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(float(focal_loss(z, t, alpha=0.5, gamma=0.0)), 4) == round(0.5 * math.log(2), 4)
        True
    """
    assert logits.shape == target.shape, f"logits {tuple(logits.shape)} vs target {tuple(target.shape)}"
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t
    p_t = torch.exp(-ce)
    alpha_t = alpha * target + (1.0 - alpha) * (1.0 - target)
    return (alpha_t * (1.0 - p_t).pow(gamma) * ce).mean()


# ------------------------------------------------------------------------------------------------ training
@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _dataset_category(ds: Dataset) -> str:
    index = getattr(ds, "index", None)
    if isinstance(index, pd.DataFrame) and "category" in index.columns and len(index):
        return str(index["category"].iloc[0])
    return str(ds[0].get("category", ""))


def _images01(items: list[dict], normalized: bool) -> torch.Tensor:
    x = torch.stack([it["image"] for it in items])  # (B, 3, H, W)
    return denormalize(x) if normalized else x.clamp(0.0, 1.0)


@dataclasses.dataclass
class PseudoAnomalySource:
    """What the pseudo-anomalies of one fit draw from: the strategy and its texture / object source."""

    kind: GeneratorKind
    texture: Any  # TextureFolder or the pool tensor (texture kind)
    objects: ObjectSource | None  # object kind


def pseudo_anomalies(x01: torch.Tensor, indices: torch.Tensor, source: PseudoAnomalySource, cfg: PAGMFRConfig,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-anomalous versions of a batch: each image with probability ``anomaly_prob``.

    Args:
        x01: normal images (B, 3, H, W) in [0, 1].
        indices: (B,) their positions in the training pool (self-textures / self-regions avoid them).
        source: the strategy and its sources.
        cfg: the config (``anomaly_prob``, ``texture``, ``objects``).
        generator: explicit randomness.

    Returns:
        images (B, 3, H, W) in [0, 1] and masks (B, 1, H, W) in {0, 1} (all zero for untouched images).
    """
    b = x01.shape[0]
    chosen = torch.rand(b, generator=generator) < cfg.anomaly_prob  # (B,)
    out, masks = x01.clone(), x01.new_zeros(b, 1, *x01.shape[-2:])
    sel = torch.nonzero(chosen).flatten()
    if sel.numel() == 0:
        return out, masks
    if source.kind == "texture":
        for i in sel.tolist():
            out[i], masks[i] = synthesize(x01[i], cfg.texture, generator, source=source.texture,
                                          exclude=int(indices[i]))
    else:
        assert source.objects is not None
        y, m = object_pseudo_anomalies(x01[sel], indices[sel], source.objects, cfg.objects, generator)
        out[sel], masks[sel] = y, m
    return out, masks


def _training_step(net: PAGMFRNet, backbone, x01: torch.Tensor, xa01: torch.Tensor, masks: torch.Tensor,
                   cfg: PAGMFRConfig, clean: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Losses of one batch: clean images (targets) and their pseudo-anomalous versions (inputs).

    ``clean``: the clean images' backbone maps when already known (a training set without augmentation).
    """
    layers = cfg.resolved_layers
    b = x01.shape[0]
    changed = torch.nonzero(masks.flatten(1).amax(1) > 0).flatten()  # images with a pseudo-anomaly
    with torch.no_grad():
        if clean is None:
            out = backbone(normalize(torch.cat([x01, xa01[changed]])))  # (B + n, C_k, h_k, w_k)
            clean, fresh = [out[k][:b] for k in layers], [out[k][b:] for k in layers]
        else:
            out = backbone(normalize(xa01[changed]))  # (n, C_k, h_k, w_k)
            fresh = [out[k] for k in layers]
        anomalous = []
        for c, f_new in zip(clean, fresh, strict=True):  # untouched images keep the clean features
            f = c.clone()
            f[changed] = f_new
            anomalous.append(f)
    logit, rec, rec_img = net(anomalous, xa01)
    feat = feature_reconstruction_loss(clean, rec)
    mse, ssim_loss = image_reconstruction_loss(rec_img, x01, cfg.ssim_window)
    focal = focal_loss(logit, masks, cfg.focal_alpha, cfg.focal_gamma)
    loss = cfg.feature_weight * feat + cfg.image_weight * (mse + ssim_loss) + cfg.focal_weight * focal
    return {"loss": loss, "feature": feat, "image_mse": mse, "image_ssim": ssim_loss, "focal": focal}


def train_pagmfr(net: PAGMFRNet, backbone, train_ds: Dataset, cfg: PAGMFRConfig, *, kind: GeneratorKind,
                 seed: int, device: torch.device, checkpoint_path: Path | None = None, resume: bool = False,
                 show_progress: bool = True) -> dict[str, Any]:
    """Train MFRM, MFFM and the MLP on pseudo-anomalies of the training images (the backbone stays frozen).

    Epoch ``e`` shuffles with seed ``seed + e``, selects the dataset's augmentation stream with
    ``set_epoch(e)`` and draws its pseudo-anomalies from a generator derived from ``(seed, e)``, so a run
    resumed from a checkpoint after epoch ``e`` continues exactly as the uninterrupted run would.

    Returns:
        log dict: ``epochs`` (one dict per epoch: epoch, loss terms, lr, time_s), ``resumed_from``, ``kind``.
    """
    n = len(train_ds)
    if n == 0:
        raise ValueError("PAGMFR: the training dataset is empty")
    normalized = bool(getattr(train_ds, "normalize", True))
    plain = train_ds.without_augment() if hasattr(train_ds, "without_augment") else train_ds
    pool = _images01([plain[i] for i in range(n)], normalized)  # (N, 3, H, W): the self-texture pool
    if tuple(pool.shape[-2:]) != (cfg.image_size, cfg.image_size):
        raise ConfigError(f"PAGMFR: training images are {tuple(pool.shape[-2:])}, the config expects "
                          f"{cfg.image_size} px (set DataConfig.image_size = PAGMFRConfig.image_size)")
    if kind == "texture":
        source = PseudoAnomalySource(kind, texture_source(cfg.texture, pool, cfg.image_size), None)
    else:
        source = PseudoAnomalySource(kind, None, ObjectSource(pool, cfg.objects.source_dir or None))
    cache = None  # the clean images' backbone maps, computed once when the images never change
    if getattr(train_ds, "augment", "unknown") is None:
        with torch.no_grad():
            maps = [backbone(normalize(pool[s: s + cfg.batch_size]).to(device))
                    for s in range(0, n, cfg.batch_size)]
        cache = [torch.cat([m[k] for m in maps]) for k in cfg.resolved_layers]  # (N, C_k, h_k, w_k)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.min_lr)
    history: list[dict[str, float]] = []
    start = 0
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path, cfg, keys=RESUME_KEYS)
        if ckpt.get("seed") != seed or ckpt.get("kind") != kind:
            raise CheckpointError(
                f"{checkpoint_path}: made with seed {ckpt.get('seed')} and generator {ckpt.get('kind')!r}, "
                f"this run uses {seed} and {kind!r}; pass the same generator seed or start without resume")
        load_weights(net, ckpt["state_dict"], checkpoint_path)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history = list(ckpt["history"])
        start = int(ckpt["epoch"])
    for epoch in progress(range(start, cfg.epochs), desc="pagmfr", total=cfg.epochs, initial=start,
                          enabled=show_progress):
        t0 = time.perf_counter()
        net.train()
        if hasattr(train_ds, "set_epoch"):  # mudenet_core.data: augmentation stream of this epoch
            train_ds.set_epoch(epoch)
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        seen = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + epoch)  # datasets that draw from the global RNG
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            g = derived_generator(seed, "pagmfr-pseudo-anomalies", epoch)
            for s in range(0, n, cfg.batch_size):
                idx = perm[s: s + cfg.batch_size]
                x01 = _images01([train_ds[int(i)] for i in idx], normalized)  # (B, 3, H, W)
                xa01, masks = pseudo_anomalies(x01, idx, source, cfg, g)
                clean = [c[idx.to(c.device)] for c in cache] if cache is not None else None
                terms = _training_step(net, backbone, x01.to(device), xa01.to(device), masks.to(device), cfg,
                                       clean)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                for k in LOSS_TERMS:
                    sums[k] += float(terms[k].detach()) * idx.numel()
                seen += idx.numel()
        row = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in sums.items()},
               "lr": float(opt.param_groups[0]["lr"]), "time_s": time.perf_counter() - t0}
        sched.step()
        history.append(row)
        done = epoch + 1
        if checkpoint_path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
            save_checkpoint(checkpoint_path, state_dict=net.state_dict(), config=cfg,
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=done,
                            history=history, seed=seed, kind=kind)
    net.eval()
    return {"epochs": history, "resumed_from": start, "kind": kind}


def save_training_outputs(folder: str | Path, history: list[dict[str, float]],
                          timing: dict[str, Any]) -> None:
    """Write ``training_curves.csv`` / ``.png`` (loss terms per epoch) and ``timing.json`` into ``folder``."""
    from mudenet_core import viz

    folder = Path(folder)
    table = pd.DataFrame(history)
    save_csv(folder / CURVES_CSV, table)
    if len(table):
        viz.save_figure(viz.loss_curves(table, step_key="epoch", terms=list(LOSS_TERMS)), folder / CURVES_PNG)
    save_json(folder / TIMING_JSON, timing)


# ------------------------------------------------------------------------------------------------ detector
class PAGMFR:
    """PAGMFR detector: ``fit`` / ``predict`` / ``save`` / ``load`` (see the module docstring).

    Attributes:
        config: the :class:`PAGMFRConfig`.
        backbone: the frozen feature extractor.
        net: :class:`~mudenet_core.nets.pagmfr.PAGMFRNet` (MFRM, MFFM, anomaly calculation).
        kind: the pseudo-anomaly strategy of the last fit ("texture" / "object"; "" before fit).
        threshold: image-score threshold chosen on the synthetic validation set; NaN before ``fit``.
    """

    def __init__(self, config: PAGMFRConfig | None = None, *, pretrained: bool | None = None):
        self.config = config if config is not None else PAGMFRConfig()
        if not isinstance(self.config, PAGMFRConfig):
            raise ConfigError(f"PAGMFR needs a PAGMFRConfig, got {type(self.config).__name__}")
        c = self.config
        self.device = torch.device("cpu")
        self.backbone = build_backbone(c.backbone, c.resolved_layers,
                                       pretrained=c.pretrained if pretrained is None else pretrained)
        self.channels = tuple(self.backbone.channels[k] for k in c.resolved_layers)
        self.net = self._build_net()
        self.kind = ""
        self.threshold = float("nan")

    def _build_net(self) -> PAGMFRNet:
        c = self.config
        return PAGMFRNet(self.channels, c.width, c.fused_channels, c.hidden, c.se_ratio, c.ssim_window,
                         c.detach_reconstruction, c.skip_levels).eval()

    def fit(self, train_ds: Dataset, val_ds: Dataset | None = None, *, generator: torch.Generator,
            device: str | torch.device = "cpu", show_progress: bool = True,
            checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Train on pseudo-anomalies of ``train_ds``; calibrate the threshold on validation from ``val_ds``.

        Args:
            train_ds: training split (normal images), items with ``"image"`` (3, H, W) and ``"category"``.
            val_ds: validation split (normal images); the synthetic-anomaly validation set is built from it
                (None: no calibration).
            generator: the run's RNG; initial weights and the training seed are drawn from it.
            device: torch device.
            show_progress: progress bars.
            checkpoint_dir: if given: ``pagmfr_train.pt`` (resume), training curves and ``timing.json``.
            resume: continue from ``checkpoint_dir/pagmfr_train.pt`` when it exists.

        Returns:
            log dict: ``epochs`` (per-epoch losses), ``loss`` (per-epoch totals), ``kind``, ``category``,
            ``resumed_from``, ``threshold``, ``validation`` (image/pixel AUROC, AU-PRO on the synthetic set),
            ``train_s``, ``validation_s``, ``fit_time_s``.
        """
        t0 = time.perf_counter()
        self.device = torch.device(device)
        category = _dataset_category(train_ds)
        self.kind = generator_kind(category, self.config.generator)
        init_seed, loop_seed = _draw_seed(generator), _draw_seed(generator) % 2**40
        with _seeded(init_seed):
            self.net = self._build_net()
        self.net.to(self.device)
        self.backbone.to(self.device)
        ckpt = Path(checkpoint_dir) / TRAIN_CHECKPOINT if checkpoint_dir is not None else None
        log = train_pagmfr(self.net, self.backbone, train_ds, self.config, kind=self.kind, seed=loop_seed,
                           device=self.device, checkpoint_path=ckpt, resume=resume,
                           show_progress=show_progress)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        log.update(category=category, loss=[r["loss"] for r in log["epochs"]])
        if val_ds is not None and len(val_ds) > 0:
            from mudenet_core import harness

            vset = validation_set(val_ds, self.config.validation)
            result = harness.evaluate(self, vset, batch_size=self.config.eval_batch_size, device=self.device,
                                      show_progress=False)
            labels, scores = result.scores["label"].to_numpy(), result.scores["score"].to_numpy()
            tcfg = harness.ThresholdConfig(quantile=self.config.threshold_quantile)
            self.threshold = harness.choose_threshold(labels, scores, tcfg)
            log["validation"] = {k: float(v) for k, v in result.metrics.items()}
            log["val_scores"] = scores.tolist()
        log["threshold"] = self.threshold
        log.update(train_s=train_s, validation_s=time.perf_counter() - t1,
                   fit_time_s=time.perf_counter() - t0)
        if checkpoint_dir is not None:
            epochs_run = len(log["epochs"]) - log["resumed_from"]
            timing = {"train_s": train_s, "validation_s": log["validation_s"],
                      "fit_time_s": log["fit_time_s"], "epochs": self.config.epochs,
                      "epochs_this_call": epochs_run,
                      "s_per_epoch": (train_s / epochs_run) if epochs_run else float("nan"),
                      "n_train": len(train_ds), "threads": torch.get_num_threads(),
                      "device": str(self.device),
                      "kind": self.kind, "category": category}
            save_training_outputs(checkpoint_dir, log["epochs"], {k: _finite(v) for k, v in timing.items()})
        return log

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and image scores.

        Args:
            images: ImageNet-normalised (B, 3, H, W).

        Returns:
            maps (B, 1, H, W): the blurred logit map; scores (B,): its maximum.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        self.net.eval()
        x = images.to(self.device)
        feats = self.backbone(x)
        logit, _, _ = self.net([feats[k] for k in self.config.resolved_layers], denormalize(x))
        maps = gaussian_blur(logit, self.config.map_sigma)  # (B, 1, H, W)
        return maps, maps.flatten(1).amax(1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The reconstructions and the individual maps, for inspection.

        Returns:
            reconstructed features [(B, C_k, h_k, w_k)], reconstructed image (B, 3, H, W) in [0, 1], and the
            S + 2 difference maps (B, S + 2, H, W) (cosine per level, DeltaE76 / 100, (1 - SSIM) / 2).
        """
        self.net.eval()
        x = images.to(self.device)
        feats = [self.backbone(x)[k] for k in self.config.resolved_layers]
        x01 = denormalize(x)
        rec, rec_img = self.net.mfrm(feats, tuple(x.shape[-2:]))
        return rec, rec_img, self.net.anomaly.difference_maps(feats, rec, x01, rec_img)

    def classify(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Decisions (N,) in {0, 1}: score >= threshold."""
        if math.isnan(self.threshold):
            raise RuntimeError(
                "PAGMFR.classify: no threshold yet; call fit() with a val_ds (or load()) first")
        s = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        return (s >= self.threshold).astype(int)

    def save(self, path: str | Path) -> Path:
        """Save networks, frozen backbone (no download needed to load), threshold, strategy and config."""
        sd = {f"net.{k}": v.detach().cpu() for k, v in self.net.state_dict().items()}
        sd.update({f"backbone.{k}": v.detach().cpu() for k, v in self.backbone.state_dict().items()})
        sd["threshold"] = torch.tensor(self.threshold, dtype=torch.float64)
        return save_checkpoint(path, state_dict=sd, config=self.config, method="pagmfr", kind=self.kind)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> PAGMFR:
        """Rebuild a detector saved with :meth:`save`."""
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != "pagmfr":
            raise CheckpointError(f"{path}: not a PAGMFR checkpoint (method={ckpt.get('method')!r})")
        det = cls(PAGMFRConfig.from_dict(ckpt["config"]), pretrained=False)
        sd = ckpt["state_dict"]
        for prefix, module in (("net.", det.net), ("backbone.", det.backbone)):
            load_weights(module, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, path)
        if "threshold" not in sd:
            raise CheckpointError(f"{path}: PAGMFR checkpoint without a threshold")
        det.threshold = float(sd["threshold"])
        det.kind = str(ckpt.get("kind", ""))
        det.device = torch.device(device)
        det.net.to(det.device).eval()
        det.backbone.to(det.device)
        return det


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ------------------------------------------------------------------------------------------------ figures
def prediction_grid(detector: PAGMFR, dataset: Dataset, *, indices: Sequence[int] | None = None, n: int = 6,
                    vmin: float | None = None, vmax: float | None = None):
    """Figure: one row per image: image | ground truth | predicted heat map | overlay.

    Args:
        detector: a fitted detector.
        dataset: items with ``image`` (normalised unless ``dataset.normalize`` is False), ``mask``, ``label``,
            ``defect_type``.
        indices: which items (default: ``n`` spread evenly over the dataset).
        n: how many when ``indices`` is None.
        vmin: heat-map colour range (default: the shown maps' range; pass the calibrated range to compare).
        vmax: upper end of the range.

    Returns:
        matplotlib Figure (:func:`mudenet_core.viz.anomaly_map_grid`).
    """
    from mudenet_core import viz

    if indices is None:
        indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).round().astype(int))
    items = [dataset[int(i)] for i in indices]
    x = torch.stack([it["image"] for it in items])
    normalized = bool(getattr(dataset, "normalize", True))
    maps, scores = detector.predict(x if normalized else normalize(x))
    images = denormalize(x) if normalized else x
    titles = [f"{it.get('defect_type', '')}  score={float(s):.3g}"
              for it, s in zip(items, scores, strict=True)]
    masks = torch.stack([it["mask"] for it in items])[:, 0]  # (N, H, W)
    return viz.anomaly_map_grid(images.cpu(), maps[:, 0].cpu(), masks, titles=titles, vmin=vmin, vmax=vmax)


def save_prediction_grid(detector: PAGMFR, dataset: Dataset, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`prediction_grid` to ``path`` (atomically; format from the suffix)."""
    from mudenet_core import viz

    return viz.save_figure(prediction_grid(detector, dataset, **kwargs), path)
