"""Export to ONNX and TorchScript: raw RGB in, the torch detector's calibrated map and score out.

One smoke-profile model per exportable method (mudenet, patchcore, padim, ae) is trained with ``mudenet
train`` on the generated ``plate`` category (seconds). The exported files are run with onnxruntime (CPU) and
``torch.jit.load``, and compared with the torch detector's own path, independent of the export graph: the
package's preprocessing (``resize_image`` + ``normalize``, as ``mudenet predict``), ``detector.predict``,
``resize_map`` back to the input size, and ``threshold.json``'s ``(v - low) / (high - low)``. Images: the
generated test images (always) and real MPDD metal_plate images, 512 x 448 crops (marked ``real_data``
and ``slow``: four more ONNX exports).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mudenet_core import cli, export
from mudenet_core.cli.predict import resize_map
from mudenet_core.data.images import list_images, load_image
from mudenet_core.data.transforms import normalize, resize_image, to_tensor
from mudenet_core.methods import get_method

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]

CATEGORY = "plate"
METHODS = ("mudenet", "patchcore", "padim", "ae")
FORMATS = ("onnx", "torchscript")
TINY = {"mudenet": ["distill.steps=2", "train.steps=2"], "ae": ["epochs=1"], "patchcore": [], "padim": []}
RTOL, ATOL = 1e-3, 1e-5  # the parity tolerance on maps (and scores)
NEAR = 1e-4  # decisions are compared only for scores at least this far from the threshold


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MUDENET_NO_PROGRESS", "1")
    monkeypatch.setenv("MUDENET_TRACKING", "0")


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory, one_thread):
    """method -> `mudenet train --profile smoke` output folder (model.pt, config.yaml, threshold.json)."""
    base = tmp_path_factory.mktemp("export_runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MUDENET_NO_PROGRESS", "1")
    mp.setenv("MUDENET_TRACKING", "0")  # no MLflow run in the repository's store
    out = {}
    try:
        for m in METHODS:
            rc = cli.main(["train", "--method", m, "--data-root", str(synthetic_root), "--category", CATEGORY,
                           "--profile", "smoke", "--device", "cpu", "--output-dir", str(base / m), *TINY[m]])
            assert rc == 0, m
            out[m] = base / m
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """(method, format, (H0, W0)) -> (exported model, detector, calibration record); exported once each."""
    base = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(method, fmt, size=(64, 64)):
        key = (method, fmt, tuple(size))
        if key not in cache:
            ckpt = runs[method] / "model.pt"
            det = get_method(method)[0].load(ckpt)
            cal = json.loads((runs[method] / "threshold.json").read_text())
            path = base / f"{method}_{size[0]}x{size[1]}" / export.DEFAULT_FILES[fmt]
            export.export_detector(det, path, fmt=fmt, calibration=cal, input_size=size, checkpoint=ckpt)
            loaded = (export.load_onnx_model(path, threads=1) if fmt == "onnx"
                      else export.load_torchscript_model(path))
            cache[key] = (loaded, det, cal)
        return cache[key]

    return get


def generated_images(synthetic_root) -> list[np.ndarray]:
    """The generated plate test images (64 px): good ones and defects, (H, W, 3) float in [0, 1]."""
    test = synthetic_root / CATEGORY / "test"
    return [load_image(p) for d in sorted(test.iterdir()) for p in list_images(d)]


def torch_reference(det, cal, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The torch detector's path, as `mudenet predict` runs it: calibrated maps at input size, scores, raw."""
    size = det.config.image_size
    x = torch.stack([normalize(resize_image(to_tensor(im), size)) for im in images])  # (B, 3, S, S)
    with torch.no_grad():
        maps, scores = det.predict(x)  # (B, 1, S, S), (B,)
    h0, w0 = images[0].shape[:2]
    maps = np.stack([resize_map(m, (h0, w0)) for m in maps[:, 0].numpy()])[:, None]  # (B, 1, H0, W0)
    lo, hi = cal["map_normalization"]["low"], cal["map_normalization"]["high"]
    raw = scores.numpy().astype(np.float64)
    return (maps - lo) / (hi - lo), (raw - lo) / (hi - lo), raw


