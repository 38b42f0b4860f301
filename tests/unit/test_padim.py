"""PaDiM: streaming Gaussian statistics against numpy/sklearn, Mahalanobis against scipy, blur against scipy,
the fitted detector's invariants, save/load, and a smoke evaluation on the generated dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import ledoit_wolf

from mudenet_core.baselines.common import gaussian_blur, upsample_and_blur
from mudenet_core.baselines.padim import GaussianAccumulator, PaDiM, PaDiMConfig, mahalanobis
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


def _features(n=37, p=3, d=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(p, d, d))
    # correlated, and far from 0 (tests the centring in float64)
    x = np.einsum("npi,pij->npj", rng.normal(size=(n, p, d)), a) + 50.0
    return x


def test_streaming_mean_cov_equals_numpy():
    x = _features()
    acc = GaussianAccumulator(x.shape[1], x.shape[2])
    for s, e in [(0, 10), (10, 11), (11, 37)]:  # uneven batches
        acc.update(torch.from_numpy(x[s:e]))
    mean, cov = acc.finalize(eps=0.0)
    for p in range(x.shape[1]):
        np.testing.assert_allclose(mean[p].numpy(), x[:, p].mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov[p].numpy(), np.cov(x[:, p], rowvar=False), rtol=1e-9, atol=1e-9)
    _, cov_eps = acc.finalize(eps=0.01)
    np.testing.assert_allclose((cov_eps - cov).numpy(), np.broadcast_to(0.01 * np.eye(5), cov.shape),
                               atol=1e-12)


def test_streaming_ledoit_wolf_equals_sklearn():
    x = _features(n=8, d=6, seed=1)  # fewer samples than dimensions: shrinkage matters
    acc = GaussianAccumulator(x.shape[1], x.shape[2], ledoit_wolf=True)
    acc.update(torch.from_numpy(x[:3]))
    acc.update(torch.from_numpy(x[3:]))
    _, cov = acc.finalize(eps=0.0, shrinkage="ledoit_wolf")
    for p in range(x.shape[1]):
        expected, shrink = ledoit_wolf(x[:, p])
        assert 0 < shrink < 1
        np.testing.assert_allclose(cov[p].numpy(), expected, rtol=1e-7, atol=1e-9)


def test_regularised_covariance_is_positive_definite_with_fewer_samples_than_dims():
    x = _features(n=4, d=10, seed=2)  # rank <= 3 sample covariance
    acc = GaussianAccumulator(x.shape[1], x.shape[2])
    acc.update(torch.from_numpy(x))
    _, cov = acc.finalize(eps=0.0)
    assert float(torch.linalg.eigvalsh(cov).min()) < 1e-8  # singular without the regulariser
    _, cov = acc.finalize(eps=0.01)
    eig = torch.linalg.eigvalsh(cov)
    assert float(eig.min()) >= 0.01 - 1e-8
    torch.linalg.cholesky(cov)  # raises if not positive definite


def test_mahalanobis_matches_scipy_on_hand_case():
    mean = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    cov = np.array([[[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], np.diag([1.0, 4.0, 9.0])])
    # (B=2, P=2, d=3)
    x = np.array([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], [[1.0, -2.0, 0.5], [-1.0, 0.0, 6.0]]])
    inv = np.linalg.inv(cov)
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(inv)).numpy()
    for b in range(2):
        for p in range(2):
            assert got[b, p] == pytest.approx(scipy_mahalanobis(x[b, p], mean[p], inv[p]), rel=1e-12)
    assert got[1, 0] == 0.0  # x == mean
    assert got[1, 1] == pytest.approx(np.sqrt(1.0 + 0.0 + 36.0 / 9.0))  # diagonal case by hand: sqrt(5)


def test_gaussian_blur_matches_scipy_mirror_mode():
    rng = np.random.default_rng(0)
    m = rng.random((2, 1, 40, 33)).astype(np.float64)
    got = gaussian_blur(torch.from_numpy(m), sigma=4.0).numpy()
    for i in range(2):
        ref = gaussian_filter(m[i, 0], 4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(got[i, 0], ref, atol=1e-12)
    up = upsample_and_blur(torch.ones(1, 1, 8, 8), (32, 32), sigma=4.0)
    assert up.shape == (1, 1, 32, 32) and torch.allclose(up, torch.ones_like(up))  # constant stays constant


def test_config_validation_and_profiles():
    with pytest.raises(ConfigError, match="n_features"):
        PaDiMConfig(n_features=-1)
    with pytest.raises(ConfigError, match="unknown key"):
        PaDiMConfig.from_dict({"n_feature": 10})
    det_cls, cfg_cls = get_method("padim")
    assert det_cls is PaDiM and cfg_cls is PaDiMConfig
    paper = load_config("padim", "paper")
    assert (paper.backbone, paper.n_features, paper.covariance_eps, paper.blur_sigma, paper.image_size) == (
        "resnet18", 100, 0.01, 4.0, 256)
    assert load_config("padim", "cpu").backbone == "efficientnet_lite0"


@pytest.fixture(scope="module")
def fitted_padim():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(12, 3, 64, 64, generator=g)
    cfg = PaDiMConfig(backbone="efficientnet_lite0", n_features=24, image_size=64)
    det = PaDiM(cfg)
    log = det.fit(ImageList(train), None, generator=torch.Generator().manual_seed(1), show_progress=False)
    return det, log, train


def test_fitted_padim_invariants(fitted_padim):
    det, log, _ = fitted_padim
    m = det.model
    assert log["n_images"] == 12 and log["feature_grid"] == [16, 16] and log["n_features"] == 24
    idx = m.channel_idx
    assert idx.numel() == 24 and len(set(idx.tolist())) == 24 and int(idx.max()) < 24 + 40 + 112
    # the subset is a function of the generator: same seed -> same subset
    det2 = PaDiM(det.config)
    det2.fit(ImageList(torch.zeros(2, 3, 64, 64)), None, generator=torch.Generator().manual_seed(1),
             show_progress=False)
    assert torch.equal(det2.model.channel_idx, idx)
    assert m.mean.shape == (256, 24) and m.inv_cov.shape == (256, 24, 24)
    # inverse covariances are symmetric positive definite (12 images < 24 dims: only eps makes them exist)
    inv = m.inv_cov.double()
    assert torch.allclose(inv, inv.transpose(1, 2), atol=1e-3 * float(inv.abs().max()))
    assert float(torch.linalg.eigvalsh(0.5 * (inv + inv.transpose(1, 2))).min()) > 0


def test_predict_shapes_and_score_is_map_max(fitted_padim):
    det, _, train = fitted_padim
    maps, scores = det.predict(train[:3])
    assert maps.shape == (3, 1, 64, 64) and scores.shape == (3,)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    noise = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 3.0
    _, s_out = det.predict(noise)
    assert float(s_out.min()) > float(scores.max())  # far-off inputs score higher than training images
    with pytest.raises(AssertionError, match="feature grid"):
        det.predict(torch.zeros(1, 3, 96, 96))


def test_save_load_round_trip(fitted_padim, tmp_path):
    det, _, train = fitted_padim
    path = det.save(tmp_path / "padim.pt")
    loaded = PaDiM.load(path)
    assert loaded.config == det.config
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    m1, s1 = det.predict(x)
    m2, s2 = loaded.predict(x)
    assert torch.equal(m1, m2) and torch.equal(s1, s2)
    assert torch.equal(loaded.model.channel_idx, det.model.channel_idx)


def test_smoke_fit_evaluate_on_generated_data(synthetic_root):
    from mudenet_core.data import AugmentConfig, DataConfig, make_splits
    from mudenet_core.harness import evaluate

    cfg = load_config("padim", "smoke")
    splits = make_splits(DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate",
                                    image_size=cfg.image_size, augment=AugmentConfig()))
    det = PaDiM(cfg)
    det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    res = evaluate(det, splits.test, show_progress=False)
    n = len(splits.test)
    assert res.maps.shape == (n, cfg.image_size, cfg.image_size)
    assert np.isfinite(res.maps).all()
    assert res.metrics["image_auroc"] > 0.5
