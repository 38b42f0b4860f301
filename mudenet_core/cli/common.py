"""What every ``mudenet`` command shares: file names of a run, user errors, config and data resolution."""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mudenet_core import __version__
from mudenet_core.config import ConfigError
from mudenet_core.io import CheckpointError, atomic_write_text, clean_stale_temps, git_sha, prepare_out_dir
from mudenet_core.methods import METHODS, get_method, profile_path

PROG = "mudenet"
COMMANDS = ("distill", "train", "evaluate", "predict", "serve", "export")
MODEL_FILE = "model.pt"  # the trained detector (Detector.save)
RUN_CONFIG_FILE = "config.yaml"  # method, method_config, data_config, seed, git_sha ... of a run
SPLIT_FILE = "split.csv"  # the resolved dataset index of a run
CHECKPOINT_DIR = "checkpoints"  # resumable training state (the method's own files)
DATA_PREFIX = "data."  # overrides with this prefix go to the data config
# what each command writes into its output folder (glob patterns): ``--overwrite`` clears these first, so
# no artefact of an earlier run (a threshold, an evaluation of the old model, an overlay) survives
TRAIN_OUTPUTS = (MODEL_FILE, RUN_CONFIG_FILE, SPLIT_FILE, CHECKPOINT_DIR, "train_log.json",
                 "distill_log.json", "loss_curves_*.png", "threshold.json", "validation", "evaluate",
                 "predict", "export")
