"""Command line: ``mudenet distill | train | evaluate | predict`` (also ``python -m mudenet_core``).

Every command works for any registered method (``--method``, default ``mudenet``); ``distill`` only for
methods with a distillation step. The method's config comes from a profile (``--profile smoke|cpu|paper``,
default ``paper`` on CUDA and ``cpu`` otherwise) or a YAML file (``--config``), then from trailing
``key=value`` overrides (``train.steps=100 width=32``; nested keys as ``outer.inner=value``); overrides named
``data.<key>=value`` change the data config. Unknown keys are rejected. ``--config`` also accepts a
``config.yaml`` written by ``train``, which reproduces that run.

Typical session::

    mudenet train --profile smoke --output-dir runs/smoke            # model.pt, config.yaml, split.csv
    mudenet evaluate --checkpoint runs/smoke                         # runs/smoke/evaluate/...
    mudenet predict --checkpoint runs/smoke --input some/folder      # runs/smoke/predict/...

Two-stage training: ``mudenet distill --output-dir runs/t`` leaves a resumable checkpoint in
``runs/t/checkpoints``; ``mudenet train --init runs/t --output-dir runs/m`` continues from it.

User errors (bad option, unknown key, missing file, an output folder that exists) print one line
``mudenet: error: ...`` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from mudenet_core import __version__
from mudenet_core.config import ConfigError
from mudenet_core.io import (
    CheckpointError,
    atomic_path,
    atomic_write_text,
    git_sha,
    prepare_out_dir,
    save_csv,
    save_json,
)
from mudenet_core.methods import METHODS, PROFILES, get_method, profile_path, training_split

PROG = "mudenet"
COMMANDS = ("distill", "train", "evaluate", "predict")
MODEL_FILE = "model.pt"  # the trained detector (Detector.save)
RUN_CONFIG_FILE = "config.yaml"  # method, method_config, data_config, seed, git_sha ... of a run
SPLIT_FILE = "split.csv"  # the resolved dataset index of a run
CHECKPOINT_DIR = "checkpoints"  # resumable training state (the method's own files)
DATA_PREFIX = "data."  # overrides with this prefix go to the data config


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user asked for something impossible" (no traceback, exit 2)."""
    types: list[type[BaseException]] = [CLIError, ConfigError, CheckpointError, FileExistsError,
                                        FileNotFoundError, NotADirectoryError]
    optional = (("mudenet_core.data.images", "DataError"), ("mudenet_core.metrics", "MetricError"),
                ("mudenet_core.nets.backbones", "BackboneWeightsError"))
    for mod, name in optional:
        try:
            t = getattr(__import__(mod, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(t, type) and issubclass(t, BaseException):
            types.append(t)
    return tuple(types)


# ----------------------------------------------------------------------------------------------------- parser


def _add_common(p: argparse.ArgumentParser, *, trains: bool) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--method", default=None,
                   help=f"{', '.join(METHODS)} (default: mudenet, or the method of the checkpoint/config)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="output folder" + (" (required)" if trains else " (default: <checkpoint dir>/<cmd>)"))
    g.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if trains:
        g.add_argument("--config", type=Path, default=None,
                       help="method config YAML, or a config.yaml written by `train` (instead of --profile)")
        g.add_argument("--profile", choices=PROFILES, default=None,
                       help="configs/<method>/<profile>.yaml (default: paper on CUDA, cpu otherwise)")
        g.add_argument("--resume", action="store_true",
                       help="continue from <output-dir>/checkpoints (reuses the output folder)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="synthetic (default), mvtec_ad, mvtec_loco, visa, mpdd, folder")
    d.add_argument("--data-root", type=Path, default=None,
                   help="dataset root (default for synthetic: the embedded generated dataset)")
    d.add_argument("--category", default=None, help="dataset category")


def build_parser() -> argparse.ArgumentParser:
    """The ``mudenet`` argument parser (trailing ``key=value`` overrides are collected by :func:`main`)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="MuDeNet and baselines for unsupervised visual anomaly detection.",
        epilog="Trailing key=value arguments override the method config (data.<key>=value: the data config).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    overrides_help = ("Trailing key=value arguments override the method config (nested: outer.inner=value); "
                      "data.<key>=value overrides the data config. Unknown keys are rejected.")

    p = sub.add_parser("distill", help="stage 1 only: distil the teacher (methods with a distillation step)",
                       description="Distil the teacher; writes checkpoints/, config.yaml, split.csv.",
                       epilog=overrides_help)
    _add_common(p, trains=True)

    p = sub.add_parser("train", help="train on train/good, calibrate on the validation split",
                       description="Train a detector; writes model.pt, config.yaml, split.csv, a log",
                       epilog=overrides_help)
    _add_common(p, trains=True)
    p.add_argument("--init", type=Path, default=None,
                   help="output folder of `distill`: continue from its checkpoint (and, by default, config)")
    p.add_argument("--texture-dir", type=Path, default=None,
                   help="texture images for the synthetic validation anomalies that choose the threshold "
                        "(e.g. DTD images/; default: self-textures from the normal images)")
    p.add_argument("--threshold-quantile", type=float, default=None,
                   help="threshold = this quantile of the normal validation scores (default 0.99)")

    p = sub.add_parser("evaluate", help="score the test split: metrics, per-image scores, overlays",
                       description="Evaluate a checkpoint on the test split of its dataset.",
                       epilog="Trailing data.<key>=value arguments override the recorded data config.")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt or the folder holding it")
    _add_common(p, trains=False)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--n-overlays", type=int, default=8, help="test images drawn as overlays (default 8)")
    p.add_argument("--no-maps", action="store_true", help="do not write maps.npy")

    p = sub.add_parser("predict", help="score an image or a folder of images (no labels needed)",
                       description="Anomaly maps (PNG + .npy) and scores (predictions.csv) of new images.")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt or the folder holding it")
    p.add_argument("--input", type=Path, required=True, help="an image or a folder (searched recursively)")
    _add_common(p, trains=False)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold for is_anomalous (default: the one chosen on the validation set at "
                        "training time, threshold.json beside model.pt)")
    return parser


# ---------------------------------------------------------------------------------------------- resolution


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides into method-config and ``data.``-prefixed ones; check their form."""
    method, data = [], []
    for o in overrides:
        if o.startswith("-"):
            raise CLIError(f"unrecognised option {o!r} (see `{PROG} <command> --help`)")
        if "=" not in o or not o.split("=", 1)[0].strip():
            raise CLIError(f"unexpected argument {o!r}: overrides must look like key=value")
        (data if o.startswith(DATA_PREFIX) else method).append(o)
    return method, [o[len(DATA_PREFIX):] for o in data]


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise CLIError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CLIError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _read_run(folder: Path) -> dict | None:
    """The run record (config.yaml written by distill/train) in ``folder``, or None."""
    path = folder / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    d = _read_yaml(path)
    return d if _is_run_config(d) else None


def _is_run_config(d: Any) -> bool:
    return isinstance(d, dict) and "method_config" in d


def _pick_method(explicit: str | None, recorded: str | None, where: str) -> str:
    if explicit and recorded and explicit != recorded:
        raise CLIError(f"--method {explicit} disagrees with {where}, which was made with method {recorded!r}")
    name = explicit or recorded or "mudenet"
    if name not in METHODS:
        raise CLIError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def _method_config(args, device: torch.device, overrides: list[str],
                   init_run: dict | None) -> tuple[str, Any, str, dict | None]:
    """Resolve (method, config, where it came from, recorded data config) for ``distill``/``train``."""
    run, where = None, None
    if args.config is not None:
        if args.profile is not None:
            raise CLIError("give either --config or --profile, not both")
        raw = _read_yaml(args.config)
        if _is_run_config(raw):
            run, where = raw, str(args.config)
    elif args.profile is None and init_run is not None:
        run, where = init_run, str(args.init / RUN_CONFIG_FILE)
    method = _pick_method(args.method, run.get("method") if run else None, where or "the config")
    _, cfg_cls = get_method(method)
    if run is not None:
        try:
            cfg = cfg_cls.from_dict(run["method_config"])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        source = where
    elif args.config is not None:
        cfg, source = cfg_cls.from_yaml(args.config), str(args.config)
    else:
        profile = args.profile or ("paper" if device.type == "cuda" else "cpu")
        path = profile_path(method, profile)
        cfg = cfg_cls.from_yaml(path) if path.is_file() else cfg_cls()
        source = f"profile {profile}" + ("" if path.is_file() else f" (no {path}: defaults)")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return method, cfg, source, (run or {}).get("data_config")


def _data_config(args, method_cfg: Any, base: dict | None, overrides: list[str]):
    """The data config: recorded values, then --dataset/--data-root/--category, then ``data.*`` overrides.

    The image size always follows the method's ``image_size`` where the method config has one.
    """
    from mudenet_core.data.datasets import DataConfig

    d = dict(base or {})
    if args.dataset is not None:
        if d.get("dataset") not in (None, args.dataset):  # another dataset: drop root/category
            d.pop("root", None)
            d.pop("category", None)
        d["dataset"] = args.dataset
    if args.data_root is not None:
        if not args.data_root.exists():
            raise CLIError(f"--data-root {args.data_root} does not exist")
        d["root"] = str(args.data_root.resolve())
    if args.category is not None:
        d["category"] = args.category
    if d.get("dataset", "synthetic") != "synthetic" and not d.get("root"):
        raise CLIError(f"--data-root is required for dataset {d['dataset']!r}")
    model_size = getattr(method_cfg, "image_size", None)
    if model_size is not None:
        d["image_size"] = int(model_size)
    cfg = DataConfig.from_dict(d)
    if overrides:
        cfg = cfg.with_overrides(overrides)
        if model_size is not None and cfg.image_size != model_size:
            raise CLIError(f"data.image_size={cfg.image_size} disagrees with the method's image_size="
                           f"{model_size}; override image_size instead")
    return cfg


def _device(name: str) -> torch.device:
    from mudenet_core.utils import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as e:
        raise CLIError(str(e)) from None


def _checkpoint_path(path: Path) -> Path:
    p = path / MODEL_FILE if path.is_dir() else path
    if not p.is_file():
        hint = f" (no {MODEL_FILE} in that folder)" if path.is_dir() else ""
        raise CLIError(f"checkpoint not found: {p}{hint}")
    return p


def _load_detector(args, device: torch.device):
    """(checkpoint path, run record or None, method name, detector) for ``evaluate``/``predict``."""
    ckpt = _checkpoint_path(args.checkpoint)
    run = _read_run(ckpt.parent)
    method = _pick_method(args.method, run.get("method") if run else None, str(ckpt.parent / RUN_CONFIG_FILE))
    det_cls, _ = get_method(method)
    detector = det_cls.load(ckpt, device=device)
    return ckpt, run, method, detector


def _output_dir(args, default: Path | None, *, resume: bool = False) -> Path:
    out = args.output_dir if args.output_dir is not None else default
    if out is None:
        raise CLIError(f"--output-dir is required for `{args.command}`")
    if out.exists() and not out.is_dir():
        raise CLIError(f"output path {out} exists and is not a folder")
    if resume:
        out.mkdir(parents=True, exist_ok=True)
        return out
    try:
        return prepare_out_dir(out, overwrite=args.overwrite)
    except FileExistsError:
        alt = " or --resume to continue the run" if args.command in ("distill", "train") else ""
        msg = f"output folder {out} exists and is not empty; pass --overwrite to write into it{alt}"
        raise CLIError(msg) from None


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, tensors/arrays -> lists, other objects -> strings, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor | np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _write_run_config(out: Path, args, *, method: str, source: str, cfg: Any, data_cfg: Any) -> Path:
    record = {
        "command": args.command,
        "method": method,
        "config_source": source,
        "seed": args.seed,
        "device": args.device,
        "method_config": cfg.to_dict(),
        "data_config": data_cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "git_sha": git_sha(),
        "torch_version": str(torch.__version__),
        "mudenet_core_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return atomic_write_text(out / RUN_CONFIG_FILE, yaml.safe_dump(record, sort_keys=False))


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def loss_table(log: Any) -> dict[str, pd.DataFrame]:
    """Per-step loss tables found in a training log: stage -> DataFrame (one row per logged step).

    A stage is any entry that is a list of dicts or a dict of equal-length lists, at the top level or one
    level down (e.g. MuDeNet's ``{"train": {"step": [...], "L1": [...], ...}}``); top-level numeric lists
    whose name contains "loss" form the stage ``train`` (e.g. ``{"loss": [per-epoch values]}``).

    Example:
        >>> t = loss_table({"train": {"step": [0, 1], "L1": [2.0, 1.0]}, "time_s": 3.0})
        >>> list(t), t["train"]["L1"].tolist()
        (['train'], [2.0, 1.0])
        >>> loss_table({"loss": [3.0, 2.0], "val_scores": [0.1]})["train"]["loss"].tolist()
        [3.0, 2.0]
    """
    def as_table(v: Any) -> pd.DataFrame | None:
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            return pd.DataFrame(v)
        if isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values()):
            lengths = {len(x) for x in v.values()}
            if len(lengths) == 1 and lengths != {0}:
                return pd.DataFrame(v)
        return None

    out: dict[str, pd.DataFrame] = {}
    if not isinstance(log, dict):
        return out
    if (t := as_table(log)) is not None:
        return {"train": t}
    flat = {k: v for k, v in log.items() if "loss" in str(k).lower() and isinstance(v, list) and v
            and all(isinstance(x, int | float) for x in v)}  # e.g. {"loss": [per-epoch values]}
    if flat and (t := as_table(flat)) is not None:
        out["train"] = t
    for k, v in log.items():
        if (t := as_table(v)) is not None:
            out[str(k)] = t
        elif isinstance(v, dict):
            sub = {kk: vv for kk, vv in v.items() if isinstance(vv, list)}
            if (t := as_table(sub)) is not None:
                out[str(k)] = t
    return out


def _save_loss_curves(log: Any, out: Path) -> None:
    from mudenet_core import viz

    for stage, table in loss_table(log).items():
        terms = [c for c in table.columns if c not in ("step", "time_s", "lr", "steps_per_s")
                 and pd.api.types.is_numeric_dtype(table[c])]
        if terms:
            viz.save_figure(viz.loss_curves(table, terms=terms), out / f"loss_curves_{stage}.png")


# ------------------------------------------------------------------------------------------------ commands


def _prepare_training(args, overrides: list[str], check=None):
    """Resolve device, configs and output folder, seed, build the splits (saving split.csv).

    ``check(method, detector_class)`` may raise a :class:`CLIError` before anything is written.
    """
    device = _device(args.device)
    method_over, data_over = _split_overrides(overrides)
    init_run = None
    if getattr(args, "init", None) is not None:
        if not (args.init / CHECKPOINT_DIR).is_dir() or not any((args.init / CHECKPOINT_DIR).iterdir()):
            raise CLIError(f"--init {args.init}: no {CHECKPOINT_DIR}/ with a checkpoint (expected the output "
                           f"folder of `{PROG} distill`)")
        init_run = _read_run(args.init)
    method, cfg, source, recorded_data = _method_config(args, device, method_over, init_run)
    data_cfg = _data_config(args, cfg, recorded_data, data_over)
    if check is not None:
        check(method, get_method(method)[0])
    out = _output_dir(args, None, resume=args.resume)
    from mudenet_core.data.datasets import make_splits
    from mudenet_core.utils import seed_everything

    generator = seed_everything(args.seed)
    aug_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))  # own stream for augmentations
    splits = make_splits(data_cfg, save_split_to=out / SPLIT_FILE,
                         generator=torch.Generator().manual_seed(aug_seed))
    _log(f"{args.command}: method={method} ({source}), config_hash={cfg.config_hash()}, "
         f"data={data_cfg.dataset}/{data_cfg.category} (train {len(splits.train)}, val {len(splits.val)}, "
         f"test {len(splits.test)}), device={device}, output={out}")
    return device, method, cfg, source, data_cfg, out, generator, splits


def cmd_distill(args, overrides: list[str]) -> int:
    """``mudenet distill``: stage 1 of methods with a teacher; the checkpoint is the hand-off to ``train``."""
    def check(name: str, det_cls: type) -> None:
        if not callable(getattr(det_cls, "distill", None)):
            raise CLIError(f"method {name!r} has no distillation step; use `{PROG} train --method {name}`")

    device, method, cfg, source, data_cfg, out, generator, splits = _prepare_training(args, overrides, check)
    det_cls, _ = get_method(method)
    detector = det_cls(cfg)
    log = detector.distill(splits.train, generator=generator, device=device,
                           show_progress=not args.no_progress, checkpoint_dir=out / CHECKPOINT_DIR,
                           resume=args.resume)
    _write_run_config(out, args, method=method, source=source, cfg=cfg, data_cfg=data_cfg)
    save_json(out / "distill_log.json", _finite(log if log is not None else {}))
    _save_loss_curves(log, out)
    _log(f"distill: wrote {out / CHECKPOINT_DIR}; continue with `{PROG} train --init {out} --output-dir ...`")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    """``mudenet train``: fit a detector; save model.pt, config.yaml, split.csv, train_log.json, curves."""
    device, method, cfg, source, data_cfg, out, generator, splits = _prepare_training(args, overrides)
    det_cls, _ = get_method(method)
    resume = args.resume
    if args.init is not None and not (args.resume and any((out / CHECKPOINT_DIR).glob("*"))):
        shutil.copytree(args.init / CHECKPOINT_DIR, out / CHECKPOINT_DIR, dirs_exist_ok=True)
        resume = True
        _log(f"train: continuing from {args.init / CHECKPOINT_DIR}")
    detector = det_cls(cfg)
    log = detector.fit(training_split(det_cls, splits), splits.val, generator=generator, device=device,
                       show_progress=not args.no_progress, checkpoint_dir=out / CHECKPOINT_DIR, resume=resume)
    detector.save(out / MODEL_FILE)
    _write_run_config(out, args, method=method, source=source, cfg=detector.config, data_cfg=data_cfg)
    save_json(out / "train_log.json", _finite(log if log is not None else {}))
    _save_loss_curves(log, out)
    _calibrate_threshold(args, detector, splits, out, device)
    _log(f"train: wrote {out / MODEL_FILE}")
    return 0


def _calibrate_threshold(args, detector, splits, out: Path, device: torch.device) -> float:
    """Choose the decision threshold on the synthetic-anomaly validation set; write threshold.json."""
    from mudenet_core.data import synthesis
    from mudenet_core.harness import ThresholdConfig, calibrate_threshold, save_calibration

    tex = str(args.texture_dir.resolve()) if getattr(args, "texture_dir", None) else ""
    vcfg = synthesis.ValidationConfig(synthesis=synthesis.SynthesisConfig(texture_dir=tex))
    val_set = synthesis.validation_set(splits.val, vcfg)
    q = getattr(args, "threshold_quantile", None)
    tcfg = ThresholdConfig() if q is None else ThresholdConfig(quantile=q)
    result, threshold = calibrate_threshold(detector, val_set, cfg=tcfg, device=device)
    save_calibration(result, threshold, tcfg, threshold_dir=out, eval_dir=out / "validation",
                     config=detector.config, save_maps=False, extra={"git_sha": git_sha()})
    labels = result.scores["label"].to_numpy()
    shown = ("image_auroc", "pixel_auroc", "au_pro")
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k in shown)
    _log(f"train: validation ({int((labels == 0).sum())} normal + {int((labels == 1).sum())} synthetic "
         f"anomalies): {summary}; threshold {threshold:.6g} ({tcfg.mode}, q={tcfg.quantile})")
    return threshold


