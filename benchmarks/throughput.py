"""Throughput of MuDeNet: inference images/s (batch 1 and 16) and training images/s (stage-2 steps).

Measures, for the MuDeNet ``paper`` and ``cpu`` configs at 256 x 256 (``--image-size``):

* ``inference``: ``MuDeNet.predict`` (all four networks, normalised map, image score) at batch 1 and 16;
* ``train``: stage-2 steps of ``mudenet_core.train.train_end_to_end`` (S1, A, S2 forward + backward + Adam
  step, teacher forward under no_grad) at the config's training batch size;

in fp32 and under autocast (bf16 on CPU, fp16 on CUDA), on CPU and, when present, on CUDA. Peak memory is the
memory above what was held before the measured calls (activations, workspace, optimiser state; the weights are
``model_mb``): ``torch.cuda.max_memory_allocated`` growth on CUDA and, on CPU, the peak resident set size
(sampled every 2 ms with psutil; ``resource.ru_maxrss`` growth without psutil) minus the resident size before
the calls, after ``malloc_trim``. On CPU each (config, dtype) runs in a fresh interpreter.

The networks are randomly initialised (throughput does not depend on the weights; no backbone is needed).
Rows are appended atomically (under a lock) to ``results/benchmarks/throughput_<device>.csv``: one row per
(config, device, dtype, mode, batch), tidy.

``--compile`` adds inference rows with ``torch.compile``d networks (dtype ``fp32+compile`` / ``bf16+compile``
...; training is not compiled). ``--loss-curve N`` instead runs N stage-2 training steps of each config on a
generated ``plate`` category (randomly initialised teacher: no backbone download) and writes the per-step
losses to ``results/benchmarks/loss_curve_<device>.csv`` (``benchmarks/gpu_check.sh`` uses both).

Usage::

    python benchmarks/throughput.py --quick   # CPU (+ CUDA if present); CPU part ~3 min on an idle 2-core box
    python benchmarks/throughput.py --devices cuda --configs paper --repeats 20
    python benchmarks/throughput.py --devices cuda --configs paper --compile --repeats 20
    python benchmarks/throughput.py --devices cuda --configs paper --loss-curve 200
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import fcntl
import gc
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mudenet_core import train  # noqa: E402
from mudenet_core.io import git_sha, save_csv  # noqa: E402
from mudenet_core.methods import load_config, profile_path  # noqa: E402
from mudenet_core.mudenet import MuDeNet, MuDeNetConfig  # noqa: E402

COLUMNS = ["config", "device", "dtype", "mode", "batch", "images_per_s", "peak_mem_mb", "model_mb",
           "image_size", "repeats", "quick", "torch_version", "git_sha", "device_name", "num_threads",
           "load_avg_1m", "timestamp_utc"]
AMP_DTYPE = {"cpu": ("bf16", torch.bfloat16), "cuda": ("fp16", torch.float16)}


class PeakRSS:
    """Peak resident set size (bytes) above the level at ``__enter__``, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak_delta = interval_s, 0
        try:
            import psutil

            self._proc = psutil.Process(os.getpid())
        except ImportError:  # fall back to the lifetime maximum of getrusage (only sees new peaks)
            self._proc = None

    def _rss(self) -> int:
        if self._proc is not None:
            return self._proc.memory_info().rss
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._base = self._peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_delta = self._peak - self._base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPE[device.type][1])


def release_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so RSS is a fair baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS baselines may include cached memory
        pass


