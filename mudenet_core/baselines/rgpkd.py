"""RGPKD: reconstruction-guided, prompt-enhanced asymmetric knowledge distillation (Wang, Qin, Chi, Chen, Yu).

No paper is available; the only code (``Cariaaaaaa/RGPKD:test.py`` @8d27967) is a sketch that cannot run
(``research/methods_reference.md`` section B). What it and the README fix, and what we chose where they are
silent or broken:

* **Teacher**: frozen ImageNet ResNet-18 (``layer1`` / ``layer2`` / ``layer3``, strides 4 / 8 / 16) in the
  ``paper`` profile; the offline EfficientNet-Lite0 (``stage2`` / ``stage3`` / ``stage5``) in ``cpu`` and
  ``smoke``. Always in eval mode: :meth:`RGPKDModel.train` keeps its BatchNorm statistics fixed (the sketch's
  ``model.train()`` let them drift, B.5.5).
* **Student**: the U-Net of :mod:`mudenet_core.nets.rgpkd` (ResNet-18-like encoder, mirrored decoder with
  skips, a linear 1x1 head per level, a full-size reconstruction in [0, 1]). The sketch starts the student's
  encoder from ImageNet ResNet-18 too; ``student_pretrained`` does that where the weights exist (``paper``),
  the CPU profiles start it from random weights (no offline ResNet-18 weights).
* **Prompt bank**: the teacher's three feature maps of every training image (built once before training, in
  dataset order, from the images as the training split yields them at epoch 0).
* **Retrieval** (our choice; the sketch returned per-position indices, B.5.1, and compared the student's
  ``e4`` with the teacher's ``F3`` by raw dot products): one nearest normal image per query, by cosine
  similarity of the *flattened* coarsest (stride-16) teacher map of the query with those of the bank
  (flattened rather than pooled: industrial images are aligned, and the spatial layout is what a normal
  reference has to match). The query is the teacher's map, not the student's: it is fixed, so retrieval does
  not change while the student learns. During training a query never retrieves its own bank entry (needs at
  least 2 training images). A query map of another size than the bank's is resized (bilinear) to the bank
  grid for retrieval only.
* **Prompt module**: affinity-based cross-attention from decoder positions to the retrieved map, plus a
  best-match cosine map, fused residually (:class:`mudenet_core.nets.rgpkd.PromptModule`).
  ``prompts_at_test`` says whether prediction retrieves and fuses prompts (the sketch does not, B.2); both
  were measured on validation (see ``configs/rgpkd/cpu.yaml``).
* **Loss** (:func:`rgpkd_loss`): ``w_feature * sum_k MSE(s_k, t_k) + w_reconstruction * MSE(rec, x01) +
  w_ssim * (1 - SSIM(rec, x01))``, weights 1; ``x01`` is the de-normalised input in [0, 1] (the sketch
  compared its Sigmoid output with the ImageNet-normalised image, B.5.4); SSIM has a Gaussian window per
  channel (:func:`mudenet_core.ssim.ssim`; the sketch's box window could not run on 3 channels).
* **Optimiser**: SGD (lr 1e-3, momentum 0.9) with cosine annealing over ``epochs`` (stepped per epoch), 800
  epochs, batch 32, 256 px (``paper``). The last epoch's weights are kept: the sketch's "best I-AUROC on the
  test set every 20 epochs" is test-set selection, which our protocol forbids.
* **Anomaly map** (:func:`anomaly_map`): per level ``1 - cos(t_k, s_k)`` over channels, bilinear to (H, W),
  summed over the 3 levels, Gaussian blur (sigma 2 px); image score = the map's maximum. No min-max over the
  batch (the sketch's made scores depend on what else is in the batch).

Example:
    >>> keys = torch.eye(3)  # three bank images, orthogonal retrieval keys
    >>> nearest_prompt(torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.2, 0.0]]), keys).tolist()
    [1, 0]
    >>> nearest_prompt(torch.tensor([[0.1, 0.9, 0.0]]), keys, exclude=torch.tensor([1])).tolist()
    [0]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mudenet_core.baselines.ae import denormalize, draw_seed, seeded
from mudenet_core.baselines.common import gaussian_blur, iterate_images
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.io import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from mudenet_core.nets.backbones import BACKBONES, Backbone, build_backbone
from mudenet_core.nets.rgpkd import RESNET18_WIDTHS, RGPKDStudent, load_resnet18_encoder
from mudenet_core.ssim import ssim
from mudenet_core.utils import progress, resolve_device

# Config keys that fix the networks' shapes: a checkpoint made with other values cannot be loaded.
ARCH_KEYS = ["teacher", "student_widths", "use_prompts", "prompt_reduction"]
# ... and those a training run depends on besides them: a resumed run must share them all.
RESUME_KEYS = ARCH_KEYS + ["pretrained", "student_pretrained", "epochs", "batch_size", "lr", "momentum",
                           "weight_decay", "w_feature", "w_reconstruction", "w_ssim", "ssim_window",
                           "ssim_sigma"]
TRAIN_CHECKPOINT = "rgpkd_train.pt"


@dataclasses.dataclass(frozen=True)
class RGPKDConfig(ConfigBase):
    """RGPKD settings; defaults are the ``paper`` profile (ResNet-18 teacher, 256 px, 800 epochs)."""

    teacher: str = "resnet18"  # registry name (mudenet_core.nets.backbones); its 3 default layers
    pretrained: bool = True  # teacher ImageNet weights (False only for tests)
    student_widths: tuple[int, ...] = positive(RESNET18_WIDTHS)  # encoder stage widths; decoder mirrors
    student_pretrained: bool = True  # start the student encoder from ImageNet ResNet-18 (widths 64-512 only)
    use_prompts: bool = True  # build the prompt bank and modules and train with retrieved prompts
    prompts_at_test: bool = False  # predict retrieves and fuses prompts too (the public sketch: no)
    prompt_reduction: int = positive(2)  # prompt-module embeddings have C // prompt_reduction channels
    image_size: int = positive(256)  # square input side this profile is meant for (a multiple of 32)
    epochs: int = positive(800)  # passes over train/good
    batch_size: int = positive(32)  # training batch size
    lr: float = positive(1e-3)  # SGD learning rate (cosine-annealed to 0 over the epochs)
    momentum: float = bounded(0.9, ge=0, lt=1)  # SGD momentum
    weight_decay: float = nonnegative(0.0)  # SGD weight decay
    w_feature: float = nonnegative(1.0)  # weight of sum_k MSE(s_k, t_k)
    w_reconstruction: float = nonnegative(1.0)  # weight of MSE(reconstruction, image in [0, 1])
    w_ssim: float = nonnegative(1.0)  # weight of 1 - SSIM(reconstruction, image in [0, 1])
    ssim_window: int = positive(11)  # Gaussian SSIM window length (odd)
    ssim_sigma: float = positive(1.5)  # Gaussian SSIM window standard deviation, pixels
    map_sigma: float = nonnegative(2.0)  # Gaussian blur of the summed map, image pixels (0: none)
    checkpoint_every: int = positive(10)  # epochs between training checkpoints (with a checkpoint_dir)
    eval_batch_size: int = positive(8)  # images per forward pass when building the prompt bank

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        if self.teacher not in BACKBONES:
            raise ConfigError(f"RGPKDConfig.teacher must be one of {sorted(BACKBONES)}, got {self.teacher!r}")
        if len(self.student_widths) != 4:
            raise ConfigError(f"RGPKDConfig.student_widths must name 4 encoder stage widths, got "
                              f"{self.student_widths}")
        if self.student_pretrained and tuple(self.student_widths) != RESNET18_WIDTHS:
            raise ConfigError(f"RGPKDConfig.student_pretrained needs student_widths {list(RESNET18_WIDTHS)} "
                              f"(ResNet-18's), got {list(self.student_widths)}; set student_pretrained=false")
        if self.image_size % 32 != 0:
            raise ConfigError(f"RGPKDConfig.image_size must be a multiple of 32 (five stride-2 stages), got "
                              f"{self.image_size}")
        if self.prompts_at_test and not self.use_prompts:
            raise ConfigError("RGPKDConfig.prompts_at_test needs use_prompts=true (no prompt modules "
                              "otherwise)")
        if self.ssim_window % 2 == 0:
            raise ConfigError(f"RGPKDConfig.ssim_window must be odd, got {self.ssim_window}")


# --- losses (pure functions) --------------------------------------------------------------------------------


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over the levels of the mean squared error between student and teacher maps (B, C_k, h_k, w_k).

    Example:
        >>> t = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1)]
        >>> float(feature_loss([torch.ones(1, 2, 2, 2), torch.full((1, 1, 1, 1), 2.0)], t))
        5.0
    """
    assert len(student) == len(teacher), f"{len(student)} student levels for {len(teacher)} teacher levels"
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        assert s.shape == t.shape, f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
        total = total + F.mse_loss(s, t)
    return total


