"""Inference speed of the exported models: torch vs onnxruntime, images/s on the CPU, one thread.

For each exportable method (mudenet, patchcore, padim, ae) a model of its ``cpu`` profile at 128 px
(``image_size=128``; PatchCore and PaDiM's cpu profiles are 256 px) is trained with ``mudenet train`` on a
generated ``plate`` category (few steps: speed does not depend on how well a model is trained, only on its
shapes; PatchCore's memory bank is 10 % of the generated training patches), exported with
:mod:`mudenet_core.export` at its model size, and timed at batch 1 and 8 on one thread:

* ``torch_detector``: ``detector.predict`` on preprocessed (normalised, 128 px) images, the harness's path;
* ``torch_graph``: the export graph in eager torch (raw RGB in: normalisation and calibration included);
* ``torchscript``: the ``torch.jit.trace`` export, via ``load_torchscript_model(...).predict_rgb``;
* ``onnxruntime``: the ONNX export with onnxruntime's CPU provider (``intra_op_num_threads=1``).

Each (method, runtime, batch) is warmed up once, then called until ``--min-time`` seconds and at least
``--repeats`` calls have passed; images/s = batch / median seconds per call. Rows are appended atomically
(under a file lock) to ``results/benchmarks/export_speed_cpu.csv``, tidy: one row per (method, runtime,
batch).

Usage::

    python benchmarks/export_speed.py                       # all four methods, ~3-5 min on a busy 2-core box
    python benchmarks/export_speed.py --methods mudenet --repeats 20
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mudenet_core import cli, export  # noqa: E402
from mudenet_core.data import synthetic  # noqa: E402
from mudenet_core.data.transforms import normalize  # noqa: E402
from mudenet_core.io import git_sha, save_csv  # noqa: E402
from mudenet_core.methods import get_method  # noqa: E402

OUT = REPO / "results" / "benchmarks" / "export_speed_cpu.csv"
METHODS = ("mudenet", "patchcore", "padim", "ae")
SIZE = 128
# cpu profile plus: the 128 px size, and few training steps (shapes, not quality, set the speed)
OVERRIDES = {"mudenet": ["distill.steps=2", "train.steps=2"], "patchcore": [f"image_size={SIZE}"],
             "padim": [f"image_size={SIZE}"], "ae": ["epochs=1"]}
COLUMNS = ["method", "runtime", "batch", "images_per_s", "ms_per_call", "calls", "image_size", "input_size",
           "threads", "exporter", "model_mb", "torch_version", "onnxruntime_version", "git_sha",
           "device_name", "load_avg_1m", "timestamp_utc"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_calls(fn, *, min_time: float, repeats: int) -> tuple[float, int]:
    """(median seconds per call, number of calls) after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def train_run(root: Path, out: Path, method: str) -> Path:
    rc = cli.main(["train", "--method", method, "--data-root", str(root), "--category", "plate", "--profile",
                   "cpu", "--device", "cpu", "--output-dir", str(out), "--no-progress", *OVERRIDES[method]])
    if rc != 0:
        raise SystemExit(f"training {method} failed (exit {rc})")
    return out / "model.pt"


def bench_method(method: str, ckpt: Path, work: Path, args) -> list[dict]:
    det = get_method(method)[0].load(ckpt)
    cal = export.load_run_calibration(ckpt)
    assert det.config.image_size == SIZE, f"{method}: expected {SIZE} px, got {det.config.image_size}"
    graph = export.build_graph(det, calibration=cal)
    paths = {fmt: work / method / export.DEFAULT_FILES[fmt] for fmt in export.FORMATS}
    records = {fmt: export.export_detector(det, paths[fmt], fmt=fmt, calibration=cal, checkpoint=ckpt)
               for fmt in export.FORMATS}
    runners = {"onnxruntime": export.load_onnx_model(paths["onnx"], threads=1),
               "torchscript": export.load_torchscript_model(paths["torchscript"])}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        rgb = torch.rand(batch, 3, SIZE, SIZE, generator=gen)  # (B, 3, H, W) in [0, 1]
        x = normalize(rgb)
        rgb_np = rgb.numpy()
        calls = {
            "torch_detector": lambda x=x: det.predict(x),
            "torch_graph": lambda rgb=rgb: graph(rgb),
            "torchscript": lambda a=rgb_np: runners["torchscript"].predict_rgb(a),
            "onnxruntime": lambda a=rgb_np: runners["onnxruntime"].predict_rgb(a),
        }
        for runtime, fn in calls.items():
            with torch.no_grad():
                sec, n = time_calls(fn, min_time=args.min_time, repeats=args.repeats)
            fmt = "onnx" if runtime == "onnxruntime" else "torchscript"
            exported = runtime in ("onnxruntime", "torchscript")
            rows.append({"method": method, "runtime": runtime, "batch": batch, "images_per_s": batch / sec,
                         "ms_per_call": 1000 * sec, "calls": n, "image_size": SIZE, "input_size": SIZE,
                         "threads": torch.get_num_threads(),
                         "exporter": records[fmt]["exporter"] if exported else "eager",
                         "model_mb": paths[fmt].stat().st_size / 2**20 if exported else float("nan")})
            print(f"{method:10s} {runtime:15s} batch {batch}: {batch / sec:8.2f} images/s", flush=True)
    return rows


def append_rows(rows: list[dict], path: Path) -> None:
    """Append rows to the CSV atomically, under an exclusive lock (a file outside the repository)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"mudenet_export_speed_{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        new = pd.DataFrame(rows, columns=COLUMNS)
        old = pd.read_csv(path) if path.is_file() else None
        save_csv(path, new if old is None else pd.concat([old, new], ignore_index=True))


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=5, help="at least this many timed calls")
    p.add_argument("--min-time", type=float, default=2.0, help="and at least this many seconds of calls")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MUDENET_NO_PROGRESS", "1")
    os.environ.setdefault("MUDENET_TRACKING", "0")  # no MLflow runs for throwaway models
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="export_speed_") as tmp:
        work = Path(tmp)
        synthetic.generate(work / "data", categories=["plate"], image_size=SIZE, n_train=24, n_test_good=2,
                           n_test_per_defect=1, seed=0)
        for method in args.methods:
            ckpt = train_run(work / "data", work / "runs" / method, method)
            rows += bench_method(method, ckpt, work / "exports", args)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    common = {"torch_version": str(torch.__version__), "onnxruntime_version": onnxruntime.__version__,
              "git_sha": git_sha(), "device_name": cpu_name(),
              "load_avg_1m": os.getloadavg()[0], "timestamp_utc": stamp}
    append_rows([{**r, **common} for r in rows], args.out)
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
