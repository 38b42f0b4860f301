"""PatchCore (Roth et al., 2022): a coreset memory bank of locally aware patch features, k-NN scores.

Pipeline (paper's names in brackets):

1. Locally aware patch features: the two mid-level backbone maps (``layer2`` / ``layer3`` of the ResNets,
   the stride-8 / stride-16 stages of EfficientNet-Lite0) are each averaged over a 3 x 3 neighbourhood
   (stride 1, zero padding), reduced per position to ``pretrain_embed_dim`` values by adaptive average pooling
   over the channel vector, upsampled (bilinear) to the stride-8 grid, stacked, and pooled again to
   ``target_embed_dim`` (the reference implementation's ``MeanMapper`` / ``Aggregator``): one (D,) feature per
   position.
2. Memory bank M: all training patch features, subsampled by greedy coreset selection (farthest-point
   sampling, ratio 1 % / 10 % / 25 %) on a seeded Johnson-Lindenstrauss random projection
   (:func:`greedy_coreset`). Memory is bounded: a running min-distance vector (N,) and chunked distance
   computations; no N x N matrix.
3. Patch scores: distance of every test patch to its nearest neighbour in M (:func:`nearest_neighbors`:
   blocked ``addmm`` into one reused buffer and argmin / top-k in torch, FAISS when installed). The map is
   upsampled to the image size and blurred (sigma = 4).
4. Image score: the largest patch score s* reweighted as in the paper (eq. 7),
   ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*``, where m* is the nearest
   bank element of the most anomalous patch m_test* and N_b(m*) its b nearest bank elements (m* included, as
   in anomalib).

Example:
    >>> import torch
    >>> x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    >>> idx = greedy_coreset(x, 10, generator=torch.Generator().manual_seed(0), projection_dim=0)
    >>> idx.shape, len(set(idx.tolist()))
    (torch.Size([10]), 10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mudenet_core.baselines.common import iterate_images, upsample_and_blur
from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative, positive
from mudenet_core.io import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from mudenet_core.utils import progress

try:  # optional: exact L2 search on the CPU/GPU; the torch path gives the same neighbours
    import faiss  # type: ignore[import-not-found]
except ImportError:  # not installed here: pip install faiss-cpu (extra "faiss")
    faiss = None


@dataclasses.dataclass(frozen=True)
class PatchCoreConfig(ConfigBase):
    """PatchCore settings; defaults are the paper's (WideResNet-50, layer2 + layer3, 3 x 3, 10 % coreset)."""

    backbone: str = "wide_resnet50_2"  # registry name (mudenet_core.nets.backbones)
    layers: tuple[str, ...] = ()  # the two mid-level maps; () = the stride-8 and stride-16 DEFAULT_LAYERS
    pretrained: bool = True  # ImageNet weights (False only for tests without weights)
    patch_size: int = positive(3)  # local neighbourhood p of the average pooling (1 disables it)
    # per-layer adaptive average pooling of each position's channel vector
    pretrain_embed_dim: int = positive(1024)
    target_embed_dim: int = positive(1024)  # D: final pooling of the stacked layers
    # fraction of training patches kept in the memory bank (1.0 keeps all)
    coreset_ratio: float = bounded(0.1, gt=0, le=1)
    # JL random projection used for coreset selection only; 0 = use the features
    projection_dim: int = nonnegative(128)
    # b of the image-score reweighting (>= 2); 0 = plain max patch score
    reweight_neighbors: int = bounded(9, ge=2, also=(0,))
    blur_sigma: float = nonnegative(4.0)  # Gaussian blur of the upsampled map, in image pixels (0 disables)
    # square input size this profile is meant for (the data pipeline resizes to it)
    image_size: int = positive(256)
    batch_size: int = positive(8)  # images per forward pass during fit
    # rows per chunk of the coreset / nearest-neighbour distance computations
    chunk_size: int = positive(16384)
    use_faiss: bool = True  # use FAISS for nearest-neighbour search when it is installed

    def __post_init__(self):
        super().__post_init__()  # the declared bounds (reweight_neighbors: b = 1 would always weigh 0)
        if self.patch_size % 2 == 0:
            raise ConfigError(f"PatchCoreConfig.patch_size must be positive and odd, got {self.patch_size}")


# --- memory bank: coreset selection and nearest-neighbour search --------------------------------------------


