"""Ours vs anomalib: PatchCore and PaDiM fitted and run on the same images, backbone, layers and threads.

Optional benchmark. anomalib is never a dependency of this project: it lives in a separate virtual
environment (default ``../anomalib-venv``, beside the checkout; ``--anomalib-python``)::

    python3 -m venv ../anomalib-venv
    ../anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib   # anomalib 2.7.0 here

What is the same for both: the images (our data pipeline resizes them once; both workers read the same
tensors, from MPDD ``metal_plate`` and a generated ``plate`` category), the train/test split (our
``train`` split, validation images held out), the backbone (our EfficientNet-Lite0 ImageNet weights mapped
onto timm's ``tf_efficientnet_lite0`` by :func:`lite0_to_timm_state_dict`, fed the same Lite-normalised
pixels), the layers (PatchCore: stage3 + stage5 = timm ``blocks.2`` + ``blocks.4``; PaDiM: stage2 + stage3 +
stage5 = ``blocks.1/2/4``), the coreset ratio (0.1), b = 9 reweighting neighbours, d = 100 PaDiM channels
and the very subset of them (the one our ``PaDiM.fit`` draws from seed 0, handed to anomalib's
``PadimModel`` as its ``idx``: two independent draws differ by up to 20 points of image AUROC on
metal_plate, which once passed for a difference of the libraries), the resolution (128 / 256 px), the
thread count, and the metric code (ours, :mod:`mudenet_core.metrics`, on the maps and scores each worker
returns). What differs is each library's own method code: anomalib's torch
models (``PatchcoreModel``, ``PadimModel``, called directly, without Lightning's ``Engine``) use the full
concatenated 152 channels where our PatchCore pools to 128, and their own coreset sampler and search.

Each (library, method, dataset, size) runs in a fresh subprocess (``--repeats`` rounds, the order of the two
libraries alternating), whose resident set size the parent samples every 20 ms (peak RSS). anomalib's
PatchCore grew to ~24 GB in an earlier run through glibc's memory-map threshold; ``--malloc-mmap-threshold``
sets ``MALLOC_MMAP_THRESHOLD_`` for the anomalib children (bytes; ours are left alone).

Rows go to ``results/benchmarks/peers_cpu.csv`` (tidy): ``library, method, dataset, image_size, round,
fit_s, images_per_s, peak_rss_mib, image_auroc, pixel_auroc, au_pro, n_train, n_test, num_threads,
malloc_mmap_threshold, library_version, git_sha, load_avg_1m, timestamp_utc``.

Usage::

    python benchmarks/peers.py --quick               # metal_plate, 128 px, 1 round (a few minutes)
    python benchmarks/peers.py --sizes 128 256 --datasets metal_plate plate --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Mapping  # noqa: E402

import torch  # noqa: E402

from mudenet_core.nets.efficientnet_lite import LITE0_BLOCKS, stage_block_ranges  # noqa: E402

ANOMALIB_PYTHON = str(REPO.parent / "anomalib-venv" / "bin" / "python")  # ../anomalib-venv
MPDD = REPO.parent / "shared" / "data" / "mpdd"
COLUMNS = [
    "library",
    "method",
    "dataset",
    "image_size",
    "round",
    "fit_s",
    "images_per_s",
    "peak_rss_mib",
    "image_auroc",
    "pixel_auroc",
    "au_pro",
    "n_train",
    "n_test",
    "num_threads",
    "malloc_mmap_threshold",
    "library_version",
    "git_sha",
    "load_avg_1m",
    "timestamp_utc",
]
# our layer names -> timm's features_only module names (tf_efficientnet_lite0: blocks.i is stage i + 1)
TIMM_LAYERS = {f"stage{i + 1}": f"blocks.{i}" for i in range(len(LITE0_BLOCKS))}
METHOD_LAYERS = {"patchcore": ("stage3", "stage5"), "padim": ("stage2", "stage3", "stage5")}
CORESET_RATIO, NUM_NEIGHBORS, PADIM_FEATURES = 0.1, 9, 100
PADIM_SEED = 0  # seed of the generator our PaDiM.fit draws its channel subset from (shared with anomalib)


# --- weight mapping -----------------------------------------------------------------------------------------

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# MBConv pieces: stage 1 (no expansion) is timm's DepthwiseSeparableConv, the others InvertedResidual
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_key_to_timm(key: str) -> str:
    """Our EfficientNet-Lite0 state-dict key -> timm ``tf_efficientnet_lite0``'s.

    Example:
        >>> lite0_key_to_timm("_blocks.15._bn2.running_var")
        'blocks.6.0.bn3.running_var'
        >>> lite0_key_to_timm("_bn0.weight")
        'bn1.weight'
    """
    parts = key.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    if parts[0] != "_blocks" or len(parts) < 4:
        raise KeyError(f"not an EfficientNet-Lite0 state-dict key: {key!r}")
    n = int(parts[1])
    for stage, (start, stop) in enumerate(stage_block_ranges().values()):
        if start <= n < stop:
            names = _FIRST_STAGE if LITE0_BLOCKS[stage].expand_ratio == 1 else _EXPANDED
            if parts[2] not in names:
                raise KeyError(f"{key!r}: no {parts[2]!r} in a stage-{stage + 1} block")
            return ".".join(["blocks", str(stage), str(n - start), names[parts[2]], *parts[3:]])
    raise KeyError(f"{key!r}: block {n} is beyond Lite0's {sum(b.num_repeat for b in LITE0_BLOCKS)} blocks")


def lite0_to_timm_state_dict(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename every key of our Lite0 state dict for timm (tensors unchanged: both store OIHW conv weights).

    Raises:
        KeyError: an unknown key, or two keys mapping to one name.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        new = lite0_key_to_timm(k)
        if new in out:
            raise KeyError(f"two keys map to {new!r}")
        out[new] = v
    return out


# --- data ---------------------------------------------------------------------------------------------------


def prepare_data(dataset: str, size: int, out_dir: Path) -> Path:
    """Resize the dataset once with our pipeline and save train / test tensors for both workers."""
    from mudenet_core.data import DataConfig, make_splits, synthetic

    if dataset == "metal_plate":
        if not (MPDD / "metal_plate").is_dir():
            raise SystemExit(f"MPDD metal_plate not found at {MPDD / 'metal_plate'}")
        cfg = DataConfig(dataset="mvtec_ad", root=str(MPDD), category="metal_plate", image_size=size)
    elif dataset == "plate":
        root = out_dir / "generated"
        if not root.is_dir():
            synthetic.generate(
                root,
                categories=["plate"],
                image_size=256,
                n_train=60,
                n_test_good=20,
                n_test_per_defect=10,
                seed=0,
            )
        cfg = DataConfig(dataset="synthetic", root=str(root), category="plate", image_size=size)
    else:
        raise SystemExit(f"unknown dataset {dataset!r}: metal_plate or plate")
    splits = make_splits(cfg, show_progress=False)
    train = torch.stack([splits.train_unaugmented[i]["image"] for i in range(len(splits.train_unaugmented))])
    test = [splits.test[i] for i in range(len(splits.test))]
    path = out_dir / f"{dataset}_{size}.pt"
    torch.save(
        {
            "train": train,
            "test": torch.stack([t["image"] for t in test]),
            "labels": torch.tensor([int(t["label"]) for t in test]),
            "masks": torch.stack([(t["mask"][0] > 0.5) for t in test]).to(torch.uint8),
        },
        path,
    )
    return path


def lite0_timm_weights(out_dir: Path) -> Path:
    """Our shipped Lite0 ImageNet weights, renamed for timm, saved for the anomalib worker."""
    from mudenet_core.nets.backbones import lite0_weights_path

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    path = out_dir / "tf_efficientnet_lite0_from_ours.pt"
    torch.save(lite0_to_timm_state_dict(state), path)
    return path


def padim_channel_subset(out_dir: Path) -> Path:
    """The PaDiM channel subset our worker draws (seed ``PADIM_SEED``), saved for the anomalib worker."""
    from mudenet_core.baselines.padim import random_channel_subset
    from mudenet_core.nets.backbones import BACKBONES

    n_channels = sum(BACKBONES["efficientnet_lite0"].channels[k] for k in METHOD_LAYERS["padim"])
    idx = random_channel_subset(n_channels, PADIM_FEATURES, torch.Generator().manual_seed(PADIM_SEED))
    path = out_dir / "padim_channel_idx.pt"
    torch.save(idx, path)
    return path


# --- our worker ---------------------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


def ours_worker(method: str, data_path: Path, size: int, out: Path, batch: int) -> dict:
    """Fit and run our detector (cpu profile at ``size``, the shared settings); save maps and scores."""
    import numpy as np

    from mudenet_core.methods import get_method, load_config

    data = torch.load(data_path, weights_only=True)
    cfg = load_config(method, "cpu").replace(image_size=size)
    if method == "patchcore":
        cfg = cfg.replace(coreset_ratio=CORESET_RATIO, reweight_neighbors=NUM_NEIGHBORS)
    else:
        cfg = cfg.replace(n_features=PADIM_FEATURES)
    det_cls, _ = get_method(method)
    det = det_cls(cfg)
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(PADIM_SEED)
    det.fit(_Images(data["train"]), None, generator=generator, show_progress=False)
    fit_s = time.perf_counter() - t0
    if method == "padim":  # the subset handed to anomalib must be the one we fitted with
        shared = torch.load(data_path.with_name("padim_channel_idx.pt"), weights_only=True)
        if not torch.equal(det.model.channel_idx.cpu(), shared):
            raise RuntimeError("our PaDiM drew another channel subset than the one given to anomalib")
    maps, scores = [], []
    t0 = time.perf_counter()
    for s in range(0, len(data["test"]), batch):
        m, sc = det.predict(data["test"][s : s + batch])
        maps.append(m[:, 0].numpy())
        scores.append(sc.double().numpy())
    pred_s = time.perf_counter() - t0
    np.save(out / "maps.npy", np.concatenate(maps).astype(np.float32))
    np.save(out / "scores.npy", np.concatenate(scores))
    import mudenet_core

    return {"fit_s": fit_s, "predict_s": pred_s, "version": getattr(mudenet_core, "__version__", "?")}


# --- orchestration ------------------------------------------------------------------------------------------


def run_sampled(
    cmd: list[str], env: dict, interval_s: float = 0.02
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd``, sampling its resident set size; return (result, peak RSS MiB).

    The child's stdout and stderr go to files, not pipes: nothing reads a pipe while the parent samples, so a
    child that writes more than the pipe buffer (64 KiB; anomalib's progress output at 256 px) would block
    in ``write`` for ever, stalling its own fit clock first.
    """
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        peak = 0
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                break
            time.sleep(interval_s)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), peak / 2**20


