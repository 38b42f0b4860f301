"""PaDiM (Defard et al., 2020): one multivariate Gaussian per feature-grid position, Mahalanobis anomaly map.

Pipeline (paper's names in brackets):

1. A frozen ImageNet backbone gives three maps at strides 4 / 8 / 16 (ResNet-18 ``layer1-3``); the coarser
   maps are upsampled (nearest) to the stride-4 grid and concatenated: embedding (B, C, h, w).
2. A random subset of ``d`` channels is kept (100 of 448 for ResNet-18), drawn once from the ``generator``
   given to :meth:`PaDiM.fit` (:func:`random_channel_subset`) and saved with the model. The draw matters
   with few training images: on MPDD metal_plate (Lite0, 100 of 176 channels, 49 images, 128 px) the test
   image AUROC of 30 subsets spans 0.66-0.88 (mean 0.78, std 0.05), anomalib's ``PadimModel`` alike.
3. At every position ``ij`` a Gaussian N(mu_ij, Sigma_ij) is fitted to the training embeddings, with
   ``Sigma_ij = cov_ij + eps * I`` (eps = 0.01) or, optionally, a Ledoit-Wolf shrunk covariance.
   The sums and outer-product sums are accumulated in float64 batch by batch
   (:class:`GaussianAccumulator`), so memory does not grow with the number of training images.
4. The anomaly map is the Mahalanobis distance ``sqrt((x - mu)^T Sigma^-1 (x - mu))`` per position, upsampled
   bilinearly to the image size and blurred (sigma = 4); the image score is the map's maximum.

Example:
    >>> import torch
    >>> acc = GaussianAccumulator(n_positions=2, dim=3)
    >>> acc.update(torch.randn(10, 2, 3, generator=torch.Generator().manual_seed(0)))
    >>> mean, cov = acc.finalize(eps=0.01)
    >>> tuple(mean.shape), tuple(cov.shape)
    ((2, 3), (2, 3, 3))
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from mudenet_core.baselines.common import iterate_images, upsample_and_blur
from mudenet_core.config import ConfigBase, ConfigError, nonnegative, positive
from mudenet_core.io import CheckpointError, load_checkpoint, load_weights, save_checkpoint


@dataclasses.dataclass(frozen=True)
class PaDiMConfig(ConfigBase):
    """PaDiM settings; defaults are the paper's (ResNet-18, d = 100, eps = 0.01, sigma = 4, 256 px images)."""

    backbone: str = "resnet18"  # registry name (mudenet_core.nets.backbones): resnet18, wide_resnet50_2, ...
    layers: tuple[str, ...] = ()  # maps to concatenate; () = DEFAULT_LAYERS[backbone] (strides 4/8/16)
    pretrained: bool = True  # ImageNet weights (False only for tests without weights)
    n_features: int = nonnegative(100)  # d: size of the random channel subset; 0 keeps every channel
    covariance_eps: float = nonnegative(0.01)  # eps in Sigma + eps * I
    shrinkage: Literal["none", "ledoit_wolf"] = "none"  # covariance estimator (LW: sklearn's formula)
    blur_sigma: float = nonnegative(4.0)  # Gaussian blur of the upsampled map, in image pixels (0 disables)
    # square input size this profile is meant for (the data pipeline resizes to it)
    image_size: int = positive(256)
    batch_size: int = positive(8)  # images per forward pass during fit