def rgpkd_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], reconstruction: torch.Tensor,
               target: torch.Tensor, *, w_feature: float = 1.0, w_reconstruction: float = 1.0,
               w_ssim: float = 1.0, ssim_window: int = 11,
               ssim_sigma: float = 1.5) -> dict[str, torch.Tensor]:
    """The RGPKD training loss and its parts.

    Args:
        student: student maps [s1, s2, s3], each (B, C_k, h_k, w_k).
        teacher: teacher maps [t1, t2, t3], same shapes.
        reconstruction: the student's reconstruction (B, 3, H, W) in [0, 1].
        target: the input image in pixel space (B, 3, H, W), [0, 1].
        w_feature: weight of the feature term.
        w_reconstruction: weight of the MSE reconstruction term.
        w_ssim: weight of the SSIM term ``1 - SSIM``.
        ssim_window: Gaussian SSIM window length.
        ssim_sigma: Gaussian SSIM window standard deviation.

    Returns:
        ``{"loss", "feature", "reconstruction", "ssim"}`` scalar tensors (``loss`` is the weighted sum).
    """
    assert reconstruction.shape == target.shape and target.ndim == 4, \
        f"reconstruction {tuple(reconstruction.shape)} vs target {tuple(target.shape)}"
    feat = feature_loss(student, teacher)
    rec = F.mse_loss(reconstruction, target)
    ssim_term = 1.0 - ssim(reconstruction, target, window_size=ssim_window, sigma=ssim_sigma, data_range=1.0)
    loss = w_feature * feat + w_reconstruction * rec + w_ssim * ssim_term
    return {"loss": loss, "feature": feat, "reconstruction": rec, "ssim": ssim_term}