def select_overlays(scores: pd.DataFrame, n: int) -> list[int]:
    """Up to ``n`` row positions covering every defect type: round-robin over types (defects first).

    Example:
        >>> df = pd.DataFrame({"defect_type": ["good", "good", "crack", "crack", "hole"]})
        >>> select_overlays(df, 4)
        [2, 4, 0, 3]
    """
    types = scores["defect_type"].astype(str).to_numpy()
    order = sorted(set(types), key=lambda t: (t == "good", t))
    queues = {t: list(np.flatnonzero(types == t)) for t in order}
    picked: list[int] = []
    while len(picked) < n and any(queues.values()):
        for t in order:
            if queues[t] and len(picked) < n:
                picked.append(int(queues[t].pop(0)))
    return picked


class _DisplayImages:
    """Lazy sequence of a dataset's images in [0, 1] (3, H, W), for the figure functions."""

    def __init__(self, dataset, normalized: bool):
        self.dataset, self.normalized = dataset, normalized

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        from mudenet_core.data.transforms import denormalize

        x = self.dataset[int(i)]["image"]  # (3, H, W)
        return denormalize(x) if self.normalized else x.clamp(0, 1)


def cmd_evaluate(args, overrides: list[str]) -> int:
    """``mudenet evaluate``: metrics JSON + tidy CSV, per-image scores, overlays and curves."""
    device = _device(args.device)
    method_over, data_over = _split_overrides(overrides)
    if method_over:
        raise CLIError(f"evaluate takes the method config from the checkpoint; unexpected override(s) "
                       f"{method_over} (only data.<key>=value is accepted)")
    ckpt, run, method, detector = _load_detector(args, device)
    data_cfg = _data_config(args, detector.config, (run or {}).get("data_config"), data_over)
    out = _output_dir(args, ckpt.parent / "evaluate")
    from mudenet_core.data.datasets import make_splits
    from mudenet_core.harness import evaluate, save_evaluation

    test = make_splits(data_cfg).test
    _log(f"evaluate: {method} from {ckpt} on {data_cfg.dataset}/{data_cfg.category} ({len(test)} images)")
    result = evaluate(detector, test, batch_size=args.batch_size, device=device,
                      show_progress=not args.no_progress)
    from mudenet_core.harness import deployment_metrics, load_threshold

    rec = load_threshold(ckpt.parent)
    if rec is not None:  # what a deployment gets at the threshold chosen on validation (f1_max: the oracle)
        result.metrics.update(deployment_metrics(result.scores["label"], result.scores["score"],
                                                 rec["threshold"]))
    save_evaluation(result, out, config=detector.config, save_maps=not args.no_maps,
                    extra={"method": method, "checkpoint": str(ckpt), "data_config": data_cfg.to_dict(),
                           "git_sha": git_sha()})
    images = _DisplayImages(test, data_cfg.normalize)
    _evaluation_figures(result, images, out, n=args.n_overlays, method=method)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    _log(f"evaluate: {summary}")
    _log(f"evaluate: wrote {out}")
    return 0