def check_parity(loaded, det, cal, images: list[np.ndarray]) -> dict:
    rgb = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)  # (B, 3, H0, W0)
    got_maps, got_scores = loaded.predict_rgb(rgb)
    ref_maps, ref_scores, raw = torch_reference(det, cal, images)
    assert got_maps.shape == ref_maps.shape == (len(images), 1, *images[0].shape[:2])
    np.testing.assert_allclose(got_maps, ref_maps, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_scores, ref_scores, rtol=RTOL, atol=ATOL)
    thr = cal["threshold"]  # threshold.json's, in the detector's units
    clear = np.abs(raw - thr) >= NEAR * (cal["map_normalization"]["high"] - cal["map_normalization"]["low"])
    assert clear.any(), "no decision to compare"
    np.testing.assert_array_equal(loaded.is_anomalous(got_scores)[clear], (raw >= thr)[clear])
    # dynamic batch axis: one image at a time gives the batch's outputs
    one_map, one_score = loaded.predict_rgb(rgb[:1])
    np.testing.assert_allclose(one_map, got_maps[:1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(one_score, got_scores[:1], rtol=RTOL, atol=ATOL)
    d = np.abs(got_maps - ref_maps)
    return {"max_abs": float(d.max()), "max_rel": float((d / np.maximum(np.abs(ref_maps), 1e-6)).max()),
            "score": float(np.abs(got_scores - ref_scores).max())}


# ------------------------------------------------------------------------------------------- the resize
@pytest.mark.parametrize(("size_in", "size_out"), [((512, 512), (64, 64)), ((96, 80), (64, 64)),
                                                    ((64, 64), (96, 80)), ((100, 70), (64, 48))])
def test_resize_matches_pil_bilinear(size_in, size_out):
    """PIL's BILINEAR resize (antialiased when shrinking) is the reference torch's antialias=True follows."""
    a = np.random.default_rng(0).random(size_in).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, mode="F").resize(size_out[::-1], Image.BILINEAR))
    got = export.Resize(size_in, size_out)(torch.from_numpy(a)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_resize_matrix_hand_computed():
    # halving: a tent filter widened to half-width 2 around output centre 1.0 (input centres 0.5 ... 3.5):
    # weights 1 - |d| / 2 = 3/4, 3/4, 1/4, 0, normalised by their sum 7/4
    m = export.resize_matrix(4, 2).double()
    expected = torch.tensor([[3, 3, 1, 0], [0, 1, 3, 3]], dtype=torch.float64) / 7
    torch.testing.assert_close(m.T, expected, atol=1e-7, rtol=0)
    assert torch.equal(export.resize_matrix(5, 5), torch.eye(5))


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_parity_on_generated_images(exports, synthetic_root, method, fmt):
    loaded, det, cal = exports(method, fmt)
    err = check_parity(loaded, det, cal, generated_images(synthetic_root))
    print(f"parity generated {method} {fmt}: {err}")


@pytest.mark.real_data
@pytest.mark.slow  # four more ONNX exports (~30 s on one thread)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_parity_on_real_mpdd_images(exports, mpdd_root, method, fmt):
    """Real images, 512 x 448 crops of the 512 px MPDD files: the graph resizes each axis by its own factor to
    the model's 64 px, and the map back to 512 x 448."""
    files = list_images(mpdd_root / "test" / "good")[:2] + list_images(mpdd_root / "test" / "defective")[:3]
    images = [np.ascontiguousarray(load_image(p)[:, 32:480]) for p in files]
    assert images[0].shape == (512, 448, 3)
    loaded, det, cal = exports(method, fmt, (512, 448))
    err = check_parity(loaded, det, cal, images)
    print(f"parity mpdd {method} {fmt}: {err}")


def test_uint8_nhwc_input_equals_float_nchw(exports, synthetic_root):
    loaded, _, _ = exports("ae", "onnx")
    u8 = (np.stack(generated_images(synthetic_root)[:3]) * 255).round().astype(np.uint8)  # (B, H, W, 3)
    m8, s8 = loaded.predict_rgb(u8)
    mf, sf = loaded.predict_rgb(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(m8, mf)
    np.testing.assert_array_equal(s8, sf)


@pytest.mark.parametrize("method", METHODS)
def test_predict_is_a_drop_in_detector(exports, method):
    """`predict` takes the harness's normalised images and returns the detector's own (raw) units."""
    loaded, det, _ = exports(method, "onnx")
    x = torch.stack([normalize(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)))
                     for i in range(3)])
    with torch.no_grad():
        ref_maps, ref_scores = det.predict(x)
    maps, scores = loaded.predict(x)
    assert maps.shape == ref_maps.shape == (3, 1, 64, 64) and scores.shape == (3,)
    scale = float(ref_maps.abs().max())
    np.testing.assert_allclose(maps.numpy(), ref_maps.numpy(), rtol=RTOL, atol=ATOL * max(scale, 1.0))
    np.testing.assert_allclose(scores.numpy(), ref_scores.numpy(), rtol=RTOL, atol=ATOL * max(scale, 1.0))


