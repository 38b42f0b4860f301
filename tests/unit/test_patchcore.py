"""PatchCore: greedy coreset against a brute-force farthest-point reference, chunked search against cdist,
the paper's reweighting on a hand case, training images scoring ~0, save/load, and a smoke evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mudenet_core.baselines.patchcore import (
    PatchCore,
    PatchCoreConfig,
    greedy_coreset,
    nearest_neighbors,
    random_projection,
    reweighted_score,
)
from mudenet_core.config import ConfigError
from mudenet_core.methods import get_method, load_config


class ImageList(torch.utils.data.Dataset):
    """Minimal dataset of the data contract's ``image`` entries."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0}


def farthest_point_reference(x: np.ndarray, n: int, start: int) -> list[int]:
    """Brute force: full N x N distance matrix, add the point farthest from the selection each step."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    sel = [start]
    for _ in range(n - 1):
        sel.append(int(np.argmax(d[:, sel].min(1))))
    return sel


def test_greedy_coreset_equals_brute_force_farthest_point():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = greedy_coreset(x, 40, generator=torch.Generator().manual_seed(1), projection_dim=0)
    assert idx.tolist() == farthest_point_reference(x.numpy(), 40, start=int(idx[0]))
    assert len(set(idx.tolist())) == 40


def test_greedy_coreset_chunking_gives_identical_result():
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(2))
    runs = [greedy_coreset(x, 50, generator=torch.Generator().manual_seed(3), projection_dim=8, chunk_size=c)
            for c in (7, 64, 100_000)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # the seed decides the projection and the start: another seed gives another coreset
    other = greedy_coreset(x, 50, generator=torch.Generator().manual_seed(4), projection_dim=8)
    assert not torch.equal(runs[0], other)


def test_random_projection_roughly_preserves_distances():
    x = torch.randn(50, 512, generator=torch.Generator().manual_seed(0))
    y = random_projection(x, 256, torch.Generator().manual_seed(0))
    assert y.shape == (50, 256)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert 0.7 < float(ratio.min()) and float(ratio.max()) < 1.3  # Johnson-Lindenstrauss, eps ~ 0.3


def test_nearest_neighbors_chunked_matches_cdist():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(57, 9, generator=g), torch.randn(83, 9, generator=g)
    ref = torch.cdist(q.double(), bank.double())
    ref_d, ref_i = torch.topk(ref, 3, dim=1, largest=False)
    for chunk, block in ((5, 50), (16, 1 << 24), (10_000, 100), (10_000, 1 << 24)):  # bank and query chunks
        d, i = nearest_neighbors(q, bank, k=3, chunk_size=chunk, block_elements=block)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=1e-5)
    d, i = nearest_neighbors(bank[:4], bank, k=1)
    assert i[:, 0].tolist() == [0, 1, 2, 3] and float(d.abs().max()) == 0.0  # exact zero for a bank row


def test_reweighted_score_hand_case():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=torch.float64)
    query = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    # m* = (0, 0) at s* = 1; N_3(m*) = {(0,0), (1,0), (0,1)}; distances to m_test*: 1, 2, sqrt(2)
    s = reweighted_score(query, torch.tensor([1.0], dtype=torch.float64), torch.tensor([0]), bank, b=3)
    expected = (1 - math.e / (math.e + math.exp(2.0) + math.exp(math.sqrt(2.0)))) * 1.0
    assert float(s) == pytest.approx(expected, rel=1e-12)


def test_config_validation_and_profiles():
    with pytest.raises(ConfigError, match="reweight_neighbors"):
        PatchCoreConfig(reweight_neighbors=1)
    with pytest.raises(ConfigError, match="coreset_ratio"):
        PatchCoreConfig(coreset_ratio=0.0)
    with pytest.raises(ConfigError, match="unknown key"):
        PatchCoreConfig.from_dict({"anomaly_scorer_num_nn": 3})  # patchcore-inspection's swallowed option
    det_cls, cfg_cls = get_method("patchcore")
    assert det_cls is PatchCore and cfg_cls is PatchCoreConfig
    paper = load_config("patchcore", "paper")
    assert (paper.backbone, paper.coreset_ratio, paper.patch_size, paper.image_size) == (
        "wide_resnet50_2", 0.1, 3, 256)


def _lite0_cfg(**kw) -> PatchCoreConfig:
    base = dict(backbone="efficientnet_lite0", pretrain_embed_dim=48, target_embed_dim=48, image_size=64,
                projection_dim=16, reweight_neighbors=5)
    return PatchCoreConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def train_images():
    torch.set_num_threads(2)
    return torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_training_images_score_about_zero_with_full_memory_bank(train_images):
    det = PatchCore(_lite0_cfg(coreset_ratio=1.0))
    log = det.fit(ImageList(train_images), None, generator=torch.Generator().manual_seed(0),
                  show_progress=False)
    assert log["memory_bank_size"] == log["n_patches"] == 6 * 8 * 8
    maps, scores = det.predict(train_images[:3])  # another batch size than in fit
    assert maps.shape == (3, 1, 64, 64) and scores.shape == (3,)
    other = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    maps_o, scores_o = det.predict(other)
    assert float(scores.abs().max()) < 1e-3 * float(scores_o.min())
    assert float(maps.abs().max()) < 1e-3 * float(maps_o.max())


@pytest.fixture(scope="module")
def fitted_patchcore(train_images):
    det = PatchCore(_lite0_cfg(coreset_ratio=0.25))
    log = det.fit(ImageList(train_images), None, generator=torch.Generator().manual_seed(0),
                  show_progress=False)
    return det, log


def test_coreset_fit_log_and_bank(fitted_patchcore):
    det, log = fitted_patchcore
    assert log["n_patches"] == 384 and log["memory_bank_size"] == 96 and log["feature_dim"] == 48
    bank = det.memory_bank
    assert bank.shape == (96, 48) and torch.unique(bank, dim=0).shape[0] == 96  # distinct coreset elements


def test_save_load_round_trip(fitted_patchcore, train_images, tmp_path):
    det, _ = fitted_patchcore
    path = det.save(tmp_path / "patchcore.pt")
    loaded = PatchCore.load(path)
    assert loaded.config == det.config
    assert torch.equal(loaded.memory_bank, det.memory_bank)
    m1, s1 = det.predict(train_images[:2])
    m2, s2 = loaded.predict(train_images[:2])
    assert torch.equal(m1, m2) and torch.equal(s1, s2)


def test_smoke_fit_evaluate_on_generated_data(synthetic_root):
    from mudenet_core.data import AugmentConfig, DataConfig, make_splits
    from mudenet_core.harness import evaluate

    cfg = load_config("patchcore", "smoke")
    splits = make_splits(DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate",
                                    image_size=cfg.image_size, augment=AugmentConfig()))
    det = PatchCore(cfg)
    det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    res = evaluate(det, splits.test, show_progress=False)
    n = len(splits.test)
    assert res.maps.shape == (n, cfg.image_size, cfg.image_size)
    assert np.isfinite(res.maps).all()
    assert res.metrics["image_auroc"] > 0.5
