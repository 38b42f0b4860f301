#!/usr/bin/env python
"""Execute the numbered notebooks for every (dataset, category, seed) and build the results index.

For each run it converts ``notebooks/NN_name.py`` (jupytext percent script) to a notebook, executes it with
papermill (parameters injected after the ``parameters`` cell, kernel ``python3``, cwd = repository root) into
``results/<profile>/runs/<dataset>/<category>/seed<k>/NN_name.ipynb``, renders HTML beside it with nbconvert,
and records everything in ``results/<profile>/manifest.json`` (written atomically). ``90_report`` runs once
per profile after all runs; it builds ``tables/*.csv`` and ``figures/*.png`` from the per-run CSVs, and this
program then writes ``index.html``.

User runs write the git-ignored ``results/<profile>/``; ``--reference`` rewrites the committed
``results/reference/<profile>/`` (from a clean git tree only).

Examples::

    python run_all.py                                  # cpu profile on the embedded generated dataset
    python run_all.py --profile smoke                  # a minute-scale check of the whole pipeline
    python run_all.py --profile paper --dataset mvtec_ad --data-root /data/mvtec_ad --seeds 0 1 2 --jobs 2
    python run_all.py --resume                         # skip notebooks whose outputs are complete
    python run_all.py --profile smoke --executor ray   # one Ray task per run, on a local Ray cluster
    # the paper grid on a Ray cluster, one GPU per run; data and results on a filesystem all nodes mount:
    python run_all.py --profile paper --data-root /nfs/mvtec --out /nfs/results --executor ray --address auto
    python run_all.py --reference                      # regenerate results/reference/cpu/ (clean tree)

Exit status: 0 done, 1 a notebook failed, 2 a user error (a bad option, ``--set`` key or value, a dataset
folder that is missing or lacks what the run needs): one line on stderr, before anything is executed.

Profiles live in ``params/<profile>.yaml``: the run grid (dataset, categories, seeds, methods) and the
notebook parameters (``common`` for every notebook that declares the name, ``notebooks.<NN_name>`` for one).
The pieces live in :mod:`mudenet_core.workbook` (plan, resume, execute, ray_executor, manifest, render,
console). With ``--executor ray`` the results and data folders must be on a filesystem every node of the
cluster mounts at the same path (see :mod:`mudenet_core.workbook.ray_executor`).
"""

from __future__ import annotations

import sys

from mudenet_core.workbook.cli import build_parser, main
from mudenet_core.workbook.execute import execute_one, execute_run, kernel_config, kernel_env, run_profile
from mudenet_core.workbook.manifest import package_versions
from mudenet_core.workbook.plan import (
    DATASETS,
    NOTEBOOKS,
    PROFILES,
    Plan,
    PlanError,
    RunAllError,
    RunKey,
    declared_parameters,
    discover_categories,
    load_profile,
    make_plan,
    notebook_parameters,
    notebook_path,
    parse_overrides,
    read_notebook,
)
from mudenet_core.workbook.render import render_html
from mudenet_core.workbook.resume import (
    data_fingerprint,
    entry_complete,
    file_sha,
    notebook_inputs,
    why_incomplete,
)

__all__ = [
    "DATASETS", "NOTEBOOKS", "PROFILES", "Plan", "PlanError", "RunAllError", "RunKey", "build_parser",
    "data_fingerprint", "declared_parameters", "discover_categories", "entry_complete", "execute_one",
    "execute_run", "file_sha", "kernel_config", "kernel_env", "load_profile", "main", "make_plan",
    "notebook_inputs", "notebook_parameters", "notebook_path", "package_versions", "parse_overrides",
    "read_notebook", "render_html", "run_profile", "why_incomplete",
]

if __name__ == "__main__":
    sys.exit(main())