class GaussianAccumulator:
    """Streaming per-position mean and covariance: float64 sums, so memory is independent of the image count.

    Keeps ``n``, ``sum_x`` (P, d), ``sum_xxT`` (P, d, d) and, for Ledoit-Wolf shrinkage, ``sum_sq_x``
    (P, d) (= sum ||x||^2 x) and ``sum_sq_sq`` (P,) (= sum ||x||^4), from which sklearn's Ledoit-Wolf estimate
    follows exactly without keeping the samples.

    Args:
        n_positions: P, number of feature-grid positions (h * w).
        dim: d, feature dimension.
        ledoit_wolf: also accumulate the fourth-moment sums Ledoit-Wolf needs.
        device: where the sums live.
    """

    def __init__(self, n_positions: int, dim: int, *, ledoit_wolf: bool = False,
                 device: torch.device | str = "cpu"):
        self.n = 0
        self.ledoit_wolf = ledoit_wolf
        kw = dict(dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(n_positions, dim, **kw)  # (P, d)
        self.sum_xxT = torch.zeros(n_positions, dim, dim, **kw)  # (P, d, d)
        if ledoit_wolf:
            self.sum_sq_x = torch.zeros(n_positions, dim, **kw)  # (P, d): sum ||x||^2 x
            self.sum_sq_sq = torch.zeros(n_positions, **kw)  # (P,): sum ||x||^4

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of samples ``x`` (N, P, d)."""
        assert x.ndim == 3 and x.shape[1:] == self.sum_x.shape, \
            f"expected (N, {self.sum_x.shape[0]}, {self.sum_x.shape[1]}), got {tuple(x.shape)}"
        x = x.to(self.sum_x.device, torch.float64).contiguous()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_xxT += torch.einsum("npi,npj->pij", x, x)
        if self.ledoit_wolf:
            sq = (x * x).sum(-1)  # (N, P)
            self.sum_sq_x += (sq.unsqueeze(-1) * x).sum(0)
            self.sum_sq_sq += (sq * sq).sum(0)

    def finalize(self, eps: float = 0.0, shrinkage: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance per position (float64).

        Args:
            eps: added to the diagonal (PaDiM's regulariser, 0.01).
            shrinkage: ``"none"``: unbiased sample covariance (divides by n - 1, as ``numpy.cov``);
                ``"ledoit_wolf"``: ``sklearn.covariance.ledoit_wolf`` (MLE covariance shrunk towards mu * I).

        Returns:
            mean (P, d), covariance (P, d, d).
        """
        n = self.n
        if n < 2:
            raise ValueError(f"need at least 2 samples per position to estimate a covariance, got {n}")
        mean = self.sum_x / n  # (P, d)
        scatter = self.sum_xxT - n * torch.einsum("pi,pj->pij", mean, mean)  # (P, d, d): sum (x-mu)(x-mu)^T
        d = mean.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=mean.device)
        if shrinkage == "none":
            cov = scatter / (n - 1)
        elif shrinkage == "ledoit_wolf":
            if not self.ledoit_wolf:
                raise ValueError("GaussianAccumulator was built without ledoit_wolf=True")
            emp = scatter / n  # (P, d, d) MLE covariance
            tr = torch.diagonal(emp, dim1=1, dim2=2).sum(-1)  # (P,)
            mu = tr / d
            # sum_k ||x_k - mean||^4 from raw moments: a = ||x||^2, b = x . mean, c = ||mean||^2
            c = (mean * mean).sum(-1)
            sum_a = torch.diagonal(self.sum_xxT, dim1=1, dim2=2).sum(-1)
            sum_b = (self.sum_x * mean).sum(-1)
            sum_b2 = torch.einsum("pi,pij,pj->p", mean, self.sum_xxT, mean)
            sum_ab = (self.sum_sq_x * mean).sum(-1)
            fourth = (self.sum_sq_sq + 4 * sum_b2 + n * c * c - 4 * sum_ab + 2 * c * sum_a - 4 * c * sum_b)
            delta_ = (emp * emp).sum((1, 2))  # ||emp||_F^2
            beta = (fourth / n - delta_) / (d * n)
            delta = (delta_ - 2 * mu * tr + d * mu * mu) / d
            beta = torch.minimum(beta, delta)
            tiny = torch.finfo(torch.float64).tiny
            s = torch.where(beta > 0, beta / delta.clamp_min(tiny), torch.zeros_like(beta))
            cov = (1 - s)[:, None, None] * emp + (s * mu)[:, None, None] * eye
        else:
            raise ValueError(f"unknown shrinkage {shrinkage!r}; choose 'none' or 'ledoit_wolf'")
        return mean, cov + eps * eye


