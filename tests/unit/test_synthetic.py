"""The generated dataset: layout, determinism, exact masks, normal variation, generate-once semantics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mudenet_core.data import DataError, synthetic

SMALL = dict(image_size=64, n_train=12, n_test_good=4, n_test_per_defect=2, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_params(synthetic_root):
    params = json.loads((synthetic_root / synthetic.PARAMS_FILE).read_text())
    assert params == {"generator_version": synthetic.GENERATOR_VERSION,
                      "categories": list(synthetic.CATEGORIES), **SMALL}
    assert len(synthetic.CATEGORIES) >= 2
    for cat in synthetic.CATEGORIES:
        c = synthetic_root / cat
        assert len(list((c / "train" / "good").glob("*.png"))) == 12
        assert len(list((c / "test" / "good").glob("*.png"))) == 4
        assert len(synthetic.DEFECT_TYPES[cat]) >= 4
        for t in synthetic.DEFECT_TYPES[cat]:
            imgs = sorted((c / "test" / t).glob("*.png"))
            assert len(imgs) == 2
            for p in imgs:
                m = np.asarray(Image.open(c / "ground_truth" / t / f"{p.stem}_mask.png"))
                assert m.shape == (64, 64) and set(np.unique(m)) == {0, 255}
                assert Image.open(p).size == (64, 64) and Image.open(p).mode == "RGB"


def test_written_files_match_render_sample(synthetic_root):
    for cat in synthetic.CATEGORIES:
        t = synthetic.DEFECT_TYPES[cat][-1]
        clean, img, mask = synthetic.render_sample(cat, t, image_size=64, seed=0, index=1)
        assert np.array_equal(np.asarray(Image.open(synthetic_root / cat / "test" / t / "001.png")), img)
        written = np.asarray(Image.open(synthetic_root / cat / "ground_truth" / t / "001_mask.png")) > 0
        assert np.array_equal(written, mask)
        _, good, _ = synthetic.render_sample(cat, "good", image_size=64, seed=0, index=3, split="train")
        written = np.asarray(Image.open(synthetic_root / cat / "train" / "good" / "003.png"))
        assert np.array_equal(written, good)


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    kw = dict(image_size=32, n_train=3, n_test_good=1, n_test_per_defect=1)
    a = _files(synthetic.generate(tmp_path / "a", seed=7, **kw))
    b = _files(synthetic.generate(tmp_path / "b", seed=7, **kw))
    c = _files(synthetic.generate(tmp_path / "c", seed=8, **kw))
    assert a == b
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != c[k] for k in pngs)  # every image changes with the seed


@pytest.mark.parametrize("size", [64, 160])
@pytest.mark.parametrize("category", synthetic.CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category, size):
    for t in synthetic.DEFECT_TYPES[category]:
        for index in range(3):
            clean, img, mask = synthetic.render_sample(category, t, image_size=size, seed=1, index=index)
            diff = np.abs(img.astype(int) - clean.astype(int)).max(axis=2)
            assert np.array_equal(diff > 0, mask), f"{category}/{t}/{index}: mask != changed pixels"
            assert diff[mask].min() > synthetic.CHANGE_THRESHOLD  # every masked pixel visibly changed
            assert 3 <= mask.sum() <= 0.1 * size * size, f"{category}/{t}: implausible area {mask.sum()}"


def test_good_images_vary_but_stay_normal():
    for cat in synthetic.CATEGORIES:
        imgs = [synthetic.render_sample(cat, image_size=64, index=i, split="train")[1].astype(float)
                for i in range(6)]
        diffs = [np.abs(imgs[0] - x).mean() for x in imgs[1:]]
        assert min(diffs) > 2.0  # pose, light and noise differ between normal images (grey levels)
        means = [x.mean() for x in imgs]
        assert np.std(means) < 0.1 * np.mean(means)  # ...but they are the same kind of image
        _, good, mask = synthetic.render_sample(cat, "good", image_size=64, index=0)
        assert not mask.any()


def test_render_sample_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown synthetic category"):
        synthetic.render_sample("nope")
    with pytest.raises(ValueError, match="unknown defect type"):
        synthetic.render_sample("plate", "stain")
    with pytest.raises(ValueError, match="invalid split"):
        synthetic.render_sample("plate", "spot", split="train")


def test_ensure_generates_once_and_regenerates_on_mismatch(tmp_path):
    root = tmp_path / "synth"
    kw = dict(categories=["plate"], image_size=32, n_train=2, n_test_good=1, n_test_per_defect=1)
    synthetic.ensure(root, **kw)
    marker = root / "plate" / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    assert synthetic.ensure(root, **kw) == root
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.warns(UserWarning, match=r"other parameters \(\['categories', 'n_train'\]\); regenerating"):
        synthetic.ensure(root, **{**kw, "n_train": 3, "categories": ["weave"]})
    assert not (root / "plate").exists() and len(list((root / "weave" / "train" / "good").iterdir())) == 3
    assert json.loads((root / synthetic.PARAMS_FILE).read_text())["n_train"] == 3
    with pytest.raises(TypeError, match="unknown parameter"):
        synthetic.ensure(root, size=32)


def test_generate_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not a generated dataset")
    with pytest.raises(DataError, match="refusing"):
        synthetic.generate(tmp_path, image_size=32, n_train=1, n_test_good=1, n_test_per_defect=1)
    assert (tmp_path / "mine.txt").exists()


def test_default_root_is_git_ignored_data_folder():
    root = synthetic.default_root()
    assert root.parts[-2:] == ("data", "synthetic")
    ignore = (root.parents[1] / ".gitignore").read_text().split()
    assert "/data/" in ignore  # anchored: a bare "data/" would also hide the mudenet_core/data package
