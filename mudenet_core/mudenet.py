"""The MuDeNet detector: config, fit (distillation + end-to-end training + calibration), predict, save/load.

Example (tiny, random backbone weights; real profiles are in ``configs/mudenet/``)::

    cfg = load_config("mudenet", "smoke")
    det = MuDeNet(cfg)
    log = det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0))
    maps, scores = det.predict(images)        # (B, 1, H, W), (B,)
    det.calibrate(splits.val, cfg.scoring.replace(use_logical=False))   # ablation, no retraining
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import torch

from mudenet_core import __version__, scoring, train
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.data.transforms import BatchAugmenter, derive_seed
from mudenet_core.io import REPO_ROOT, CheckpointError, load_checkpoint, load_weights, save_checkpoint
from mudenet_core.nets.mudenet import MuDeNetNets
from mudenet_core.scoring import ScoringConfig


@dataclasses.dataclass(frozen=True)
class DistillConfig(ConfigBase):
    """Stage 1: teacher distillation from a frozen pretrained backbone (Eq. 16)."""

    epochs: int = positive(200)  # passes over the distillation images (not stated in the paper; our choice)
    steps: int = nonnegative(0)  # if > 0, a fixed number of steps instead of epochs
    lr: float = positive(1e-3)  # Adam learning rate
    batch_size: int = positive(8)  # images per step
    weight_decay: float = nonnegative(0.0)  # Adam weight decay
    # category's training images, a folder of generic images, or both (the folder shows the teacher the
    # backbone's response to colours and textures the category never has; off in every profile)
    source: Literal["train", "folder", "train+folder"] = "train"
    folder: str | None = None  # images for source "folder" / "train+folder" (relative: to the repo root)
    max_images: int = nonnegative(0)  # cap on folder images (training images for source "train"); 0 = all
    channel_seed: int = nonnegative(0)  # seed of the random choice of C backbone channels
    # scratch: distil per category (the paper's reproduction); pretrained: load the generic teacher distilled
    # once on ImageNet sample + DTD crops (mudenet_core/teacher_zoo.py, EfficientAD-style), then fine-tune it
    # for `steps` steps on the distillation images if steps > 0 (epochs are ignored: 0 steps = no fine-tuning)
    init: Literal["scratch", "pretrained"] = "scratch"
    pretrained_path: str = ""  # init=pretrained: teacher file ("" = the shipped one for the architecture)


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Stage 2: end-to-end training of S1, A and S2 (Eqs. 3, 5, 7, 8)."""

    epochs: int = positive(500)  # passes over the training images (paper: 500)
    # if > 0, a fixed number of steps instead of epochs (same schedule for any dataset size)
    steps: int = nonnegative(0)
    lr: float = positive(1e-3)  # Adam learning rate (paper: 1e-3)
    batch_size: int = positive(8)  # images per step (paper: 8)
    weight_decay: float = nonnegative(0.0)  # Adam weight decay
    detach_ae: bool = True  # stop L2's gradient at A's output
    # non-paper: EfficientAD hard-feature quantile for L1/L2 (e.g. 0.999; 0 = plain MSE)
    hard_q: float | None = bounded(None, ge=0, lt=1)
    # non-paper: lr x0.1 after this fraction of steps (EfficientAD 0.95)
    lr_decay_at: float | None = bounded(None, ge=0, le=1)
    penalty_folder: str | None = None  # non-paper: OOD images (e.g. DTD) penalising S1 (relative: to repo)
    penalty_weight: float = nonnegative(1.0)  # weight of the penalty term
    penalty_max_images: int = positive(200)  # cap on the number of penalty images held in memory


