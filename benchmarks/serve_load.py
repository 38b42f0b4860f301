"""Load benchmark of ``mudenet serve``: throughput and latency percentiles at concurrency 1/4/16, server RSS.

For each method (default MuDeNet and PatchCore, ``--profile smoke``), a model is trained with the CLI on the
generated ``plate`` category into a temporary MLflow registry, ``mudenet serve --model <id>`` is started in a
subprocess on a free localhost port, and ``--requests`` POSTs of ``/api/test_image`` (generated test images,
round robin) are sent at each concurrency. Measured: requests/s, p50 / p95 / p99 latency (ms), errors
(non-200 answers or failed connections), and the server's resident set size before the first and after the
last request (MiB, psutil). Writes a tidy CSV (one row per method x concurrency x metric, with the git SHA)::

    .venv/bin/python benchmarks/serve_load.py --requests 40        # -> results/benchmarks/serve_load_cpu.csv

Bounded: localhost only, a fixed request count, every subprocess stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mudenet_core import io, tracking  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(method: str, profile: str, data: Path, out: Path, env: dict) -> None:
    cmd = [sys.executable, "-m", "mudenet_core", "train", "--method", method, "--profile", profile,
           "--data-root", str(data), "--category", "plate", "--output-dir", str(out), "--no-progress"]
    subprocess.run(cmd, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / (1 << 20)


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/api/status", timeout=2).json().get("model"):
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up in time")


def _load(url: str, images: list[tuple[str, bytes]], n: int,
          concurrency: int) -> tuple[list[float], int, float]:
    import httpx

    def one(i: int) -> tuple[float, bool]:
        name, data = images[i % len(images)]
        t0 = time.perf_counter()
        try:
            r = client.post(url + "/api/test_image", files={"file": (name, data, "image/png")}, timeout=120)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - t0, ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    return [t for t, _ in out], sum(1 for _, ok in out if not ok), wall


def main(argv: list[str] | None = None) -> int:
    """Train, serve, load, write the CSV; returns the exit code (1 when any request failed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["mudenet", "patchcore"])
    p.add_argument("--profile", default="smoke", choices=("smoke", "cpu"))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    p.add_argument("--image-size", type=int, default=128, help="generated images (px)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "serve_load_cpu.csv")
    args = p.parse_args(argv)
    from mudenet_core.data import synthetic

    rows, failed = [], 0
    sha = io.git_sha()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        tmp = Path(tmp)
        data = synthetic.generate(tmp / "data", categories=["plate"], image_size=args.image_size, n_train=16,
                                  n_test_good=4, n_test_per_defect=2, seed=0)
        images = [(p.name, p.read_bytes()) for p in sorted((data / "plate" / "test").rglob("*.png"))]
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, tracking.ENV_SWITCH: "1",
               "OMP_NUM_THREADS": str(args.server_threads)}
        env.pop("MUDENET_API_TOKEN", None)
        for method in args.methods:
            _train(method, args.profile, data, tmp / method, env)
            (model,) = [m for m in tracking.list_models(uri) if m["method"] == method]
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "mudenet_core", "serve", "--port", str(port), "--model",
                   model["model_id"], "--threads", str(args.server_threads)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_up(url, proc)
                _load(url, images, 4, 1)  # warm-up (first-call allocations)
                rss_before = _rss_mb(proc.pid)
                for c in args.concurrency:
                    lat, errors, wall = _load(url, images, args.requests, c)
                    failed += errors
                    ms = np.asarray(lat) * 1000
                    for metric, value in (("throughput_rps", args.requests / wall),
                                          ("latency_p50_ms", np.percentile(ms, 50)),
                                          ("latency_p95_ms", np.percentile(ms, 95)),
                                          ("latency_p99_ms", np.percentile(ms, 99)), ("errors", errors)):
                        rows.append({"method": method, "concurrency": c, "metric": metric,
                                     "value": float(value)})
                rss_after = _rss_mb(proc.pid)
                for metric, value in (("rss_before_mb", rss_before), ("rss_after_mb", rss_after)):
                    rows.append({"method": method, "concurrency": 0, "metric": metric, "value": float(value)})
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    df = pd.DataFrame(rows).assign(profile=args.profile, requests=args.requests, image_size=args.image_size,
                                   server_threads=args.server_threads, git_sha=sha)
    io.save_csv(args.out, df)
    wide = df.pivot_table(index=["method", "concurrency"], columns="metric", values="value")
    print(wide.round(2).to_string())
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
