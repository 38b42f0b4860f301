"""Convolutional autoencoder baseline: the reconstruction-error detector an inspection system starts from.

Network (``ConvAutoencoder``): four encoder blocks ``Conv(k4, s2, p1) - BatchNorm - LeakyReLU`` take the
image (B, 3, H, W) to (B, C4, H/16, W/16); a **dense bottleneck** flattens that grid and maps it to a latent
vector (B, 512) and back (``Linear - LeakyReLU``); four mirrored blocks ``ConvTranspose(k4, s2, p1) -
BatchNorm - LeakyReLU`` decode to (B, 3, H, W), the last one a plain transposed convolution (no norm, no
activation) so the output lives in the same ImageNet-normalised space as the input.

Why a dense bottleneck: a 1x1 convolution to 512 channels at H/16 would keep 512 * (H/16)^2 numbers
(131 072 for 256 px input, two thirds of the image's 196 608), which barely constrains the reconstruction; a
512-d vector is a real information bottleneck, so what the normal data never showed is reconstructed badly.
``bottleneck="conv"`` (1x1 conv to ``latent_dim`` channels) is kept as an option for ablations. The dense
bottleneck ties the network to one input size (``AEConfig.image_size``).

Scoring: the anomaly map is the per-pixel squared reconstruction error summed over the colour channels of the
*de-normalised* image and reconstruction (pixel space, [0, 1] scale), blurred with a Gaussian
(``map_sigma``); the image score is the map's maximum (or mean). The anomaly threshold is the
``threshold_percentile``-th percentile (90 by default) of the image scores of the normal validation images.
:func:`classification_report` turns labels, scores, masks and maps into the inspection report (accuracy,
precision, recall, F1, AUC-ROC, AUC-PR, optimal threshold, IoU).

Example:
    >>> ae = ConvAutoencoder(image_size=32, channels=(4, 8, 8, 8), latent_dim=16)
    >>> tuple(ae(torch.zeros(2, 3, 32, 32)).shape)
    (2, 3, 32, 32)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mudenet_core import metrics
from mudenet_core.baselines.common import gaussian_blur, iterate_images
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.io import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from mudenet_core.utils import progress, resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Config keys that fix the network's shape: a checkpoint made with other values cannot be loaded or resumed.
ARCH_KEYS = ["image_size", "channels", "latent_dim", "bottleneck", "negative_slope"]


@dataclasses.dataclass(frozen=True)
class AEConfig(ConfigBase):
    """Configuration of the convolutional-autoencoder detector (defaults: the ``paper`` profile)."""

    image_size: int = positive(256)  # H = W of the input; a multiple of 16
    # widths of the 4 encoder blocks (decoder mirrors them)
    channels: tuple[int, ...] = positive((32, 64, 128, 256))
    latent_dim: int = positive(512)  # size of the latent code
    bottleneck: Literal["dense", "conv"] = (
        "dense"  # dense: a latent vector; conv: 1x1 conv to latent_dim channels
    )
    negative_slope: float = nonnegative(0.2)  # LeakyReLU slope
    epochs: int = positive(100)  # passes over train/good
    batch_size: int = positive(16)  # training batch size
    lr: float = positive(1e-3)  # Adam learning rate
    weight_decay: float = nonnegative(0.0)  # Adam weight decay
    map_sigma: float = nonnegative(4.0)  # Gaussian blur of the error map, in pixels (0: none)
    score_reduction: Literal["max", "mean"] = "max"  # image score from the map
    # anomaly threshold = this percentile of validation image scores
    threshold_percentile: float = bounded(90.0, ge=0, le=100)
    # epochs between training checkpoints (when fit gets a checkpoint_dir)
    checkpoint_every: int = positive(1)
    eval_batch_size: int = positive(8)  # batch size of calibration passes

    def __post_init__(self):
        super().__post_init__()  # the declared bounds
        if self.image_size % 16 != 0:
            raise ConfigError(f"AEConfig.image_size must be a multiple of 16 (four stride-2 blocks), got "
                              f"{self.image_size}")
        if len(self.channels) != 4:
            raise ConfigError(f"AEConfig.channels must name the widths of the 4 encoder blocks, got "
                              f"{self.channels}")


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (e.g. module construction, whose initialisers use torch's global RNG) with a fixed seed.

    The global RNG state is restored afterwards, so the block neither depends on nor disturbs it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def draw_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (how sub-seeds are derived from the caller's generator)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _block(c_in: int, c_out: int, slope: float, transpose: bool = False) -> nn.Sequential:
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 4, stride=2, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(slope, inplace=True))


class ConvAutoencoder(nn.Module):
    """Image (B, 3, H, W) -> reconstruction (B, 3, H, W), through a latent of size ``latent_dim``.

    Args:
        image_size: H = W; must be a multiple of 16 (four stride-2 blocks).
        channels: widths of the four encoder blocks.
        latent_dim: size of the latent vector (dense) or channel count at H/16 (conv).
        bottleneck: ``"dense"`` (Linear to a vector) or ``"conv"`` (1x1 convolutions).
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        image_size: int = 256,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        latent_dim: int = 512,
        bottleneck: str = "dense",
        negative_slope: float = 0.2,
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"ConvAutoencoder: expected 4 encoder widths, got {channels}")
        if image_size % 16 != 0:
            raise ValueError(f"ConvAutoencoder: image_size must be a multiple of 16, got {image_size}")
        self.image_size = image_size
        self.grid = image_size // 16  # h = w at the bottleneck
        c = [3, *channels]
        self.encoder = nn.Sequential(*[_block(c[i], c[i + 1], negative_slope) for i in range(4)])
        c4 = channels[-1]
        if bottleneck == "dense":
            n = c4 * self.grid * self.grid
            self.to_latent = nn.Sequential(nn.Flatten(), nn.Linear(n, latent_dim))
            self.from_latent = nn.Sequential(
                nn.Linear(latent_dim, n),
                nn.LeakyReLU(negative_slope, inplace=True),
                nn.Unflatten(1, (c4, self.grid, self.grid)),
            )
        elif bottleneck == "conv":
            self.to_latent = nn.Conv2d(c4, latent_dim, 1)
            self.from_latent = nn.Sequential(
                nn.Conv2d(latent_dim, c4, 1), nn.LeakyReLU(negative_slope, inplace=True)
            )
        else:
            raise ValueError(f"ConvAutoencoder: bottleneck must be 'dense' or 'conv', got {bottleneck!r}")
        rc = c[::-1]  # [c4, c3, c2, c1, 3]
        dec = [_block(rc[i], rc[i + 1], negative_slope, transpose=True) for i in range(3)]
        dec.append(nn.ConvTranspose2d(rc[3], 3, 4, stride=2, padding=1))  # (B, 3, H, W), no norm/activation
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent code: (B, 3, H, W) -> (B, Z) (dense) or (B, Z, H/16, W/16) (conv)."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W), got {tuple(x.shape)}"
        assert x.shape[-1] == x.shape[-2] == self.image_size, (
            f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}"
        )
        return self.to_latent(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 3, H, W) of the ImageNet-normalised input (B, 3, H, W)."""
        return self.decoder(self.from_latent(self.encode(x)))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> pixel space (B, 3, H, W) (not clipped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std + mean


def reconstruction_error_map(
    images: torch.Tensor, reconstructions: torch.Tensor, sigma: float = 4.0
) -> torch.Tensor:
    """Per-pixel squared error summed over channels, in de-normalised pixel space, then Gaussian-blurred.

    Args:
        images: ImageNet-normalised inputs (B, 3, H, W).
        reconstructions: the autoencoder's outputs (B, 3, H, W), same normalisation.
        sigma: blur standard deviation in pixels (0: no blur).

    Returns:
        error map (B, 1, H, W).

    Example:
        >>> x = torch.zeros(1, 3, 4, 4); y = x.clone(); y[0, :, 1, 2] = 1.0
        >>> m = reconstruction_error_map(x, y, sigma=0)
        >>> round(float(m[0, 0, 1, 2]), 4), float(m.sum() - m[0, 0, 1, 2])
        (0.1532, 0.0)
    """
    assert images.shape == reconstructions.shape and images.ndim == 4, (
        f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} must be (B,3,H,W)"
    )
    err = (denormalize(images) - denormalize(reconstructions)).pow(2).sum(1, keepdim=True)  # (B, 1, H, W)
    return gaussian_blur(err, sigma)


def percentile_threshold(scores: np.ndarray, percentile: float) -> float:
    """The anomaly threshold: the ``percentile``-th percentile (numpy, linear) of the normal scores."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("percentile_threshold: no validation scores (is the validation split empty?)")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile_threshold: percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(scores, percentile))


