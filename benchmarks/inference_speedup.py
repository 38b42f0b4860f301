"""Inference images/s of every method before and after the CPU speed work, measured interleaved.

"Before" is this working tree with the speed-path files (:data:`SPEED_FILES`) taken from a git ref (default
``HEAD``), "after" is the working tree as it is; everything else is the same code in both. Each method is
fitted once (its ``cpu`` profile, with training shortened by :data:`FAST_FIT`: throughput does not depend on
how long a network was trained) on MPDD ``metal_plate`` (the generated ``plate`` category when the real data
is absent), and saved; both variants load that same checkpoint (the state dicts did not change). Then, for
``--repeats`` rounds, every (method, variant) runs in a fresh interpreter (the order of the two variants
alternates between rounds): one warm-up ``predict`` (it builds the folded copies), then ``--calls`` timed
calls on the same batch of real test images; the row records the median seconds per call.

Rows (one per method, variant and round) go to ``results/benchmarks/inference_speedup_cpu.csv`` (tidy,
replaced atomically): ``method, profile, variant, round, batch, image_size, calls, sec_per_call,
images_per_s, num_threads, before_ref, git_sha, load_avg_1m, torch_version, device_name, timestamp_utc``.
The speed-up of a method is median(after) / median(before) over the rounds.

Usage::

    python benchmarks/inference_speedup.py --threads 1                 # every method, 3 rounds
    python benchmarks/inference_speedup.py --methods patchcore padim mudenet --repeats 1 --dry-run
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and "--worker-root" in sys.argv:  # a timing child: import the tree it was given
    sys.path.insert(0, sys.argv[sys.argv.index("--worker-root") + 1])
else:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

SPEED_FILES = (  # the files the speed work changed; "before" takes them from --before-ref
    "mudenet_core/nets/efficientnet_lite.py",
    "mudenet_core/nets/backbones.py",
    "mudenet_core/nets/pdn.py",
    "mudenet_core/nets/autoencoder.py",
    "mudenet_core/baselines/patchcore.py",
    "mudenet_core/baselines/padim.py",
    "mudenet_core/scoring.py",  # MuDeNet's fused head distances and one-matrix upsample + blur
    "mudenet_core/nets/mudenet.py",
    "mudenet_core/mudenet.py",
    "mudenet_core/baselines/uninformed_students.py",  # the teacher and students as one grouped network
)
# cpu-profile overrides that shorten training to a few steps (the networks keep their sizes)
FAST_FIT: dict[str, list[str]] = {
    "mudenet": ["distill.steps=2", "train.steps=2"],
    "padim": [],
    "patchcore": [],
    "ae": ["epochs=1"],
    "us": ["teacher_steps=2", "student_epochs=1"],
    "glass": ["epochs=1"],
    "pagmfr": ["epochs=1"],
    "rgpkd": ["epochs=1"],
}
COLUMNS = ["method", "profile", "variant", "round", "batch", "image_size", "calls", "sec_per_call",
           "images_per_s", "num_threads", "before_ref", "git_sha", "load_avg_1m", "torch_version",
           "device_name", "timestamp_utc"]
MPDD = REPO.parent / "shared" / "data" / "mpdd"


def build_before_tree(ref: str, dest: Path) -> Path:
    """Copy of ``mudenet_core/`` and ``configs/`` with :data:`SPEED_FILES` as they are at ``ref``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "mudenet_core", dest / "mudenet_core", ignore=ignore)
    shutil.copytree(REPO / "configs", dest / "configs", ignore=ignore)
    for rel in SPEED_FILES:
        res = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{rel}"], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"cannot read {rel} at {ref!r}: {res.stderr.strip()}")
        (dest / rel).write_text(res.stdout)
    return dest


def _data_config(image_size: int):
    from mudenet_core.data import DataConfig

    if (MPDD / "metal_plate").is_dir():
        return DataConfig(dataset="mvtec_ad", root=str(MPDD), category="metal_plate", image_size=image_size)
    return None


