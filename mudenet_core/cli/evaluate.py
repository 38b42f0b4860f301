"""``mudenet evaluate``: score the test split of a checkpoint's dataset; metrics, overlays, curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mudenet_core.cli.common import (
    CLIError,
    data_config,
    load_detector,
    output_dir,
    resolve_device_arg,
    say,
    split_overrides,
)
from mudenet_core.io import git_sha


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
    device = resolve_device_arg(args.device)
    method_over, data_over = split_overrides(overrides)
    if method_over:
        raise CLIError(f"evaluate takes the method config from the checkpoint; unexpected override(s) "
                       f"{method_over} (only data.<key>=value is accepted)")
    ckpt, run, method, detector = load_detector(args, device)
    data_cfg = data_config(args, detector.config, (run or {}).get("data_config"), data_over)
    out = output_dir(args, ckpt.parent / "evaluate")
    from mudenet_core.data.datasets import make_splits
    from mudenet_core.harness import evaluate, save_evaluation

    test = make_splits(data_cfg.replace(preload=False)).test  # decode the test images only, not all three
    if data_cfg.preload:
        test.preload(lossy=data_cfg.preload_dtype == "uint8")
    say(f"evaluate: {method} from {ckpt} on {data_cfg.dataset}/{data_cfg.category} ({len(test)} images)")
    result = evaluate(detector, test, batch_size=args.batch_size, device=device,
                      show_progress=not args.no_progress)
    from mudenet_core.harness import deployment_metrics, load_calibration

    rec, why = load_calibration(ckpt.parent, ckpt)
    if rec is None:
        say(f"evaluate: no validation threshold for this model ({why}); only the oracle f1_max is reported")
    if rec is not None:  # what a deployment gets at the threshold chosen on validation (f1_max: the oracle)
        result.metrics.update(deployment_metrics(result.scores["label"], result.scores["score"],
                                                 rec["threshold"]))
    save_evaluation(result, out, config=detector.config, save_maps=not args.no_maps,
                    extra={"method": method, "checkpoint": str(ckpt), "data_config": data_cfg.to_dict(),
                           "git_sha": git_sha()})
    images = _DisplayImages(test, data_cfg.normalize)
    _evaluation_figures(result, images, out, n=args.n_overlays, method=method)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    say(f"evaluate: {summary}")
    say(f"evaluate: wrote {out}")
    from mudenet_core import tracking  # test metrics onto the MLflow run (off: MUDENET_TRACKING=0)

    if (run_id := tracking.track_cli_evaluation(ckpt, result.metrics, out)) is not None:
        say(f"evaluate: logged to {tracking.tracking_uri()} (run {run_id})")
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