@dataclasses.dataclass(frozen=True)
class MuDeNetConfig(ConfigBase):
    """MuDeNet: architecture, the two training stages and scoring (defaults = the paper's settings)."""

    image_size: int = positive(256)  # square input size (paper: 256)
    backbone: str = "wide_resnet50_2"  # distillation backbone (mudenet_core.nets.backbones)
    backbone_layers: tuple[str, ...] | None = None  # None: DEFAULT_LAYERS[backbone] (strides 4 / 8 / 16)
    pretrained: bool = True  # pretrained backbone weights (False only for tests)
    width: int = positive(64)  # channels of the descriptor networks' blocks (paper: 64)
    out_channels: int = positive(128)  # C, descriptor channels per level (paper: 128)
    latent_dim: int = positive(32)  # Z, autoencoder latent size (paper: 32)
    ae_width: int = positive(128)  # autoencoder channels (paper: 128)
    level_blocks: tuple[int, ...] = nonnegative((1, 2, 2))  # residual blocks added per level (paper: 1, 2, 2)
    level_kernels: tuple[int, ...] = positive((3, 3, 5))  # kernel size per level (paper: 3, 3, 5)
    normalize_teacher: bool = True  # z-score teacher maps per channel (EfficientAD practice)
    # steps between resume checkpoints (when fit gets a checkpoint_dir); 0 = none
    checkpoint_every: int = nonnegative(500)
    eval_batch_size: int = positive(8)  # batch size for statistics, calibration and prediction
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    scoring: ScoringConfig = ScoringConfig()

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        if self.image_size % 32 != 0:
            raise ConfigError(f"MuDeNetConfig.image_size must be a multiple of 32, got {self.image_size}")
        if not self.level_blocks or len(self.level_blocks) != len(self.level_kernels):
            raise ConfigError("MuDeNetConfig: level_blocks and level_kernels must have the same length "
                              f"(>= 1), got {self.level_blocks} and {self.level_kernels}")
        if any(k % 2 == 0 for k in self.level_kernels):
            raise ConfigError(
                f"MuDeNetConfig.level_kernels must be odd ('same' padding), got {self.level_kernels}")
        # ScoringConfig (mudenet_core/scoring.py) declares no bounds of its own: the ones MuDeNet depends on
        bad_levels = [v for v in self.scoring.levels if not 1 <= v <= len(self.level_blocks)]
        if bad_levels:
            raise ConfigError(f"MuDeNetConfig.scoring.levels must be in [1, {len(self.level_blocks)}] "
                              f"(1-based levels), got {self.scoring.levels}")
        if not self.scoring.blur_sigma >= 0:
            raise ConfigError(f"MuDeNetConfig.scoring.blur_sigma must be >= 0, got {self.scoring.blur_sigma}")


# Config keys that fix the networks' shapes: a checkpoint is loadable into a config that agrees on these.
ARCHITECTURE_KEYS = [
    "image_size",
    "width",
    "out_channels",
    "latent_dim",
    "ae_width",
    "level_blocks",
    "level_kernels",
    "backbone",
    "backbone_layers",
    "normalize_teacher",
]
# A run resumes only into a config that agrees on everything but scoring and bookkeeping.
RESUME_KEYS = [*ARCHITECTURE_KEYS, "pretrained", "distill", "train"]
# Keys of older configs that are gone; ignored when a saved detector is loaded (training augmentation is the
# dataset's, drawn on the fly: train.train_end_to_end's augmenter).
REMOVED_KEYS = ("augment_copies",)