def test_harness_evaluates_the_onnx_model_like_the_detector(exports, synthetic_root):
    from mudenet_core import harness
    from mudenet_core.data.datasets import DataConfig, make_splits

    loaded, det, _ = exports("patchcore", "onnx")
    ds = make_splits(DataConfig(root=str(synthetic_root), category=CATEGORY, image_size=64)).test
    ref = harness.evaluate(det, ds, show_progress=False)
    got = harness.evaluate(loaded, ds, show_progress=False)
    np.testing.assert_allclose(got.scores["score"], ref.scores["score"], rtol=RTOL, atol=1e-4)
    assert got.metrics["image_auroc"] == pytest.approx(ref.metrics["image_auroc"])


def test_a_sign_flipped_export_fails_the_parity_check(runs, tmp_path):
    """The check can fail: an export whose scorer negates the map and score disagrees with torch."""

    class Flipped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            amap, score = self.inner(x)
            return -amap, -score

    det = get_method("ae")[0].load(runs["ae"] / "model.pt")
    cal = json.loads((runs["ae"] / "threshold.json").read_text())
    good = export.build_graph(det, calibration=cal)
    bad = export.build_graph(det, calibration=cal)
    bad.scorer = Flipped(bad.scorer)
    rec = export.export_record(bad, method="ae", calibration=cal, fmt="torchscript", exporter="")
    export.export_torchscript(bad, tmp_path / "bad.pt", rec)
    loaded = export.TorchScriptDetector(tmp_path / "bad.pt", rec, torch.jit.load(str(tmp_path / "bad.pt")))
    rgb = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    check = export.parity(good, loaded, rgb)
    assert check["maps_allclose"] == 0.0 and check["max_abs_score"] > 1.0


def test_legacy_onnx_exporter_path(runs, tmp_path):
    """The fallback exporter (dynamo=False, TorchScript-based) gives the same outputs where it works."""
    det = get_method("ae")[0].load(runs["ae"] / "model.pt")
    cal = json.loads((runs["ae"] / "threshold.json").read_text())
    rec = export.export_detector(det, tmp_path / "m.onnx", fmt="onnx", calibration=cal, exporter="legacy")
    assert rec["exporter"] == "torch.onnx.export(dynamo=False)"
    rgb = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loaded = export.load_onnx_model(tmp_path / "m.onnx")
    check = export.parity(export.build_graph(det, calibration=cal), loaded, rgb)
    assert check["maps_allclose"] == 1.0 and check["max_abs_score"] < ATOL


