"""GLASS (Chen, Luo, Lv, Zhang, ECCV 2024): a discriminator trained on global and local synthetic anomalies.

Networks (:mod:`mudenet_core.nets.glass`): a frozen backbone's stride-8 and stride-16 maps, aggregated over
3 x 3 neighbourhoods and pooled to ``target_embed_dim`` (D) values per position; a linear *feature adaptor*
(D -> D); an MLP *discriminator* (D -> ``dsc_hidden`` -> BN -> LeakyReLU -> 1 -> sigmoid). Per training batch
of normal images x (official ``glass.py``, see ``../shared/research/methods_reference.md`` section A):

* **LAS** (local anomaly synthesis, image level, :mod:`mudenet_core.data.synthesis`): each image gets a Perlin
  mask filled with a texture (DTD when ``synthesis.texture_dir`` names a folder, else a self-texture cut from
  another training image); its feature-level label is the mask max-pooled to the grid.
* **GAS** (global anomaly synthesis, feature level, :func:`global_anomaly_features`): the adapted normal
  features plus N(0, ``noise_std``^2) noise are moved ``gas_steps`` times by ``gas_step_size`` along the
  normalised gradient of BCE(D(f), 1) (ascent on the loss of calling them anomalous, i.e. towards the normal
  side), and every ``projection_every`` steps projected (:func:`truncated_projection`) back to a shell:
  *manifold*: distance to the true feature in [``manifold_r``, 2 ``manifold_r``]; *hypersphere*: distance
  to the per-position centre c in [r, 2r], r the ``radius_quantile`` quantile of the normal points' distances
  to c (c: mean adapted training feature per position, recomputed at the start of every epoch). With the
  hypersphere, LAS features inside the mask are also projected to [2r, 4r] around c.
* **Loss**: BCE(D(normal), 0) + BCE(D(GAS), 1) + focal loss (gamma 2) on the LAS positions with OHEM (keep the
  positions whose squared error is at or above its ``ohem_quantile`` quantile); Adam (1e-4, wd 1e-5) for the
  adaptor, AdamW (2e-4, wd 0.01) for the discriminator.

Inference: the discriminator's score of every position, bilinearly upsampled and Gaussian-blurred
(sigma ``blur_sigma`` = 4) into the map; the image score is the maximum of the raw patch scores. The
discriminator runs in eval mode (BatchNorm running statistics), so an image's score does not depend on the
batch.

Distribution: ``distribution: auto`` takes the official per-category table (:func:`default_distribution`:
MVTec AD bottle, cable, pill, screw, transistor use the hypersphere, every other MVTec AD and every MPDD
category the manifold, unknown categories the manifold); ``manifold`` / ``hypersphere`` force one.

Foreground masks (optional, as the official ``--fg 1`` on MVTec AD): set ``foreground_dir`` to a folder
holding, for every training image, a mask with the same file name (or the same stem with any image
extension), e.g. ``fg_mask/bottle/000.png`` for ``train/good/000.png`` (CLI: ``foreground_dir=<folder>``);
any non-zero pixel is foreground and LAS masks are kept inside it. The official masks are a separate
download (GLASS README, "Foreground Mask"); without them anomalies may fall on the background.

Checkpoint choice, our protocol (the official code picks the best epoch on the *test* set): with
``selection: best_val`` the model kept is the epoch with the highest image + pixel AUROC on the
synthetic-anomaly validation set built inside ``fit`` from ``val_ds``
(:func:`mudenet_core.data.synthesis.validation_set`, the same LAS recipe, fixed seed 0); ``last`` keeps the
final epoch (a fixed schedule). The test split is never read.

Outputs of ``fit(..., checkpoint_dir=D)``: ``D/glass_train.pt`` (resume state, every ``checkpoint_every``
epochs; ``resume=True`` continues it exactly), ``D/glass_best.pt`` and ``D/glass_final.pt`` (detector
checkpoints, :meth:`GLASS.load`), ``D/training_curves.csv`` / ``.png`` (losses and validation AUROC per
epoch) and ``D/timing.json`` (seconds per epoch and in total).

Example:
    >>> p = truncated_projection(torch.tensor([[0.3, 0.4], [3.0, 4.0]]), torch.zeros(2, 2), 1.0, 2.0)
    >>> p.norm(dim=1).tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mudenet_core import metrics
from mudenet_core.baselines.ae import draw_seed, seeded
from mudenet_core.baselines.common import upsample_and_blur
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.data import synthesis as las
from mudenet_core.data.images import DataError
from mudenet_core.data.synthesis import (
    gas_shell,
    global_anomaly_features,
    load_foreground,
    truncated_projection,
)
from mudenet_core.data.transforms import denormalize, normalize
from mudenet_core.io import (
    REPO_ROOT,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_csv,
    save_json,
)
from mudenet_core.nets.glass import Discriminator, GLASSEmbedding, feature_adaptor
from mudenet_core.utils import modes_restored, progress

Distribution = Literal["manifold", "hypersphere"]

# Official per-category choice (GLASS datasets/excel/*_distribution.xlsx; methods_reference.md A.5): the
# categories that use the hypersphere; every other category of these datasets uses the manifold.
HYPERSPHERE_CATEGORIES: dict[str, frozenset[str]] = {
    "mvtec_ad": frozenset({"bottle", "cable", "pill", "screw", "transistor"}),
    "mpdd": frozenset(),
}
KNOWN_CATEGORIES: dict[str, frozenset[str]] = {
    "mvtec_ad": frozenset({"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                           "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"}),
    "mpdd": frozenset({"bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate",
                       "tubes"}),
}
TRAIN_CHECKPOINT = "glass_train.pt"


def default_distribution(dataset: str | None, category: str) -> Distribution:
    """The official distribution hypothesis of a category: ``"hypersphere"`` or ``"manifold"``.

    Args:
        dataset: ``"mvtec_ad"`` or ``"mpdd"`` (the tables the official code ships); None: found from the
            category name (the two tables share none).
        category: category folder name.

    Returns:
        the table's choice; ``"manifold"`` (GLASS-m) for a dataset or category outside the tables.

    Example:
        >>> default_distribution("mvtec_ad", "screw"), default_distribution(None, "metal_plate")
        ('hypersphere', 'manifold')
    """
    if dataset is None:
        dataset = next((d for d, cats in KNOWN_CATEGORIES.items() if category in cats), None)
    return "hypersphere" if category in HYPERSPHERE_CATEGORIES.get(dataset or "", frozenset()) else "manifold"


@dataclasses.dataclass(frozen=True)
class GLASSConfig(ConfigBase):
    """GLASS settings; defaults are the official run scripts' (WideResNet-50 layer2 + layer3, 288 px)."""

    backbone: str = "wide_resnet50_2"  # registry name (mudenet_core.nets.backbones)
    layers: tuple[str, ...] = ()  # the two maps (strides 8 / 16); () = the backbone's DEFAULT_LAYERS[1:]
    pretrained: bool = True  # ImageNet weights (False only for tests without weights)
    image_size: int = positive(288)  # H = W of the input (official: resize 288, crop 288)
    patch_size: int = positive(3)  # neighbourhood p of the local aggregation (odd)
    pretrain_embed_dim: int = positive(1536)  # D': per-layer adaptive pooling of the p*p*C_k values
    target_embed_dim: int = positive(1536)  # D: pooling of the stacked layers; adaptor/discriminator width
    dsc_hidden: int = positive(1024)  # hidden width of the discriminator
    # GAS shell: manifold (around the true feature), hypersphere (around the centre), auto (official table)
    distribution: Literal["auto", "manifold", "hypersphere"] = "auto"
    foreground_dir: str = ""  # folder of foreground masks named as the training images ("" = none)
    synthesis: las.SynthesisConfig = las.SynthesisConfig()  # LAS (texture_dir "" = self-textures)
    noise_std: float = nonnegative(0.015)  # GAS Gaussian noise
    gas_steps: int = nonnegative(20)  # gradient-ascent steps (0: noise only, no projection)
    gas_step_size: float = nonnegative(0.001)  # step along the normalised gradient
    projection_every: int = positive(5)  # truncated projection after every this many steps
    manifold_r: float = positive(0.5)  # manifold shell [r, 2r] around the true feature (official code: 0.5)
    radius_quantile: float = bounded(0.75, gt=0, le=1)  # hypersphere r: quantile of normal distances to c
    ohem_quantile: float = bounded(0.5, ge=0, lt=1)  # LAS OHEM: keep errors >= this quantile (0 = keep all)
    focal_gamma: float = nonnegative(2.0)  # focal loss exponent of the LAS loss
    lr_adaptor: float = positive(1e-4)  # Adam
    weight_decay_adaptor: float = nonnegative(1e-5)
    lr_discriminator: float = positive(2e-4)  # AdamW
    weight_decay_discriminator: float = nonnegative(0.01)  # torch's AdamW default (official leaves it)
    epochs: int = positive(640)  # official meta_epochs
    batch_size: int = positive(8)
    max_samples_per_epoch: int = nonnegative(392)  # an epoch ends after the batch passing this (0 = no cap)
    # best_val: keep the epoch with the best validation image + pixel AUROC; last: a fixed schedule
    selection: Literal["best_val", "last"] = "best_val"
    val_every: int = nonnegative(1)  # validate every this many epochs, and after the last (0 = never)
    val_min_anomalous: int = positive(60)  # synthetic anomalies of the validation set built in fit
    blur_sigma: float = nonnegative(4.0)  # Gaussian blur of the upsampled map, in pixels
    checkpoint_every: int = positive(5)  # epochs between resume checkpoints (with a checkpoint_dir)
    eval_batch_size: int = positive(8)  # images per forward pass outside training
    cache_embeddings: bool = True  # keep the normal images' frozen embeddings (memory: N * h * w * D)

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        if self.patch_size % 2 == 0:
            raise ConfigError(f"GLASSConfig.patch_size must be odd, got {self.patch_size}")
        if self.selection == "best_val" and self.val_every == 0:
            raise ConfigError("GLASSConfig: selection 'best_val' needs validation (val_every >= 1); "
                              "use selection 'last' with val_every 0")


