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
from mudenet_core.baselines.padim import (
    GaussianAccumulator,
    PaDiM,
    PaDiMConfig,
    mahalanobis,
    random_channel_subset,
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


def _bilinear_upsample(m, size):
    """Bilinear resize of a 2-D map by hand: half-pixel centres, edges clamped (align_corners=False)."""
    def weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, wr = weights(m.shape[0], size)
    c0, c1, wc = weights(m.shape[1], size)
    rows = m[r0] * (1 - wr)[:, None] + m[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc)[None] + rows[:, c1] * wc[None]


def test_predict_is_the_papers_pipeline_written_with_numpy_and_scipy(fitted_padim):
    """The PaDiM paper's steps on the backbone's maps, independently: stride-8/16 maps repeated (nearest) onto
    the stride-4 grid, the fitted channel subset, ``np.cov`` + 0.01 I per position, scipy's Mahalanobis,
    bilinear upsampling, ``gaussian_filter`` (sigma 4, mirror borders), image score = map maximum. anomalib's
    ``PadimModel`` does the same (benchmarks/peers.py: equal AUROC given the same channel subset)."""
    det, _, train = fitted_padim
    m = det.model
    x = torch.cat([train[:2], torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))])
    with torch.no_grad():
        f_train = {k: v.double().numpy() for k, v in m.backbone(train).items()}
        f_test = {k: v.double().numpy() for k, v in m.backbone(x).items()}

    def embed(f):  # (B, C_k, h_k, w_k) per layer -> (B, 16, 16, d)
        maps = []
        for k in ("stage2", "stage3", "stage5"):
            r = 16 // f[k].shape[-1]
            maps.append(np.repeat(np.repeat(f[k], r, axis=2), r, axis=3))
        return np.concatenate(maps, axis=1)[:, m.channel_idx.numpy()].transpose(0, 2, 3, 1)

    e_train, e_test = embed(f_train), embed(f_test)
    d = e_train.shape[-1]
    dist = np.zeros(e_test.shape[:3])
    for i in range(16):
        for j in range(16):
            mu = e_train[:, i, j].mean(0)
            inv = np.linalg.inv(np.cov(e_train[:, i, j], rowvar=False) + 0.01 * np.eye(d))
            for b in range(len(x)):
                dist[b, i, j] = scipy_mahalanobis(e_test[b, i, j], mu, inv)
    expected = np.stack([gaussian_filter(_bilinear_upsample(dist[b], 64), 4.0, mode="mirror", truncate=4.0)
                         for b in range(len(x))])
    maps, scores = det.predict(x)
    np.testing.assert_allclose(maps[:, 0].double().numpy(), expected, rtol=2e-3, atol=1e-3 * expected.max())
    np.testing.assert_allclose(scores.double().numpy(), expected.max(axis=(1, 2)), rtol=2e-3)


def test_fit_keeps_the_subset_random_channel_subset_draws():
    """peers.py hands ``random_channel_subset(176, d, seed)`` to anomalib: it must be what ``fit`` keeps."""
    cfg = PaDiMConfig(backbone="efficientnet_lite0", pretrained=False, n_features=30, image_size=32)
    det = PaDiM(cfg)
    det.fit(ImageList(torch.randn(3, 3, 32, 32)), None, generator=torch.Generator().manual_seed(7),
            show_progress=False)
    expected = random_channel_subset(24 + 40 + 112, 30, torch.Generator().manual_seed(7))
    assert torch.equal(det.model.channel_idx, expected)
    assert expected.tolist() == sorted(set(expected.tolist())) and 0 <= int(expected.min())
    assert int(expected.max()) < 176
    other = random_channel_subset(176, 30, torch.Generator().manual_seed(8))
    assert not torch.equal(other, expected)  # the seed, not a fixed list, decides
    with pytest.raises(ValueError, match="n_channels"):
        random_channel_subset(10, 11, torch.Generator())


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