def _measure(fn, device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs; return (seconds per run, peak memory MiB).

    Peak memory covers warm-up and timed runs: CUDA ``max_memory_allocated`` minus the allocation before them,
    CPU peak RSS minus the RSS before them (after :func:`release_heap`).
    """
    release_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        dt_s = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with PeakRSS() as mem:
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            dt_s = time.perf_counter() - t0
        peak = mem.peak_delta / 2**20
    return dt_s / repeats, peak


def build_detector(cfg: MuDeNetConfig, device: torch.device, seed: int = 0) -> MuDeNet:
    """A MuDeNet with seeded random weights on ``device``, ready for ``predict``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        det = MuDeNet(cfg)
    det.nets.to(device).eval()
    det.device = device
    det.fitted = True
    return det


def time_inference(det: MuDeNet, images: torch.Tensor, device: torch.device, dtype: str, *, repeats: int,
                   warmup: int) -> tuple[float, float]:
    """(seconds per ``predict`` call on ``images`` (B, 3, H, W), peak memory MiB)."""

    def run():
        with _autocast(device, dtype), torch.no_grad():
            det.predict(images)

    return _measure(run, device, repeats, warmup)


def time_training(det: MuDeNet, cfg: MuDeNetConfig, pool: torch.Tensor, device: torch.device, dtype: str, *,
                  steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per stage-2 step on batches from ``pool`` (N, 3, H, W), peak memory MiB).

    Warm-up steps run in a separate call; the timed call includes one optimiser creation (negligible).
    """

    tc = cfg.train
    penalty = None
    if tc.penalty_folder:  # the config trains with a penalty on extra images: same cost, random pixels
        penalty = torch.randn(pool.shape, generator=torch.Generator().manual_seed(1))

    def run(n: int):
        with _autocast(device, dtype):
            train.train_end_to_end(det.nets, pool, steps=n, lr=tc.lr, batch_size=tc.batch_size,
                                   generator=torch.Generator().manual_seed(0), device=device,
                                   detach_ae=tc.detach_ae, hard_q=tc.hard_q, penalty_images=penalty,
                                   penalty_weight=tc.penalty_weight, show_progress=False)

    if warmup > 0:
        run(warmup)
    sec, peak = _measure(lambda: run(steps), device, 1, 0)  # a fresh optimiser: Adam state is in the peak
    return sec / steps, peak


def compiled(det: MuDeNet) -> MuDeNet:
    """The same detector with ``torch.compile``d networks for ``predict`` (training stays eager)."""
    det.nets = torch.compile(det.nets)
    return det


def loss_curve(name: str, cfg: MuDeNetConfig, device: torch.device, steps: int, *, n_images: int = 16,
               seed: int = 0) -> pd.DataFrame:
    """Per-step stage-2 losses of ``steps`` steps on a generated ``plate`` category at the config's size.

    The teacher is randomly initialised (frozen, as in stage 2): the curve checks the training path and its
    speed on ``device``, not detection quality.

    Returns:
        one row per step: config, device, step, L1, LA, L2, L, seconds since the start.
    """
    import tempfile

    from mudenet_core.data import DataConfig, make_splits, synthetic

    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(tmp, categories=["plate"], image_size=cfg.image_size, n_train=n_images,
                           n_test_good=1, n_test_per_defect=1, seed=seed)
        splits = make_splits(DataConfig(dataset="synthetic", root=tmp, category="plate",
                                        image_size=cfg.image_size, val_fraction=0.0), show_progress=False)
        pool = torch.stack([splits.train[i]["image"] for i in range(len(splits.train))])  # (N, 3, H, W)
    det = build_detector(cfg, device, seed=seed)
    tc = cfg.train
    t0, stamps = time.perf_counter(), []

    def tick(stage: str, step: int, losses: dict) -> None:
        _sync(device)
        stamps.append(time.perf_counter() - t0)

    log = train.train_end_to_end(det.nets, pool, steps=steps, lr=tc.lr, batch_size=tc.batch_size,
                                 generator=torch.Generator().manual_seed(seed), device=device,
                                 detach_ae=tc.detach_ae, hard_q=tc.hard_q, callback=tick, show_progress=False)
    n = len(log["L"])
    return pd.DataFrame({"config": name, "device": device.type, "step": list(range(1, n + 1)),
                         **{k: log[k] for k in ("L1", "LA", "L2", "L")}, "elapsed_s": stamps[:n]})


def bench_config(name: str, cfg: MuDeNetConfig, device: torch.device, dtypes: list[str], *, repeats: int,
                 train_steps: int, warmup: int, batches: tuple[int, ...], quick: bool = False,
                 compile_inference: bool = False) -> list[dict]:
    """All measurements of one config on one device: inference per batch size, then training, per dtype.

    With ``quick``, only the first batch size gets warm-up calls (they initialise the kernels for the others
    too) and training gets none, so its first step's one-off costs (Adam state) count: a lower bound.
    """
    g = torch.Generator().manual_seed(0)
    size, bt = cfg.image_size, cfg.train.batch_size
    rows = []
    for dtype in dtypes:
        det = build_detector(cfg, device)
        if compile_inference:  # extra inference rows with the compiled networks (warm-up includes compiling)
            cdet = compiled(build_detector(cfg, device))
            for b in batches:
                images = torch.randn(b, 3, size, size, generator=g).to(device)
                n = repeats if b == batches[0] else max(1, repeats // 2)
                sec, peak = time_inference(cdet, images, device, dtype, repeats=n, warmup=max(1, warmup))
                rows.append(dict(config=name, dtype=f"{dtype}+compile", mode="inference", batch=b,
                                 images_per_s=b / sec, peak_mem_mb=peak, repeats=n, image_size=size))
                print(f"  {name:6s} {device.type:4s} {dtype}+compile inference b={b:<3d} "
                      f"{b / sec:9.2f} img/s", flush=True)
            del cdet
        for b in batches:
            images = torch.randn(b, 3, size, size, generator=g).to(device)  # (B, 3, H, W)
            n = repeats if b == batches[0] else max(1, repeats // 2)
            warm = warmup if (b == batches[0] or not quick) else 0
            sec, peak = time_inference(det, images, device, dtype, repeats=n, warmup=warm)
            rows.append(dict(config=name, dtype=dtype, mode="inference", batch=b, images_per_s=b / sec,
                             peak_mem_mb=peak, repeats=n, image_size=size))
            print(f"  {name:6s} {device.type:4s} {dtype:4s} inference b={b:<3d} {b / sec:9.2f} img/s  "
                  f"peak {peak:8.1f} MiB", flush=True)
        pool = torch.randn(max(2 * bt, 16), 3, size, size, generator=g)  # (N, 3, H, W) training images
        sec, peak = time_training(det, cfg, pool, device, dtype, steps=train_steps,
                                  warmup=0 if quick else warmup)
        rows.append(dict(config=name, dtype=dtype, mode="train", batch=bt, images_per_s=bt / sec,
                         peak_mem_mb=peak, repeats=train_steps, image_size=size))
        print(f"  {name:6s} {device.type:4s} {dtype:4s} train     b={bt:<3d} {bt / sec:9.2f} img/s  "
              f"peak {peak:8.1f} MiB", flush=True)
        if device.type == "cuda":
            del det, pool
            torch.cuda.empty_cache()
    return rows


def append_rows(path: Path, rows: pd.DataFrame) -> Path:
    """Append rows to a CSV atomically, under an exclusive lock (concurrent runs do not lose rows)."""
    import hashlib
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]  # lock file outside the repository
    with open(Path(tempfile.gettempdir()) / f"mudenet_throughput_{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = pd.read_csv(path) if path.is_file() else None
        df = rows if old is None else pd.concat([old, rows], ignore_index=True)
        return save_csv(path, df)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(name: str, dtype: str, device: torch.device, args, *, repeats: int,
            train_steps: int) -> list[dict]:
    """Rows of one (config, dtype) on ``device``, measured in this process."""
    cfg = load_config("mudenet", name)
    cfg = cfg.replace(image_size=args.image_size) if args.image_size > 0 else cfg
    print(f"{name}: width={cfg.width} C={cfg.out_channels} Z={cfg.latent_dim} size={cfg.image_size} "
          f"train batch={cfg.train.batch_size} on {device} ({dtype})", flush=True)
    rows = bench_config(name, cfg, device, [dtype], repeats=repeats, train_steps=train_steps, warmup=1,
                        batches=(1, 16), quick=args.quick, compile_inference=args.compile)
    det = build_detector(cfg, torch.device("cpu"))
    model_mb = sum(t.numel() * t.element_size() for t in det.nets.state_dict().values()) / 2**20
    for r in rows:
        r["load_avg_1m"] = os.getloadavg()[0]
        r["model_mb"] = model_mb
    return rows


def measure_in_subprocess(name: str, dtype: str, device: torch.device, argv: list[str]) -> list[dict]:
    """Run :func:`measure` in a fresh interpreter (CPU: a clean heap, so peak RSS is not masked by memory
    that the allocator kept from earlier measurements) and return its rows."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--configs", name, "--dtypes", dtype,
               "--devices", device.type, "--worker-out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["paper", "cpu"], help="profiles in configs/mudenet/")
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: both if present)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "amp"],
                   help="fp32 and/or amp (bf16 autocast on CPU, fp16 autocast on CUDA)")
    p.add_argument("--image-size", type=int, default=256, help="square input size; 0 = the config's own")
    p.add_argument("--repeats", type=int, default=None, help="timed inference calls at batch 1 (default 10)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="one timed call each (CPU: ~3 min, idle 2 cores)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: measure everything in this process (faster start, peak RSS less reliable)")
    p.add_argument("--compile", action="store_true",
                   help="also time inference with torch.compile'd networks (dtype '<dtype>+compile')")
    p.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                   help="instead: STEPS stage-2 training steps per config on a generated category, losses to "
                        "loss_curve_<device>.csv")
    p.add_argument("--out-dir", type=Path, default=REPO / "results" / "benchmarks")
    p.add_argument("--dry-run", action="store_true", help="print the rows, write nothing")
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 10)
    train_steps = args.train_steps or (1 if args.quick else 5)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for name in args.configs:
        if not profile_path("mudenet", name).is_file():
            p.error(f"no MuDeNet profile {profile_path('mudenet', name)}")
    if args.worker_out is not None:  # child of measure_in_subprocess: one config, one dtype, one device
        device = torch.device(devices[0])
        rows = measure(args.configs[0], args.dtypes[0], device, args, repeats=repeats,
                       train_steps=train_steps)
        args.worker_out.write_text(json.dumps(rows))
        return 0
    child_argv = ["--image-size", str(args.image_size), "--repeats", str(repeats), "--train-steps",
                  str(train_steps)] + (["--threads", str(args.threads)] if args.threads else []) + (
                  ["--quick"] if args.quick else []) + (["--compile"] if args.compile else [])
    sha, stamp = git_sha(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if args.loss_curve > 0:
        for dev_name in devices:
            device = torch.device(dev_name)
            if device.type == "cuda" and not torch.cuda.is_available():
                print("cuda requested but not available; skipped", file=sys.stderr)
                continue
            for name in args.configs:
                cfg = load_config("mudenet", name)
                cfg = cfg.replace(image_size=args.image_size) if args.image_size > 0 else cfg
                df = loss_curve(name, cfg, device, args.loss_curve).assign(git_sha=sha, timestamp_utc=stamp)
                every = max(1, len(df) // 10)
                shown = sorted(set(range(0, len(df), every)) | {len(df) - 1})
                print(df.iloc[shown].round(4).to_string(index=False))
                print(f"{name} on {device.type}: {len(df)} steps in {df['elapsed_s'].iloc[-1]:.1f} s, "
                      f"L {df['L'].iloc[:10].mean():.4f} (first 10) -> "
                      f"{df['L'].iloc[-10:].mean():.4f} (last 10)")
                if not args.dry_run:
                    path = append_rows(args.out_dir / f"loss_curve_{device.type}.csv", df)
                    print(f"appended {len(df)} rows to {path}")
        return 0
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("cuda requested but not available; skipped", file=sys.stderr)
            continue
        dtypes = [d if d == "fp32" else AMP_DTYPE[device.type][0] for d in args.dtypes]
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        rows = []
        t0 = time.perf_counter()
        for name in args.configs:
            for dtype in dtypes:
                if device.type == "cpu" and not args.in_process:
                    got = measure_in_subprocess(name, dtype, device, child_argv)
                else:
                    got = measure(name, dtype, device, args, repeats=repeats, train_steps=train_steps)
                rows += [{**r, "device": device.type, "torch_version": str(torch.__version__), "git_sha": sha,
                          "device_name": device_name, "num_threads": args.threads or torch.get_num_threads(),
                          "quick": args.quick, "timestamp_utc": stamp} for r in got]
        df = pd.DataFrame(rows)[COLUMNS]
        print(f"{device.type}: {time.perf_counter() - t0:.0f} s")
        shown = df[["config", "dtype", "mode", "batch", "images_per_s", "peak_mem_mb", "load_avg_1m"]]
        print(shown.round(2).to_string(index=False))
        if not args.dry_run:
            path = append_rows(args.out_dir / f"throughput_{device.type}.csv", df)
            print(f"appended {len(df)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
