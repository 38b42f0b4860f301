"""``mudenet distill`` and ``mudenet train``: fit a detector, calibrate its threshold on validation."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mudenet_core.cli.common import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    PROG,
    RUN_CONFIG_FILE,
    SPLIT_FILE,
    CLIError,
    data_config,
    finite,
    method_config,
    output_dir,
    read_run,
    resolve_device_arg,
    say,
    split_overrides,
    write_run_config,
)
from mudenet_core.cli.identity import FINISHED, RUNNING, identity_diff, run_identity
from mudenet_core.io import clean_stale_temps, git_sha, save_json
from mudenet_core.methods import get_method, training_split


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


@dataclasses.dataclass
class Prepared:
    """Everything a training command resolved before its first step."""

    device: torch.device
    method: str
    cfg: Any  # the method config
    source: str  # where the method config came from
    data_cfg: Any  # DataConfig
    out: Path
    generator: torch.Generator
    splits: Any  # Splits
    identity: dict[str, Any]  # see mudenet_core.cli.identity


def _resume_check(out: Path, identity: dict[str, Any], command: str) -> bool:
    """Whether ``out`` holds a finished run of this identity; a CLIError when it holds another run.

    Nothing is written: this runs before the output folder is touched.
    """
    if not out.is_dir() or not any(out.iterdir()):
        return False  # nothing to resume: a fresh start
    record = read_run(out)
    if record is None:
        raise CLIError(f"cannot resume {out}: it holds no run record ({RUN_CONFIG_FILE}); pass --overwrite "
                       "to start over, or choose another --output-dir")
    if "identity" not in record:
        raise CLIError(f"cannot resume {out}: its run was made by an older version that recorded no "
                       "identity, so it cannot be checked; pass --overwrite to start over")
    diff = identity_diff(record["identity"], identity)
    if diff:
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        hint = (f"; to train on a distilled teacher use `{PROG} train --init {out}`"
                if record["identity"].get("command") == "distill" and command == "train" else "")
        raise CLIError(f"cannot resume {out}: it is another run: " + "; ".join(diff[:4]) + more
                       + f"{hint}; use another --output-dir, or --overwrite to replace it")
    return record.get("status") == FINISHED


def _prepare_training(args, overrides: list[str], check=None) -> Prepared | None:
    """Resolve device, configs, identity and output folder, seed, build the splits (saving split.csv).

    ``check(method, detector_class)`` may raise a :class:`CLIError` before anything is written. Returns None
    when ``--resume`` finds the run already finished (nothing to do).
    """
    device = resolve_device_arg(args.device)
    method_over, data_over = split_overrides(overrides)
    init_run = None
    if getattr(args, "init", None) is not None:
        if not (args.init / CHECKPOINT_DIR).is_dir() or not any((args.init / CHECKPOINT_DIR).iterdir()):
            raise CLIError(f"--init {args.init}: no {CHECKPOINT_DIR}/ with a checkpoint (expected the output "
                           f"folder of `{PROG} distill`)")
        init_run = read_run(args.init)
    method, cfg, source, recorded_data = method_config(args, device, method_over, init_run)
    data_cfg = data_config(args, cfg, recorded_data, data_over)
    if check is not None:
        check(method, get_method(method)[0])
    from mudenet_core.data.datasets import build_index, make_splits
    from mudenet_core.utils import seed_everything

    index = build_index(data_cfg)  # checked once: the identity and the splits use the same index
    identity = run_identity(command=args.command, method=method, cfg=cfg, data_cfg=data_cfg, index=index,
                            seed=args.seed)
    if args.resume and args.output_dir is not None and _resume_check(args.output_dir, identity, args.command):
        clean_stale_temps(args.output_dir)
        say(f"{args.command}: {args.output_dir} is a finished run with these settings; nothing to do "
            "(pass --overwrite instead of --resume to run it again)")
        return None
    out = output_dir(args, None, resume=args.resume)
    generator = seed_everything(args.seed)
    aug_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))  # own stream for augmentations
    splits = make_splits(data_cfg, index=index, save_split_to=out / SPLIT_FILE,
                         generator=torch.Generator().manual_seed(aug_seed))
    write_run_config(out, args, method=method, source=source, cfg=cfg, data_cfg=data_cfg, identity=identity,
                     status=RUNNING)
    say(f"{args.command}: method={method} ({source}), config_hash={cfg.config_hash()}, "
        f"data={data_cfg.dataset}/{data_cfg.category} (train {len(splits.train)}, val {len(splits.val)}, "
        f"test {len(splits.test)}), device={device}, threads={torch.get_num_threads()}, output={out}")
    return Prepared(device, method, cfg, source, data_cfg, out, generator, splits, identity)


def cmd_distill(args, overrides: list[str]) -> int:
    """``mudenet distill``: stage 1 of methods with a teacher; the checkpoint is the hand-off to ``train``."""
    def check(name: str, det_cls: type) -> None:
        if not callable(getattr(det_cls, "distill", None)):
            raise CLIError(f"method {name!r} has no distillation step; use `{PROG} train --method {name}`")

    run = _prepare_training(args, overrides, check)
    if run is None:
        return 0
    out = run.out
    detector = get_method(run.method)[0](run.cfg)
    log = detector.distill(run.splits.train, generator=run.generator, device=run.device,
                           show_progress=not args.no_progress, checkpoint_dir=out / CHECKPOINT_DIR,
                           resume=args.resume)
    save_json(out / "distill_log.json", finite(log if log is not None else {}))
    _save_loss_curves(log, out)
    write_run_config(out, args, method=run.method, source=run.source, cfg=run.cfg, data_cfg=run.data_cfg,
                     identity=run.identity, status=FINISHED)
    say(f"distill: wrote {out / CHECKPOINT_DIR}; continue with `{PROG} train --init {out} --output-dir ...`")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    """``mudenet train``: fit a detector; save model.pt, config.yaml, split.csv, train_log.json, curves."""
    run = _prepare_training(args, overrides)
    if run is None:
        return 0
    out, device, splits = run.out, run.device, run.splits
    det_cls, _ = get_method(run.method)
    resume = args.resume
    if args.init is not None and not (args.resume and any((out / CHECKPOINT_DIR).glob("*"))):
        shutil.copytree(args.init / CHECKPOINT_DIR, out / CHECKPOINT_DIR, dirs_exist_ok=True)
        resume = True
        say(f"train: continuing from {args.init / CHECKPOINT_DIR}")
    detector = det_cls(run.cfg)
    log = detector.fit(training_split(det_cls, splits), splits.val, generator=run.generator, device=device,
                       show_progress=not args.no_progress, checkpoint_dir=out / CHECKPOINT_DIR, resume=resume)
    detector.save(out / MODEL_FILE)
    save_json(out / "train_log.json", finite(log if log is not None else {}))
    _save_loss_curves(log, out)
    _calibrate_threshold(args, detector, splits, out, device)
    write_run_config(out, args, method=run.method, source=run.source, cfg=detector.config,
                     data_cfg=run.data_cfg, identity=run.identity, status=FINISHED)
    say(f"train: wrote {out / MODEL_FILE}")
    from mudenet_core import tracking  # MLflow run + registered model (off with MUDENET_TRACKING=0)

    if (run_id := tracking.track_cli_fit(out, method=run.method, config=detector.config,
                                         data_config=run.data_cfg, seed=args.seed)) is not None:
        say(f"train: logged to {tracking.tracking_uri()} (run {run_id})")
    return 0


def _calibrate_threshold(args, detector, splits, out: Path, device: torch.device) -> float:
    """Choose the threshold and heat-map range on the synthetic-anomaly validation set; write threshold.json.

    ``out / MODEL_FILE`` must already hold the detector: threshold.json records its SHA-256.
    """
    from mudenet_core.data import synthesis
    from mudenet_core.harness import ThresholdConfig, calibrate_threshold, save_calibration

    tex = str(args.texture_dir.resolve()) if getattr(args, "texture_dir", None) else ""
    vcfg = synthesis.ValidationConfig(synthesis=synthesis.SynthesisConfig(texture_dir=tex))
    val_set = synthesis.validation_set(splits.val, vcfg)
    q = getattr(args, "threshold_quantile", None)
    tcfg = ThresholdConfig() if q is None else ThresholdConfig(quantile=q)
    result, threshold = calibrate_threshold(detector, val_set, cfg=tcfg, device=device)
    save_calibration(result, threshold, tcfg, threshold_dir=out, eval_dir=out / "validation",
                     model_path=out / MODEL_FILE,  # saved by cmd_train before this call: its hash is recorded
                     config=detector.config, save_maps=False, extra={"git_sha": git_sha()})
    labels = result.scores["label"].to_numpy()
    shown = ("image_auroc", "pixel_auroc", "au_pro")
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k in shown)
    say(f"train: validation ({int((labels == 0).sum())} normal + {int((labels == 1).sum())} synthetic "
         f"anomalies): {summary}; threshold {threshold:.6g} ({tcfg.mode}, q={tcfg.quantile})")
    return threshold


