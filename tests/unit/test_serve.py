"""The inference service (FastAPI TestClient): registry model in, harness scores out, 4xx on bad input."""

from __future__ import annotations

import base64
import io as _io
import shutil
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mudenet_core import io, tracking

warnings.filterwarnings("ignore", message=".*httpx2.*")  # starlette's TestClient prefers httpx2 (not needed)
from fastapi.testclient import TestClient  # noqa: E402

from mudenet_core.serve import ServeError, create_app  # noqa: E402

MODEL_ID = "models:/ae-synthetic-plate/1"


@pytest.fixture(scope="module")
def served(synthetic_root, tmp_path_factory, one_thread):
    """A smoke AE trained and evaluated by the CLI (tracked in a temporary store) and an app serving it."""
    from mudenet_core import cli

    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.ENV_SWITCH, "1")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MUDENET_API_TOKEN", raising=False)
        out = tmp / "ae"
        assert (
            cli.main(
                [
                    "train",
                    "--method",
                    "ae",
                    "--profile",
                    "smoke",
                    "--data-root",
                    str(synthetic_root),
                    "--category",
                    "plate",
                    "--output-dir",
                    str(out),
                    "--no-progress",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
        assert (
            cli.main(
                [
                    "evaluate",
                    "--checkpoint",
                    str(out),
                    "--no-progress",
                    "--n-overlays",
                    "0",
                    "--batch-size",
                    "1",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
        torch.set_num_threads(1)
        app = create_app(model_id=MODEL_ID, tracking_uri=uri, token="")
        with TestClient(app) as client:
            yield {
                "client": client,
                "uri": uri,
                "out": out,
                "tmp": tmp,
                "scores": pd.read_csv(out / "evaluate" / "scores.csv"),
                "threshold": io.load_json(out / "threshold.json")["threshold"],
            }


def _png(arr: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _post(client, data: bytes, name: str = "x.png", **form):
    return client.post("/api/test_image", files={"file": (name, data, "application/octet-stream")}, data=form)


def _good(served) -> None:
    """A good request after a bad one: the service is still up and right."""
    path = served["scores"]["image_path"].iloc[0]
    r = _post(served["client"], Path(path).read_bytes(), Path(path).name)
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(served["scores"]["score"].iloc[0], rel=1e-4, abs=1e-6)


def test_status_names_the_model_and_its_validation_threshold(served):
    s = served["client"].get("/api/status").json()
    assert s["model"]["model_id"] == MODEL_ID and s["method"] == "ae" and s["input_size"] == 64
    assert s["threshold"] == served["threshold"] and "validation" in s["threshold_source"]
    assert s["device"] == "cpu" and s["version"]
    listing = served["client"].get("/api/models").json()
    assert [(m["model_id"], m["loaded"]) for m in listing["models"]] == [(MODEL_ID, True)]


def test_scores_equal_the_harness_and_decisions_follow_the_threshold(served):
    df = served["scores"].sort_values("score")
    lo, hi = (
        df.iloc[0],
        df.iloc[-1],
    )  # the lowest- and highest-scoring test images (harness, `mudenet evaluate`)
    for row in (lo, hi, df.iloc[len(df) // 2]):
        r = _post(served["client"], Path(row["image_path"]).read_bytes(), Path(row["image_path"]).name).json()
        assert r["score"] == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        assert r["threshold"] == served["threshold"]
        assert r["is_anomalous"] == (row["score"] >= served["threshold"])
    t = (lo["score"] + hi["score"]) / 2  # between them: the top image is anomalous, the bottom one normal
    top = _post(served["client"], Path(hi["image_path"]).read_bytes(), threshold=str(t)).json()
    bottom = _post(served["client"], Path(lo["image_path"]).read_bytes(), threshold=str(t)).json()
    assert (top["decision"], bottom["decision"]) == ("anomalous", "normal")
    assert top["threshold_source"] == "request"


def test_regions_match_skimage_on_the_quantised_map(served):
    from skimage import measure

    path = served["scores"].sort_values("score")["image_path"].iloc[-1]
    r = _post(served["client"], Path(path).read_bytes()).json()
    m = r["map"]
    q = np.frombuffer(base64.b64decode(m["data"]), np.uint8).reshape(m["shape"])
    assert q.min() == 0 and q.max() == 255 and m["shape"] == r["map_size"] == [64, 64]
    for k in (127, 200, 240):  # a threshold halfway between two levels: map >= t  <=>  q > k
        t = m["min"] + (k + 0.5) * (m["max"] - m["min"]) / 255
        got = _post(served["client"], Path(path).read_bytes(), threshold=str(t)).json()["regions"]
        props = measure.regionprops(measure.label(q > k, connectivity=2))
        want = sorted(
            ((p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2], int(p.area)) for p in props),
            key=lambda b: (-b[4], b[1], b[0]),
        )
        assert [(g["x0"], g["y0"], g["x1"], g["y1"], g["area"]) for g in got] == want
        assert all(g["peak"] >= t for g in got)
    heat = Image.open(_io.BytesIO(base64.b64decode(r["anomaly_map_png"])))
    assert heat.size == (64, 64) and heat.mode == "RGB"


def test_batch_equals_single_requests_and_reads_zips(served):
    paths = list(served["scores"]["image_path"].iloc[:4])
    files = [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths[:2]]
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in paths[2:]:
            z.write(p, f"sub/{Path(p).name}")
        z.writestr("notes.txt", "not an image")
    files.append(("files", ("more.zip", buf.getvalue(), "application/zip")))
    r = served["client"].post("/api/batch_test", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_images"] == 4 and body["skipped"] == ["more.zip/notes.txt"]
    want = served["scores"]["score"].iloc[:4].to_numpy()
    np.testing.assert_allclose([x["score"] for x in body["results"]], want, rtol=1e-4, atol=1e-6)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    raw = _png(np.zeros((2, 2, 3), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def _zip_bomb() -> bytes:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", b"\0" * (60 << 20))  # 60 MiB of zeros, about 60 KiB compressed
    return buf.getvalue()


def _zip_of_text() -> bytes:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


GOOD = _png(np.full((32, 32, 3), 128, np.uint8))
BAD_UPLOADS = [
    ("not-an-image", b"hello, world", "x.png", 415),
    ("truncated-png", GOOD[: len(GOOD) // 2], "x.png", 415),
    ("empty", b"", "x.png", 400),
    ("decompression-bomb", _bomb_png(60000, 60000), "x.png", 413),
    ("garbage-tiff", b"II*\0" + b"\xff" * 64, "x.tif", 415),
]


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_get_a_4xx_and_the_service_stays_up(served, case):
    _, data, name, status = case
    r = _post(served["client"], data, name)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail"} and "Traceback" not in r.text and "/tmp" not in r.json()["detail"]
    _good(served)


@pytest.mark.parametrize(
    "case",
    [
        ("zip-bomb", _zip_bomb(), 413),
        ("zip-of-text", _zip_of_text(), 415),
        ("broken-zip", b"PK\x03\x04" + b"\0" * 40, 415),
    ],
    ids=lambda c: c[0],
)
def test_bad_zips_get_a_4xx_and_the_service_stays_up(served, case):
    _, data, status = case
    r = served["client"].post("/api/batch_test", files=[("files", ("a.zip", data, "application/zip"))])
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    _good(served)


def test_cmyk_and_16_bit_images_are_converted(served):
    path = served["scores"]["image_path"].iloc[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    ref = _post(served["client"], _png(rgb)).json()["score"]
    # 16-bit: v * 257 / 65535 == v / 255, so the very same input reaches the model
    rgb16 = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # mode I;16
    gray8 = _post(served["client"], _png(rgb[..., 0])).json()["score"]
    buf = _io.BytesIO()
    rgb16.save(buf, format="PNG")
    assert rgb16.mode == "I;16"
    assert _post(served["client"], buf.getvalue()).json()["score"] == pytest.approx(gray8, rel=1e-6)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    expect = _post(served["client"], _png(np.asarray(cmyk.convert("RGB")))).json()["score"]
    assert expect == pytest.approx(ref, rel=1e-6)  # RGB -> CMYK -> RGB is lossless in PIL for 8-bit
    for fmt, name in (("TIFF", "x.tif"), ("JPEG", "x.jpg")):
        buf = _io.BytesIO()
        cmyk.save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        decoded = np.asarray(Image.open(_io.BytesIO(buf.getvalue())).convert("RGB"))
        r = _post(served["client"], buf.getvalue(), name)
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(
            _post(served["client"], _png(decoded)).json()["score"], rel=1e-6
        )


def test_oversized_uploads_are_refused(served):
    app = create_app(model_id=MODEL_ID, tracking_uri=served["uri"], max_upload_mb=0.01, token="")
    with TestClient(app) as c:
        big = _png(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))  # ~49 KB
        r = _post(c, big)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        assert _post(c, GOOD).status_code == 200


@pytest.mark.parametrize(
    "bad",
    ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "models:/../ae-synthetic-plate/1", "..\\x/1"],
)
def test_path_like_model_ids_are_refused(served, bad):
    r = served["client"].post("/api/load_model", json={"model_id": bad})
    assert r.status_code == 400 and "path" in r.json()["detail"]
    assert served["client"].get("/api/status").json()["model"]["model_id"] == MODEL_ID
    _good(served)


def _register_broken(served, name: str, model_bytes: bytes) -> str:
    folder = served["tmp"] / name
    folder.mkdir()
    (folder / "model.pt").write_bytes(model_bytes)
    io.save_json(folder / "threshold.json", {"threshold": 1.0})
    from mudenet_core.baselines.ae import AEConfig

    rec = tracking.FitRecord(
        method="ae",
        dataset="synthetic",
        category=name,
        seed=0,
        profile="custom",
        config=AEConfig(),
        model_dir=folder,
        git_sha="x",
    )
    assert tracking.log_fit(rec, uri=served["uri"]) is not None
    return f"models:/ae-synthetic-{name}/1"


def test_unknown_and_broken_models_get_a_4xx(served, monkeypatch):
    monkeypatch.setenv(tracking.ENV_SWITCH, "1")
    c = served["client"]
    assert c.post("/api/load_model", json={"model_id": "ae-synthetic-plate/9"}).status_code == 404
    corrupt = _register_broken(served, "corrupt", b"not a checkpoint")
    r = c.post("/api/load_model", json={"model_id": corrupt})
    assert r.status_code == 422 and "Traceback" not in r.text
    buf = _io.BytesIO()  # a pickle that needs more than weights_only=True allows
    torch.save({"state_dict": {}, "config": {}, "payload": Path("/etc/passwd")}, buf)
    unsafe = _register_broken(served, "unsafe", buf.getvalue())
    r = c.post("/api/load_model", json={"model_id": unsafe})
    assert r.status_code == 422 and "weights_only" in r.json()["detail"]
    assert c.get("/api/status").json()["model"]["model_id"] == MODEL_ID  # the old model stays
    _good(served)


def test_onnx_runtime_needs_model_onnx(served):
    with pytest.raises(ServeError, match="model.onnx") as e:
        create_app(model_id=MODEL_ID, tracking_uri=served["uri"], runtime="onnx", token="")
    assert e.value.status == 422


def test_bearer_token_guards_every_route_but_status_and_the_page(served):
    app = create_app(tracking_uri=served["uri"], token="s3cret")
    with TestClient(app) as c:
        assert c.get("/api/status").json()["auth_required"] is True
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        for method, path in (
            ("get", "/api/models"),
            ("post", "/api/load_model"),
            ("post", "/api/test_image"),
            ("post", "/api/batch_test"),
            ("get", "/docs"),
            ("get", "/openapi.json"),
        ):
            assert getattr(c, method)(path).status_code == 401, path
            assert getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/api/models", headers=ok).status_code == 200
        assert c.post("/api/test_image", files={"file": ("x.png", GOOD)}, headers=ok).status_code == 409
        r = c.post("/api/load_model", json={"model_id": MODEL_ID}, headers=ok)
        assert (
            r.status_code == 200
            and c.post("/api/test_image", files={"file": ("x.png", GOOD)}, headers=ok).status_code == 200
        )


def test_openapi_lists_the_routes(served):
    paths = set(served["client"].get("/openapi.json").json()["paths"])
    assert {"/api/status", "/api/models", "/api/load_model", "/api/test_image", "/api/batch_test"} <= paths


def test_cli_serve_refuses_a_bad_model_at_start(served, monkeypatch, capsys):
    from mudenet_core import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["uri"])
    assert cli.main(["serve", "--model", "../etc/passwd"]) == 2
    assert "cannot start" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "nosuch/1"]) == 2


NODE_HARNESS = """
const vm = require("vm"), fs = require("fs");
const el = () => ({ addEventListener() {}, querySelector() { return { innerHTML: "" }; },
                    querySelectorAll() { return []; }, classList: { toggle() {}, add() {}, remove() {} },
                    dataset: {}, hidden: false });
const ctx = { document: { getElementById: el }, sessionStorage: { getItem: () => "" }, window: {},
              fetch: () => new Promise(() => {}), atob: (s) => Buffer.from(s, "base64").toString("binary"),
              console, Uint8Array, Float32Array, Math, Promise, Image: function () {} };
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), ctx);
const input = JSON.parse(fs.readFileSync(0, "utf8"));
const map = ctx.window.mudenet.decodeMap(input.map);
process.stdout.write(JSON.stringify(input.thresholds.map((t) => ctx.window.mudenet.regionsAt(map, t))));
"""


def test_the_page_computes_the_same_regions_as_the_server(served, tmp_path):
    import json
    import subprocess

    from mudenet_core.serve.app import STATIC_DIR
    from mudenet_core.serve.inference import quantise, regions

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's JS is checked in the browser test only")
    rng = np.random.default_rng(0)
    amap = rng.random((24, 32)).astype(np.float32)
    amap[5:9, 3:12] += 2.0  # one blob and many small specks
    q = quantise(amap)
    levels = np.frombuffer(base64.b64decode(q["data"]), np.uint8).reshape(q["shape"])
    thresholds = [q["min"] + (k + 0.5) * (q["max"] - q["min"]) / 255 for k in (60, 150, 200)]
    script = tmp_path / "harness.js"
    script.write_text(NODE_HARNESS)
    out = subprocess.run([node, str(script), str(STATIC_DIR / "app.js")], input=json.dumps(
        {"map": q, "thresholds": thresholds}), capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout)
    dequantised = q["min"] + levels.astype(np.float64) * ((q["max"] - q["min"]) / 255)
    for t, js in zip(thresholds, got, strict=True):
        want = regions(dequantised, t)  # the server's rule on the map the page holds
        assert [(g["x0"], g["y0"], g["x1"], g["y1"], g["area"]) for g in js] == \
               [(g["x0"], g["y0"], g["x1"], g["y1"], g["area"]) for g in want]
        assert len(js) > 0


def test_onnx_export_is_registered_and_served_with_the_torch_scores(served, tmp_path):
    """`mudenet export --format onnx` adds model.onnx to the registered model; --runtime onnx serves it."""
    from mudenet_core import cli

    out = served["out"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.ENV_SWITCH, "1")
        mp.setenv("MLFLOW_TRACKING_URI", served["uri"])
        assert cli.main(["export", "--checkpoint", str(out), "--format", "onnx",
                         "--output", str(tmp_path / "plate.onnx")]) == 0
    app = create_app(model_id=MODEL_ID, tracking_uri=served["uri"], runtime="onnx", token="")
    with TestClient(app) as client:
        scores = served["scores"]
        for i in (0, len(scores) - 1):
            path = Path(scores["image_path"].iloc[i])
            r = _post(client, path.read_bytes(), path.name)
            assert r.status_code == 200, r.text
            assert r.json()["score"] == pytest.approx(scores["score"].iloc[i], rel=1e-3, abs=1e-5)