def resolve_folder(path: str) -> Path:
    """A config folder path: absolute as given, relative to the repository root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def _training_images(train_ds, seed: int) -> tuple[torch.Tensor, BatchAugmenter | None]:
    """The un-augmented training images (N, 3, H, W) and, if the dataset augments, its on-the-fly augmenter.

    A dataset with a (non-identity) ``augment`` (:class:`~mudenet_core.data.AnomalyDataset`) gives its base
    images through ``without_augment``; the augmenter then draws ``train_ds.augment`` afresh per step with
    ``seed``. Other datasets are stacked as they are.
    """
    aug = getattr(train_ds, "augment", None)
    if aug is None or aug.is_identity:
        return train.stack_dataset(train_ds), None
    if not hasattr(train_ds, "without_augment"):
        raise TypeError(f"{type(train_ds).__name__} augments but has no without_augment(); MuDeNet needs the "
                        "un-augmented images to augment on the fly")
    base = train.stack_dataset(train_ds.without_augment(normalize=False))  # (N, 3, H, W) in [0, 1]
    augmenter = BatchAugmenter(base, aug, seed, normalize=train_ds.normalize)
    return augmenter.base(), augmenter


def _build_nets(cfg: MuDeNetConfig) -> MuDeNetNets:
    return MuDeNetNets(
        cfg.image_size,
        cfg.width,
        cfg.out_channels,
        cfg.latent_dim,
        cfg.ae_width,
        tuple(cfg.level_blocks),
        tuple(cfg.level_kernels),
    )


class MuDeNet:
    """MuDeNet detector (teacher, structural student, autoencoder, logical student) behind the harness API."""

    CHECKPOINT_NAME = "last.pt"

    def __init__(self, config: MuDeNetConfig | None = None):
        self.config = config if config is not None else MuDeNetConfig()
        self.nets = _build_nets(self.config)
        self.device = torch.device("cpu")
        self.fitted = False

    # ------------------------------------------------------------------ training
    def _distillation_data(self, train_images: torch.Tensor) -> torch.Tensor:
        dc = self.config.distill
        if dc.source == "train":
            return train_images if dc.max_images <= 0 else train_images[: dc.max_images]
        if not dc.folder:
            raise ConfigError(f"MuDeNetConfig.distill.source={dc.source!r} needs distill.folder")
        # subset drawn from a config-seeded generator, so a resumed run picks the same images
        folder_images = train.load_image_folder(
            resolve_folder(dc.folder),
            self.config.image_size,
            dc.max_images,
            torch.Generator().manual_seed(dc.channel_seed),
        )  # (N_f, 3, H, W)
        if dc.source == "train+folder":
            return torch.cat([train_images, folder_images])  # (N + N_f, 3, H, W)
        return folder_images

    def distillation_backbone(self) -> tuple[torch.nn.Module, list[str]]:
        """The frozen backbone the targets E come from, and its layers (the same every time for a config)."""
        from mudenet_core.nets.backbones import DEFAULT_LAYERS, build_backbone

        cfg = self.config
        layers = list(cfg.backbone_layers or DEFAULT_LAYERS[cfg.backbone])
        with torch.random.fork_rng(devices=[]):  # unpretrained (test) backbones: weights fixed by the config
            torch.manual_seed(cfg.distill.channel_seed)
            return build_backbone(cfg.backbone, layers, pretrained=cfg.pretrained), layers

    def _targets(self, images: torch.Tensor, device: torch.device, fixed: bool = False) -> torch.Tensor:
        """Distillation targets E (N, C, h1, w1); sets the channel_idx and target_mean/std buffers.

        With ``fixed``, the buffers already set (a pretrained teacher's) define the targets and are kept.
        """
        cfg = self.config
        backbone, layers = self.distillation_backbone()
        backbone = backbone.to(device)
        total = sum(backbone.channels[name] for name in layers)
        if fixed:
            idx = self.nets.channel_idx.cpu()
        else:
            idx = train.choose_channels(total, cfg.out_channels, cfg.distill.channel_seed)
        feats = train.backbone_features(
            backbone, layers, images, batch_size=cfg.eval_batch_size, device=device, channel_idx=idx
        )  # (N, C, h1, w1)
        del backbone
        if fixed:
            mean, std = self.nets.target_mean.cpu(), self.nets.target_std.cpu()
            return train.distillation_targets(feats, mean, std)[0]
        targets, mean, std = train.distillation_targets(feats)
        self.nets.channel_idx.copy_(idx)
        self.nets.target_mean.copy_(mean)
        self.nets.target_std.copy_(std)
        return targets

    def _save_state(
        self, path: Path, stage: str, loop_state: dict | None, log: dict, generator: torch.Generator,
        augment: dict | None = None,
    ) -> None:
        save_checkpoint(
            path,
            state_dict=self.nets.state_dict(),
            config=self.config,
            stage=stage,
            loop_state=loop_state,
            log=log,
            generator=generator.get_state(),
            channel_idx=self.nets.channel_idx.tolist(),
            code_version=__version__,
            augment=augment,  # the training set's augmentation (a resume must use the same)
        )

    def distill(
        self,
        train_ds,
        *,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        show_progress: bool = True,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callback: train.StepCallback | None = None,
    ) -> dict[str, Any]:
        """Stage 1 only: distil the teacher (Eq. 16) and stop before the students are trained.

        With ``checkpoint_dir``, ``last.pt`` is left at the start of stage 2, so
        ``fit(..., checkpoint_dir=<same>, resume=True)`` continues from the distilled teacher (the
        ``10_distillation`` notebook and ``mudenet distill`` work this way). Arguments as in :meth:`fit`.

        Returns:
            log dict with ``distill`` (step, L_dist, time_s, steps_per_s).
        """
        return self._fit(train_ds, None, generator=generator, device=device, show_progress=show_progress,
                         checkpoint_dir=checkpoint_dir, resume=resume, callback=callback, distill_only=True)

    def fit(
        self,
        train_ds,
        val_ds,
        *,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        show_progress: bool = True,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callback: train.StepCallback | None = None,
    ) -> dict[str, Any]:
        """Distil the teacher, train S1/A/S2 end to end, then calibrate the map normalisation on ``val_ds``.

        See :meth:`_fit` for the arguments and the returned log.
        """
        return self._fit(train_ds, val_ds, generator=generator, device=device, show_progress=show_progress,
                         checkpoint_dir=checkpoint_dir, resume=resume, callback=callback, distill_only=False)

    def _fit(
        self,
        train_ds,
        val_ds,
        *,
        generator: torch.Generator,
        device: torch.device | str,
        show_progress: bool,
        checkpoint_dir: str | Path | None,
        resume: bool,
        callback: train.StepCallback | None,
        distill_only: bool,
    ) -> dict[str, Any]:
        """Both stages (or stage 1 only with ``distill_only``) and the calibration.

        Args:
            train_ds: nominal training images (dataset items are dicts with "image" (3, H, W)). If it
                augments (an ``AnomalyDataset`` with ``augment``), distillation uses its un-augmented images
                and stage 2 draws the augmentation afresh for every batch (``train.train_end_to_end``).
            val_ds: held-out nominal images for the map statistics.
            generator: the only source of randomness (initialisation, batches, augmentation draws).
            device: where to train and predict.
            show_progress: progress bars with losses and speed.
            checkpoint_dir: if given, ``last.pt`` is written there atomically every
                ``checkpoint_every`` steps and
                after each stage.
            resume: continue from ``checkpoint_dir/last.pt`` (same config required, except
                scoring); starts afresh
                when the file does not exist.
            callback: called as ``callback(stage, step, losses)`` after every training step
                (e.g. to stop a run).
            distill_only: stop after stage 1 (see :meth:`distill`).

        Returns:
            log dict: ``distill`` (init, [pretrained_path], step, L_dist, time_s, steps_per_s; with
            ``distill.init="pretrained"`` and no fine-tuning, empty step/L_dist and time_s 0),
            ``train`` (step, L1, LA, L2, L, [L_pen],
            time_s, steps_per_s), ``calibration_s``, ``time_s``.
        """
        cfg = self.config
        device = torch.device(device)
        t_start = time.perf_counter()
        ckpt_path = Path(checkpoint_dir) / self.CHECKPOINT_NAME if checkpoint_dir is not None else None
        resumed: dict | None = None
        if resume:
            if ckpt_path is None:
                raise ValueError("fit(resume=True) needs checkpoint_dir")
            if ckpt_path.is_file():
                resumed = load_checkpoint(ckpt_path, expected_config=cfg, keys=RESUME_KEYS)
        log: dict[str, Any] = {}

        # Initialisation from the generator only (module init uses torch's global RNG: fork and seed it).
        init_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.nets = _build_nets(cfg)
        if resumed is not None:
            self.nets.load_state_dict(resumed["state_dict"])
            generator.set_state(resumed["generator"])
            log = dict(resumed["log"])
        self.nets.to(device)
        stage = resumed["stage"] if resumed is not None else "distill"

        # Un-augmented training images (distillation, teacher statistics); the dataset's augmentation, if any,
        # is drawn afresh for every batch of stage 2, seeded from this fit's generator (through init_seed).
        aug_seed = derive_seed(init_seed, "augment")
        train_images, augmenter = _training_images(train_ds, aug_seed)  # (N, 3, H, W)
        augment_record = augmenter.cfg.to_dict() if augmenter is not None else None
        if resumed is not None and resumed.get("augment") != augment_record:
            raise CheckpointError(
                f"{ckpt_path}: trained with augmentation {resumed.get('augment')!r}, but the training set "
                f"now augments with {augment_record!r}; resume with the run's data config"
            )
        assert train_images.shape[-1] == cfg.image_size, (
            f"dataset image size {train_images.shape[-1]} != config image_size {cfg.image_size}"
        )

        def saver(stage_name: str):
            if ckpt_path is None:
                return None
            return lambda loop_state: self._save_state(ckpt_path, stage_name, loop_state, log, generator,
                                                       augment=augment_record)

        if stage == "distill" and cfg.distill.init == "pretrained" and resumed is None:
            # the generic teacher (weights, channel_idx, target_mean/std); a resumed fine-tune has them
            from mudenet_core import teacher_zoo

            path = teacher_zoo.load_pretrained_teacher(self.nets, cfg, cfg.distill.pretrained_path)
            log["distill"] = {"init": "pretrained", "pretrained_path": str(path), "step": [], "L_dist": [],
                              "time_s": 0.0, "steps_per_s": 0.0}
            if cfg.distill.steps == 0:
                stage = "statistics"
        if stage == "distill":
            dc = cfg.distill
            dimages = self._distillation_data(train_images)
            targets = self._targets(dimages, device, fixed=dc.init == "pretrained")
            steps = dc.steps if dc.init == "pretrained" else train.steps_for(
                dimages.shape[0], dc.batch_size, dc.epochs, dc.steps)
            pretrained_info = {k: v for k, v in log.get("distill", {}).items() if k == "pretrained_path"}
            log["distill"] = train.distill(
                self.nets.teacher,
                dimages,
                targets,
                steps=steps,
                lr=dc.lr,
                batch_size=dc.batch_size,
                weight_decay=dc.weight_decay,
                generator=generator,
                device=device,
                state=resumed["loop_state"] if resumed is not None else None,
                checkpoint=saver("distill"),
                checkpoint_every=cfg.checkpoint_every,
                callback=callback,
                show_progress=show_progress,
            )
            del targets
            log["distill"] = {"init": dc.init, **pretrained_info, **log["distill"]}
            stage = "statistics"
        if stage == "statistics":  # not a checkpoint stage: it runs straight after stage 1
            if cfg.normalize_teacher:
                mean, std = train.teacher_statistics(
                    self.nets.teacher, train_images, batch_size=cfg.eval_batch_size, device=device
                )
                self.nets.teacher_mean.copy_(mean)
                self.nets.teacher_std.copy_(std)
            stage, resumed = "train", None
            if ckpt_path is not None:
                self._save_state(ckpt_path, "train", None, log, generator, augment=augment_record)

        if distill_only:
            if stage == "done":
                raise ValueError(f"{ckpt_path}: this run finished training; there is no stage 1 to resume")
            self.device = device
            return log

        if stage == "train":
            tc = cfg.train
            penalty = None
            if tc.penalty_folder:
                penalty = train.load_image_folder(
                    resolve_folder(tc.penalty_folder),
                    cfg.image_size,
                    tc.penalty_max_images,
                    torch.Generator().manual_seed(cfg.distill.channel_seed + 1),
                )
            log["train"] = train.train_end_to_end(
                self.nets,
                train_images,
                steps=train.steps_for(train_images.shape[0], tc.batch_size, tc.epochs, tc.steps),
                lr=tc.lr,
                batch_size=tc.batch_size,
                generator=generator,
                weight_decay=tc.weight_decay,
                detach_ae=tc.detach_ae,
                hard_q=tc.hard_q,
                lr_decay_at=tc.lr_decay_at,
                penalty_images=penalty,
                penalty_weight=tc.penalty_weight,
                augmenter=augmenter,
                device=device,
                state=resumed["loop_state"] if resumed is not None else None,
                checkpoint=saver("train"),
                checkpoint_every=cfg.checkpoint_every,
                callback=callback,
                show_progress=show_progress,
            )
            stage = "done"

        self.device = device
        t0 = time.perf_counter()
        self.calibrate(val_ds)
        log["calibration_s"] = time.perf_counter() - t0
        log["time_s"] = time.perf_counter() - t_start
        if ckpt_path is not None:
            self._save_state(ckpt_path, "done", None, log, generator, augment=augment_record)
        return log

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def predict_components(self, images: torch.Tensor) -> torch.Tensor:
        """Raw per-level, per-branch maps before normalisation: (B, 3, H, W) -> (B, 2, S, h, w).

        Branch 0 is structural sum_c (X^l - S1^l)^2, branch 1 logical sum_c (A^l - S2^l)^2.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        self.nets.eval()
        return self.nets.raw_maps(images.to(self.device))  # fused heads and distances (MuDeNetNets.raw_maps)

    @torch.no_grad()
    def _raw_dataset(self, dataset) -> torch.Tensor:
        raws = []
        for i in range(0, len(dataset), self.config.eval_batch_size):
            batch = torch.stack(
                [dataset[j]["image"] for j in range(i, min(i + self.config.eval_batch_size, len(dataset)))]
            )
            raws.append(self.predict_components(batch).cpu())
        return torch.cat(raws)  # (N, 2, S, h, w)

    def calibrate(self, val_ds, scoring_config: ScoringConfig | None = None) -> torch.Tensor:
        """(Re)compute the per-level, per-branch map statistics on nominal ``val_ds``.

        Optionally switches to a new scoring config first (ablations without retraining).

        Returns:
            the statistics (2, S, 2), also stored in the ``map_stats`` buffer.
        """
        if scoring_config is not None:
            self.config = dataclasses.replace(self.config, scoring=scoring_config)
        if len(val_ds) == 0:
            raise ValueError(
                "calibrate: the validation split is empty; MuDeNet needs nominal validation images"
            )
        stats = scoring.map_statistics(self._raw_dataset(val_ds), self.config.scoring)
        self.nets.map_stats.copy_(stats)
        self.fitted = True
        return stats

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> anomaly maps (B, 1, H, W) at input size and image scores (B,).

        Only the levels and branches that ``config.scoring`` fuses are computed.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        sc = self.config.scoring
        valid = all(1 <= lv <= self.nets.num_levels for lv in sc.levels)  # else scoring.fuse raises
        self.nets.eval()
        raw = self.nets.raw_maps(images.to(self.device), sc.levels if valid else None,
                                 structural=sc.use_structural, logical=sc.use_logical)  # (B, 2, S, h, w)
        amap = scoring.anomaly_map(raw, self.nets.map_stats, sc, tuple(images.shape[-2:]))
        return amap, scoring.image_scores(amap)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write weights, buffers (statistics, channel indices) and config atomically."""
        return save_checkpoint(
            path,
            state_dict=self.nets.state_dict(),
            config=self.config,
            stage="done",
            channel_idx=self.nets.channel_idx.tolist(),
            code_version=__version__,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        expected_config: MuDeNetConfig | None = None,
    ) -> MuDeNet:
        """Load a detector saved by :meth:`save` (or a finished ``fit`` checkpoint).

        Raises:
            CheckpointError: unreadable file, unfinished training, or architecture keys that differ from
                ``expected_config``.
        """
        ckpt = load_checkpoint(
            path,
            expected_config=expected_config,
            keys=ARCHITECTURE_KEYS if expected_config is not None else None,
        )
        if ckpt.get("stage", "done") != "done":
            raise CheckpointError(
                f"{path}: training stopped in stage {ckpt['stage']!r}; resume it with "
                "fit(..., checkpoint_dir=..., resume=True)"
            )
        try:
            cfg = MuDeNetConfig.from_dict({k: v for k, v in ckpt["config"].items() if k not in REMOVED_KEYS})
        except ConfigError as e:
            raise CheckpointError(f"{path}: stored config is not a valid MuDeNetConfig ({e})") from None
        det = cls(cfg)
        load_weights(det.nets, ckpt["state_dict"], path)
        det.device = torch.device(device)
        det.nets.to(det.device).eval()
        det.fitted = True
        return det
