r"""Learning curves of MuDeNet: validation and test metrics against stage-2 training steps, from one run.

The schedule of a profile is chosen on the *validation* curve (held-out normal images plus synthetic
anomalies); the test curve is recorded beside it only to show how well validation tracks test, never to
choose. One training run gives every point: the teacher is distilled once, then at each requested step
the map normalisation is re-calibrated on the normal validation images and both sets are scored.

Command line (tidy CSV + figure)::

    python -m mudenet_core.learning_curves --dataset mpdd --data-root /data/mpdd --category metal_plate \\
        --steps 0 250 500 1000 2000 --image-size 128 --out results/reference/cpu/learning_curves

Output: ``<out>/<dataset>_<category>_<size>px_seed<k>.csv`` with columns ``dataset, category, image_size,
seed, step, split, metric, value, config_hash, git_sha`` and a PNG of the curves beside it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mudenet_core import harness, io

CURVE_COLUMNS = [
    "dataset",
    "category",
    "image_size",
    "seed",
    "step",
    "split",
    "metric",
    "value",
    "elapsed_s",
    "config_hash",
    "git_sha",
]
CURVE_METRICS = ("image_auroc", "pixel_auroc", "au_pro")


class _CurveRecorder:
    """A MuDeNet fit callback: at the requested stage-2 steps, calibrate and score val and test sets."""

    def __init__(self, det, steps: Sequence[int], sets: dict, calib_ds, device):
        self.det, self.steps, self.sets, self.calib_ds, self.device = (
            det,
            set(int(s) for s in steps),
            sets,
            calib_ds,
            device,
        )
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def record(self, step: int) -> None:
        from mudenet_core.utils import modes_restored

        with modes_restored(self.det.nets):
            self.det.device = torch.device(self.device)
            self.det.calibrate(self.calib_ds)
            for split, ds in self.sets.items():
                res = harness.evaluate(self.det, ds, device=self.device, show_progress=False)
                for k in CURVE_METRICS:
                    if k in res.metrics:
                        self.rows.append(
                            {
                                "step": int(step),
                                "split": split,
                                "metric": k,
                                "value": float(res.metrics[k]),
                                "elapsed_s": time.perf_counter() - self.t0,
                            }
                        )

    def __call__(self, stage: str, step: int, losses: dict) -> None:
        if stage == "train" and step in self.steps:
            self.record(step)


def learning_curve(
    config,
    splits,
    val_set,
    *,
    steps: Sequence[int],
    seed: int = 0,
    device="cpu",
    show_progress: bool = True,
    test: bool = True,
) -> pd.DataFrame:
    """Train MuDeNet once for ``max(steps)`` stage-2 steps; metrics at every step in ``steps``.

    Args:
        config: a :class:`~mudenet_core.mudenet.MuDeNetConfig` (its ``train.steps`` is replaced).
        splits: the category's splits (train: fit; val: normalisation statistics).
        val_set: the synthetic-anomaly validation set.
        steps: stage-2 steps at which to measure (0 = right after distillation, students untrained).
        seed: training seed.
        device: where to train.
        show_progress: progress bars.
        test: also score the test split (for the validation-vs-test figure only).

    Returns:
        tidy rows: step, split ("val" / "test"), metric, value, elapsed_s.
    """
    from mudenet_core.mudenet import MuDeNet
    from mudenet_core.utils import seed_everything

    steps = sorted(set(int(s) for s in steps))
    assert steps and steps[0] >= 0, f"steps must be >= 0, got {steps}"
    cfg = config.replace(train={**config.train.to_dict(), "steps": max(1, steps[-1])})
    g = seed_everything(seed)
    sets = {"val": val_set, **({"test": splits.test} if test else {})}
    with tempfile.TemporaryDirectory() as ckpt:
        det = MuDeNet(cfg)
        det.distill(
            splits.train, generator=g, device=device, show_progress=show_progress, checkpoint_dir=ckpt
        )
        rec = _CurveRecorder(det, steps, sets, splits.val, device)
        if 0 in steps:
            state = io.load_checkpoint(Path(ckpt) / MuDeNet.CHECKPOINT_NAME)
            det.nets.load_state_dict(state["state_dict"])
            det.nets.to(device)
            rec.record(0)
        if steps[-1] > 0:
            det.fit(
                splits.train,
                splits.val,
                generator=g,
                device=device,
                show_progress=show_progress,
                checkpoint_dir=ckpt,
                resume=True,
                callback=rec,
            )
    return pd.DataFrame(rec.rows, columns=["step", "split", "metric", "value", "elapsed_s"])


def curve_figure(df: pd.DataFrame, title: str = ""):
    """One panel per metric: validation (solid) and test (dashed) against training steps."""
    from matplotlib.figure import Figure

    metrics = [m for m in CURVE_METRICS if m in set(df["metric"])]
    fig = Figure(figsize=(4.0 * len(metrics), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    group_cols = [c for c in ("image_size", "category") if c in df.columns and df[c].nunique() > 1]
    for ax, metric in zip(axes, metrics, strict=True):
        sub = df[df["metric"] == metric]
        groups = sub.groupby(group_cols) if group_cols else [((), sub)]
        for key, grp in groups:
            label = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            for split, style in (("val", "-o"), ("test", "--s")):
                pts = grp[grp["split"] == split].groupby("step")["value"].agg(["mean", "std"]).reset_index()
                if len(pts):
                    ax.errorbar(
                        pts["step"],
                        pts["mean"],
                        yerr=pts["std"].fillna(0),
                        fmt=style,
                        ms=3,
                        capsize=2,
                        label=f"{label} {split}".strip(),
                    )
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("stage-2 steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m mudenet_core.learning_curves``."""
    p = argparse.ArgumentParser(
        prog="python -m mudenet_core.learning_curves", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", default="", help="folder holding the categories ('' = generated dataset)")
    p.add_argument("--category", default="plate")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--image-size", type=int, default=None, help="default: the profile's")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 250, 500, 1000, 2000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--texture-dir", default="", help="texture folder of the synthetic validation anomalies")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-test", action="store_true", help="validation curve only")
    p.add_argument("overrides", nargs="*", help="method config key=value overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the curves and write the tidy CSV and the figure."""
    from mudenet_core import experiment, viz

    args = build_parser().parse_args(argv)
    cfg = experiment.method_config(
        "mudenet", args.profile, image_size=args.image_size, overrides=list(args.overrides) or None
    )
    frames = []
    name = f"{args.dataset}_{args.category}_{cfg.image_size}px"
    out_csv = args.out / f"{name}.csv"
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run, _, device = experiment.start_run(
                tmp, dataset=args.dataset, category=args.category, seed=seed
            )
            splits = experiment.build_splits(run, args.data_root, cfg.image_size)
            val_set = experiment.build_validation(splits, args.texture_dir)
            df = learning_curve(
                cfg, splits, val_set, steps=args.steps, seed=seed, device=device, test=not args.no_test
            )
        df.insert(0, "seed", seed)
        df.insert(0, "image_size", cfg.image_size)
        df.insert(0, "category", args.category)
        df.insert(0, "dataset", args.dataset)
        df["config_hash"], df["git_sha"] = cfg.config_hash(), io.git_sha()
        frames.append(df)
        io.save_csv(out_csv, pd.concat(frames, ignore_index=True)[CURVE_COLUMNS])  # after every seed
        print(
            df[df["metric"] == "image_auroc"].pivot_table(index="step", columns="split", values="value"),
            flush=True,
        )
    all_rows = pd.concat(frames, ignore_index=True)
    viz.save_figure(
        curve_figure(all_rows, title=f"{args.dataset}/{args.category}, {cfg.image_size} px"),
        args.out / f"{name}.png",
    )
    print(f"wrote {out_csv}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
