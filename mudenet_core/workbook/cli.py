"""The command line of ``python run_all.py``: parse, plan (exit 2 on bad arguments), execute (1: failed).

Every user error (a bad option, a ``--set`` key, a value out of range, a missing dataset folder) is one line
on stderr, ``[run_all] ERROR: ...``, and exit status 2, before anything is executed; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from mudenet_core.workbook.execute import run_profile
from mudenet_core.workbook.executor_config import EXECUTORS
from mudenet_core.workbook.plan import DATASETS, PROFILES, REPO_ROOT, PlanError, RunAllError, make_plan

DESCRIPTION = """\
Execute the numbered notebooks for every (dataset, category, seed) and build the results index.

User runs write results/<profile>/ (git-ignored); --reference rewrites the committed reference results in
results/reference/<profile>/ and refuses to run from a dirty git tree. Exit status: 0 done, 1 a notebook
failed, 2 bad arguments (nothing executed).
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are a :class:`PlanError` (one line, exit status 2 in main)."""

    def error(self, message: str):
        raise PlanError(f"{message} (usage: python run_all.py --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (a usage error raises :class:`PlanError`)."""
    p = _Parser(prog="run_all.py", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=PROFILES, default="cpu",
                   help="run grid and notebook parameters (params/<profile>.yaml); default: cpu (generated "
                        "dataset, fits 30 min on 2 cores)")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: the profile's)")
    p.add_argument("--data-root", default=None,
                   help="folder holding the dataset's categories (default for synthetic: the profile's "
                        "synthetic_root, generated on first use)")
    p.add_argument("--categories", nargs="+", default=None,
                   help="categories (space- or comma-separated); default: the profile's for its own dataset, "
                        "else every category found under --data-root")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods of the harness (mudenet runs notebooks 10-30 and 50; the others run in "
                        "40_baselines); default: the profile's")
    p.add_argument("--jobs", type=int, default=None,
                   help="independent (dataset, category, seed) runs in parallel (default 1); with --executor "
                        "ray: the local cluster gets N x executor.num_cpus CPUs (default: every core)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: this machine (--jobs processes); ray: one Ray task per (dataset, category, "
                        "seed) run with the resources of params/<profile>.yaml executor: (num_cpus, "
                        "num_gpus, max_retries), on --address or a local cluster; outputs go to "
                        "--results-root, which every node must see at the same path (a shared filesystem)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: an existing cluster (auto, HOST:PORT, ray://HOST:PORT); "
                        "default: start a local one")
    p.add_argument("--resume", action="store_true",
                   help="skip notebooks whose outputs are complete (same notebook, package code, configs, "
                        "parameters and dataset files) and let notebooks reuse checkpoints made from the "
                        "same inputs")
    p.add_argument("--only", nargs="+", default=None,
                   help="a subset of notebooks, by name or number (e.g. 00 40)")
    p.add_argument("--set", nargs="+", default=[], metavar="METHOD.KEY=VALUE",
                   help="config overrides for every run: METHOD.KEY=VALUE for a method's config (e.g. "
                        "mudenet.train.steps=500 mudenet.distill.source=train+folder), data.KEY=VALUE for "
                        "the dataset config (e.g. data.val_fraction=0.2); unknown methods and keys exit 2")
    p.add_argument("--texture-dir", default=None, metavar="PATH",
                   help="folder of texture images for the synthetic validation anomalies (notebook parameter "
                        "TEXTURE_DIR; default: none)")
    p.add_argument("--results-root", "--out", dest="results_root", default=str(REPO_ROOT / "results"),
                   metavar="DIR", help="results root (default: <repo>/results): user runs write "
                   "<DIR>/<profile>/, --reference <DIR>/reference/<profile>/")
    p.add_argument("--reference", action="store_true",
                   help="regenerate the committed reference results (results/reference/<profile>/); refuses "
                        "when the git tree has uncommitted changes")
    p.add_argument("--allow-dirty", action="store_true",
                   help="with --reference: run from a dirty tree anyway (development; the SHA says -dirty)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _error(e: BaseException | str) -> None:
    """``[run_all] ERROR: <message>`` on stderr, on one line."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"[run_all] ERROR: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a notebook failed, 2 bad arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    t0 = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        if args.allow_dirty and not args.reference:
            raise PlanError("--allow-dirty only applies to --reference")
        plan = make_plan(args)
    except PlanError as e:
        _error(e)
        return 2
    except RunAllError as e:  # a notebook source that cannot be read: nothing was executed
        _error(e)
        return 1
    except OSError as e:  # a path of the arguments that cannot be read
        _error(f"{type(e).__name__}: {e}")
        return 2
    where = "" if plan.executor == "local" else f" on Ray ({plan.address or 'a local cluster'})"
    print(
        f"[run_all] profile {plan.profile}{' (reference)' if plan.reference else ''}: "
        f"{len(plan.runs)} run(s) x {len(plan.notebooks)} notebook(s) -> {plan.profile_dir}{where}",
        flush=True,
    )
    try:
        summary = run_profile(plan, show_progress=not args.quiet, argv=argv)
    except PlanError as e:  # found before any notebook ran (e.g. the dataset could not be prepared)
        _error(e)
        return 2
    except RunAllError as e:
        print(f"[run_all] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    wall = time.perf_counter() - t0
    if summary["executed"] == 0:
        print(f"[run_all] nothing to do: every notebook's outputs are complete ({wall:.1f} s)", flush=True)
    else:
        print(f"[run_all] executed {summary['executed']} notebook(s) in {wall:.1f} s; "
              f"index: {summary['index']}", flush=True)
    return 0