# Config keys a resumed run may change (everything else must match the checkpoint).
FREE_KEYS = ("epochs", "checkpoint_every", "eval_batch_size")


# --- losses and feature-level synthesis (pure functions) ----------------------------------------------------
def focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """Mean binary focal loss ``-(1 - p_t)^gamma log(p_t + eps)`` of probabilities p (N,) for targets (N,).

    ``p_t`` is p where the target is 1 and 1 - p where it is 0; ``eps`` plays the official smoothing's role.

    Example:
        >>> round(float(focal_loss(torch.tensor([0.5]), torch.tensor([1.0]), gamma=2.0, eps=0.0)), 4)
        0.1733
    """
    pt = torch.where(target > 0.5, p, 1.0 - p)
    return (-(1.0 - pt).pow(gamma) * torch.log(pt + eps)).mean()


def ohem_mask(errors: torch.Tensor, q: float) -> torch.Tensor:
    """Online hard example mining: the positions whose error is at least the ``q`` quantile (q = 0: all).

    Example:
        >>> ohem_mask(torch.tensor([0.1, 0.4, 0.2, 0.3]), 0.5).tolist()
        [False, True, False, True]
    """
    if q <= 0:
        return torch.ones_like(errors, dtype=torch.bool)
    return errors >= torch.quantile(errors.detach(), q)


