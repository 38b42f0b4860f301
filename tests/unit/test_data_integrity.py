"""Data that is wrong but decodes, corrupt files found before training, and huge images.

Masks are checked when a dataset is indexed (background 0, a label mask, not empty for defect images), every
image is decoded once when the splits are made and kept in memory (items bit-identical to reading the files),
and images above a pixel limit fail with a one-line DataError instead of PIL's DecompressionBombError.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from mudenet_core.config import ConfigError
from mudenet_core.data import AugmentConfig, DataConfig, DataError, build_index, load_image, make_splits
from mudenet_core.data import datasets as datasets_module
from mudenet_core.data.images import image_size

pytestmark = pytest.mark.usefixtures("one_thread")

BOX = (4, 12, 6, 20)  # rows 4:12, columns 6:20 of a 32 x 32 image: the defect of the hand-made masks


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _noise(h=32, w=32, seed=0) -> np.ndarray:
    """An RGB uint8 image of noise (PNG cannot compress it, so a truncated file loses pixel data)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _box_mask(h=32, w=32, box=BOX, value=255, background=0) -> np.ndarray:
    m = np.full((h, w), background, dtype=np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = value
    return m


def _mvtec_tree(root: Path, n_train=6) -> Path:
    """MVTec AD layout, category "part": noise images, 2 good and 2 "crack" test images with 0/255 masks."""
    cat = root / "part"
    for i in range(n_train):
        _png(cat / "train" / "good" / f"{i:03d}.png", _noise(seed=i))
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png", _noise(seed=100 + i))
        _png(cat / "test" / "crack" / f"{i:03d}.png", _noise(seed=200 + i))
        _png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", _box_mask())
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="mvtec_ad", root=str(root), category="part", image_size=16, **kw)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height but which holds one row of pixels: nothing big is allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * (width + 1))  # filter byte + one row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# -------------------------------------------------------------------------------- 1. masks that are wrong
def test_mask_with_nonzero_background_is_an_error_naming_the_file(tmp_path):
    root = _mvtec_tree(tmp_path)
    bad = _png(root / "part" / "ground_truth" / "crack" / "001_mask.png", _box_mask(background=3))
    with pytest.raises(DataError, match=r"001_mask\.png: its background .* is 3, not 0") as e:
        build_index(_cfg(root))
    assert str(bad) in str(e.value) and "strict=False" in str(e.value) and "\n" not in str(e.value)


def test_inverted_mask_is_an_error(tmp_path):
    root = _mvtec_tree(tmp_path)
    _png(root / "part" / "ground_truth" / "crack" / "000_mask.png", _box_mask(value=0, background=255))
    with pytest.raises(DataError, match=r"000_mask\.png: its background .* is 255, not 0"):
        build_index(_cfg(root))


def test_all_zero_mask_of_a_defect_image_is_an_error(tmp_path):
    root = _mvtec_tree(tmp_path)
    _png(root / "part" / "ground_truth" / "crack" / "000_mask.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match=r"000_mask\.png: empty \(no defect pixel\), but .*crack[/\\]000\.png"
                                        r" is a defect image"):
        build_index(_cfg(root))


def test_lossy_mask_is_an_error(tmp_path):
    root = _mvtec_tree(tmp_path)
    soft = _box_mask().astype(np.float64)
    soft[3, 5:21] = np.linspace(1, 120, 16)  # a blurred edge: many grey levels next to the box
    _png(root / "part" / "ground_truth" / "crack" / "000_mask.png", soft.astype(np.uint8))
    with pytest.raises(DataError, match=r"000_mask\.png: it holds 18 distinct values"):
        build_index(_cfg(root))


