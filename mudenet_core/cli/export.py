"""``mudenet export``: a trained run as an ONNX or TorchScript file, raw RGB in, calibrated map and score out.

The graph, its input convention and metadata are described in :mod:`mudenet_core.export`. The export needs
the run's calibration record (``threshold.json`` beside ``model.pt``, for this very model file): its map range
and threshold go inside the graph and its metadata. After writing, the command runs the file (onnxruntime, or
``torch.jit.load``) and the torch graph on two seeded random images and fails if they disagree beyond
rtol 1e-3 / atol 1e-5 on the maps; the measured differences are recorded in the sidecar ``<file>.json``.

Default output: ``<checkpoint dir>/export/model.onnx`` (``model.torchscript.pt`` for TorchScript).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mudenet_core.cli.common import CLIError, checkpoint_path, pick_method, read_run, say

PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-5  # of the post-export check on the maps


def _input_size(args, image_size: int) -> tuple[int, int]:
    if args.input_size is None:
        return image_size, image_size
    h, w = args.input_size
    if h < 1 or w < 1:
        raise CLIError(f"--input-size must be two positive integers (H W), got {h} {w}")
    return int(h), int(w)


def cmd_export(args, overrides: list[str]) -> int:
    """``mudenet export``: write the exported model and its sidecar JSON, check it against torch."""
    from mudenet_core import export
    from mudenet_core.io import save_json
    from mudenet_core.methods import get_method

    if overrides:
        raise CLIError(f"export takes no key=value overrides, got {list(overrides)}")
    ckpt = checkpoint_path(args.checkpoint)
    run = read_run(ckpt.parent)
    method = pick_method(args.method, run.get("method") if run else None, str(ckpt.parent / "config.yaml"))
    if method not in export.SCORERS:
        raise CLIError(f"export supports {', '.join(export.SCORERS)}; {ckpt} is a {method!r} model")
    out = args.output or ckpt.parent / "export" / export.DEFAULT_FILES[args.format]
    if out.is_dir():
        raise CLIError(f"--output {out} is a folder; give a file name")
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    calibration = export.load_run_calibration(ckpt)
    det_cls, _ = get_method(method)
    detector = det_cls.load(ckpt, device="cpu")
    data = (run or {}).get("data_config") or {}
    size = _input_size(args, int(detector.config.image_size))
    say(f"export: {method} from {ckpt} as {args.format} (input (B, 3, {size[0]}, {size[1]}), model "
        f"{detector.config.image_size} px) -> {out}")
    try:
        record = export.export_detector(detector, out, fmt=args.format, calibration=calibration,
                                        input_size=size, imagenet_normalize=bool(data.get("normalize", True)),
                                        exporter=args.exporter, checkpoint=ckpt)
    except ImportError as e:
        raise CLIError(f"export needs the optional extra 'export' ({e}): pip install -e \".[export]\""
                       ) from None
    except export.ExportError as e:
        raise CLIError(str(e)) from None
    graph = export.build_graph(detector, calibration=calibration, input_size=size,
                               imagenet_normalize=bool(data.get("normalize", True)))
    loaded = export.load_onnx_model(out) if args.format == "onnx" else export.load_torchscript_model(out)
    rgb = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    check = export.parity(graph, loaded, rgb, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    ok = check["maps_allclose"] == 1.0
    record["parity_check"] = {**check, "images": "2 seeded uniform random images", "seed": args.seed,
                              "rtol": PARITY_RTOL, "atol": PARITY_ATOL, "passed": ok}
    save_json(export.sidecar_path(out), record)
    say(f"export: {record['exporter']}; parity with torch: max |map diff| {check['max_abs_map']:.3g}, "
        f"max |score diff| {check['max_abs_score']:.3g}; threshold {record['threshold']!s} (calibrated)")
    if not ok:
        raise CLIError(f"{out}: the exported model disagrees with torch beyond rtol {PARITY_RTOL} / atol "
                       f"{PARITY_ATOL} (max |map diff| {check['max_abs_map']:.3g}); see "
                       f"{export.sidecar_path(out)}")
    say(f"export: wrote {out} and {export.sidecar_path(out)}")
    if args.format == "onnx":
        from mudenet_core import tracking

        run_id = tracking.track_cli_export(ckpt, out, export.sidecar_path(out))
        if run_id:
            say(f"export: added model.onnx to the registered model of MLflow run {run_id} "
                "(mudenet serve --runtime onnx serves it)")
    return 0


def add_export_parser(sub) -> None:
    """Add the ``export`` subcommand to the ``mudenet`` subparsers."""
    from mudenet_core import export

    p = sub.add_parser("export", help="a trained run as ONNX or TorchScript (raw RGB in, map and score out)",
                       description="Export a run: the graph takes float RGB (B, 3, H0, W0) in [0, 1], "
                                   "resizes and normalises inside, and returns the calibrated map and score.")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt or the run folder holding it")
    p.add_argument("--format", choices=export.FORMATS, required=True, help="onnx or torchscript")
    p.add_argument("--output", type=Path, default=None,
                   help="file to write (default: <checkpoint dir>/export/model.onnx or model.torchscript.pt)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="fixed input size of the graph (default: the model's size); the graph resizes to it")
    p.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="ONNX exporter: auto (dynamo=True, then dynamo=False), dynamo, legacy (dynamo=False, "
                        "TorchScript-based; fails on PatchCore)")
    p.add_argument("--method", default=None, help="method of the checkpoint (default: from its config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--seed", type=int, default=0, help="seed of the post-export check's random images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
