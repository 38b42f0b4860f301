"""Data layer: index/split building, the sample contract, transforms, loaders for every layout, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mudenet_core.config import ConfigError
from mudenet_core.data import (
    DEMO_AUGMENT,
    AnomalyDataset,
    AugmentConfig,
    BatchAugmenter,
    DataConfig,
    DataError,
    DTDTextures,
    MVTecLOCOTestDataset,
    augment,
    augment_for,
    augmentation_example,
    augmentation_grid,
    build_index,
    denormalize,
    derive_seed,
    index_mvtec_ad,
    load_image,
    make_splits,
    normalize,
    synthetic,
)

KEYS = {"image", "label", "mask", "path", "category", "defect_type"}


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rgb(h=32, w=32, value=128) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def _mask(h=32, w=32, box=(4, 12, 4, 12), value=255) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = value
    return m


def _mvtec_tree(root: Path, category="part", n_train=4) -> Path:
    """A tiny MVTec AD-layout category: n_train good, 2 test good, 2 'crack' with masks."""
    cat = root / category
    for i in range(n_train):
        _png(cat / "train" / "good" / f"{i:03d}.png", _rgb(value=100 + i))
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png", _rgb(value=90))
        _png(cat / "test" / "crack" / f"{i:03d}.png", _rgb(value=200))
        _png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", _mask())
    return root


# ------------------------------------------------------------------------------------------- real data: MPDD
@pytest.mark.real_data
def test_mpdd_counts_labels_and_masks(mpdd_root):
    cfg = DataConfig(dataset="mpdd", root=str(mpdd_root.parent), category=mpdd_root.name, image_size=64,
                     val_fraction=0.0)
    s = make_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (54, 0, 26 + 71)
    test = s.test.index
    assert (test["label"] == (test["defect_type"] != "good")).all()
    assert (test["defect_type"].value_counts().to_dict()) == {"defective": 71, "good": 26}
    # every defective image has its own mask file (same stem), of the image's size, with defect pixels
    bad = test[test["label"] == 1]
    for img, msk in zip(bad["image_path"], bad["mask_path"], strict=True):
        assert Path(msk).name == Path(img).stem + "_mask.png"
        m = np.asarray(Image.open(msk))
        assert Image.open(img).size == m.shape[::-1] and (m > 0).any()
    # the sample's mask at full size equals the file (independent read with PIL)
    i = int(np.flatnonzero(test["label"].to_numpy() == 1)[0])
    full = make_splits(cfg.replace(image_size=512)).test[i]
    want = np.asarray(Image.open(test["mask_path"][i])) > 0
    assert torch.equal(full["mask"][0] > 0.5, torch.from_numpy(want))
    good = s.test[int(np.flatnonzero(test["label"].to_numpy() == 0)[0])]
    assert good["label"] == 0 and good["mask"].sum() == 0 and good["defect_type"] == "good"


@pytest.mark.real_data
def test_mpdd_val_split_disjoint_seeded_and_saved(mpdd_root, tmp_path):
    cfg = DataConfig(dataset="mpdd", root=str(mpdd_root.parent), category=mpdd_root.name, image_size=32,
                     val_fraction=0.2, split_seed=3)
    s = make_splits(cfg, save_split_to=tmp_path / "splits")
    train, val = set(s.train.index["image_path"]), set(s.val.index["image_path"])
    assert len(val) == round(0.2 * 54) and len(train) == 54 - len(val) and not train & val
    assert val == set(make_splits(cfg).val.index["image_path"])  # same seed -> same split
    assert val != set(make_splits(cfg.replace(split_seed=4)).val.index["image_path"])
    saved = pd.read_csv(tmp_path / "splits" / "mpdd_metal_plate.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(saved, s.index, check_dtype=False)
    assert set(saved["split"]) == {"train", "val", "test"}


# ------------------------------------------------------------------------------------------ generated dataset
def test_synthetic_splits_and_sample_contract(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate", image_size=48,
                     val_fraction=0.25)
    s = make_splits(cfg)
    n_types = len(synthetic.DEFECT_TYPES["plate"])
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 4 + 2 * n_types)
    cols = ["image_path", "mask_path", "label", "defect_type", "category", "split"]
    assert list(s.index.columns[:6]) == cols
    for ds in (s.train, s.val, s.test):
        assert ds.index["image_path"].is_monotonic_increasing
    for i in range(len(s.test)):
        x = s.test[i]
        assert set(x) == KEYS
        assert x["image"].shape == (3, 48, 48) and x["image"].dtype == torch.float32
        assert x["mask"].shape == (1, 48, 48) and set(x["mask"].unique().tolist()) <= {0.0, 1.0}
        assert x["label"] == int(x["defect_type"] != "good") and x["category"] == "plate"
        assert (x["mask"].sum() > 0) == (x["label"] == 1)
    # the image is ImageNet-normalised: undoing it gives the resized file
    x = s.test[0]
    raw = torch.from_numpy(load_image(x["path"])).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(raw, size=(48, 48), mode="bilinear", antialias=True)[0]
    assert torch.allclose(denormalize(x["image"]), ref.clamp(0, 1), atol=1e-5)
    plain = make_splits(cfg.replace(normalize=False)).test[0]["image"]
    assert torch.allclose(normalize(plain), x["image"], atol=1e-5)


def test_synthetic_empty_root_uses_default_generated_folder(monkeypatch, synthetic_root):
    monkeypatch.setattr(synthetic, "ensure", lambda root=None, **kw: synthetic_root)
    df = build_index(DataConfig(dataset="synthetic", root="", category="weave", image_size=32))
    assert df["image_path"].str.startswith(str(synthetic_root)).all()


def test_synthetic_root_without_params_is_an_error(tmp_path):
    _mvtec_tree(tmp_path)
    with pytest.raises(DataError, match="no generated dataset"):
        build_index(DataConfig(dataset="synthetic", root=str(tmp_path), category="part"))


# -------------------------------------------------------------------------------------------- augmentations
def test_augmented_train_set_is_deterministic_given_the_generator(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="weave", image_size=32,
                     augment=AugmentConfig(hflip=True, vflip=True, rotation_deg=20, color_jitter=0.2))

    def first_two_epochs(seed):
        ds = make_splits(cfg, generator=torch.Generator().manual_seed(seed)).train
        return [ds[i]["image"] for i in range(len(ds))], [ds[i]["image"] for i in range(len(ds))]

    a1, a2 = first_two_epochs(0)
    b1, b2 = first_two_epochs(0)
    c1, _ = first_two_epochs(1)
    assert all(torch.equal(x, y) for x, y in zip(a1 + a2, b1 + b2, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a1, c1, strict=True))  # another seed, other draws
    assert not all(torch.equal(x, y) for x, y in zip(a1, a2, strict=True))  # epochs differ
    ds = make_splits(cfg, generator=torch.Generator().manual_seed(0)).train
    e0 = ds[1]["image"]
    ds.set_epoch(0)
    assert torch.equal(ds[1]["image"], e0)  # set_epoch replays an epoch
    # validation and test are never augmented: they equal the plain (augment-free) datasets
    s, plain = make_splits(cfg), make_splits(cfg.replace(augment=AugmentConfig()))
    assert s.train.augment is not None and s.val.augment is None and s.test.augment is None
    assert torch.equal(s.val[0]["image"], plain.val[0]["image"])
    assert torch.equal(s.test[0]["image"], plain.test[0]["image"])


def test_augment_moves_image_and_mask_together():
    cfg = AugmentConfig(hflip=True, vflip=True)
    mask = torch.zeros(1, 9, 9)
    mask[0, 1:3, 1:5] = 1
    image = torch.cat([mask, torch.rand(2, 9, 9)])  # channel 0 carries the mask
    seen = set()
    for seed in range(12):
        img, m = augment(image, mask, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(img[0], m[0])
        seen.add(tuple(m[0].nonzero()[0].tolist()))
    assert len(seen) == 4  # all four flip combinations occur
    ident, _ = augment(image, mask, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(ident, image)


def test_augment_rotation_matches_rot90_at_90_degrees():
    from mudenet_core.data.transforms import _rotate

    x = torch.rand(3, 9, 9)
    assert torch.allclose(_rotate(x, 90.0, "bilinear"), torch.rot90(x, 1, dims=(1, 2)), atol=1e-5)
    assert torch.equal(_rotate(x, 0.0, "bilinear"), x)  # 0 degrees: the identity
    m = (torch.rand(1, 9, 9) > 0.5).float()
    assert torch.equal(_rotate(m, 90.0, "nearest"), torch.rot90(m, 1, dims=(1, 2)))


@pytest.mark.parametrize("angle", [0.5, 7.0, 15.0, 30.0, 45.0, 60.0, 89.0, 135.0, -20.0, 180.0])
def test_rotation_samples_only_inside_the_image(angle):
    """Zoom-in rotation: no padding at all, so no structure is invented at borders and corners."""
    from mudenet_core.data.transforms import _rotate, rotation_grid, rotation_zoom

    for h, w in ((16, 16), (12, 20)):
        g = rotation_grid(h, w, angle)  # (1, H, W, 2), align_corners=True coordinates
        assert tuple(g.shape) == (1, h, w, 2) and g.abs().max() <= 1.0
        ones = _rotate(torch.ones(3, h, w), angle, "bilinear")  # grid_sample pads with zeros
        torch.testing.assert_close(ones, torch.ones(3, h, w), rtol=0, atol=1e-5)  # never reads a padded pixel
    # the zoom is minimal: the rotated corners of the output reach the source's edge (|coordinate| = 1)
    assert torch.isclose(rotation_grid(16, 16, angle).abs().amax(dim=-1).max(), torch.tensor(1.0), atol=1e-6)
    a = np.radians(angle)
    assert np.isclose(rotation_zoom(16, 16, angle), abs(np.cos(a)) + abs(np.sin(a)))
    m = torch.zeros(1, 16, 16)
    m[0, 3:9, 5:12] = 1
    r = _rotate(m, angle, "nearest")
    assert set(r.unique().tolist()) <= {0.0, 1.0} and r.sum() > 0  # the mask stays binary


def test_augment_rotation_and_jitter_stay_in_range():
    x = torch.rand(3, 16, 16)
    y, m = augment(x, torch.zeros(1, 16, 16), AugmentConfig(rotation_deg=45, color_jitter=0.5),
                   torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y) and m.sum() == 0


def test_augmentation_needs_a_generator():
    idx = pd.DataFrame([dict(image_path="x.png", mask_path="", label=0, defect_type="good", category="c",
                             split="train")])
    with pytest.raises(ValueError, match="Generator"):
        AnomalyDataset(idx, image_size=8, augment=AugmentConfig(hflip=True))
    AnomalyDataset(idx, image_size=8, augment=AugmentConfig())  # identity needs none


def test_augment_tables_and_config_selection():
    assert augment_for("mvtec_ad", "carpet").rotation_deg > 0
    assert not augment_for("mvtec_ad", "transistor").hflip and not augment_for("mvtec_ad", "metal_nut").vflip
    assert augment_for("mvtec_ad", "not_a_category") == AugmentConfig()  # the default
    assert augment_for("no_such_dataset", "x") == AugmentConfig()
    cfg = DataConfig(dataset="mvtec_ad", category="carpet")
    assert cfg.augment_policy == "none" and cfg.resolved_augment() == AugmentConfig()  # one recipe: none
    table = cfg.replace(augment_policy="table")
    assert table.resolved_augment() == augment_for("mvtec_ad", "carpet")  # opt-in per-category table
    explicit = DataConfig.from_dict({"dataset": "mvtec_ad", "category": "carpet", "augment": {"vflip": True},
                                     "augment_policy": "table"})
    assert explicit.resolved_augment() == AugmentConfig(vflip=True)  # an explicit augment wins
    with pytest.raises(ConfigError, match="augment_policy"):
        DataConfig.from_dict({"augment_policy": "paper"})
    with pytest.raises(ConfigError, match="unknown key"):
        DataConfig.from_dict({"datset": "mpdd"})
    with pytest.raises(ConfigError):
        DataConfig.from_dict({"dataset": "imagenet"})
    with pytest.raises(ConfigError, match="rotation_deg"):
        AugmentConfig(rotation_deg=-1)


AUG = AugmentConfig(hflip=True, vflip=True, rotation_deg=15, color_jitter=0.1)


def test_on_the_fly_draws_are_fresh_per_step_and_reproducible():
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    aug = BatchAugmenter(images, AUG, seed=7, normalize=False)
    idx = torch.tensor([3, 1, 4])
    a0, a1 = aug.batch(idx, step=0), aug.batch(idx, step=1)
    assert tuple(a0.shape) == (3, 3, 16, 16) and a0.min() >= 0 and a0.max() <= 1
    assert not any(torch.equal(a0[k], a1[k]) for k in range(3))  # the same image, another step: a new draw
    # the same (seed, step, index) gives the same draw: a fresh augmenter (a resumed run), any batch order
    again = BatchAugmenter(images.clone(), AUG, seed=7, normalize=False)
    assert torch.equal(again.batch(idx, 0), a0)
    assert torch.equal(again.batch(torch.tensor([4, 3]), 0), a0[[2, 0]])
    assert not torch.equal(BatchAugmenter(images, AUG, seed=8, normalize=False).batch(idx, 0), a0)  # seed
    # normalised batches are normalize(draw); an identity augmentation returns the images themselves
    torch.testing.assert_close(BatchAugmenter(images, AUG, seed=7).batch(idx, 0), normalize(a0))
    ident = BatchAugmenter(images, AugmentConfig(), seed=7)
    assert ident.is_identity and torch.equal(ident.batch(idx, 5), normalize(images[idx]))
    assert torch.equal(ident.base(), normalize(images))
    assert derive_seed(7, 0, 3) == derive_seed(7, 0, 3) != derive_seed(7, 1, 3)


def test_training_free_splits_are_unaugmented_like_val(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="weave", image_size=32,
                     augment=AUG)
    s = make_splits(cfg, generator=torch.Generator().manual_seed(0))
    assert s.train.augment == AUG
    plain = s.train_unaugmented
    assert plain.augment is None and len(plain) == len(s.train) and s.train.augment == AUG  # a copy
    # loaded exactly as val/test are: the same images as an augment-free dataset over the train rows
    val_style = AnomalyDataset(s.index[s.index["split"] == "train"], image_size=32)
    for i in range(len(plain)):
        assert torch.equal(plain[i]["image"], val_style[i]["image"])
        assert plain[i]["path"] == s.train[i]["path"]
    assert not torch.equal(s.train[0]["image"], plain[0]["image"])  # the training set itself still augments
    raw = s.train.without_augment(normalize=False)[0]["image"]  # [0, 1]: BatchAugmenter's base images
    assert raw.min() >= 0 and raw.max() <= 1 and torch.equal(normalize(raw), plain[0]["image"])
    # default config: no augmentation at all, train equals its unaugmented copy
    d = make_splits(cfg.replace(augment=None))
    assert d.config.augment_policy == "none" and d.train.augment is None
    assert torch.equal(d.train[0]["image"], d.train_unaugmented[0]["image"])


def test_augmentation_figure_and_its_label():
    from matplotlib.figure import Figure

    fig = augmentation_grid(torch.rand(2, 3, 16, 16), AUG, n_draws=4, seed=0, title="demo")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 5
    assert fig.axes[0].get_title() == "original" and fig.axes[4].get_title() == "draw 4"
    cfg, title = augmentation_example(None, "synthetic", "plate")  # no table entry: the demonstration
    assert cfg == DEMO_AUGMENT and title.startswith("DEMONSTRATION")
    cfg, title = augmentation_example(AugmentConfig(), "synthetic", "weave")  # table entry, not used
    assert cfg == augment_for("synthetic", "weave") and "NOT used" in title and "not the paper" in title
    cfg, title = augmentation_example(AUG, "synthetic", "plate")  # what the run trains with
    assert cfg == AUG and title.startswith("Training augmentation of this run")


def test_denormalize_inverts_normalize():
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(denormalize(normalize(x)), x, atol=1e-6)
    assert torch.allclose(normalize(torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)), torch.zeros(3, 1, 1))


# --------------------------------------------------------------------------------------------- image modes
def test_grayscale_rgba_palette_and_16bit_load_as_rgb(tmp_path):
    g = _png(tmp_path / "g.png", np.full((4, 6), 51, dtype=np.uint8))
    np.testing.assert_allclose(load_image(g), np.full((4, 6, 3), 0.2), atol=1e-6)
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10  # alpha is dropped, colour kept
    out = load_image(_png(tmp_path / "a.png", rgba))
    assert out.shape == (4, 6, 3) and np.allclose(out[..., 0], 1.0) and np.allclose(out[..., 1:], 0.0)
    p = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png")
    np.testing.assert_allclose(load_image(tmp_path / "p.png")[0, 1], [1.0, 0.0, 0.0])
    v16 = np.full((4, 6), 1000, dtype=np.uint16)  # 1000/65535 = 0.01526; the high byte alone would give 3/255
    x = load_image(_png(tmp_path / "s16.png", v16))
    assert x.shape == (4, 6, 3) and np.allclose(x, 1000 / 65535, atol=1e-6)
    assert np.allclose(load_image(_png(tmp_path / "max16.png", np.full((2, 2), 65535, np.uint16))), 1.0)
    tifffile = pytest.importorskip("tifffile")
    rgb16 = np.zeros((4, 6, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 1000, 32768, 65535
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)
    np.testing.assert_allclose(load_image(tmp_path / "rgb16.tif")[0, 0], [1000 / 65535, 32768 / 65535, 1.0],
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_missing_split_folders_name_the_path(tmp_path):
    root = _mvtec_tree(tmp_path)
    shutil.rmtree(root / "part" / "test")
    with pytest.raises(DataError, match=r"missing test folder: .*part[/\\]test"):
        index_mvtec_ad(root, "part")
    shutil.rmtree(root / "part" / "train")
    with pytest.raises(DataError, match=r"missing train/good folder: .*part[/\\]train[/\\]good"):
        index_mvtec_ad(root, "part")
    with pytest.raises(DataError, match=r"category folder not found: .*nope.*\['part'\]"):
        index_mvtec_ad(root, "nope")
    with pytest.raises(DataError, match="dataset root not found"):
        index_mvtec_ad(tmp_path / "absent", "part")


def test_empty_category_is_an_error(tmp_path):
    root = _mvtec_tree(tmp_path)
    for p in (root / "part" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"no images in train/good folder .*train[/\\]good"):
        index_mvtec_ad(root, "part")


def test_undecodable_image_names_the_file(tmp_path):
    root = _mvtec_tree(tmp_path)
    bad = root / "part" / "train" / "good" / "002.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"002\.png: not a readable image"):
        index_mvtec_ad(root, "part")
    # without header validation, the error comes when the image is read
    ds = AnomalyDataset(index_mvtec_ad(root, "part", validate=False).query("split == 'train'"), image_size=16)
    with pytest.raises(DataError, match=r"002\.png: the image cannot be decoded"):
        ds[2]
    # a truncated file has a valid header but does not decode
    good = root / "part" / "train" / "good" / "001.png"
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match=r"001\.png"):
        ds[1]


def test_defect_without_mask_or_with_wrong_size_mask(tmp_path):
    root = _mvtec_tree(tmp_path)
    (root / "part" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"image .*crack[/\\]001\.png has no mask \(expected .*001_mask\.png"):
        index_mvtec_ad(root, "part")
    _png(root / "part" / "ground_truth" / "crack" / "001_mask.png", _mask(16, 16))
    with pytest.raises(DataError, match=r"mask .*001_mask\.png has size 16x16 but its image .* is 32x32"):
        index_mvtec_ad(root, "part")


# --------------------------------------------------------------------------------------------- MVTec LOCO
def _loco_tree(root: Path, with_config=True) -> Path:
    """pushpins: 40x40 images; masks with pixel values 255 (relative 0.5) and 100 (absolute 40 px)."""
    cat = root / "pushpins"
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png", _rgb(40, 40, 100 + i))
    for i in range(2):
        _png(cat / "validation" / "good" / f"{i:03d}.png", _rgb(40, 40, 120 + i))
        _png(cat / "test" / "good" / f"{i:03d}.png", _rgb(40, 40, 90))
    _png(cat / "test" / "logical_anomalies" / "000.png", _rgb(40, 40, 200))
    _png(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", _mask(40, 40, (0, 10, 0, 10), 255))
    _png(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", _mask(40, 40, (20, 40, 20, 40), 100))
    _png(cat / "test" / "logical_anomalies" / "001.png", _rgb(40, 40, 200))
    _png(cat / "ground_truth" / "logical_anomalies" / "001" / "000.png", _mask(40, 40, (0, 4, 0, 40), 100))
    _png(cat / "test" / "structural_anomalies" / "000.png", _rgb(40, 40, 210))
    gt = cat / "ground_truth"
    _png(gt / "structural_anomalies" / "000" / "000.png", _mask(40, 40, (10, 30, 10, 30), 255))
    if with_config:
        (cat / "defects_config.json").write_text(json.dumps([
            {"defect_name": "missing_pin", "pixel_value": 255, "saturation_threshold": 0.5,
             "relative_saturation": True},
            {"defect_name": "extra_pin", "pixel_value": 100, "saturation_threshold": 40,
             "relative_saturation": False},
        ]))
    return root


def test_mvtec_loco_splits_subsets_and_masks(tmp_path):
    root = _loco_tree(tmp_path)
    s = make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=20,
                               val_fraction=0.5))
    assert (len(s.train), len(s.val), len(s.test)) == (3, 2, 5)  # val is validation/good, not carved
    assert all("validation" in p for p in s.val.index["image_path"])
    assert isinstance(s.test, MVTecLOCOTestDataset) and not hasattr(s.val, "spro_regions")
    t = s.test.index
    assert t["subset"].tolist() == ["good", "good", "logical", "logical", "structural"]
    assert len(s.test.subset("logical")) == 4 and len(s.test.subset("structural")) == 3
    x = s.test[2]  # logical 000: the union of both masks, resized 40 -> 20 with nearest
    want = np.zeros((20, 20), bool)
    want[0:5, 0:5] = want[10:20, 10:20] = True
    assert x["label"] == 1 and np.array_equal(x["mask"][0].numpy() > 0.5, want)


def test_mvtec_loco_spro_saturation_thresholds(tmp_path):
    root = _loco_tree(tmp_path)
    s = make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=20))
    regions = s.test.spro_regions()
    assert [len(r) for r in regions] == [0, 0, 2, 1, 1]
    (r1, t1), (r2, t2) = regions[2]
    assert r1.shape == (20, 20) and r1.dtype == bool
    # relative: 0.5 of the region's area at evaluation size (10x10 -> 5x5 = 25 px)
    assert r1.sum() == 25 and t1 == pytest.approx(12.5)
    # absolute: 40 px at 40x40 -> 40 * (20*20)/(40*40) = 10 px at 20x20 (region 10x10 = 100 px)
    assert r2.sum() == 100 and t2 == pytest.approx(10.0)
    (r3, t3), = regions[3]  # absolute again: 4x40 -> 2x20 = 40 px region, threshold 10 px
    assert r3.sum() == 40 and t3 == pytest.approx(10.0)
    (r4, t4), = regions[4]
    assert r4.sum() == 100 and t4 == pytest.approx(50.0)
    small = make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=8))
    (q, tq), = small.test.spro_regions()[3]  # 4x40 -> 1x8 = 8 px; 40 * 64/1600 = 1.6
    assert q.sum() == 8 and tq == pytest.approx(1.6)
    # an absolute threshold larger than the region is capped at the region's area
    cfg_path = root / "pushpins" / "defects_config.json"
    entries = json.loads(cfg_path.read_text())
    entries[1]["saturation_threshold"] = 4000
    cfg_path.write_text(json.dumps(entries))
    capped = make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=20))
    (r, t), = capped.test.spro_regions()[3]
    assert t == r.sum() == 40


def test_mvtec_loco_without_defects_config_saturates_at_full_area(tmp_path):
    root = _loco_tree(tmp_path, with_config=False)
    s = make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=20))
    for regs in s.test.spro_regions():
        for region, thr in regs:
            assert thr == region.sum()


def test_mvtec_loco_bad_inputs(tmp_path):
    root = _loco_tree(tmp_path)
    cat = root / "pushpins"
    (cat / "defects_config.json").write_text(json.dumps([{"defect_name": "x", "pixel_value": 255}]))
    with pytest.raises(DataError, match="defects_config.json: each entry needs keys"):
        make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=20))
    (cat / "defects_config.json").write_text(json.dumps([
        {"defect_name": "x", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True}]))
    s = make_splits(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins", image_size=20))
    with pytest.raises(DataError, match=r"001\.png has pixel value 100, which .*defects_config\.json does"):
        s.test.spro_regions()
    shutil.rmtree(cat / "ground_truth" / "structural_anomalies" / "000")
    with pytest.raises(DataError, match=r"structural_anomalies[/\\]000\.png has no mask"):
        build_index(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins"))
    shutil.rmtree(cat / "validation")
    with pytest.raises(DataError, match=r"missing validation/good folder"):
        build_index(DataConfig(dataset="mvtec_loco", root=str(root), category="pushpins"))


# ---------------------------------------------------------------------------------------------------- VisA
def _visa_tree(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _png(root / rel, _rgb(30, 40, 100 + i))  # PNG bytes under a .JPG name decode fine
            rows.append(f"{obj},train,normal,{rel},")
        rel = f"{obj}/Data/Images/Normal/0100.JPG"
        _png(root / rel, _rgb(30, 40, 90))
        rows.append(f"{obj},test,normal,{rel},")
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _png(root / rel, _rgb(30, 40, 200))
            _png(root / mrel, _mask(30, 40, (0, 6, 0, 8), 3))  # VisA masks hold class ids, not 255
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_loader(tmp_path):
    root = _visa_tree(tmp_path)
    s = make_splits(DataConfig(dataset="visa", root=str(root), category="candle", image_size=20,
                               val_fraction=0.34))
    assert (len(s.train), len(s.val), len(s.test)) == (2, 1, 3)
    assert s.test.index["label"].tolist() == [1, 1, 0]
    assert s.test.index["defect_type"].tolist() == ["anomaly", "anomaly", "good"]
    assert s.index["category"].eq("candle").all() and not s.index["image_path"].str.contains("pcb1").any()
    x = s.test[0]
    want = np.zeros((20, 20), bool)  # rows 0:6 of 30 -> 0:4 of 20, cols 0:8 of 40 -> 0:4 of 20
    want[0:4, 0:4] = True
    assert np.array_equal(x["mask"][0].numpy() > 0.5, want)
    with pytest.raises(DataError, match=r"1cls\.csv: no rows for category 'fryum' \(categories: \['candle'"):
        build_index(DataConfig(dataset="visa", root=str(root), category="fryum"))


def test_visa_bad_inputs(tmp_path):
    root = _visa_tree(tmp_path)
    (root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(DataError, match=r"defect image .*001\.JPG has no mask \(expected .*001\.png"):
        build_index(DataConfig(dataset="visa", root=str(root), category="candle"))
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,train,x.png\n")
    with pytest.raises(DataError, match=r"1cls\.csv: missing column\(s\) \['label', 'mask'\]"):
        build_index(DataConfig(dataset="visa", root=str(root), category="candle"))
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"split file not found: .*split_csv[/\\]1cls\.csv"):
        build_index(DataConfig(dataset="visa", root=str(root), category="candle"))


# -------------------------------------------------------------------------------------------------- folder
def test_folder_dataset(tmp_path):
    for i in range(10):
        _png(tmp_path / "ok" / f"n{i}.png", _rgb(value=100 + i))
    for i in range(3):
        _png(tmp_path / "bad" / f"a{i}.png", _rgb(value=200))
        _png(tmp_path / "gt" / f"a{i}_mask.png", _mask())
    cfg = DataConfig(dataset="folder", root=str(tmp_path), category="widget", image_size=16,
                     val_fraction=0.25, folder_normal_dir="ok", folder_anomaly_dir="bad",
                     folder_mask_dir="gt", folder_mask_suffix="_mask", folder_test_fraction=0.2)
    s = make_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 2 + 3)
    paths = [set(d.index["image_path"]) for d in (s.train, s.val, s.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert s.test.index["label"].sum() == 3 and s.test.index["defect_type"].isin(["bad", "good"]).all()
    assert all(s.test[i]["mask"].sum() > 0 for i in range(len(s.test)) if s.test[i]["label"] == 1)
    (tmp_path / "gt" / "a1_mask.png").unlink()
    with pytest.raises(DataError, match=r"defect image .*a1\.png has no mask"):
        build_index(cfg)
    no_masks = make_splits(cfg.replace(folder_mask_dir=""))  # image-level only: zero masks
    assert all(no_masks.test[i]["mask"].sum() == 0 for i in range(len(no_masks.test)))


# ----------------------------------------------------------------------------------------------------- DTD
def test_dtd_textures_are_drawn_from_the_generator(dtd_root):
    tex = DTDTextures(dtd_root, size=32)
    assert len(tex.classes) == 10 and len(tex) > 100
    a = tex.sample_batch(3, torch.Generator().manual_seed(0))
    b = tex.sample_batch(3, torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    one = DTDTextures(dtd_root.parent, size=8, classes=["banded"])  # the DTD folder itself works too
    assert all(p.parent.name == "banded" for p in one.paths)
    with pytest.raises(DataError, match="not found"):
        DTDTextures(dtd_root, size=8, classes=["no_such_class"])