# ------------------------------------------------------------------------------------------- metadata
def test_onnx_metadata_threshold_and_dynamic_batch(exports, runs):
    import onnx

    loaded, _, cal = exports("patchcore", "onnx")
    proto = onnx.load(str(loaded.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    lo, hi = cal["map_normalization"]["low"], cal["map_normalization"]["high"]
    assert float(meta["threshold_raw"]) == cal["threshold"]
    assert float(meta["threshold"]) == pytest.approx((cal["threshold"] - lo) / (hi - lo), rel=1e-12)
    assert (float(meta["map_low"]), float(meta["map_high"])) == (lo, hi)
    record = json.loads(meta[export.METADATA_KEY])
    sidecar = json.loads(export.sidecar_path(loaded.path).read_text())
    assert sidecar["threshold"] == record["threshold"] and sidecar["method"] == "patchcore"
    assert sidecar["file_sha256"] == __import__("hashlib").sha256(loaded.path.read_bytes()).hexdigest()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]
    # the k-NN against the memory bank is inside the graph: the bank is an initializer, searched by TopK
    bank = torch.load(runs["patchcore"] / "model.pt", weights_only=False)["state_dict"]["memory_bank"]
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    assert tuple(bank.shape) in shapes or tuple(bank.T.shape) in shapes
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "MatMul"} <= ops


def test_torchscript_carries_its_record(exports):
    loaded, _, cal = exports("mudenet", "torchscript")
    extra = {export.TORCHSCRIPT_EXTRA: ""}
    torch.jit.load(str(loaded.path), _extra_files=extra)
    assert json.loads(extra[export.TORCHSCRIPT_EXTRA])["threshold_raw"] == cal["threshold"]


# ------------------------------------------------------------------------------------------- CLI and errors
def test_cli_export_default_path_overwrite_and_check(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["ae"], run)
    assert cli.main(["export", "--checkpoint", str(run), "--format", "onnx"]) == 0
    out = run / "export" / "model.onnx"
    side = json.loads(export.sidecar_path(out).read_text())
    assert side["parity_check"]["passed"] is True and side["exporter"] == "torch.onnx.export(dynamo=True)"
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--format", "onnx"]) == 2
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err
    loaded = export.load_onnx_model(run)  # the run folder finds export/model.onnx
    assert loaded.method == "ae" and loaded.input_size == (64, 64)
    with open(run / "model.pt", "ab") as f:  # trained again since: the export no longer belongs to it
        f.write(b"\0")
    with pytest.raises(export.ExportError, match="is stale"):
        export.load_onnx_model(run)


def test_cli_export_refuses_without_a_calibration_for_this_model(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["padim"], run)
    (run / "threshold.json").unlink()
    assert cli.main(["export", "--checkpoint", str(run), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert "cannot export without its calibration" in err and "no threshold.json" in err
    shutil.copy(runs["padim"] / "threshold.json", run / "threshold.json")
    with open(run / "model.pt", "ab") as f:  # the model changed since its calibration
        f.write(b"\0")
    assert cli.main(["export", "--checkpoint", str(run), "--format", "torchscript"]) == 2
    assert "stale after retraining" in capsys.readouterr().err
    assert not (run / "export").exists()


def test_bad_inputs_and_files_are_named(exports, tmp_path):
    loaded, _, _ = exports("ae", "onnx")
    with pytest.raises(ValueError, match=r"float images must be \(B, 3, 64, 64\)"):
        loaded.predict_rgb(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="must lie in"):
        loaded.predict_rgb(np.full((1, 3, 64, 64), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"uint8 images must be \(B, 64, 64, 3\)"):
        loaded.predict_rgb(np.zeros((1, 3, 64, 64), np.uint8))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(export.ExportError, match="junk.onnx"):
        export.load_onnx_model(junk)
    with pytest.raises(FileNotFoundError, match="no model.onnx in"):
        export.load_onnx_model(tmp_path)