def run_one(library: str, method: str, data_path: Path, size: int, args, weights: Path,
            channel_idx: Path) -> dict:
    """One fresh-process run: fit, predict the test set, metrics with our code, peak RSS."""
    import numpy as np

    from mudenet_core import metrics

    with tempfile.TemporaryDirectory(prefix=f"peers_{library}_") as tmp:
        out = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        if library == "ours":
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                method,
                "--data",
                str(data_path),
                "--size",
                str(size),
                "--out",
                str(out),
                "--threads",
                str(args.threads),
            ]
        else:
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            env.pop("PYTHONPATH", None)
            cmd = [
                args.anomalib_python,
                str(Path(__file__).with_name("peers_worker_anomalib.py")),
                method,
                "--data",
                str(data_path),
                "--weights",
                str(weights),
                "--out",
                str(out),
                "--threads",
                str(args.threads),
                "--coreset-ratio",
                str(CORESET_RATIO),
                "--num-neighbors",
                str(NUM_NEIGHBORS),
                "--n-features",
                str(PADIM_FEATURES),
                "--layers",
                *[TIMM_LAYERS[k] for k in METHOD_LAYERS[method]],
                "--channel-idx",
                str(channel_idx),
            ]
        res, peak = run_sampled(cmd, env)
        if res.returncode != 0:
            raise RuntimeError(f"{library} {method} {size} px failed:\n{res.stderr[-4000:]}")
        info = json.loads(res.stdout.strip().splitlines()[-1])
        data = torch.load(data_path, weights_only=True)
        labels, masks = data["labels"].numpy(), data["masks"].numpy()
        maps, scores = np.load(out / "maps.npy"), np.load(out / "scores.npy")
    n_test = len(labels)
    return {
        "fit_s": info["fit_s"],
        "images_per_s": n_test / info["predict_s"],
        "peak_rss_mib": peak,
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "au_pro": metrics.au_pro(masks, maps),
        "n_train": len(data["train"]),
        "n_test": n_test,
        "library_version": info["version"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["patchcore", "padim"], choices=sorted(METHOD_LAYERS))
    p.add_argument("--datasets", nargs="+", default=["metal_plate", "plate"])
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="bounded: metal_plate, 128 px, 1 round")
    p.add_argument("--libraries", nargs="+", default=["ours", "anomalib"], choices=["ours", "anomalib"])
    p.add_argument("--anomalib-python", default=ANOMALIB_PYTHON, help="python of the anomalib venv")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ (bytes) for the anomalib children; 0 leaves glibc's default",
    )
    p.add_argument("--out-csv", type=Path, default=REPO / "results" / "benchmarks" / "peers_cpu.csv")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--worker", choices=sorted(METHOD_LAYERS), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(ours_worker(args.worker, args.data, args.size, args.out, batch=8)))
        return 0
    if args.quick:
        args.datasets, args.sizes, args.repeats = ["metal_plate"], [128], 1
    if "anomalib" in args.libraries and not Path(args.anomalib_python).is_file():
        p.error(f"anomalib's python {args.anomalib_python} not found; create the venv (see the module doc)")

    import pandas as pd

    from mudenet_core.io import git_sha, save_csv

    sha, stamp = git_sha(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    keys = ["dataset", "image_size", "method", "library"]
    old = pd.read_csv(args.out_csv) if args.out_csv.is_file() and not args.dry_run else None
    rows = []

    def write_rows() -> None:
        """Rewrite the CSV after every run (a killed run keeps what it measured): the earlier rows of the
        (dataset, size, method, library) measured now are replaced, all others kept."""
        df = pd.DataFrame(rows)[COLUMNS]
        if old is not None:
            measured = set(map(tuple, df[keys].astype(str).values))
            keep = [tuple(r) not in measured for r in old[keys].astype(str).values]
            df = pd.concat([old[keep], df], ignore_index=True)
        save_csv(args.out_csv, df)

    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        tmp = Path(tmp)
        weights = lite0_timm_weights(tmp)
        channel_idx = padim_channel_subset(tmp)  # beside the data files: ours_worker checks it
        for dataset in args.datasets:
            for size in args.sizes:
                data_path = prepare_data(dataset, size, tmp)
                for rnd in range(args.repeats):
                    libs = args.libraries if rnd % 2 == 0 else args.libraries[::-1]
                    for method in args.methods:
                        for lib in libs:
                            load = os.getloadavg()[0]
                            r = run_one(lib, method, data_path, size, args, weights, channel_idx)
                            rows.append(
                                {
                                    "library": lib,
                                    "method": method,
                                    "dataset": dataset,
                                    "image_size": size,
                                    "round": rnd,
                                    **r,
                                    "num_threads": args.threads,
                                    "malloc_mmap_threshold": args.malloc_mmap_threshold
                                    if lib == "anomalib"
                                    else 0,
                                    "git_sha": sha,
                                    "load_avg_1m": load,
                                    "timestamp_utc": stamp,
                                }
                            )
                            print(
                                f"{dataset} {size}px #{rnd} {lib:8s} {method:9s} fit {r['fit_s']:6.1f} s  "
                                f"{r['images_per_s']:6.2f} img/s  peak {r['peak_rss_mib']:7.0f} MiB  "
                                f"AUROC {r['image_auroc']:.3f} / {r['pixel_auroc']:.3f}  AU-PRO "
                                f"{r['au_pro']:.3f}",
                                flush=True,
                            )
                            if not args.dry_run:
                                write_rows()
    df = pd.DataFrame(rows)[COLUMNS]
    summary = df.groupby(keys)[
        ["fit_s", "images_per_s", "peak_rss_mib", "image_auroc", "pixel_auroc", "au_pro"]
    ].median()
    print(summary.round(3).to_string())
    if not args.dry_run:
        print(f"wrote {len(rows)} rows to {args.out_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
