"""``mudenet predict`` for real decisions: fixed heat-map range, one-to-one output names, maps at input size,
a threshold that belongs to its model, one-line write errors.

One tiny MuDeNet is trained per module (smoke profile, two steps per stage) on the generated dataset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mudenet_core import cli, harness

CATEGORY = "plate"
TINY = ["distill.steps=2", "train.steps=2"]  # on top of the smoke profile


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MUDENET_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def run_dir(synthetic_root, tmp_path_factory, one_thread):
    """`mudenet train` output of a tiny MuDeNet (model.pt, config.yaml, threshold.json)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("MUDENET_NO_PROGRESS", "1")
    try:
        rc = cli.main(["train", "--data-root", str(synthetic_root), "--category", CATEGORY, "--profile",
                       "smoke", "--device", "cpu", "--output-dir", str(out), *TINY])
    finally:
        mp.undo()
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def detector(run_dir):
    from mudenet_core.mudenet import MuDeNet

    return MuDeNet.load(run_dir / "model.pt")


def images_dir(synthetic_root):
    return synthetic_root / CATEGORY / "test"


def predict(ckpt, inp, out, *extra) -> pd.DataFrame:
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(inp), "--output-dir", str(out),
                     "--device", "cpu", *extra]) == 0
    return pd.read_csv(out / "predictions.csv")


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def jet_png(m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The expected heat-map pixels, written out here: jet colour map of (m - lo) / (hi - lo), clipped."""
    rgb = matplotlib.colormaps["jet"](np.clip((m.astype(np.float64) - lo) / (hi - lo), 0, 1))[..., :3]
    return (rgb * 255).round().astype(np.uint8)


def model_map(detector, image: np.ndarray) -> np.ndarray:
    """The detector's map (64, 64) of an (H, W, 3) image, through the package's own preprocessing."""
    from mudenet_core.data.transforms import normalize, resize_image, to_tensor

    x = normalize(resize_image(to_tensor(image), 64))[None]
    with torch.no_grad():
        amap, _ = detector.predict(x)
    return amap[0, 0].numpy()


def isolated(run_dir, tmp_path, name="iso"):
    """A copy of the run folder with model.pt and config.yaml only."""
    iso = tmp_path / name
    iso.mkdir()
    for f in ("model.pt", "config.yaml"):
        shutil.copy(run_dir / f, iso / f)
    return iso


# ------------------------------------------------------------------------------------- calibration record
def test_train_records_model_hash_and_map_range(run_dir):
    rec = json.loads((run_dir / "threshold.json").read_text())
    assert rec["model_sha256"] == hashlib.sha256((run_dir / "model.pt").read_bytes()).hexdigest()
    norm = rec["map_normalization"]
    assert norm["q_low"] == 0.01 and norm["q_high"] == 0.999
    assert np.isfinite(norm["low"]) and norm["high"] > norm["low"]
    assert harness.load_calibration(run_dir, run_dir / "model.pt") == (rec, "")


def test_map_normalization_hand_computed():
    normal = np.arange(100, dtype=np.float64).reshape(1, 10, 10)  # values 0..99
    anomalous = np.full((1, 10, 10), 1000.0)
    got = harness.map_normalization(np.concatenate([normal, anomalous]), [0, 1], q_low=0.5, q_high=0.25)
    # low: median of the normal values only (49.5); high: 0.25 quantile of all 200 values (index 49.75)
    assert got["low"] == pytest.approx(49.5) and got["high"] == pytest.approx(49.75)
    const = harness.map_normalization(np.ones((2, 3, 3)), [0, 0])
    assert const["low"] == 1.0 and const["high"] > 1.0  # never an empty range


def test_load_calibration_checks_the_model_file(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights of model one")
    cfg = harness.ThresholdConfig()
    harness.save_threshold(tmp_path, 0.7, cfg, n_normal=3, n_anomalous=5, model_path=model,
                           map_norm={"low": 0.1, "high": 0.9})
    rec, why = harness.load_calibration(tmp_path)
    assert why == "" and rec["threshold"] == 0.7
    assert rec["model_sha256"] == hashlib.sha256(b"weights of model one").hexdigest()
    model.write_bytes(b"weights of model two")  # retrained in place, threshold.json left behind
    rec, why = harness.load_calibration(tmp_path, model)
    assert rec is None and "another model" in why
    with pytest.warns(harness.CalibrationWarning, match="another model"):
        assert harness.load_threshold(tmp_path) is None
    (tmp_path / "threshold.json").write_text(json.dumps({"threshold": 0.7}))  # format 1: no hash
    rec, why = harness.load_calibration(tmp_path, model)
    assert rec is None and "predates" in why
    (tmp_path / "threshold.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert harness.load_threshold(tmp_path) is None  # no record: None, no warning


# ----------------------------------------------------------------------------------- 1: fixed normalisation
def test_heatmap_same_alone_or_beside_a_defect(run_dir, synthetic_root, tmp_path):
    src = images_dir(synthetic_root)
    good, defect = src / "good" / "000.png", src / "scratch" / "000.png"
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(good, both / "good.png")
    shutil.copy(defect, both / "defect.png")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(good, alone / "good.png")
    df1 = predict(run_dir, alone / "good.png", tmp_path / "p1")
    df2 = predict(run_dir, both, tmp_path / "p2")
    row2 = df2[df2["image_path"].str.endswith("good.png")].iloc[0]
    h1 = png(tmp_path / "p1" / df1["heatmap_file"].iloc[0])
    h2 = png(tmp_path / "p2" / row2["heatmap_file"])
    assert np.array_equal(h1, h2)  # bit-identical, whatever else is in the call
    assert np.array_equal(png(tmp_path / "p1" / df1["overlay_file"].iloc[0]),
                          png(tmp_path / "p2" / row2["overlay_file"]))
    # and it is the jet colouring of its own map in the range recorded at calibration time
    norm = json.loads((run_dir / "threshold.json").read_text())["map_normalization"]
    m = np.load(tmp_path / "p1" / df1["map_file"].iloc[0])
    assert np.array_equal(h1, jet_png(m, norm["low"], norm["high"]))
    info = json.loads((tmp_path / "p1" / "predict_info.json").read_text())
    assert info["heatmap_range"] == [norm["low"], norm["high"]]


def test_without_a_range_falls_back_to_per_call_scaling_with_a_warning(run_dir, synthetic_root, tmp_path,
                                                                       capsys):
    from mudenet_core import viz

    iso = isolated(run_dir, tmp_path)
    (iso / "threshold.json").write_text(json.dumps({"threshold": 0.5, "source": "validation"}))  # format 1
    capsys.readouterr()
    df = predict(iso, images_dir(synthetic_root) / "good", tmp_path / "p")
    err = capsys.readouterr().err
    assert "warning" in err and "predates model hashes" in err
    assert "is_anomalous" not in df  # an unverifiable threshold is not used
    maps = [np.load(tmp_path / "p" / f) for f in df["map_file"]]
    lo, hi = viz.map_range(np.stack(maps))
    assert np.array_equal(png(tmp_path / "p" / df["heatmap_file"].iloc[0]), jet_png(maps[0], lo, hi))


# ---------------------------------------------------------------------------------------- 2: output names
def test_colliding_names_get_their_own_outputs(run_dir, detector, synthetic_root, tmp_path):
    from mudenet_core.data.images import load_image

    src = images_dir(synthetic_root)
    inp = tmp_path / "in"
    (inp / "x").mkdir(parents=True)
    shutil.copy(src / "good" / "000.png", inp / "a.png")
    Image.open(src / "scratch" / "000.png").convert("RGB").save(inp / "a.jpg", quality=95)
    shutil.copy(src / "spot" / "000.png", inp / "x" / "b.png")
    shutil.copy(src / "good" / "001.png", inp / "x__b.png")
    out = tmp_path / "p"
    df = predict(run_dir, inp, out)
    assert len(df) == 4
    for col, folder in (("map_file", "maps"), ("heatmap_file", "heatmaps"), ("overlay_file", "overlays")):
        written = sorted(p.relative_to(out).as_posix() for p in (out / folder).rglob("*") if p.is_file())
        assert written == sorted(df[col]) and df[col].is_unique  # 4 files, one per input
    # each map file holds the map of its own input (none was overwritten by a namesake)
    for path, map_file in zip(df["image_path"], df["map_file"], strict=True):
        expected = model_map(detector, load_image(path))
        np.testing.assert_allclose(np.load(out / map_file), expected, rtol=1e-4, atol=1e-5)
    inputs = (inp / "a.png", inp / "a.jpg", inp / "x" / "b.png", inp / "x__b.png")
    assert sorted(df["image_path"]) == sorted(str(p) for p in inputs)


def test_output_names_are_one_to_one_and_deterministic(tmp_path):
    from mudenet_core.cli.predict import output_names

    files = [tmp_path / n for n in ("a.png", "a.jpg", "x/b.png", "x__b.png", "C.png", "c.png")]
    names = output_names(files, tmp_path)
    assert names[:4] == ["a.png", "a.jpg", "x/b.png", "x__b.png"]
    assert len({n.casefold() for n in names}) == 6  # also on a case-insensitive disk
    assert names == output_names(list(files), tmp_path)


# ------------------------------------------------------------------------------------ 3: maps at input size
def test_maps_come_back_at_the_input_size(run_dir, detector, synthetic_root, tmp_path):
    from mudenet_core.data.images import load_image

    inp = tmp_path / "wide.png"
    Image.open(images_dir(synthetic_root) / "scratch" / "000.png").convert("RGB").resize(
        (144, 80), Image.BILINEAR).save(inp)  # W0 = 144, H0 = 80
    out = tmp_path / "p"
    df = predict(run_dir, inp, out)
    assert (df["height"].iloc[0], df["width"].iloc[0]) == (80, 144)
    m = np.load(out / df["map_file"].iloc[0])
    assert m.shape == (80, 144) and m.dtype == np.float32
    # bilinear upsampling of the model-size map, computed independently with PIL
    image = load_image(inp)
    small = model_map(detector, image)  # (64, 64)
    expected = np.asarray(Image.fromarray(small, mode="F").resize((144, 80), Image.BILINEAR))
    np.testing.assert_allclose(m, expected, atol=1e-4 * float(np.ptp(small)))
    heat = png(out / df["heatmap_file"].iloc[0])
    over = png(out / df["overlay_file"].iloc[0])
    assert heat.shape == over.shape == (80, 144, 3)
    # the overlay is drawn on the original image: 0.5 * image + 0.5 * heat map
    want = 0.5 * image + 0.5 * heat / 255.0
    assert np.abs(over.astype(np.float64) - want * 255).max() <= 1.0


# ----------------------------------------------------------------------------- 4: threshold of this model
def test_stale_threshold_is_never_used(run_dir, detector, synthetic_root, tmp_path, capsys):
    from mudenet_core.mudenet import MuDeNet

    iso = isolated(run_dir, tmp_path)
    shutil.copy(run_dir / "threshold.json", iso / "threshold.json")
    df = predict(iso, images_dir(synthetic_root) / "good", tmp_path / "ok")
    thr = json.loads((run_dir / "threshold.json").read_text())["threshold"]
    assert (df["is_anomalous"] == (df["score"] >= thr)).all()  # the record of this very model is used
    # the model is trained again in place (`train --overwrite` without recalibration): another model file
    other = MuDeNet.load(run_dir / "model.pt")
    with torch.no_grad():
        next(other.nets.parameters()).add_(0.01)
    other.save(iso / "model.pt")
    capsys.readouterr()
    df = predict(iso, images_dir(synthetic_root) / "good", tmp_path / "stale")
    err = capsys.readouterr().err
    assert "is_anomalous" not in df
    assert "chosen for another model" in err and "warning" in err
    info = json.loads((tmp_path / "stale" / "predict_info.json").read_text())
    assert info["threshold"] is None
    # --threshold still overrides
    df = predict(iso, images_dir(synthetic_root) / "good", tmp_path / "forced", "--threshold", "0.5")
    assert (df["is_anomalous"] == (df["score"] >= 0.5)).all()


# ------------------------------------------------------------------------------------ 5: one-line errors
def test_unwritable_output_folder_is_a_one_line_error(run_dir, synthetic_root, tmp_path, capsys, monkeypatch):
    import mudenet_core.cli.predict as predict_mod

    out = tmp_path / "p"

    def denied(path, arr):
        raise PermissionError(13, "Permission denied", str(path.parent / f".{path.name}.tmp"))

    monkeypatch.setattr(predict_mod, "save_npy", denied)
    capsys.readouterr()
    good = images_dir(synthetic_root) / "good"
    rc = cli.main(["predict", "--checkpoint", str(run_dir), "--input", str(good), "--output-dir", str(out),
                   "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == f"mudenet: error: cannot write to {out / 'maps'}: permission denied (choose " \
                      "another --output-dir)"
    assert not any("Traceback" in line for line in err)


def test_unreadable_input_is_a_one_line_error(run_dir, synthetic_root, tmp_path, capsys, monkeypatch):
    import mudenet_core.data.images as images

    def denied(path, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "load_image", denied)
    img = images_dir(synthetic_root) / "good" / "000.png"
    capsys.readouterr()
    rc = cli.main(["predict", "--checkpoint", str(run_dir), "--input", str(img), "--output-dir",
                   str(tmp_path / "p"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == f"mudenet: error: cannot read {img}: permission denied"


def test_batched_prediction_gives_the_same_scores_and_files(run_dir, synthetic_root, tmp_path):
    inp = images_dir(synthetic_root) / "good"
    one = predict(run_dir, inp, tmp_path / "one")
    three = predict(run_dir, inp, tmp_path / "three", "--batch-size", "3")
    assert len(one) == len(three) == len(list(inp.iterdir())) and len(one) > 3  # at least one full batch
    assert one["map_file"].tolist() == three["map_file"].tolist()
    np.testing.assert_allclose(three["score"], one["score"], rtol=1e-4, atol=1e-6)
    for f in one["map_file"]:
        np.testing.assert_allclose(np.load(tmp_path / "three" / f), np.load(tmp_path / "one" / f),
                                   rtol=1e-4, atol=1e-5)