# --- anomaly map --------------------------------------------------------------------------------------------


def anomaly_map(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], size: tuple[int, int],
                sigma: float = 2.0) -> torch.Tensor:
    """Sum over levels of ``1 - cos(t_k, s_k)`` (over channels), each bilinearly upsampled, then blurred.

    Args:
        teacher: teacher maps [t_k (B, C_k, h_k, w_k)].
        student: student maps, same shapes.
        size: (H, W) of the output.
        sigma: Gaussian blur in pixels (0: none).

    Returns:
        anomaly map (B, 1, H, W); every image's map depends on that image only.

    Example:
        >>> t = [torch.tensor([[[[1.0]], [[0.0]]]])]  # (1, 2, 1, 1)
        >>> float(anomaly_map(t, [torch.tensor([[[[0.0]], [[1.0]]]])], (2, 2), sigma=0)[0, 0, 0, 0])
        1.0
    """
    assert len(teacher) == len(student) and len(teacher) > 0, "teacher and student need the same levels"
    out = None
    for t, s in zip(teacher, student, strict=True):
        assert t.shape == s.shape and t.ndim == 4, f"teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
        d = 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)  # (B, 1, h_k, w_k)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)
        out = d if out is None else out + d
    return gaussian_blur(out, sigma)


# --- prompt bank and retrieval ------------------------------------------------------------------------------