def classification_report(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> dict[str, float]:
    """The inspection report of a thresholded detector.

    Args:
        labels: image labels (N,) in {0, 1}.
        scores: image scores (N,).
        masks: ground-truth masks (N, H, W) in {0, 1}, or None (no IoU).
        maps: anomaly maps (N, H, W), or None (no IoU).
        threshold: image decision threshold (e.g. the detector's percentile threshold); an image is called
            anomalous when ``score >= threshold`` (as ``mudenet_core.metrics.threshold_metrics``).
        pixel_threshold: threshold on the maps for IoU; defaults to ``threshold`` (the image score is the
            map's maximum, so both live on the same scale).

    Returns:
        dict with threshold, accuracy, precision, recall, f1 (at ``threshold``), auc_roc, auc_pr,
        optimal_threshold and f1_max (the F1-maximising threshold and its F1), and iou when masks and maps are
        given and the masks contain anomalous pixels.
    """
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    assert labels.shape == scores.shape, f"labels {labels.shape} and scores {scores.shape} differ"
    if threshold is None:
        raise ValueError("classification_report: a decision threshold is required")
    out: dict[str, float] = {"threshold": float(threshold)}
    out.update({k: float(v) for k, v in metrics.threshold_metrics(labels, scores, threshold).items()})
    out["auc_roc"] = float(metrics.image_auroc(labels, scores))
    out["auc_pr"] = float(metrics.image_aupr(labels, scores))
    f1, thr = metrics.f1_max(labels, scores)
    out["f1_max"], out["optimal_threshold"] = float(f1), float(thr)
    if masks is not None and maps is not None and np.asarray(masks).any():
        pthr = threshold if pixel_threshold is None else pixel_threshold
        out["iou"] = float(metrics.iou(np.asarray(masks), np.asarray(maps), pthr))
    return out


def _epoch_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """A shuffling loader whose order depends only on ``seed`` (so a resumed epoch replays exactly)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=g, num_workers=0, drop_last=False
    )


def train_autoencoder(
    model: ConvAutoencoder,
    train_ds: Dataset,
    cfg: AEConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with MSE reconstruction loss and Adam; checkpoint every ``checkpoint_every`` epochs.

    Epoch ``e`` shuffles with seed ``seed + e`` and selects the dataset's augmentation stream with
    ``set_epoch(e)`` (``mudenet_core.data``; the global torch RNG is also forked and seeded for datasets that
    draw from it), so a run resumed from a checkpoint after epoch ``e`` continues exactly as the uninterrupted
    run would.

    Returns:
        log dict: ``loss`` (mean training loss per epoch, all epochs including resumed ones), ``resumed_from``
        (epochs already done when the call started), ``epochs``.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    start = 0
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path, cfg, keys=ARCH_KEYS + ["lr", "weight_decay", "batch_size"])
        if ckpt.get("seed") != seed:
            raise CheckpointError(
                f"{checkpoint_path}: made with seed {ckpt.get('seed')}, this run uses {seed}; "
                "pass the same generator seed or start without resume"
            )
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        losses = list(ckpt["losses"])
        start = int(ckpt["epoch"])
    for epoch in progress(
        range(start, cfg.epochs), desc="ae", total=cfg.epochs, initial=start, enabled=show_progress
    ):
        model.train()
        total, n = 0.0, 0
        if hasattr(train_ds, "set_epoch"):  # mudenet_core.data: augmentation stream of this epoch
            train_ds.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + epoch)  # datasets that draw from the global RNG
            for batch in _epoch_loader(train_ds, cfg.batch_size, seed + epoch):
                x = batch["image"].to(device)  # (B, 3, H, W)
                loss = F.mse_loss(model(x), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * x.shape[0]
                n += x.shape[0]
        losses.append(total / max(n, 1))
        done = epoch + 1
        if checkpoint_path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
            save_checkpoint(
                checkpoint_path,
                state_dict=model.state_dict(),
                config=cfg,
                optimizer=opt.state_dict(),
                epoch=done,
                losses=losses,
                seed=seed,
            )
    model.eval()
    return {"loss": losses, "resumed_from": start, "epochs": cfg.epochs}


class ConvAutoencoderDetector:
    """Detector-contract wrapper: train the autoencoder, calibrate the threshold, score images.

    Attributes:
        config: the :class:`AEConfig`.
        autoencoder: the :class:`ConvAutoencoder`.
        threshold: image-score threshold (``threshold_percentile`` of validation scores); NaN before ``fit``.
    """

    def __init__(self, config: AEConfig | None = None):
        self.config = config if config is not None else AEConfig()
        if not isinstance(self.config, AEConfig):
            raise ConfigError(f"ConvAutoencoderDetector needs an AEConfig, got {type(self.config).__name__}")
        c = self.config
        self.autoencoder = ConvAutoencoder(
            c.image_size, c.channels, c.latent_dim, c.bottleneck, c.negative_slope
        )
        self.autoencoder.eval()
        self.threshold = float("nan")
        self.device = torch.device("cpu")

    def _init_weights(self, seed: int) -> None:
        c = self.config
        with seeded(seed):
            self.autoencoder = ConvAutoencoder(
                c.image_size, c.channels, c.latent_dim, c.bottleneck, c.negative_slope
            ).to(self.device)

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
        """Train on ``train_ds`` (normal images) and set the threshold from ``val_ds`` scores.

        Args:
            train_ds: training split (normal images), items with ``"image"`` (3, H, W).
            val_ds: validation split (normal images) for the threshold.
            generator: the run's RNG; initial weights and the shuffling seeds are drawn from it.
            device: torch device.
            show_progress: progress bars.
            checkpoint_dir: if given, ``ae_train.pt`` there is written every ``checkpoint_every`` epochs.
            resume: continue from ``checkpoint_dir/ae_train.pt`` when it exists.

        Returns:
            log dict: loss per epoch, resumed_from, threshold, val_scores, fit_time_s.
        """
        t0 = time.perf_counter()
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        init_seed, loop_seed = draw_seed(generator), draw_seed(generator) % 2**40
        self._init_weights(init_seed)
        ckpt = Path(checkpoint_dir) / "ae_train.pt" if checkpoint_dir is not None else None
        log = train_autoencoder(
            self.autoencoder,
            train_ds,
            self.config,
            seed=loop_seed,
            device=self.device,
            checkpoint_path=ckpt,
            resume=resume,
            show_progress=show_progress,
        )
        val_scores = self.score_dataset(val_ds, show_progress=show_progress)
        self.threshold = percentile_threshold(val_scores, self.config.threshold_percentile)
        log.update(
            threshold=self.threshold, val_scores=val_scores.tolist(), fit_time_s=time.perf_counter() - t0
        )
        return log

    @torch.no_grad()
    def score_dataset(self, dataset: Dataset, show_progress: bool = False) -> np.ndarray:
        """Image scores (N,) of a dataset, in order."""
        out = [
            self.predict(x)[1].cpu().numpy()
            for x in iterate_images(
                dataset,
                batch_size=self.config.eval_batch_size,
                device=self.device,
                show_progress=show_progress,
                desc="ae scores",
            )
        ]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, 1, H, W) and image scores (B,) for ImageNet-normalised images (B, 3, H, W)."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        self.autoencoder.eval()
        x = images.to(self.device)
        amap = reconstruction_error_map(x, self.autoencoder(x), self.config.map_sigma)  # (B, 1, H, W)
        flat = amap.flatten(1)  # (B, H*W)
        scores = flat.amax(1) if self.config.score_reduction == "max" else flat.mean(1)
        return amap, scores

    def classify(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Decisions (N,) in {0, 1}: score >= threshold."""
        if math.isnan(self.threshold):
            raise RuntimeError(
                "ConvAutoencoderDetector.classify: no threshold yet; call fit() (or load()) first"
            )
        s = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        return (s >= self.threshold).astype(int)

    def report(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        masks: np.ndarray | None = None,
        maps: np.ndarray | None = None,
    ) -> dict[str, float]:
        """:func:`classification_report` at the calibrated threshold (e.g. on an ``EvalResult``'s arrays)."""
        if math.isnan(self.threshold):
            raise RuntimeError(
                "ConvAutoencoderDetector.report: no threshold yet; call fit() (or load()) first"
            )
        return classification_report(labels, scores, masks, maps, self.threshold)

    def save(self, path: str | Path) -> Path:
        """Save weights, threshold and config (``mudenet_core.io.save_checkpoint``, atomic)."""
        sd = {f"autoencoder.{k}": v.detach().cpu() for k, v in self.autoencoder.state_dict().items()}
        sd["threshold"] = torch.tensor(self.threshold, dtype=torch.float64)
        return save_checkpoint(path, state_dict=sd, config=self.config, method="ae")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ConvAutoencoderDetector:
        """Rebuild a detector saved with :meth:`save`."""
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != "ae":
            raise CheckpointError(
                f"{path}: not a ConvAutoencoderDetector checkpoint (method={ckpt.get('method')!r})"
            )
        det = cls(AEConfig.from_dict(ckpt["config"]))
        sd = ckpt["state_dict"]
        ae_state = {k[len("autoencoder.") :]: v for k, v in sd.items() if k.startswith("autoencoder.")}
        load_weights(det.autoencoder, ae_state, path)
        det.threshold = float(sd["threshold"])
        det.device = torch.device(device)
        det.autoencoder.to(det.device).eval()
        return det