OWNED_OUTPUTS = {
    "distill": TRAIN_OUTPUTS,
    "train": TRAIN_OUTPUTS,
    "evaluate": ("metrics.json", "metrics.csv", "scores.csv", "maps.npy", "overlays", "figures"),
    "predict": ("maps", "heatmaps", "overlays", "predictions.csv", "predict_info.json"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user asked for something impossible" (no traceback, exit 2)."""
    from mudenet_core.data.images import DataError
    from mudenet_core.metrics import MetricError
    from mudenet_core.nets.backbones import BackboneWeightsError

    return (CLIError, ConfigError, CheckpointError, DataError, MetricError, BackboneWeightsError,
            FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides into method-config and ``data.``-prefixed ones; check their form."""
    method, data = [], []
    for o in overrides:
        if o.startswith("-"):
            raise CLIError(f"unrecognised option {o!r} (see `{PROG} <command> --help`)")
        if "=" not in o or not o.split("=", 1)[0].strip():
            raise CLIError(f"unexpected argument {o!r}: overrides must look like key=value")
        (data if o.startswith(DATA_PREFIX) else method).append(o)
    return method, [o[len(DATA_PREFIX):] for o in data]


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing file or bad YAML is a CLIError naming it."""
    if not path.is_file():
        raise CLIError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CLIError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def read_run(folder: Path) -> dict | None:
    """The run record (config.yaml written by distill/train) in ``folder``, or None."""
    path = folder / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    d = read_yaml(path)
    return d if is_run_config(d) else None


def is_run_config(d: Any) -> bool:
    """Whether ``d`` is a run record written by distill/train (it has ``method_config``)."""
    return isinstance(d, dict) and "method_config" in d


def pick_method(explicit: str | None, recorded: str | None, where: str) -> str:
    """The method: ``--method``, else the recorded one, else mudenet; they must agree."""
    if explicit and recorded and explicit != recorded:
        raise CLIError(f"--method {explicit} disagrees with {where}, which was made with method {recorded!r}")
    name = explicit or recorded or "mudenet"
    if name not in METHODS:
        raise CLIError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name


def method_config(args, device: torch.device, overrides: list[str],
                   init_run: dict | None) -> tuple[str, Any, str, dict | None]:
    """Resolve (method, config, where it came from, recorded data config) for ``distill``/``train``."""
    run, where = None, None
    if args.config is not None:
        if args.profile is not None:
            raise CLIError("give either --config or --profile, not both")
        raw = read_yaml(args.config)
        if is_run_config(raw):
            run, where = raw, str(args.config)
    elif args.profile is None and init_run is not None:
        run, where = init_run, str(args.init / RUN_CONFIG_FILE)
    method = pick_method(args.method, run.get("method") if run else None, where or "the config")
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


def data_config(args, method_cfg: Any, base: dict | None, overrides: list[str]):
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


def resolve_device_arg(name: str) -> torch.device:
    """``--device`` as a torch device (CLIError when it is not available)."""
    from mudenet_core.utils import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as e:
        raise CLIError(str(e)) from None


def checkpoint_path(path: Path) -> Path:
    """``model.pt`` from a file or run-folder argument (CLIError when absent)."""
    p = path / MODEL_FILE if path.is_dir() else path
    if not p.is_file():
        hint = f" (no {MODEL_FILE} in that folder)" if path.is_dir() else ""
        raise CLIError(f"checkpoint not found: {p}{hint}")
    return p


def load_detector(args, device: torch.device):
    """(checkpoint path, run record or None, method name, detector) for ``evaluate``/``predict``."""
    ckpt = checkpoint_path(args.checkpoint)
    run = read_run(ckpt.parent)
    method = pick_method(args.method, run.get("method") if run else None, str(ckpt.parent / RUN_CONFIG_FILE))
    det_cls, _ = get_method(method)
    detector = det_cls.load(ckpt, device=device)
    return ckpt, run, method, detector


def clear_outputs(out: Path, command: str) -> list[Path]:
    """Remove what ``command`` writes (:data:`OWNED_OUTPUTS`) from ``out``; other files stay. Returns them."""
    removed = sorted({p for pattern in OWNED_OUTPUTS[command] for p in out.glob(pattern)})
    for p in removed:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return removed


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():  # the nearest existing ancestor decides whether the folder can be made
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write to {out}: permission denied on {probe} (choose another --output-dir)")


def output_dir(args, default: Path | None, *, resume: bool = False) -> Path:
    """The command's output folder, created; a non-empty one needs --overwrite (or --resume).

    ``--overwrite`` first removes the command's own earlier outputs (:func:`clear_outputs`); temporary files
    left by an interrupted write are removed in every case.
    """
    out = args.output_dir if args.output_dir is not None else default
    if out is None:
        raise CLIError(f"--output-dir is required for `{args.command}`")
    if out.exists() and not out.is_dir():
        raise CLIError(f"output path {out} exists and is not a folder")
    _check_writable(out)
    clean_stale_temps(out)
    if resume:
        out.mkdir(parents=True, exist_ok=True)
        return out
    if out.is_dir() and args.overwrite:
        for p in clear_outputs(out, args.command):
            say(f"{args.command}: --overwrite removed {p}")
    try:
        return prepare_out_dir(out, overwrite=args.overwrite)
    except FileExistsError:
        alt = " or --resume to continue the run" if args.command in ("distill", "train") else ""
        msg = f"output folder {out} exists and is not empty; pass --overwrite to write into it{alt}"
        raise CLIError(msg) from None


def finite(obj: Any) -> Any:
    """NaN/inf -> None, tensors/arrays -> lists, other objects -> strings, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, torch.Tensor | np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def write_run_config(out: Path, args, *, method: str, source: str, cfg: Any, data_cfg: Any,
                     identity: dict | None = None, status: str | None = None) -> Path:
    """Write the run record ``config.yaml`` atomically.

    It holds the method and data configs, seed, thread count, versions, and for ``distill``/``train`` the
    run's identity (:mod:`mudenet_core.cli.identity`) and ``status`` (running/finished).
    """
    record = {
        "command": args.command,
        "method": method,
        "config_source": source,
        "seed": args.seed,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "method_config": cfg.to_dict(),
        "data_config": data_cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "git_sha": git_sha(),
        "torch_version": str(torch.__version__),
        "mudenet_core_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if status is not None:
        record["status"] = status
    if identity is not None:
        record["identity"] = identity
    return atomic_write_text(out / RUN_CONFIG_FILE, yaml.safe_dump(record, sort_keys=False))


def say(msg: str) -> None:
    """One progress line on stderr, prefixed with the program name."""
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