def test_not_strict_warns_naming_the_file_and_uses_the_mask_as_well_as_possible(tmp_path):
    root = _mvtec_tree(tmp_path)
    gt = root / "part" / "ground_truth" / "crack"
    _png(gt / "000_mask.png", _box_mask(background=3))  # background 3, defect 255
    lossy = _box_mask().astype(np.int64)
    lossy[BOX[0]:BOX[1], BOX[2]:BOX[3]] -= np.arange(20)[:, None][:8]  # defect 236..255
    lossy[20:22, :] = np.arange(32)[None] % 20  # background noise 0..19, far below half of 255
    _png(gt / "001_mask.png", lossy.astype(np.uint8))
    cfg = DataConfig(dataset="mvtec_ad", root=str(root), category="part", image_size=32, strict=False)
    with pytest.warns(UserWarning, match=r"2 mask\(s\) break the mask rule") as rec:
        s = make_splits(cfg)
    message = str(rec[0].message)
    assert "000_mask.png: its background" in message and "001_mask.png: it holds" in message
    want = torch.from_numpy(_box_mask() > 0)
    defects = [i for i in range(len(s.test)) if s.test[i]["label"] == 1]
    assert len(defects) == 2
    for i in defects:  # both masks read as the hand-made box, not as "everything is defective"
        assert torch.equal(s.test[i]["mask"][0] > 0.5, want)