def _evaluation_figures(result, images: _DisplayImages, out: Path, *, n: int, method: str) -> None:
    """overlays/NNNN_<defect>_<stem>.png for a selection of test images, and figures/*.png."""
    from mudenet_core import viz

    df = result.scores
    vmin, vmax = viz.map_range(result.maps)
    labels, scores = df["label"].to_numpy(), df["score"].to_numpy()
    for i in select_overlays(df, n):
        defect = str(df["defect_type"].iloc[i])
        fig = viz.anomaly_map_grid([images[i]], [result.maps[i]], [result.masks[i]], vmin=vmin, vmax=vmax,
                                   titles=[f"{defect}  score={scores[i]:.3g}"])
        stem = Path(str(df["image_path"].iloc[i])).stem
        viz.save_figure(fig, out / "overlays" / f"{i:04d}_{defect}_{stem}.png")
    figs = out / "figures"
    viz.save_figure(viz.score_histogram(labels, scores, threshold=result.metrics.get("threshold"),
                                        title=f"{method}: image scores"), figs / "score_histogram.png")
    if len(np.unique(labels)) == 2:
        viz.save_figure(viz.roc_curves({method: (labels, scores)}), figs / "roc.png")
    if result.masks.any():
        viz.save_figure(viz.pro_curves({method: (result.masks, result.maps)}), figs / "pro.png")
    viz.save_figure(viz.best_worst_cases(images, result.maps, labels, scores, result.masks, k=3, vmin=vmin,
                                         vmax=vmax), figs / "best_worst.png")


