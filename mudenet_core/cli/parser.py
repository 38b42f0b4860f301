"""The ``mudenet`` argument parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from mudenet_core import __version__
from mudenet_core.cli.common import COMMANDS, PROG
from mudenet_core.cli.export import add_export_parser
from mudenet_core.config import nonnegative_int
from mudenet_core.methods import METHODS, PROFILES


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
    p.add_argument("--n-overlays", type=nonnegative_int, default=8,
                   help="test images drawn as overlays (default 8; 0: none)")
    p.add_argument("--no-maps", action="store_true", help="do not write maps.npy")

    p = sub.add_parser("predict", help="score an image or a folder of images (no labels needed)",
                       description="Anomaly maps (PNG + .npy) and scores (predictions.csv) of new images.")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt or the folder holding it")
    p.add_argument("--input", type=Path, required=True, help="an image or a folder (searched recursively)")
    _add_common(p, trains=False)
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (default 1: each image's outputs depend on it alone; larger "
                        "batches are faster, and maps may then differ in the last float bits with the batch)")
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold for is_anomalous (default: the one chosen on the validation set at "
                        "training time, threshold.json beside model.pt)")
    _add_serve(sub)
    add_export_parser(sub)
    return parser


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the inference service and its web page (FastAPI + uvicorn)",
                       description="Serve a registered model over HTTP: /api/* and a web page at /.",
                       epilog="MUDENET_API_TOKEN=<token> requires 'Authorization: Bearer <token>' on every "
                              "route but /api/status and the page.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", default=None,
                   help="registry ID loaded at start-up: models:/<name>/<version>, <name>/<version> or "
                        "runs:/<run_id> (default: none; pick one on the page)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request in MiB (default 20)")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="torch: the detector; onnx: the model folder's model.onnx (default torch)")
    p.add_argument("--tracking-uri", default=None,
                   help="the registry (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/results/mlflow.db)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