def test_valid_masks_of_every_layout_pass_without_a_warning(tmp_path):
    # MVTec AD / MPDD style 0/255, a defect covering most of the image (a flipped part) but not its border,
    # and a defect touching one edge
    root = _mvtec_tree(tmp_path / "mvtec")
    gt = root / "part" / "ground_truth" / "crack"
    _png(gt / "000_mask.png", _box_mask(box=(2, 30, 2, 30)))  # 77% of the image
    _png(gt / "001_mask.png", _box_mask(box=(0, 32, 0, 6)))  # the whole left edge
    # VisA: 0/1 and several class ids in one mask
    visa = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        _png(visa / f"candle/Normal/{i}.JPG", _noise(seed=i))
        rows.append(f"candle,train,normal,candle/Normal/{i}.JPG,")
    _png(visa / "candle/Normal/9.JPG", _noise(seed=9))
    rows.append("candle,test,normal,candle/Normal/9.JPG,")
    ids = _box_mask(value=1)
    ids[20:24, 20:24] = 2
    for i, m in enumerate([_box_mask(value=1), ids]):
        _png(visa / f"candle/Anomaly/{i}.JPG", _noise(seed=50 + i))
        _png(visa / f"candle/Masks/{i}.png", m)
        rows.append(f"candle,test,anomaly,candle/Anomaly/{i}.JPG,candle/Masks/{i}.png")
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    # MVTec LOCO: one mask per defect, pixel values = defect ids; an empty file beside a non-empty one is fine
    loco = tmp_path / "loco"
    cat = loco / "pushpins"
    for folder in ("train/good", "validation/good", "test/good"):
        for i in range(2):
            _png(cat / folder / f"{i:03d}.png", _noise(seed=i))
    _png(cat / "test" / "logical_anomalies" / "000.png", _noise(seed=7))
    masks = cat / "ground_truth" / "logical_anomalies" / "000"
    _png(masks / "000.png", _box_mask(value=255))
    _png(masks / "001.png", _box_mask(box=(20, 30, 0, 10), value=100))
    _png(masks / "002.png", np.zeros((32, 32), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_index(_cfg(root))
        assert (build_index(DataConfig(dataset="visa", root=str(visa), category="candle", val_fraction=0.0))
                ["label"].sum() == 2)
        s = make_splits(DataConfig(dataset="mvtec_loco", root=str(loco), category="pushpins", image_size=32))
    x = s.test[s.test.index["label"].tolist().index(1)]
    want = torch.from_numpy((_box_mask() > 0) | (_box_mask(box=(20, 30, 0, 10)) > 0))
    assert torch.equal(x["mask"][0] > 0.5, want)


def test_loco_mask_with_nonzero_background_strict_and_not(tmp_path):
    cat = tmp_path / "pushpins"
    for folder in ("train/good", "validation/good", "test/good"):
        _png(cat / folder / "000.png", _noise())
    _png(cat / "test" / "structural_anomalies" / "000.png", _noise(seed=3))
    bad = _png(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", _box_mask(background=3))
    (cat / "defects_config.json").write_text(json.dumps([{"defect_name": "x", "pixel_value": 255,
                                                          "saturation_threshold": 1.0,
                                                          "relative_saturation": True}]))
    cfg = DataConfig(dataset="mvtec_loco", root=str(tmp_path), category="pushpins", image_size=32)
    with pytest.raises(DataError, match=r"structural_anomalies[/\\]000[/\\]000\.png: its background .* is 3"):
        build_index(cfg)
    with pytest.warns(UserWarning, match=str(bad.name)):
        s = make_splits(cfg.replace(strict=False))
    (region, thr), = s.test.spro_regions()[1]  # the 255 box only: the background 3 is no defect region
    assert np.array_equal(region, _box_mask() > 0) and thr == region.sum()


# --------------------------------------------------------------- 2. corrupt files, found before training
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_corrupt_image_fails_when_the_splits_are_made(tmp_path, split):
    root = _mvtec_tree(tmp_path)
    cfg = _cfg(root, val_fraction=0.34)
    df = build_index(cfg)
    victim = Path(df.loc[df["split"] == split, "image_path"].iloc[0])
    victim.write_bytes(victim.read_bytes()[:1500])  # the header survives, the pixel data does not
    assert image_size(victim) == (32, 32)
    build_index(cfg)  # header checks cannot see it
    with pytest.raises(DataError, match=r"the image cannot be decoded") as e:
        make_splits(cfg)
    assert str(victim) in str(e.value) and "\n" not in str(e.value)


def test_every_image_is_decoded_once_up_front_and_never_again(tmp_path, monkeypatch):
    root = _mvtec_tree(tmp_path)
    calls = []
    real = datasets_module.load_image

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(datasets_module, "load_image", counting)
    s = make_splits(_cfg(root, val_fraction=0.34))
    assert sorted(calls) == sorted(s.index["image_path"])  # each image once, when the splits are made
    calls.clear()
    for ds in (s.train, s.val, s.test, s.train_unaugmented):
        for i in range(len(ds)):
            ds[i]
    assert calls == []
    lazy = make_splits(_cfg(root, val_fraction=0.34, preload=False))
    assert calls == [] and lazy.test[0]["image"].shape == (3, 16, 16) and len(calls) == 1


def _items(ds, epochs=1):
    out = []
    for _ in range(epochs):
        out += [ds[i] for i in range(len(ds))]
    return out


@pytest.mark.parametrize("size", [64, 48])  # 64: the files' own size (kept as uint8), 48: resized (float32)
@pytest.mark.parametrize("normalize", [True, False])
def test_preloaded_items_are_bit_identical_to_reading_the_files(synthetic_root, size, normalize):
    aug = AugmentConfig(hflip=True, vflip=True, rotation_deg=15, color_jitter=0.2)
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate", image_size=size,
                     val_fraction=0.25, normalize=normalize, augment=aug)
    cached = make_splits(cfg, generator=torch.Generator().manual_seed(5))
    files = make_splits(cfg.replace(preload=False), generator=torch.Generator().manual_seed(5))
    assert cached.test.preloaded and not files.test.preloaded
    pairs = [(cached.train, files.train, 2), (cached.train_unaugmented, files.train_unaugmented, 1),
             (cached.train.without_augment(normalize=False), files.train.without_augment(normalize=False), 1),
             (cached.val, files.val, 1), (cached.test, files.test, 1)]
    for a, b, epochs in pairs:
        for x, y in zip(_items(a, epochs), _items(b, epochs), strict=True):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
            assert {k: x[k] for k in ("label", "path", "category", "defect_type")} == \
                   {k: y[k] for k in ("label", "path", "category", "defect_type")}
    assert any(x["mask"].sum() > 0 for x in _items(cached.test))
    # memory: uint8 where exact (images at their own size), else float32; masks as bool, only where they exist
    n = len(cached.index)
    n_masks = int((cached.index["mask_path"] != "").sum())
    per_pixel = 1 if size == 64 else 4
    total = sum(d.cache_nbytes for d in (cached.train, cached.val, cached.test))
    assert total == n * 3 * size * size * per_pixel + n_masks * size * size


def test_uint8_cache_is_smaller_and_rounds_to_a_grey_level(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="weave", image_size=48,
                     normalize=False, val_fraction=0.25)
    exact, small = make_splits(cfg), make_splits(cfg.replace(preload_dtype="uint8"))
    assert small.test.cache_nbytes < exact.test.cache_nbytes / 3
    for x, y in zip(_items(exact.test), _items(small.test), strict=True):
        assert (x["image"] - y["image"]).abs().max() <= 0.5 / 255 + 1e-6 and torch.equal(x["mask"], y["mask"])


def test_a_long_preload_shows_one_progress_bar(tmp_path, monkeypatch):
    root = _mvtec_tree(tmp_path)
    bars = []
    real = datasets_module.progress

    def recording(*args, **kw):
        bars.append(kw)
        return real(*args, **{**kw, "enabled": False})

    monkeypatch.setattr(datasets_module, "progress", recording)
    monkeypatch.setattr(datasets_module, "PRELOAD_PROGRESS_MIN", 5)
    s = make_splits(_cfg(root))
    assert len(bars) == 1 and bars[0]["total"] == len(s.index) == 10 and bars[0]["enabled"]
    make_splits(_cfg(root), show_progress=False)
    assert not bars[1]["enabled"]


# ------------------------------------------------------------------------------------- 3. huge images
def test_a_196_megapixel_image_is_a_one_line_data_error(tmp_path):
    p = _png_header_only(tmp_path / "huge.png", 14000, 14000)
    assert image_size(p) == (14000, 14000)  # the header is fine
    with pytest.raises(DataError, match=r"huge\.png: the image is 14000x14000 \(196000000 pixels\), above "
                                        r"the limit of 100000000 pixels") as e:
        load_image(p)
    assert "max_image_pixels" in str(e.value) and "max_pixels=" in str(e.value) and "\n" not in str(e.value)


def test_a_huge_image_in_a_dataset_fails_when_indexing(tmp_path):
    root = _mvtec_tree(tmp_path)
    huge = _png_header_only(root / "part" / "train" / "good" / "003.png", 14000, 14000)
    with pytest.raises(DataError, match=r"003\.png: the image is 14000x14000 .*DataConfig\.max_image_pixels"):
        build_index(_cfg(root))
    assert str(huge) in build_index(_cfg(root, max_image_pixels=0))["image_path"].tolist()  # 0 = no limit


def test_the_pixel_limit_is_configurable_and_enforced_when_loading(tmp_path):
    p = _png(tmp_path / "small.png", _noise(30, 40))  # 40 x 30 = 1200 pixels
    with pytest.raises(DataError, match=r"small\.png: the image is 40x30 \(1200 pixels\), above the limit of "
                                        r"1000 pixels"):
        load_image(p, max_pixels=1000)
    assert load_image(p, max_pixels=1200).shape == load_image(p, max_pixels=0).shape == (30, 40, 3)
    root = _mvtec_tree(tmp_path / "data")  # 32 x 32 = 1024 pixel images
    with pytest.raises(DataError, match=r"000\.png: the image is 32x32 \(1024 pixels\), above the limit of "
                                        r"1000 pixels"):
        build_index(_cfg(root, max_image_pixels=1000))
    with pytest.raises(DataError, match=r"the image is 32x32 \(1024 pixels\), above the limit of 1000"):
        make_splits(_cfg(root, max_image_pixels=1000, validate=False))  # not indexed: the load refuses it
    assert len(make_splits(_cfg(root, max_image_pixels=1024)).test) == 4


def test_pils_own_limit_neither_fires_nor_changes(tmp_path, monkeypatch):
    p = _png(tmp_path / "x.png", _noise())  # 1024 pixels: a "decompression bomb" for PIL's limit of 100
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(PIL.Image.DecompressionBombError):
        Image.open(p)
    assert load_image(p).shape == (32, 32, 3) and image_size(p) == (32, 32)  # one limit: max_pixels
    with pytest.raises(DataError, match=r"x\.png: the image is 32x32"):
        load_image(p, max_pixels=500)
    assert PIL.Image.MAX_IMAGE_PIXELS == 100


def _gradient(h, w) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = [x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)]
    return np.stack(rgb, axis=2).astype(np.uint8)  # (H, W, 3)


def test_reduce_to_decodes_large_images_reduced(tmp_path):
    img = _gradient(300, 400)
    png = _png(tmp_path / "big.png", img)
    jpg = tmp_path / "big.jpg"
    Image.fromarray(img).save(jpg, quality=95)
    # PNG: decoded in full, then box-averaged by the largest factor keeping both sides >= 64: 300 // 64 = 4
    want = np.asarray(Image.fromarray(img).reduce(4), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(load_image(png, reduce_to=64), want)
    # JPEG: the codec decodes at 1/4 scale; close to the box-averaged full decode
    small = load_image(jpg, reduce_to=64)
    assert small.shape == (75, 100, 3) and np.abs(small - want).mean() < 0.02
    assert load_image(jpg, reduce_to=150).shape == (150, 200, 3)  # 1/2 scale keeps both sides >= 150
    assert load_image(jpg, reduce_to=151).shape == (300, 400, 3)  # 1/2 would not: full size
    # the limit applies to what is decoded: the reduced size for JPEG, the full size otherwise
    assert load_image(jpg, max_pixels=10_000, reduce_to=64).shape == (75, 100, 3)
    with pytest.raises(DataError, match=r"big\.jpg: the image is 400x300 .*reduce_to="):
        load_image(jpg, max_pixels=10_000)
    with pytest.raises(DataError, match=r"big\.png: the image is 400x300"):
        load_image(png, max_pixels=10_000, reduce_to=64)
    with pytest.raises(DataError, match=r"big\.jpg: the image decodes reduced to 100x75 \(7500 pixels\)"):
        load_image(jpg, max_pixels=5000, reduce_to=64)
    # 16-bit PNG and TIFF reduce as well
    g16 = (np.arange(300 * 400).reshape(300, 400) % 65536).astype(np.uint16)
    assert load_image(_png(tmp_path / "g16.png", g16), reduce_to=64).shape == (75, 100, 3)
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "big.tif", img)
    np.testing.assert_allclose(load_image(tmp_path / "big.tif", reduce_to=64), want, atol=0.5 / 255 + 1e-6)


def test_reduce_on_load_in_a_dataset_keeps_masks_at_full_resolution(tmp_path):
    cat = tmp_path / "part"
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png", _gradient(128, 128))
    _png(cat / "test" / "good" / "000.png", _gradient(128, 128))
    _png(cat / "test" / "crack" / "000.png", _gradient(128, 128))
    _png(cat / "ground_truth" / "crack" / "000_mask.png", _box_mask(128, 128, (16, 48, 24, 80)))
    cfg = DataConfig(dataset="mvtec_ad", root=str(tmp_path), category="part", image_size=32, normalize=False,
                     val_fraction=0.0)
    full, reduced = make_splits(cfg), make_splits(cfg.replace(reduce_on_load=True))
    for x, y in zip(_items(full.test), _items(reduced.test), strict=True):
        assert y["image"].shape == (3, 32, 32) and (x["image"] - y["image"]).abs().max() < 0.02
        assert torch.equal(x["mask"], y["mask"])
    assert reduced.test[0]["mask"].sum() == 8 * 14  # the box 32x56 at 128 px is 8x14 at 32 px


# ---------------------------------------------------------------------------------- 4. config range checks
@pytest.mark.parametrize("field, value", [("max_image_pixels", -1), ("max_image_pixels", 1.5),
                                          ("max_image_pixels", True), ("strict", "no"), ("preload", 1),
                                          ("reduce_on_load", None), ("preload_dtype", "float16")])
def test_new_data_config_values_are_range_checked(field, value):
    with pytest.raises(ConfigError, match=f"DataConfig.{field}"):
        DataConfig(**{field: value})


def test_new_data_config_values_load_from_strings():
    cfg = DataConfig().with_overrides(["strict=false", "preload=false", "max_image_pixels=0",
                                       "preload_dtype=uint8", "reduce_on_load=true"])
    assert (cfg.strict, cfg.preload, cfg.max_image_pixels, cfg.preload_dtype, cfg.reduce_on_load) == \
           (False, False, 0, "uint8", True)
    assert DataConfig().max_image_pixels == 100_000_000 and DataConfig().strict and DataConfig().preload


def test_cmyk_tiff_decodes_to_the_rgb_pil_gives(tmp_path):
    """A CMYK TIFF is converted as PIL converts it (tifffile alone would read C, M, Y as R, G, B)."""
    import numpy as np
    from PIL import Image

    from mudenet_core.data.images import load_image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (200, 30, 30)
    rgb[:, 4:] = (20, 180, 60)
    p = tmp_path / "cmyk.tif"
    Image.fromarray(rgb).convert("CMYK").save(p)
    expected = np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0
    np.testing.assert_allclose(load_image(p), expected, atol=1e-6)
    assert load_image(p)[0, 0, 0] > 0.5  # red stays red (raw C of red is near 0)
