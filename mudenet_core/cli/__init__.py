"""Command line: ``mudenet distill|train|evaluate|predict|serve|export`` (also ``python -m mudenet_core``).

One module per command (:mod:`.train` holds ``distill`` and ``train``), the parser in :mod:`.parser`, and
what they share in :mod:`.common`.

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

import sys
from collections.abc import Sequence

import torch

from mudenet_core.cli.common import PROG, CLIError, split_overrides, user_error_types
from mudenet_core.cli.evaluate import cmd_evaluate, select_overlays
from mudenet_core.cli.export import cmd_export
from mudenet_core.cli.parser import build_parser
from mudenet_core.cli.predict import cmd_predict
from mudenet_core.cli.serve import cmd_serve
from mudenet_core.cli.train import cmd_distill, cmd_train, loss_table

__all__ = ["CLIError", "build_parser", "loss_table", "main", "select_overlays", "split_overrides"]

COMMAND_FUNCS = {"distill": cmd_distill, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
                 "serve": cmd_serve, "export": cmd_export}


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
    except user_error_types() as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