def _list_inputs(path: Path) -> list[Path]:
    from mudenet_core.data.images import IMAGE_EXTENSIONS

    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise CLIError(f"--input {path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not path.exists():
        raise CLIError(f"--input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise CLIError(f"--input {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in that folder")
    return files


def _known_threshold(args, detector, ckpt: Path) -> tuple[float | None, str]:
    """The score threshold for ``is_anomalous`` and where it came from (never the test split)."""
    from mudenet_core.harness import THRESHOLD_FILE, load_threshold

    if args.threshold is not None:
        return float(args.threshold), "--threshold"
    rec = load_threshold(ckpt.parent)
    if rec is not None:
        return float(rec["threshold"]), f"{ckpt.parent / THRESHOLD_FILE} (chosen on the validation set)"
    return None, f"none known: no {THRESHOLD_FILE} beside the model (retrain, or pass --threshold)"


def _save_npy(arr: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return path


def _save_rgb(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return path


def cmd_predict(args, overrides: list[str]) -> int:
    """``mudenet predict``: maps (heat-map PNG, overlay PNG, .npy) and predictions.csv of new images."""
    device = _device(args.device)
    if overrides:
        raise CLIError(f"predict takes no key=value overrides, got {list(overrides)}")
    files = _list_inputs(args.input)
    ckpt, run, method, detector = _load_detector(args, device)
    out = _output_dir(args, ckpt.parent / "predict")
    from mudenet_core import viz
    from mudenet_core.data.images import load_image
    from mudenet_core.data.transforms import normalize, resize_image, to_tensor
    from mudenet_core.utils import progress

    data = (run or {}).get("data_config") or {}
    size = int(getattr(detector.config, "image_size", None) or data.get("image_size") or 256)
    threshold, t_source = _known_threshold(args, detector, ckpt)
    _log(f"predict: {len(files)} image(s) with {method} from {ckpt} at {size} px; threshold: "
         + (f"{threshold:.6g} ({t_source})" if threshold is not None else t_source))
    root = args.input if args.input.is_dir() else args.input.parent
    names = ["__".join(f.relative_to(root).with_suffix("").parts) for f in files]
    maps: list[np.ndarray] = []
    shown: list[torch.Tensor] = []
    scores: list[float] = []
    for s in progress(range(0, len(files), args.batch_size), desc="predict", enabled=not args.no_progress):
        batch = [resize_image(to_tensor(load_image(f)), size) for f in files[s:s + args.batch_size]]
        x = torch.stack(batch)  # (B, 3, H, W) in [0, 1]
        x = normalize(x) if data.get("normalize", True) else x
        with torch.no_grad():
            amap, score = detector.predict(x.to(device))  # (B, 1, H, W), (B,)
        assert amap.ndim == 4 and amap.shape[1] == 1, f"expected maps (B,1,H,W), got {tuple(amap.shape)}"
        maps.extend(amap[:, 0].float().cpu().numpy())
        scores.extend(score.double().cpu().tolist())
        shown.extend(batch)
    vmin, vmax = viz.map_range(np.stack(maps))
    for name, m, img in zip(names, maps, shown, strict=True):
        _save_npy(m.astype(np.float32), out / "maps" / f"{name}.npy")  # (H, W)
        viz.save_heatmap_png(m, out / "heatmaps" / f"{name}.png", vmin=vmin, vmax=vmax)
        _save_rgb(viz.overlay(img, m, vmin=vmin, vmax=vmax), out / "overlays" / f"{name}.png")
    df = pd.DataFrame({"image_path": [str(f) for f in files], "score": scores})
    if threshold is not None:
        df["is_anomalous"] = df["score"] >= threshold
    save_csv(out / "predictions.csv", df)
    save_json(out / "predict_info.json", {
        "method": method, "checkpoint": str(ckpt), "input": str(args.input), "n_images": len(files),
        "image_size": size, "threshold": threshold, "threshold_source": t_source,
        "heatmap_range": [vmin, vmax],
        "map_files": {n: f"maps/{n}.npy" for n in names}, "git_sha": git_sha()})
    flagged = f" ({int(df['is_anomalous'].sum())} of {len(df)} anomalous)" if threshold is not None else ""
    _log(f"predict: wrote {out / 'predictions.csv'}{flagged}")
    return 0


COMMAND_FUNCS = {"distill": cmd_distill, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mudenet`` and ``python -m mudenet_core``; returns the exit code.

    Example:
        >>> main(["train", "--output-dir", "/nonexistent/x", "no_such_key=1"])
        2
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if getattr(args, "batch_size", 1) < 1:
            raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
        return COMMAND_FUNCS[args.command](args, rest)
    except _user_error_types() as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