def fit_and_save(method: str, out_dir: Path, batch: int) -> tuple[Path, Path, str, int]:
    """Fit ``method`` (cpu profile + FAST_FIT) and save it; return (checkpoint, images file, data, size)."""
    from mudenet_core.data import DataConfig, make_splits, synthetic
    from mudenet_core.methods import get_method, load_config

    cfg = load_config(method, "cpu", overrides=FAST_FIT.get(method) or None)
    size = cfg.image_size
    data_cfg = _data_config(size)
    if data_cfg is None:  # no real data here: the generated plate category
        root = out_dir / "plate"
        synthetic.generate(root, categories=["plate"], image_size=size, n_train=24, n_test_good=4,
                           n_test_per_defect=2, seed=0)
        data_cfg = DataConfig(dataset="synthetic", root=str(root), category="plate", image_size=size)
    splits = make_splits(data_cfg, show_progress=False)
    det_cls, _ = get_method(method)
    det = det_cls(cfg)
    det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    ckpt = det.save(out_dir / f"{method}.pt")
    step = max(1, len(splits.test) // batch)  # spread over good and defective test images
    images = torch.stack([splits.test[i * step]["image"] for i in range(batch)])  # (B, 3, H, W)
    images_path = out_dir / f"{method}_images.pt"
    torch.save(images, images_path)
    return Path(ckpt), images_path, f"{data_cfg.dataset}/{data_cfg.category}", size


def worker(method: str, ckpt: Path, images_path: Path, calls: int) -> dict:
    """In a fresh interpreter on one tree: load, warm up, time ``calls`` predict calls (median)."""
    import mudenet_core
    from mudenet_core.methods import get_method

    det_cls, _ = get_method(method)
    det = det_cls.load(ckpt)
    images = torch.load(images_path, weights_only=True)
    det.predict(images)  # warm-up: kernels, and the folded copies where the tree has them
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        det.predict(images)
        times.append(time.perf_counter() - t0)
    return {"sec_per_call": statistics.median(times), "package": str(Path(mudenet_core.__file__).parent)}


def run_worker(root: Path, method: str, ckpt: Path, images_path: Path, calls: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-root", str(root),
           "--worker-method", method, "--worker-ckpt", str(ckpt), "--worker-images", str(images_path),
           "--calls", str(calls), "--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{method} on {root}: worker failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = (root / "mudenet_core").resolve()
    assert Path(out["package"]).resolve() == expected, f"worker imported {out['package']}, not {expected}"
    return out


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(FAST_FIT), help="registry names (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--calls", type=int, default=3, help="timed predict calls per run (their median is kept)")
    p.add_argument("--batch", type=int, default=8, help="images per predict call")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every run")
    p.add_argument("--before-ref", default="HEAD", help="git ref of the 'before' speed-path files")
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "inference_speedup_cpu.csv")
    p.add_argument("--dry-run", action="store_true", help="print the rows, write nothing")
    p.add_argument("--worker-root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-method", help=argparse.SUPPRESS)
    p.add_argument("--worker-ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-images", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker_root is not None:
        print(json.dumps(worker(args.worker_method, args.worker_ckpt, args.worker_images, args.calls)))
        return 0
    unknown = [m for m in args.methods if m not in FAST_FIT]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(FAST_FIT)}")

    import pandas as pd

    from mudenet_core.io import git_sha, save_csv

    sha, stamp = git_sha(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    with tempfile.TemporaryDirectory(prefix="inference_speedup_") as tmp:
        tmp = Path(tmp)
        before = build_before_tree(args.before_ref, tmp / "before")
        fitted = {}
        for method in args.methods:
            t0 = time.perf_counter()
            fitted[method] = fit_and_save(method, tmp, args.batch)
            print(f"fitted {method} on {fitted[method][2]} at {fitted[method][3]} px "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        trees = {"before": before, "after": REPO}
        for rnd in range(args.repeats):
            order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
            for method in args.methods:
                ckpt, images_path, _, size = fitted[method]
                for variant in order:
                    load = os.getloadavg()[0]
                    out = run_worker(trees[variant], method, ckpt, images_path, args.calls, args.threads)
                    sec = out["sec_per_call"]
                    rows.append(dict(method=method, profile="cpu", variant=variant, round=rnd,
                                     batch=args.batch, image_size=size, calls=args.calls, sec_per_call=sec,
                                     images_per_s=args.batch / sec, num_threads=args.threads,
                                     before_ref=args.before_ref, git_sha=sha, load_avg_1m=load,
                                     torch_version=str(torch.__version__), device_name=cpu_name(),
                                     timestamp_utc=stamp))
                    print(f"round {rnd} {method:9s} {variant:6s} {args.batch / sec:8.2f} img/s  "
                          f"(load {load:.2f})", flush=True)
    df = pd.DataFrame(rows)[COLUMNS]
    med = df.groupby(["method", "variant"])["images_per_s"].median().unstack("variant")
    med["speedup"] = med["after"] / med["before"]
    print(med.round(2).to_string())
    if not args.dry_run:
        path = save_csv(args.out, df)
        print(f"wrote {len(df)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