def _sq_dist_to_point(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, chunk_size: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances ||x_i - c||^2 (N,) from rows x (N, D) (squared norms x_sq (N,)) to a point c (D,)."""
    c_sq = (c * c).sum()
    out = torch.empty_like(x_sq) if out is None else out
    for s in range(0, x.shape[0], chunk_size):
        e = min(s + chunk_size, x.shape[0])
        torch.addmv(x_sq[s:e], x[s:e], c, alpha=-2, out=out[s:e])  # ||x||^2 - 2 x.c, (n,)
    return out.add_(c_sq).clamp_min_(0)


@contextlib.contextmanager
def _few_threads(n_elements: int, limit: int = 1 << 23) -> Iterator[None]:
    """Run small CPU ops single-threaded: thousands of tiny parallel regions cost more than they gain.

    The greedy loop issues a few (N,)-sized ops per selection; with OpenMP each is a fork/join, which
    dominates (and, on an oversubscribed machine, takes milliseconds). Above ``limit`` elements the threads
    are kept.
    """
    if n_elements > limit:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def random_projection(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Johnson-Lindenstrauss projection ``x @ R`` with R (D, dim) ~ N(0, 1/dim), drawn from ``generator``.

    Returns:
        projected features (N, dim); ``x`` itself when ``dim`` is 0 or not smaller than D.
    """
    assert x.ndim == 2, f"expected (N, D), got {tuple(x.shape)}"
    if dim <= 0 or dim >= x.shape[1]:
        return x
    r = torch.randn(x.shape[1], dim, generator=generator, dtype=torch.float32) / math.sqrt(dim)  # (D, dim)
    return x @ r.to(x.device, x.dtype)  # (N, D) @ (D, dim) -> (N, dim)


def greedy_coreset(features: torch.Tensor, n_select: int, *, generator: torch.Generator,
                   projection_dim: int = 128, chunk_size: int = 16384,
                   show_progress: bool = False) -> torch.Tensor:
    """Greedy (farthest-point) coreset: repeatedly add the feature farthest from the current selection.

    The first element is drawn from ``generator``; selection runs on a JL projection of the features
    (``projection_dim``; 0 = exact features). Memory is O(N): one running min-distance vector and chunked
    matrix-vector products, never an N x N matrix.

    Args:
        features: (N, D).
        n_select: coreset size (1 <= n_select <= N).
        generator: seeds the projection and the starting point.
        projection_dim: JL projection size for the selection.
        chunk_size: rows per chunk of the distance computation (the result does not depend on it).
        show_progress: progress bar over selections.

    Returns:
        indices into ``features`` (n_select,), in selection order.
    """
    assert features.ndim == 2, f"expected (N, D), got {tuple(features.shape)}"
    n = features.shape[0]
    assert 1 <= n_select <= n, f"n_select must be in [1, {n}], got {n_select}"
    x = random_projection(features, projection_dim, generator)  # (N, k)
    x_sq = (x * x).sum(1)  # (N,)
    start = int(torch.randint(n, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = start
    min_dist = _sq_dist_to_point(x, x_sq, x[start], chunk_size)  # (N,) squared distance to the selection
    buf = torch.empty_like(min_dist)  # (N,) distances to the latest selection
    with _few_threads(x.numel() if x.device.type == "cpu" else 1 << 30):
        for i in progress(range(1, n_select), desc="coreset", enabled=show_progress):
            nxt = int(torch.argmax(min_dist))
            selected[i] = nxt
            torch.minimum(min_dist, _sq_dist_to_point(x, x_sq, x[nxt], chunk_size, out=buf), out=min_dist)
    return selected.to(features.device)


def nearest_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, *, chunk_size: int = 16384,
                      block_elements: int = 1 << 20, use_faiss: bool = False,
                      bank_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of ``queries`` in ``bank`` (Euclidean), memory-bounded.

    The torch path ranks by ``|m|^2 - 2 q.m`` (``|q|^2`` is the same for every m of a query, so it cannot
    change the order): one ``addmm`` per block of queries x bank rows, written into one reused buffer of at
    most ``block_elements`` floats (4 MB by default, so the block stays in cache), then ``argmin`` (k = 1) or
    ``topk``; bank chunks of ``chunk_size`` rows are merged with a running top-k. The returned distances are
    recomputed directly from the differences, so a query identical to a bank row has distance exactly 0.

    Args:
        queries: (Q, D).
        bank: (M, D).
        k: neighbours per query (<= M).
        chunk_size: bank rows per chunk.
        block_elements: bound on the query-chunk x bank-chunk distance block (the reused buffer).
        use_faiss: use ``faiss.IndexFlatL2`` when FAISS is installed (CPU tensors).
        bank_sq: precomputed squared norms of the bank rows (M,) (computed when None).

    Returns:
        distances (Q, k) ascending, indices (Q, k) into ``bank``.

    Example:
        >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> nearest_neighbors(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), bank, k=1)
        (tensor([[0.],
                [1.]]), tensor([[1],
                [0]]))
    """
    assert queries.ndim == 2 and bank.ndim == 2 and queries.shape[1] == bank.shape[1], \
        f"expected (Q, D) and (M, D), got {tuple(queries.shape)} and {tuple(bank.shape)}"
    m = bank.shape[0]
    assert 1 <= k <= m, f"k must be in [1, {m}], got {k}"
    if use_faiss and faiss is not None and queries.device.type == "cpu":
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank.detach().float().contiguous().numpy())
        _, idx = index.search(queries.detach().float().contiguous().numpy(), k)
        idx = torch.from_numpy(idx).long()
    else:
        idx = _ranked_neighbors(queries, bank, k, chunk_size, block_elements, bank_sq)
    idx = idx.to(bank.device)
    dist = torch.linalg.vector_norm(queries.unsqueeze(1) - bank[idx], dim=-1)  # (Q, k) exact distances
    if k == 1:
        return dist, idx
    dist, order = torch.sort(dist, dim=1)
    return dist, torch.gather(idx, 1, order)


def _ranked_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int, block_elements: int,
                      bank_sq: torch.Tensor | None) -> torch.Tensor:
    """Indices (Q, k) of the k smallest ``|m|^2 - 2 q.m`` per query (see :func:`nearest_neighbors`)."""
    m, n_q = bank.shape[0], queries.shape[0]
    bank_sq = (bank * bank).sum(1) if bank_sq is None else bank_sq  # (M,)
    mc = min(m, chunk_size)
    q_chunk = max(1, min(n_q, block_elements // mc))
    buf = torch.empty(q_chunk, mc, dtype=queries.dtype, device=queries.device)  # reused for every block
    idx = torch.empty(n_q, k, dtype=torch.long, device=queries.device)
    for qs in range(0, n_q, q_chunk):
        q = queries[qs:qs + q_chunk]  # (q, D)
        best_d = best_i = None
        for ms in range(0, m, mc):
            b = bank[ms:ms + mc]  # (mc', D)
            d2 = buf[:q.shape[0], :b.shape[0]]  # (q, mc') view of the buffer
            torch.addmm(bank_sq[ms:ms + mc], q, b.T, alpha=-2, out=d2)  # |m|^2 - 2 q.m
            if k == 1:
                cd, ci = d2.min(dim=1, keepdim=True)  # (q, 1)
            else:
                cd, ci = torch.topk(d2, min(k, b.shape[0]), dim=1, largest=False)  # (q, kk)
            ci = ci + ms
            if best_d is not None:  # merge with the best of the earlier bank chunks
                cd, order = torch.topk(torch.cat([best_d, cd], 1), min(k, best_d.shape[1] + cd.shape[1]),
                                       dim=1, largest=False)
                ci = torch.gather(torch.cat([best_i, ci], 1), 1, order)
            best_d, best_i = cd, ci
        idx[qs:qs + q.shape[0]] = best_i
    return idx


def reweighted_score(query: torch.Tensor, nn_dist: torch.Tensor, nn_index: torch.Tensor, bank: torch.Tensor,
                     b: int, *, chunk_size: int = 16384, use_faiss: bool = False) -> torch.Tensor:
    """PatchCore image score with the paper's neighbourhood reweighting (eq. 7).

    Args:
        query: features of the most anomalous patch of each image, m_test* (B, D).
        nn_dist: their nearest-neighbour distances s* (B,).
        nn_index: index of their nearest bank element m* (B,).
        bank: memory bank M (M, D).
        b: neighbourhood size |N_b(m*)| (m* itself included).
        chunk_size: rows per chunk of the neighbour search.
        use_faiss: use FAISS for the neighbour search when installed.

    Returns:
        scores (B,) = (1 - softmax_{m in N_b(m*)}(||m_test* - m||)[m*]) * s*.
    """
    b = min(b, bank.shape[0])
    if b < 2:
        return nn_dist
    # N_b(m*): m* is its own nearest neighbour (distance 0), so it comes first; an exact duplicate of m* in
    # the bank could come first instead, but it has the same distance to m_test*, so the weight is unchanged.
    _, support = nearest_neighbors(bank[nn_index], bank, k=b, chunk_size=chunk_size,
                                   use_faiss=use_faiss)  # (B, b)
    dist = torch.linalg.vector_norm(query.unsqueeze(1) - bank[support], dim=-1)  # (B, b)
    weight = 1 - torch.softmax(dist.double(), dim=1)[:, 0]  # (B,)
    return (weight * nn_dist.double()).to(nn_dist.dtype)


# --- model and detector -------------------------------------------------------------------------------------


class PatchCoreModel(nn.Module):
    """Frozen backbone plus the memory bank buffer ``memory_bank`` (M, D); ``forward``: patch features."""

    def __init__(self, config: PatchCoreConfig, *, pretrained: bool | None = None):
        super().__init__()
        from mudenet_core.nets.backbones import DEFAULT_LAYERS, build_backbone

        self.config = config
        self.layers = list(config.layers) or list(DEFAULT_LAYERS[config.backbone][1:])
        self.backbone = build_backbone(config.backbone, layers=self.layers,
                                       pretrained=config.pretrained if pretrained is None else pretrained)
        self.register_buffer("memory_bank", torch.zeros(0, config.target_embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features.

        Args:
            images: (B, 3, H, W), ImageNet-normalised.

        Returns:
            features (B, h, w, D) on the grid of the first layer (stride 8).
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        cfg = self.config
        feats = self.backbone(images)
        size = tuple(feats[self.layers[0]].shape[-2:])  # (h, w)
        per_layer = []
        for k in self.layers:
            f = feats[k]  # (B, C_k, h_k, w_k)
            if cfg.patch_size > 1:
                f = F.avg_pool2d(f, cfg.patch_size, stride=1, padding=cfg.patch_size // 2)  # p x p average
            b, c, hk, wk = f.shape
            f = f.permute(0, 2, 3, 1).reshape(-1, 1, c)  # (B, C_k, h_k, w_k) -> (B*h_k*w_k, 1, C_k)
            f = F.adaptive_avg_pool1d(f, cfg.pretrain_embed_dim)  # (B*h_k*w_k, 1, D')
            f = f.reshape(b, hk, wk, -1).permute(0, 3, 1, 2)  # -> (B, D', h_k, w_k)
            if (hk, wk) != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)  # (B, D', h, w)
            per_layer.append(f)
        f = torch.stack(per_layer, dim=-1)  # (B, D', h, w, L)
        b, d1, h, w, n_layers = f.shape
        f = f.permute(0, 2, 3, 4, 1).reshape(b * h * w, 1, n_layers * d1)  # (B*h*w, 1, L*D'), layer-major
        f = F.adaptive_avg_pool1d(f, cfg.target_embed_dim)  # (B*h*w, 1, D)
        return f.reshape(b, h, w, cfg.target_embed_dim)


class PatchCore:
    """PatchCore detector (see the module docstring): ``fit`` / ``predict`` / ``save`` / ``load``.

    Example:
        >>> PatchCore(PatchCoreConfig(coreset_ratio=0.25)).config.coreset_ratio
        0.25
    """

    TRAINING_FREE = True  # fitted on un-augmented training images, as in the paper

    def __init__(self, config: PatchCoreConfig | None = None):
        self.config = config or PatchCoreConfig()
        self._model: PatchCoreModel | None = None
        self.device = torch.device("cpu")

    @property
    def model(self) -> PatchCoreModel:
        """The backbone and memory bank (built on first use)."""
        if self._model is None:
            self._model = PatchCoreModel(self.config).to(self.device).eval()
        return self._model

    @property
    def memory_bank(self) -> torch.Tensor:
        """The coreset memory bank M (M, D)."""
        return self.model.memory_bank

    def fit(self, train_ds: Dataset, val_ds: Dataset | None = None, *, generator: torch.Generator,
            device: torch.device | str = "cpu", show_progress: bool = True,
            checkpoint_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Extract every training patch feature and keep a greedy coreset of them as the memory bank.

        Args:
            train_ds: dataset of normal images (``"image"`` (3, H, W)).
            val_ds: unused (nothing to calibrate); accepted for the common interface.
            generator: seeds the coreset's random projection and starting point.
            device: where to run the backbone and keep the bank.
            show_progress: progress bars.
            checkpoint_dir: unused (training-free).
            resume: unused.

        Returns:
            log dict: n_images, n_patches, memory_bank_size, feature_dim, fit_time_s, coreset_time_s.
        """
        del val_ds, checkpoint_dir, resume
        t0 = time.perf_counter()
        self.device = torch.device(device)
        model = self.model.to(self.device)
        cfg = self.config
        chunks, n_images = [], 0
        with torch.no_grad():
            for images in iterate_images(train_ds, batch_size=cfg.batch_size, device=self.device,
                                         show_progress=show_progress, desc="patchcore features"):
                f = model(images)  # (B, h, w, D)
                chunks.append(f.reshape(-1, f.shape[-1]))  # (B*h*w, D)
                n_images += images.shape[0]
            if not chunks:
                raise ValueError("PatchCore.fit: the training dataset is empty")
            feats = torch.cat(chunks)  # (N, D)
            del chunks
            n = feats.shape[0]
            n_select = max(1, int(round(cfg.coreset_ratio * n)))
            t1 = time.perf_counter()
            if n_select < n:
                idx = greedy_coreset(feats, n_select, generator=generator, projection_dim=cfg.projection_dim,
                                     chunk_size=cfg.chunk_size, show_progress=show_progress)
                bank = feats[idx].clone()
            else:
                bank = feats
            coreset_time = time.perf_counter() - t1
        model.memory_bank = bank.contiguous()
        return {"n_images": n_images, "n_patches": n, "memory_bank_size": bank.shape[0],
                "feature_dim": bank.shape[1], "coreset_time_s": coreset_time,
                "fit_time_s": time.perf_counter() - t0}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and image scores.

        Args:
            images: (B, 3, H, W), ImageNet-normalised.

        Returns:
            maps (B, 1, H, W) (nearest-neighbour distances, upsampled and blurred), scores (B,) (reweighted
            maximum patch score).
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (B,3,H,W), got {tuple(images.shape)}"
        model, cfg = self.model, self.config
        bank = model.memory_bank
        assert bank.shape[0] > 0, "PatchCore is not fitted: call PatchCore.fit first"
        images = images.to(self.device)
        f = model(images)  # (B, h, w, D)
        b, h, w, d = f.shape
        q = f.reshape(b * h * w, d)  # (B*h*w, D)
        dist, idx = nearest_neighbors(q, bank, k=1, chunk_size=cfg.chunk_size, use_faiss=cfg.use_faiss)
        patch = dist[:, 0].reshape(b, h * w)  # (B, h*w)
        nn_idx = idx[:, 0].reshape(b, h * w)
        worst = patch.argmax(1)  # (B,) index of m_test*
        rows = torch.arange(b, device=patch.device)
        s_star = patch[rows, worst]
        if cfg.reweight_neighbors >= 2:
            scores = reweighted_score(q.reshape(b, h * w, d)[rows, worst], s_star, nn_idx[rows, worst], bank,
                                      cfg.reweight_neighbors, chunk_size=cfg.chunk_size,
                                      use_faiss=cfg.use_faiss)
        else:
            scores = s_star
        maps = upsample_and_blur(patch.reshape(b, 1, h, w), images.shape[-2:], cfg.blur_sigma)  # (B, 1, H, W)
        return maps, scores

    def save(self, path: str | Path) -> Path:
        """Save config and state dict (backbone weights and memory bank) via ``save_checkpoint``."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_checkpoint(path, state_dict=state, config=self.config, method="patchcore")

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> PatchCore:
        """Rebuild a fitted detector from :meth:`save`'s checkpoint (needs no pretrained-weight download)."""
        ckpt = load_checkpoint(path)
        det = cls(PatchCoreConfig.from_dict(ckpt["config"]))
        det.device = torch.device(device)
        model = PatchCoreModel(det.config, pretrained=False)
        state = ckpt["state_dict"]
        if "memory_bank" not in state:
            raise CheckpointError(f"{path}: not a PatchCore checkpoint (state_dict lacks 'memory_bank')")
        model.memory_bank = torch.empty_like(state["memory_bank"])
        load_weights(model, state, path)
        det._model = model.to(det.device).eval()
        return det
