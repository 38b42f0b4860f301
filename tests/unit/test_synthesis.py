"""Anomaly synthesis (GLASS LAS) and the synthetic-anomaly validation set."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mudenet_core.data import DataConfig, make_splits
from mudenet_core.data import synthesis as S
from mudenet_core.data.images import DataError


def test_perlin_noise_is_zero_at_lattice_points_and_bounded():
    # gradient noise vanishes at every cell corner (offset 0 from the corner's gradient), whatever the angles
    n = S.perlin_noise((64, 64), (4, 8), torch.Generator().manual_seed(3))
    assert n.shape == (64, 64)
    assert torch.all(n[::16, ::8] == 0)
    assert n.abs().max() <= math.sqrt(2) + 1e-6 and n.std() > 0.05


def test_perlin_noise_at_non_multiple_size():
    n = S.perlin_noise((50, 70), (4, 4), torch.Generator().manual_seed(0))
    assert n.shape == (50, 70) and torch.isfinite(n).all()


@pytest.mark.parametrize("seed", range(8))
def test_masks_are_binary_and_nonempty_at_feature_level(seed):
    cfg = S.SynthesisConfig()
    m = S.perlin_mask((64, 64), cfg, torch.Generator().manual_seed(seed))
    assert m.shape == (1, 64, 64)
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert S.feature_mask(m, cfg.feature_stride).sum() > 0


def test_combination_split_is_one_third_each():
    # threshold below the noise range: both masks are full, nothing is redrawn, so every draw counts
    cfg = S.SynthesisConfig(threshold=-2.0)
    g = torch.Generator().manual_seed(0)
    kinds = collections.Counter(S.perlin_mask_and_kind((16, 16), cfg, g)[1] for _ in range(1200))
    for k in ("union", "intersection", "single"):
        assert abs(kinds[k] / 1200 - 1 / 3) < 0.05, kinds  # ~3.7 binomial standard deviations


def test_union_and_intersection_relations():
    # the combinations are what they say: a union contains each part, an intersection is inside both
    cfg = S.SynthesisConfig()
    sizes = collections.defaultdict(list)
    g = torch.Generator().manual_seed(5)
    for _ in range(150):
        m, k = S.perlin_mask_and_kind((32, 32), cfg, g)
        sizes[k].append(float(m.mean()))
    assert np.mean(sizes["union"]) > np.mean(sizes["single"]) > np.mean(sizes["intersection"])


def test_foreground_mask_confines_the_anomaly():
    fg = torch.zeros(64, 64)
    fg[:, :32] = 1
    for seed in range(5):
        m = S.perlin_mask((64, 64), S.SynthesisConfig(), torch.Generator().manual_seed(seed), foreground=fg)
        assert m[0, :, 32:].sum() == 0 and m.sum() > 0


def test_empty_foreground_raises_clear_error():
    with pytest.raises(DataError, match="no non-empty mask"):
        S.perlin_mask(
            (32, 32), S.SynthesisConfig(max_tries=3), torch.Generator(), foreground=torch.zeros(32, 32)
        )


def test_overlay_formula_by_hand():
    x = torch.full((3, 2, 2), 0.2)
    t = torch.ones(3, 2, 2)
    m = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = S.overlay(x, t, m, beta=0.25)
    # inside: (1 - 0.25) * 1 + 0.25 * 0.2 = 0.8; outside: unchanged
    assert torch.allclose(y[:, 0, 0], torch.full((3,), 0.8))
    assert torch.equal(y[:, 0, 1], x[:, 0, 1])


def test_synthesis_changes_exactly_the_masked_pixels_and_beta_is_clipped():
    cfg = S.SynthesisConfig()
    betas = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(100 + seed)) * 0.5
        t = 0.5 + torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(200 + seed)) * 0.5  # t > x
        y, m = S.synthesize(x, cfg, g, texture=t)
        inside = m[0] > 0
        assert torch.equal(y[:, ~inside], x[:, ~inside])  # bit-identical outside the mask
        assert torch.all(y[:, inside] != x[:, inside])  # every masked pixel changed (t != x everywhere)
        beta = 1 - ((y - x)[:, inside] / (t - x)[:, inside])  # invert the overlay
        assert torch.allclose(beta, beta.flatten()[0].expand_as(beta), atol=1e-5)
        betas.append(float(beta.flatten()[0]))
    assert min(betas) >= 0.2 - 1e-5 and max(betas) <= 0.8 + 1e-5
    assert abs(np.mean(betas) - 0.5) < 0.05 and 0.05 < np.std(betas) < 0.15


def test_same_seed_identical_other_seed_differs():
    pool = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = S.SynthesisConfig()
    a = S.synthesize(pool[0], cfg, torch.Generator().manual_seed(7), source=pool, exclude=0)
    b = S.synthesize(pool[0], cfg, torch.Generator().manual_seed(7), source=pool, exclude=0)
    c = S.synthesize(pool[0], cfg, torch.Generator().manual_seed(8), source=pool, exclude=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_texture_augment_draws_three_distinct_of_nine():
    t = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    order = torch.randperm(S.N_TEXTURE_AUGS, generator=g2)[:3].tolist()
    assert len(set(order)) == 3
    out = S.texture_augment(t, g1, 3)
    assert out.shape == t.shape and not torch.equal(out, t)
    assert torch.equal(S.texture_augment(t, torch.Generator().manual_seed(4), 0), t)  # none drawn: identity


def test_texture_folder_reads_recursively_and_names_missing_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a" / "b" / "t.jpg")
    tf = S.TextureFolder(tmp_path, 16)
    assert len(tf) == 1 and tf[0].shape == (3, 16, 24)
    tex = S.draw_texture(tf, (16, 16), S.SynthesisConfig(n_texture_augs=0), torch.Generator())
    assert tex.shape == (3, 16, 16)
    with pytest.raises(DataError, match="texture folder not found: .*nope"):
        S.TextureFolder(tmp_path / "nope", 16)


def _val_splits(root, image_size=32):
    return make_splits(
        DataConfig(
            dataset="synthetic", root=str(root), category="plate", image_size=image_size, val_fraction=0.25
        )
    )


def test_validation_set_layout_and_exact_masks(synthetic_root):
    splits = _val_splits(synthetic_root)
    n = len(splits.val)
    cfg = S.ValidationConfig(min_anomalous=10)
    vs = S.validation_set(splits.val, cfg)
    k = math.ceil(10 / n)
    assert len(vs) == n * (1 + k) and vs.per_image == k
    labels = vs.index["label"].to_numpy()
    assert labels[:n].sum() == 0 and labels[n:].sum() == n * k
    for i in range(n):  # normals are the validation images themselves
        assert torch.allclose(vs[i]["image"], splits.val[i]["image"], atol=1e-5)
        assert vs[i]["mask"].sum() == 0
    base = torch.stack([vs.images[i] for i in range(n)])
    for pos in range(n, len(vs)):
        i = (pos - n) % n  # sample j of image i sits at n + j * n + i
        m = vs.masks[pos, 0] > 0
        assert m.sum() > 0
        assert torch.equal(vs.images[pos][:, ~m], base[i][:, ~m])
        assert (vs.images[pos][:, m] != base[i][:, m]).any(dim=0).float().mean() > 0.9
        assert vs[pos]["defect_type"] == "synthetic" and vs[pos]["label"] == 1


def test_validation_set_is_deterministic_and_uses_dtd_when_given(synthetic_root, dtd_root):
    splits = _val_splits(synthetic_root)
    a = S.validation_set(splits.val, S.ValidationConfig(min_anomalous=6))
    b = S.validation_set(splits.val, S.ValidationConfig(min_anomalous=6))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    d = S.validation_set(
        splits.val,
        S.ValidationConfig(min_anomalous=6, synthesis=S.SynthesisConfig(texture_dir=str(dtd_root))),
    )
    assert torch.equal(d.masks, a.masks)  # same masks (drawn first), other textures
    assert not torch.equal(d.images, a.images)


def test_validation_set_rejects_empty_split(synthetic_root):
    splits = _val_splits(synthetic_root)
    empty = torch.utils.data.Subset(splits.val, [])
    with pytest.raises(DataError, match="holds no normal image"):
        S.validation_set(empty)