# --- model --------------------------------------------------------------------------------------------------
class GLASSModel(nn.Module):
    """Embedding (frozen), adaptor and discriminator; ``forward``: patch scores (B, h, w) of images."""

    def __init__(self, config: GLASSConfig, *, pretrained: bool | None = None):
        super().__init__()
        from mudenet_core.nets.backbones import DEFAULT_LAYERS

        if config.backbone not in DEFAULT_LAYERS:
            raise ConfigError(f"GLASSConfig.backbone {config.backbone!r} is not registered; choose from "
                              f"{', '.join(DEFAULT_LAYERS)}")
        layers = list(config.layers) or list(DEFAULT_LAYERS[config.backbone][1:])
        self.embedding = GLASSEmbedding(
            config.backbone, layers, pretrained=config.pretrained if pretrained is None else pretrained,
            patch_size=config.patch_size, pretrain_embed_dim=config.pretrain_embed_dim,
            target_embed_dim=config.target_embed_dim)
        if self.embedding.stride != config.synthesis.feature_stride:
            raise ConfigError(f"GLASSConfig.synthesis.feature_stride={config.synthesis.feature_stride} must "
                              f"be the stride of layer {layers[0]!r} ({self.embedding.stride})")
        self.adaptor = feature_adaptor(config.target_embed_dim)
        self.discriminator = Discriminator(config.target_embed_dim, config.dsc_hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch anomaly probabilities (B, h, w) of ImageNet-normalised images (B, 3, H, W)."""
        f = self.embedding(images)  # (B, h, w, D)
        b, h, w, d = f.shape
        return self.discriminator(self.adaptor(f.reshape(b * h * w, d))).reshape(b, h, w)


# --- training -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Data:
    """The normal training images of an epoch and what is derived from them."""

    images: torch.Tensor  # (N, 3, H, W) ImageNet-normalised, CPU
    texture: Any  # TextureFolder or the pool (N, 3, H, W) in [0, 1]
    foreground: torch.Tensor | None  # (N, 1, H, W) or None
    embeddings: torch.Tensor | None = None  # (N, h*w, D') on the device, when cached


def _embed_all(model: GLASSModel, images: torch.Tensor, bs: int, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        parts = [model.embedding(images[s:s + bs].to(device)).flatten(1, 2)
                 for s in range(0, len(images), bs)]
    return torch.cat(parts)  # (N, h*w, D)


def _centre(model: GLASSModel, data: _Data, bs: int, device: torch.device) -> torch.Tensor:
    """Mean adapted feature per position over the training images: (h*w, D)."""
    total, n = None, 0
    with torch.no_grad():
        for s in range(0, len(data.images), bs):
            e = (data.embeddings[s:s + bs] if data.embeddings is not None
                 else model.embedding(data.images[s:s + bs].to(device)).flatten(1, 2))  # (b, h*w, D)
            a = model.adaptor(e).sum(0)  # (h*w, D)
            total = a if total is None else total + a
            n += e.shape[0]
    return total / n


def _train_step(model: GLASSModel, opts, data: _Data, idx: torch.Tensor, centre: torch.Tensor,
                distribution: str, cfg: GLASSConfig, *, epoch: int, las_seed: int,
                noise_gen: torch.Generator, device: torch.device, timer: dict) -> dict[str, float]:
    t0 = time.perf_counter()
    aug, masks = [], []
    for i in idx.tolist():  # LAS, one generator per (epoch, image): independent of the batch order
        g = las.derived_generator(las_seed, epoch, i)
        fg = data.foreground[i] if data.foreground is not None else None
        y, m = las.synthesize(denormalize(data.images[i]), cfg.synthesis, g, source=data.texture, exclude=i,
                              foreground=fg)
        aug.append(normalize(y))
        masks.append(m)
    timer["las_s"] += time.perf_counter() - t0
    aug_x = torch.stack(aug).to(device)  # (B, 3, H, W)
    m = las.feature_mask(torch.stack(masks), cfg.synthesis.feature_stride).to(device)  # (B, 1, h, w)
    with torch.no_grad():
        e_true = (data.embeddings[idx.to(data.embeddings.device)] if data.embeddings is not None
                  else model.embedding(data.images[idx].to(device)).flatten(1, 2))  # (B, h*w, D)
        e_fake = model.embedding(aug_x)  # (B, h, w, D)
    b = e_true.shape[0]
    assert e_fake.shape[1:3] == m.shape[-2:], f"LAS grid {tuple(m.shape)} vs features {tuple(e_fake.shape)}"
    true = model.adaptor(e_true.reshape(-1, e_true.shape[-1]))  # (B*h*w, D)
    fake = model.adaptor(e_fake.reshape(-1, e_fake.shape[-1]))  # (B*h*w, D)
    c = centre.repeat(b, 1)  # (h*w, D) -> (B*h*w, D)
    label = m.reshape(-1) > 0.5  # (B*h*w,) LAS positions inside the mask
    with torch.no_grad():
        normal_pts = torch.cat([true - c, (fake - c)[~label]])
        r_t = torch.quantile(normal_pts.norm(dim=1), cfg.radius_quantile)
    anchor, r_min, r_max = gas_shell(distribution, true.detach(), c, r_t, cfg.manifold_r)
    noise = torch.randn(true.shape, generator=noise_gen, device=noise_gen.device).to(device)
    gas = global_anomaly_features(model.discriminator, true.detach(), true.detach() + cfg.noise_std * noise,
                                  steps=cfg.gas_steps, step_size=cfg.gas_step_size,
                                  every=cfg.projection_every, anchor=anchor, r_min=r_min, r_max=r_max)
    gas = true + (gas - true.detach())  # the adaptor's gradient reaches GAS features through ``true``
    if distribution == "hypersphere":  # LAS features inside the mask pushed to [2r, 4r] around c
        fake = torch.where(label[:, None], truncated_projection(fake, c, 2 * r_t, 4 * r_t), fake)
    p = model.discriminator(torch.cat([true, gas]))  # (2*B*h*w,)
    p_true, p_gas = p[: true.shape[0]], p[true.shape[0]:]
    l_normal = F.binary_cross_entropy(p_true, torch.zeros_like(p_true))
    l_gas = F.binary_cross_entropy(p_gas, torch.ones_like(p_gas))
    p_fake = model.discriminator(fake)  # (B*h*w,)
    target = label.float()
    keep = ohem_mask((p_fake.detach() - target) ** 2, cfg.ohem_quantile)
    l_las = focal_loss(p_fake[keep], target[keep], cfg.focal_gamma)
    loss = l_normal + l_gas + l_las
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return {"loss": loss.item(), "loss_normal": l_normal.item(), "loss_gas": l_gas.item(),
            "loss_las": l_las.item(), "p_normal": p_true.mean().item(), "p_gas": p_gas.mean().item(),
            "r_t": r_t.item()}


def training_curves_figure(curves: pd.DataFrame):
    """Figure: the loss terms per epoch (left) and the validation image / pixel AUROC where measured (right).

    Args:
        curves: one row per epoch with ``step`` (the epoch), ``loss``, ``loss_normal``, ``loss_gas``,
            ``loss_las``, ``val_image_auroc``, ``val_pixel_auroc`` (NaN where not validated).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.0), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    for k in ("loss", "loss_normal", "loss_gas", "loss_las"):
        ax_loss.plot(curves["step"], curves[k], lw=1.2, label=k)
    for k in ("val_image_auroc", "val_pixel_auroc"):
        v = curves[["step", k]].dropna()
        ax_val.plot(v["step"], v[k], marker="o", ms=3, lw=1.2, label=k.removeprefix("val_"))
    ax_loss.set_title("training losses", fontsize=9)
    ax_val.set_title("synthetic-anomaly validation", fontsize=9)
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _batches(n: int, cfg: GLASSConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """The epoch's shuffled index batches, cut after the batch that passes ``max_samples_per_epoch``."""
    perm = torch.randperm(n, generator=generator)
    out, seen = [], 0
    for s in range(0, n, cfg.batch_size):
        out.append(perm[s:s + cfg.batch_size])
        seen += len(out[-1])
        if cfg.max_samples_per_epoch and seen > cfg.max_samples_per_epoch:
            break
    return out


class GLASS:
    """GLASS detector (see the module docstring): ``fit`` / ``predict`` / ``save`` / ``load``.

    Example:
        >>> GLASS(GLASSConfig(backbone="resnet18", pretrained=False, target_embed_dim=16)).config.dsc_hidden
        1024
    """

    def __init__(self, config: GLASSConfig | None = None):
        self.config = config if config is not None else GLASSConfig()
        if not isinstance(self.config, GLASSConfig):
            raise ConfigError(f"GLASS needs a GLASSConfig, got {type(self.config).__name__}")
        self.model = GLASSModel(self.config)
        self.model.eval()
        self.device = torch.device("cpu")
        self.distribution: str = "" if self.config.distribution == "auto" else self.config.distribution
        self.selected_epoch = 0

    # ------------------------------------------------------------------ fit
    def _resolve_distribution(self, train_ds: Dataset) -> str:
        if self.config.distribution != "auto":
            return self.config.distribution
        dataset = getattr(getattr(train_ds, "config", None), "dataset", None)
        return default_distribution(dataset, str(train_ds[0]["category"]))

    def _epoch_data(self, train_ds: Dataset, epoch: int, prev: _Data | None, base: Path | None) -> _Data:
        """The training images of ``epoch`` (fetched once when the dataset is not augmented)."""
        static = getattr(train_ds, "augment", None) is None
        if prev is not None and static:
            return prev
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        items = [train_ds[i] for i in range(len(train_ds))]
        images = torch.stack([it["image"] for it in items])  # (N, 3, H, W)
        if not bool(getattr(train_ds, "normalize", True)):
            images = normalize(images)
        c = self.config
        if tuple(images.shape[-2:]) != (c.image_size, c.image_size):
            raise DataError(f"GLASS: training images are {tuple(images.shape[-2:])}, the config expects "
                            f"{c.image_size} x {c.image_size} (set the data image_size to the method's)")
        fg = (prev.foreground if prev is not None else
              load_foreground([it["path"] for it in items], c.foreground_dir, c.image_size)
              if c.foreground_dir else None)
        texture = (prev.texture if prev is not None and c.synthesis.texture_dir else
                   las.texture_source(c.synthesis, denormalize(images), c.image_size, base))
        data = _Data(images, texture, fg)
        if c.cache_embeddings:
            data.embeddings = _embed_all(self.model, images, c.eval_batch_size, self.device)
        return data

    def fit(self, train_ds: Dataset, val_ds: Dataset | None = None, *, generator: torch.Generator,
            device: str | torch.device = "cpu", show_progress: bool = True,
            checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Train adaptor and discriminator on ``train_ds``; validate on synthetic anomalies on ``val_ds``.

        Args:
            train_ds: normal training images (``"image"`` (3, H, W), ``"path"``, ``"category"``).
            val_ds: held-out normal images; the validation set (normal + synthetic anomalies) is built from
                them. Needed unless ``val_every`` is 0.
            generator: the run's RNG; initial weights and every training seed are drawn from it up front.
            device: torch device.
            show_progress: progress bar over epochs.
            checkpoint_dir: where the resume state, best/final checkpoints, curves and timings are written.
            resume: continue from ``checkpoint_dir/glass_train.pt`` when it exists.

        Returns:
            log dict: ``train`` (per epoch: step = epoch, losses, mean scores, validation AUROCs, time_s),
            ``selected_epoch``, ``distribution``, ``resumed_from``, ``timing``, ``fit_time_s``.
        """
        t_start = time.perf_counter()
        c = self.config
        self.device = torch.device(device)
        init_seed, loop_seed = draw_seed(generator), draw_seed(generator) % 2**40
        noise_seed, las_seed = draw_seed(generator) % 2**40, draw_seed(generator)
        with seeded(init_seed):
            self.model.adaptor = feature_adaptor(c.target_embed_dim)
            self.model.discriminator = Discriminator(c.target_embed_dim, c.dsc_hidden)
        model = self.model.to(self.device)
        self.distribution = self._resolve_distribution(train_ds)
        val_set = None
        if c.val_every > 0:
            if val_ds is None or len(val_ds) == 0:
                raise DataError("GLASS.fit: validation needs held-out normal images (val_ds is empty); set "
                                "val_every=0 and selection=last to train without validation")
            vcfg = las.ValidationConfig(min_anomalous=c.val_min_anomalous,
                                        synthesis=las.SynthesisConfig(texture_dir=c.synthesis.texture_dir))
            val_set = las.validation_set(val_ds, vcfg, base_dir=REPO_ROOT)
        opt_a = torch.optim.Adam(model.adaptor.parameters(), lr=c.lr_adaptor,
                                 weight_decay=c.weight_decay_adaptor)
        opt_d = torch.optim.AdamW(model.discriminator.parameters(), lr=c.lr_discriminator,
                                  weight_decay=c.weight_decay_discriminator)
        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        ckpt = ckpt_dir / TRAIN_CHECKPOINT if ckpt_dir is not None else None
        rows: list[dict[str, float]] = []
        best: dict[str, Any] = {"epoch": 0, "score": -math.inf, "state": None}
        start = 0
        if resume and ckpt is not None and ckpt.is_file():
            keys = [k for k in c.field_names() if k not in FREE_KEYS]
            state = load_checkpoint(ckpt, c, keys=keys)
            if state.get("seed") != loop_seed:
                raise CheckpointError(f"{ckpt}: made with another generator seed; pass the same seed or "
                                      "start without resume")
            load_weights(model.adaptor, state["adaptor"], ckpt)
            load_weights(model.discriminator, state["discriminator"], ckpt)
            opt_a.load_state_dict(state["opt_adaptor"])
            opt_d.load_state_dict(state["opt_discriminator"])
            rows, best, start = list(state["rows"]), dict(state["best"]), int(state["epoch"])
        data = None
        base = REPO_ROOT  # a relative texture_dir is read from the repository root
        model.discriminator.train()
        for epoch in progress(range(start, c.epochs), desc="glass", total=c.epochs, initial=start,
                              enabled=show_progress):
            t0 = time.perf_counter()
            timer = {"las_s": 0.0}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(loop_seed + epoch)  # datasets that draw from the global RNG
                data = self._epoch_data(train_ds, epoch, data, base)
                centre = _centre(model, data, c.eval_batch_size, self.device)  # (h*w, D)
                noise_gen = torch.Generator(device=self.device).manual_seed(noise_seed + epoch)
                steps = [_train_step(model, (opt_a, opt_d), data, idx, centre, self.distribution, c,
                                     epoch=epoch, las_seed=las_seed, noise_gen=noise_gen, device=self.device,
                                     timer=timer)
                         for idx in _batches(len(data.images), c,
                                             torch.Generator().manual_seed(loop_seed + epoch))]
            t1 = time.perf_counter()
            row = {"step": epoch + 1, **{k: float(np.mean([s[k] for s in steps])) for k in steps[0]},
                   "val_image_auroc": math.nan, "val_pixel_auroc": math.nan}
            done = epoch + 1
            if val_set is not None and (done % c.val_every == 0 or done == c.epochs):
                row["val_image_auroc"], row["val_pixel_auroc"] = self._validate(val_set)
                score = row["val_image_auroc"] + row["val_pixel_auroc"]
                if score > best["score"]:
                    best = {"epoch": done, "score": score, "state": self._trained_state()}
            row.update(train_s=t1 - t0, val_s=time.perf_counter() - t1, las_s=timer["las_s"],
                       iterations=len(steps))
            rows.append(row)
            if ckpt is not None and (done % c.checkpoint_every == 0 or done == c.epochs):
                save_checkpoint(ckpt, state_dict={}, config=c, adaptor=model.adaptor.state_dict(),
                                discriminator=model.discriminator.state_dict(),
                                opt_adaptor=opt_a.state_dict(), opt_discriminator=opt_d.state_dict(),
                                epoch=done, rows=rows, best=best, seed=loop_seed,
                                distribution=self.distribution)
        final_state = self._trained_state()
        self.selected_epoch = c.epochs
        if c.selection == "best_val" and best["state"] is not None:
            self._load_trained_state(best["state"])
            self.selected_epoch = int(best["epoch"])
        model.eval()
        log = self._write_outputs(ckpt_dir, rows, final_state, best, start, time.perf_counter() - t_start)
        return log

    @torch.no_grad()
    def _validate(self, val_set) -> tuple[float, float]:
        """Image and pixel AUROC on the synthetic-anomaly validation set (the discriminator in eval mode)."""
        with modes_restored(self.model):
            self.model.eval()
            maps, scores, labels, masks = [], [], [], []
            bs = self.config.eval_batch_size
            for s in range(0, len(val_set), bs):
                items = [val_set[i] for i in range(s, min(s + bs, len(val_set)))]
                m, sc = self.predict(torch.stack([it["image"] for it in items]))
                maps.append(m[:, 0].cpu().numpy())
                scores.append(sc.cpu().numpy())
                labels += [it["label"] for it in items]
                masks += [it["mask"][0].numpy() > 0.5 for it in items]
        maps_a = np.concatenate(maps)
        return (float(metrics.image_auroc(np.asarray(labels), np.concatenate(scores))),
                float(metrics.pixel_auroc(np.stack(masks).astype(np.uint8), maps_a)))

    def _trained_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: {n: v.detach().cpu().clone() for n, v in getattr(self.model, k).state_dict().items()}
                for k in ("adaptor", "discriminator")}

    def _load_trained_state(self, state: dict) -> None:
        for k in ("adaptor", "discriminator"):
            getattr(self.model, k).load_state_dict(state[k])

    def _write_outputs(self, ckpt_dir: Path | None, rows: list[dict], final_state: dict, best: dict,
                       start: int, fit_s: float) -> dict[str, Any]:
        """Curves CSV/PNG, timing JSON and best/final checkpoints (when ``ckpt_dir``); the fit log."""
        df = pd.DataFrame(rows)
        timing = {"epochs": [{"epoch": int(r["step"]), "train_s": r["train_s"], "val_s": r["val_s"],
                              "las_s": r["las_s"], "iterations": int(r["iterations"])} for r in rows],
                  "total_epoch_s": float(df[["train_s", "val_s"]].to_numpy().sum()) if rows else 0.0,
                  "this_call_s": fit_s, "resumed_from": start}
        if ckpt_dir is not None:
            from mudenet_core import viz

            save_csv(ckpt_dir / "training_curves.csv", df.rename(columns={"step": "epoch"}))
            if rows:
                viz.save_figure(training_curves_figure(df), ckpt_dir / "training_curves.png")
            save_json(ckpt_dir / "timing.json", timing)
            selected = self._trained_state()
            self._load_trained_state(final_state)
            self.save(ckpt_dir / "glass_final.pt", epoch=int(rows[-1]["step"]) if rows else 0)
            if best["state"] is not None:
                self._load_trained_state(best["state"])
                self.save(ckpt_dir / "glass_best.pt", epoch=int(best["epoch"]))
            self._load_trained_state(selected)
        cols = [k for k in df.columns if k not in ("train_s", "val_s", "las_s", "iterations")]
        train = {k: [None if isinstance(v, float) and math.isnan(v) else v for v in df[k].tolist()]
                 for k in cols}  # None: not validated that epoch (JSON has no NaN)
        train["time_s"] = (df["train_s"] + df["val_s"]).tolist() if rows else []
        return {"train": train, "selected_epoch": self.selected_epoch, "best_val_epoch": int(best["epoch"]),
                "distribution": self.distribution, "resumed_from": start, "epochs": self.config.epochs,
                "timing": timing, "fit_time_s": fit_s}

    # ------------------------------------------------------------------ inference and persistence
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and image scores.

        Args:
            images: (B, 3, H, W), ImageNet-normalised.

        Returns:
            maps (B, 1, H, W) (patch scores upsampled and blurred), scores (B,) (max raw patch score).
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        with modes_restored(self.model):
            self.model.eval()
            x = images.to(self.device)
            patch = self.model(x)  # (B, h, w)
        scores = patch.flatten(1).amax(1)  # (B,)
        maps = upsample_and_blur(patch[:, None], x.shape[-2:], self.config.blur_sigma)  # (B, 1, H, W)
        return maps, scores

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Save config, weights (backbone included: loading needs no download) and the distribution used."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_checkpoint(path, state_dict=state, config=self.config, method="glass",
                               distribution=self.distribution, selected_epoch=self.selected_epoch, **extra)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> GLASS:
        """Rebuild a detector saved with :meth:`save`."""
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != "glass":
            raise CheckpointError(f"{path}: not a GLASS checkpoint (method={ckpt.get('method')!r})")
        cfg = GLASSConfig.from_dict(ckpt["config"])
        det = cls.__new__(cls)
        det.config = cfg
        det.model = GLASSModel(cfg, pretrained=False)
        load_weights(det.model, ckpt["state_dict"], path)
        det.device = torch.device(device)
        det.model.to(det.device).eval()
        det.distribution = str(ckpt.get("distribution", ""))
        det.selected_epoch = int(ckpt.get("selected_epoch", 0))
        return det