def random_channel_subset(n_channels: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """PaDiM's random dimensionality reduction: ``d`` distinct channel indices of ``n_channels``, sorted.

    The one draw :meth:`PaDiM.fit` makes from its generator (``benchmarks/peers.py`` hands the same subset to
    anomalib's ``PadimModel``: the image AUROC depends on the subset by several points).

    Returns:
        indices (d,), int64, ascending.

    Example:
        >>> random_channel_subset(10, 4, torch.Generator().manual_seed(0)).shape
        torch.Size([4])
    """
    if not 0 < d <= n_channels:
        raise ValueError(f"need 0 < d <= n_channels, got d={d}, n_channels={n_channels}")
    return torch.randperm(n_channels, generator=generator)[:d].sort().values


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Per-position Mahalanobis distance ``sqrt((x - mu)^T Sigma^-1 (x - mu))``.

    Args:
        x: samples (B, P, d).
        mean: (P, d).
        inv_cov: inverse covariances (P, d, d).

    Returns:
        distances (B, P).

    Example:
        >>> import torch
        >>> mahalanobis(torch.tensor([[[3.0, 4.0]]]), torch.zeros(1, 2), torch.eye(2)[None])
        tensor([[5.]])
    """
    assert x.ndim == 3 and x.shape[1:] == mean.shape, f"x {tuple(x.shape)} vs mean {tuple(mean.shape)}"
    delta = (x - mean).contiguous()  # (B, P, d)
    m2 = torch.einsum("bpi,pij,bpj->bp", delta, inv_cov, delta)  # (B, P)
    return m2.clamp_min(0).sqrt()


class PaDiMModel(nn.Module):
    """Frozen backbone plus the fitted Gaussians as buffers; ``forward`` maps images to Mahalanobis maps.

    Buffers: ``channel_idx`` (d,), ``mean`` (h*w, d), ``inv_cov`` (h*w, d, d), ``grid`` (2,) = (h, w).
    """

    def __init__(self, config: PaDiMConfig, *, pretrained: bool | None = None):
        super().__init__()
        from mudenet_core.nets.backbones import DEFAULT_LAYERS, build_backbone

        self.layers = list(config.layers) or list(DEFAULT_LAYERS[config.backbone])
        self.backbone = build_backbone(config.backbone, layers=self.layers,
                                       pretrained=config.pretrained if pretrained is None else pretrained)
        self.total_channels = sum(self.backbone.channels[k] for k in self.layers)
        d = config.n_features or self.total_channels
        if d > self.total_channels:
            raise ConfigError(f"PaDiMConfig.n_features={d} exceeds the {self.total_channels} channels of "
                              f"{config.backbone} {self.layers}")
        self.register_buffer("channel_idx", torch.zeros(d, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(0, d))
        self.register_buffer("inv_cov", torch.zeros(0, d, d))
        self.register_buffer("grid", torch.zeros(2, dtype=torch.long))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Random-subset embedding of every position.

        Args:
            images: (B, 3, H, W), ImageNet-normalised.

        Returns:
            embeddings (B, h, w, d) on the stride-4 grid.
        """
        from mudenet_core.nets.backbones import concat_features

        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        feats = self.backbone(images)
        emb = concat_features(feats, self.layers, mode="nearest")  # (B, C, h, w)
        emb = emb.index_select(1, self.channel_idx)  # (B, d, h, w)
        # contiguous: the batched matmuls downstream are ~50x slower on the strided view
        return emb.permute(0, 2, 3, 1).contiguous()  # (B, d, h, w) -> (B, h, w, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance map on the feature grid.

        Args:
            images: (B, 3, H, W).

        Returns:
            maps (B, 1, h, w).
        """
        assert self.mean.shape[0] > 0, "PaDiM is not fitted: call PaDiM.fit first"
        emb = self.embed(images)  # (B, h, w, d)
        b, h, w, d = emb.shape
        gh, gw = (int(v) for v in self.grid)
        assert (h, w) == (gh, gw), (f"feature grid {(h, w)} differs from the fitted {(gh, gw)}: PaDiM "
                                    f"needs the image size it was fitted on")
        dist = mahalanobis(emb.reshape(b, h * w, d).float(), self.mean, self.inv_cov)  # (B, h*w)
        return dist.reshape(b, 1, h, w)


class PaDiM:
    """PaDiM detector (see the module docstring): ``fit`` / ``predict`` / ``save`` / ``load``.

    Example:
        >>> PaDiM(PaDiMConfig(backbone="resnet18")).config.n_features
        100
    """

    TRAINING_FREE = True  # fitted on un-augmented training images, as in the paper

    def __init__(self, config: PaDiMConfig | None = None):
        self.config = config or PaDiMConfig()
        self._model: PaDiMModel | None = None
        self.device = torch.device("cpu")

    @property
    def model(self) -> PaDiMModel:
        """The backbone and fitted statistics (built on first use)."""
        if self._model is None:
            self._model = PaDiMModel(self.config).to(self.device).eval()
        return self._model

    def fit(self, train_ds: Dataset, val_ds: Dataset | None = None, *, generator: torch.Generator,
            device: torch.device | str = "cpu", show_progress: bool = True,
            checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Fit one Gaussian per position on ``train_ds`` (normal images). Training-free: no checkpoints.

        Args:
            train_ds: dataset of normal images (``"image"`` (3, H, W)).
            val_ds: unused (PaDiM has nothing to calibrate); accepted for the common interface.
            generator: draws the random channel subset.
            device: where to run the backbone and keep the statistics.
            show_progress: progress bar over batches.
            checkpoint_dir: unused.
            resume: unused.

        Returns:
            log dict: n_images, feature_grid, n_features, fit_time_s.
        """
        del val_ds, checkpoint_dir, resume
        t0 = time.perf_counter()
        self.device = torch.device(device)
        model = self.model.to(self.device)
        cfg = self.config
        d = model.channel_idx.numel()
        model.channel_idx = random_channel_subset(model.total_channels, d, generator).to(self.device)
        acc = None
        with torch.no_grad():
            for images in iterate_images(train_ds, batch_size=cfg.batch_size, device=self.device,
                                         show_progress=show_progress, desc="padim fit"):
                emb = model.embed(images)  # (B, h, w, d)
                b, h, w, _ = emb.shape
                if acc is None:
                    acc = GaussianAccumulator(h * w, d, ledoit_wolf=cfg.shrinkage == "ledoit_wolf",
                                              device=self.device)
                    grid = (h, w)
                assert (h, w) == grid, f"training images differ in size: grids {grid}, {(h, w)}"
                acc.update(emb.reshape(b, h * w, d))  # (B, h, w, d) -> (B, h*w, d)
            if acc is None:
                raise ValueError("PaDiM.fit: the training dataset is empty")
            mean, cov = acc.finalize(eps=cfg.covariance_eps, shrinkage=cfg.shrinkage)
            chol, info = torch.linalg.cholesky_ex(cov)  # (h*w, d, d); also checks positive definiteness
            if bool((info != 0).any()):
                raise ValueError(f"PaDiM: {int((info != 0).sum())} per-position covariances are not positive "
                                 f"definite ({acc.n} images, d = {d}); use covariance_eps > 0 or "
                                 f"shrinkage='ledoit_wolf'")
            inv_cov = torch.cholesky_inverse(chol)  # (h*w, d, d), float64
        model.mean = mean.float()
        model.inv_cov = inv_cov.float()
        model.grid = torch.tensor(grid, dtype=torch.long, device=self.device)
        return {"n_images": acc.n, "feature_grid": list(grid), "n_features": d,
                "fit_time_s": time.perf_counter() - t0}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and image scores.

        Args:
            images: (B, 3, H, W), ImageNet-normalised, the size used in ``fit``.

        Returns:
            maps (B, 1, H, W) (upsampled and blurred Mahalanobis distances), scores (B,) (max of each map).
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        images = images.to(self.device)
        maps = self.model(images)  # (B, 1, h, w)
        maps = upsample_and_blur(maps, images.shape[-2:], self.config.blur_sigma)  # (B, 1, H, W)
        return maps, maps.flatten(1).amax(1)

    def save(self, path: str | Path) -> Path:
        """Save config and state dict (backbone weights and fitted statistics) via ``save_checkpoint``."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_checkpoint(path, state_dict=state, config=self.config, method="padim")

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> PaDiM:
        """Rebuild a fitted detector from :meth:`save`'s checkpoint (needs no pretrained-weight download)."""
        ckpt = load_checkpoint(path)
        det = cls(PaDiMConfig.from_dict(ckpt["config"]))
        det.device = torch.device(device)
        model = PaDiMModel(det.config, pretrained=False)
        state = ckpt["state_dict"]
        for k in ("mean", "inv_cov", "channel_idx", "grid"):  # fitted buffers: resize before loading
            if k not in state:
                raise CheckpointError(f"{path}: not a PaDiM checkpoint (state_dict lacks {k!r})")
            setattr(model, k, torch.empty_like(state[k]))
        load_weights(model, state, path)
        det._model = model.to(det.device).eval()
        return det


__all__ = ["PaDiM", "PaDiMConfig", "PaDiMModel", "GaussianAccumulator", "mahalanobis",
           "random_channel_subset"]