def retrieval_keys(coarse: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Retrieval keys: the coarsest teacher map, flattened and L2-normalised.

    Args:
        coarse: stride-16 teacher maps (B, C, h, w).
        grid: resize to this (h, w) first (bilinear), e.g. the bank's grid for a query of another size.

    Returns:
        keys (B, C*h*w) of unit norm.
    """
    assert coarse.ndim == 4, f"expected (B, C, h, w), got {tuple(coarse.shape)}"
    if grid is not None and tuple(coarse.shape[-2:]) != tuple(grid):
        coarse = F.interpolate(coarse, size=tuple(grid), mode="bilinear", align_corners=False)
    return F.normalize(coarse.flatten(1), dim=1)  # (B, C, h, w) -> (B, C*h*w)


def nearest_prompt(query: torch.Tensor, keys: torch.Tensor,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the bank image most similar (cosine) to each query.

    Args:
        query: query keys (B, D) (normalised or not: the cosine is taken).
        keys: bank keys (N, D).
        exclude: (B,) bank index each query may not retrieve (itself during training), or None.

    Returns:
        indices (B,) into the bank.
    """
    assert query.ndim == 2 and keys.ndim == 2 and query.shape[1] == keys.shape[1], \
        f"expected (B, D) and (N, D), got {tuple(query.shape)} and {tuple(keys.shape)}"
    sim = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T  # (B, N)
    if exclude is not None:
        assert keys.shape[0] >= 2, "retrieval excluding the query itself needs at least 2 bank images"
        sim = sim.clone()
        sim[torch.arange(sim.shape[0], device=sim.device), exclude.to(sim.device)] = -float("inf")
    return sim.argmax(1)


class RGPKDModel(nn.Module):
    """Teacher, student and prompt bank (buffers ``bank_keys`` (N, D), ``bank1..3`` (N, C_k, h_k, w_k)).

    Args:
        cfg: the config.
        pretrained: load pretrained weights (teacher: ``cfg.pretrained``; student encoder:
            ``cfg.student_pretrained``); False builds random weights to be overwritten by a checkpoint.
    """

    def __init__(self, cfg: RGPKDConfig, pretrained: bool = True):
        super().__init__()
        self.teacher: Backbone = build_backbone(cfg.teacher, pretrained=pretrained and cfg.pretrained)
        channels = tuple(self.teacher.channels.values())
        self.student = RGPKDStudent(channels, cfg.student_widths, cfg.use_prompts, cfg.prompt_reduction)
        if pretrained and cfg.student_pretrained:
            load_resnet18_encoder(self.student.encoder, _resnet18_state())
        self.register_buffer("bank_keys", torch.zeros(0, 1))
        for k in range(1, 4):
            self.register_buffer(f"bank{k}", torch.zeros(0, channels[k - 1], 1, 1))

    def train(self, mode: bool = True) -> RGPKDModel:
        """Set the student's mode; the teacher stays in eval mode (its BatchNorm statistics never move)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def bank_size(self) -> int:
        """Number of images in the prompt bank."""
        return int(self.bank_keys.shape[0])

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Teacher maps [t1, t2, t3] (B, C_k, H/s_k, W/s_k), s_k = 4, 8, 16, of images (B, 3, H, W)."""
        return list(self.teacher(x).values())

    def prompts(self, teacher_feats: Sequence[torch.Tensor], exclude: torch.Tensor | None = None
                ) -> list[torch.Tensor]:
        """Retrieve the nearest bank image of each query and return its maps [p1, p2, p3] (B, C_k, ...)."""
        if self.bank_size == 0:
            raise RuntimeError("RGPKD: the prompt bank is empty (fit first, or save with prompts_at_test)")
        grid = tuple(self.bank3.shape[-2:])
        idx = nearest_prompt(retrieval_keys(teacher_feats[2], grid), self.bank_keys, exclude)  # (B,)
        return [self.bank1[idx], self.bank2[idx], self.bank3[idx]]

    @torch.no_grad()
    def build_bank(self, dataset: Dataset, *, batch_size: int, device: torch.device,
                   show_progress: bool = False) -> None:
        """Fill the prompt bank with the teacher maps of every image of ``dataset``, in order."""
        feats: list[list[torch.Tensor]] = [[], [], []]
        for x in iterate_images(dataset, batch_size=batch_size, device=device, show_progress=show_progress,
                                desc="rgpkd prompt bank"):
            for k, f in enumerate(self.teacher_features(x)):
                feats[k].append(f)
        if not feats[0]:
            raise ValueError("RGPKD: the training dataset is empty")
        self.bank1, self.bank2, self.bank3 = (torch.cat(f) for f in feats)
        self.bank_keys = retrieval_keys(self.bank3)  # (N, C3*h3*w3)

    def clear_bank(self) -> None:
        """Empty the prompt bank (what a model saved without ``prompts_at_test`` carries)."""
        self.bank_keys = self.bank_keys[:0]
        self.bank1, self.bank2, self.bank3 = self.bank1[:0], self.bank2[:0], self.bank3[:0]


def _resnet18_state() -> dict[str, torch.Tensor]:
    """ImageNet ResNet-18 weights under torchvision names, from the backbone registry (may download)."""
    bb = build_backbone("resnet18", pretrained=True)
    stem = {"stem.0.": "conv1.", "stem.1.": "bn1."}  # the stem is Sequential(conv1, bn1, relu, maxpool)
    out = {}
    for k, v in bb.stages.state_dict().items():
        prefix = k[:7]
        out[stem[prefix] + k[7:] if prefix in stem else k] = v
    return out


class _Indexed(Dataset):
    """``{"index": i, "image": dataset[i]["image"]}``: a batch knows its bank entries."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "image": self.dataset[i]["image"]}


def train_rgpkd(model: RGPKDModel, train_ds: Dataset, cfg: RGPKDConfig, *, seed: int, device: torch.device,
                checkpoint_path: Path | None = None, resume: bool = False,
                show_progress: bool = True) -> dict[str, Any]:
    """Train the student (SGD + cosine annealing per epoch); checkpoint every ``checkpoint_every`` epochs.

    Epoch ``e`` shuffles with seed ``seed + e``, calls the dataset's ``set_epoch(e)`` when it has one and runs
    with the global torch RNG seeded by ``seed + e``, so a run resumed after epoch ``e`` continues exactly as
    the uninterrupted one (the prompt bank is rebuilt from the data before, identically).

    Returns:
        log dict: per-epoch means ``loss``, ``feature_loss``, ``reconstruction_loss``, ``ssim_loss``;
        ``resumed_from``; ``epochs``.
    """
    student = model.student
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    names = ("loss", "feature", "reconstruction", "ssim")
    log: dict[str, list[float]] = {n: [] for n in names}
    start = 0
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path, cfg, keys=RESUME_KEYS)
        if ckpt.get("seed") != seed:
            raise CheckpointError(f"{checkpoint_path}: made with seed {ckpt.get('seed')}, this run uses "
                                  f"{seed}; pass the same generator seed or start without resume")
        load_weights(student, ckpt["state_dict"], checkpoint_path)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        log = {n: list(ckpt["log"][n]) for n in names}
        start = int(ckpt["epoch"])
    indexed = _Indexed(train_ds)
    for epoch in progress(range(start, cfg.epochs), desc="rgpkd", total=cfg.epochs, initial=start,
                          enabled=show_progress):
        model.train()
        sums, n = dict.fromkeys(names, 0.0), 0
        if hasattr(train_ds, "set_epoch"):  # mudenet_core.data: augmentation stream of this epoch
            train_ds.set_epoch(epoch)
        loader = DataLoader(indexed, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(seed + epoch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + epoch)  # datasets that draw from the global RNG
            for batch in loader:
                x = batch["image"].to(device)  # (B, 3, H, W), ImageNet-normalised
                t = model.teacher_features(x)
                prompts = model.prompts(t, exclude=batch["index"]) if cfg.use_prompts else None
                s, rec = student(x, prompts)
                parts = rgpkd_loss(s, t, rec, denormalize(x).clamp(0, 1), w_feature=cfg.w_feature,
                                   w_reconstruction=cfg.w_reconstruction, w_ssim=cfg.w_ssim,
                                   ssim_window=cfg.ssim_window, ssim_sigma=cfg.ssim_sigma)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
                for name in names:
                    sums[name] += float(parts[name].detach()) * x.shape[0]
                n += x.shape[0]
        sched.step()
        for name in names:
            log[name].append(sums[name] / max(n, 1))
        done = epoch + 1
        if checkpoint_path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
            save_checkpoint(checkpoint_path, state_dict=student.state_dict(), config=cfg,
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=done, log=log,
                            seed=seed)
    model.eval()
    return {"loss": log["loss"], "feature_loss": log["feature"], "reconstruction_loss": log["reconstruction"],
            "ssim_loss": log["ssim"], "resumed_from": start, "epochs": cfg.epochs}


class RGPKD:
    """Detector-contract wrapper (see :mod:`mudenet_core.methods`): fit, predict, save, load.

    Attributes:
        config: the :class:`RGPKDConfig`.
        model: the :class:`RGPKDModel` (teacher, student, prompt bank).
    """

    def __init__(self, config: RGPKDConfig | None = None):
        self.config = config if config is not None else RGPKDConfig()
        if not isinstance(self.config, RGPKDConfig):
            raise ConfigError(f"RGPKD needs an RGPKDConfig, got {type(self.config).__name__}")
        self.device = torch.device("cpu")
        self._model: RGPKDModel | None = None

    @property
    def model(self) -> RGPKDModel:
        """The networks (the teacher is built, with its weights, on first use)."""
        if self._model is None:
            self._model = RGPKDModel(self.config).to(self.device).eval()
        return self._model

    def fit(self, train_ds: Dataset, val_ds: Dataset | None = None, *, generator: torch.Generator,
            device: str | torch.device = "cpu", show_progress: bool = True,
            checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Build the prompt bank from ``train_ds`` and train the student on it.

        Args:
            train_ds: normal training images (``"image"`` (3, H, W), ImageNet-normalised).
            val_ds: unused (the threshold is calibrated by the harness on the synthetic validation set).
            generator: the run's RNG; the student's initial weights and the shuffling seeds come from it.
            device: torch device.
            show_progress: progress bars.
            checkpoint_dir: if given, ``rgpkd_train.pt`` there is written every ``checkpoint_every`` epochs.
            resume: continue from ``checkpoint_dir/rgpkd_train.pt`` when it exists.

        Returns:
            log dict: per-epoch losses, resumed_from, epochs, bank_size, fit_time_s.
        """
        del val_ds
        t0 = time.perf_counter()
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        cfg = self.config
        init_seed, loop_seed = draw_seed(generator), draw_seed(generator) % 2**40
        with seeded(init_seed):
            self._model = RGPKDModel(cfg).to(self.device)
        model = self._model
        if cfg.use_prompts:
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(0)
            model.build_bank(train_ds, batch_size=cfg.eval_batch_size, device=self.device,
                             show_progress=show_progress)
            if model.bank_size < 2:
                raise ValueError(f"RGPKD with prompts needs at least 2 training images (a query never "
                                 f"retrieves itself), got {model.bank_size}")
        ckpt = Path(checkpoint_dir) / TRAIN_CHECKPOINT if checkpoint_dir is not None else None
        log = train_rgpkd(model, train_ds, cfg, seed=loop_seed, device=self.device, checkpoint_path=ckpt,
                          resume=resume, show_progress=show_progress)
        log.update(bank_size=model.bank_size, fit_time_s=time.perf_counter() - t0)
        return log

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, 1, H, W) and image scores (B,) of ImageNet-normalised images (B, 3, H, W)."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        model = self.model.eval()
        x = images.to(self.device)
        t = model.teacher_features(x)
        prompts = model.prompts(t) if self.config.prompts_at_test else None
        s, _ = model.student(x, prompts)
        amap = anomaly_map(t, s, tuple(x.shape[-2:]), self.config.map_sigma)  # (B, 1, H, W)
        return amap, amap.flatten(1).amax(1)

    def save(self, path: str | Path) -> Path:
        """Save config and weights (teacher, student; the bank only with ``prompts_at_test``), atomic."""
        model = self.model
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not self.config.prompts_at_test:  # prediction never reads the bank: keep the file small
            for k in ("bank_keys", "bank1", "bank2", "bank3"):
                sd[k] = sd[k][:0]
        return save_checkpoint(path, state_dict=sd, config=self.config, method="rgpkd")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RGPKD:
        """Rebuild a detector saved with :meth:`save` (needs no pretrained-weight download)."""
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != "rgpkd":
            raise CheckpointError(f"{path}: not an RGPKD checkpoint (method={ckpt.get('method')!r})")
        det = cls(RGPKDConfig.from_dict(ckpt["config"]))
        det.device = torch.device(device)
        model = RGPKDModel(det.config, pretrained=False)
        state = ckpt["state_dict"]
        for k in ("bank_keys", "bank1", "bank2", "bank3"):
            if k not in state:
                raise CheckpointError(f"{path}: not an RGPKD checkpoint (state_dict lacks {k!r})")
            setattr(model, k, torch.empty_like(state[k]))
        load_weights(model, state, path)
        if det.config.prompts_at_test and model.bank_size == 0:
            raise CheckpointError(f"{path}: prompts_at_test is set but the checkpoint holds no prompt bank")
        det._model = model.to(det.device).eval()
        return det
