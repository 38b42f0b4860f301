"""The workbook runner behind ``run_all.py``, one module per concern.

- :mod:`~mudenet_core.workbook.plan`: the ordered notebook list, profiles (``params/<profile>.yaml``), the
  command-line arguments resolved and validated into a :class:`~mudenet_core.workbook.plan.Plan`, and the
  parameters injected into each notebook.
- :mod:`~mudenet_core.workbook.overrides`: ``--set METHOD.KEY=VALUE`` and ``data.KEY=VALUE``, checked
  against the configs.
- :mod:`~mudenet_core.workbook.resume`: what makes a notebook's outputs complete (the ``--resume`` key:
  notebook source, package code, parameters, dataset fingerprint) and when a notebook may ``REUSE`` its
  checkpoints.
- :mod:`~mudenet_core.workbook.execute`: executing one notebook with papermill, one (dataset, category, seed)
  run, and the whole profile (in process, in a process pool, or on Ray).
- :mod:`~mudenet_core.workbook.executor_config`: ``--executor local|ray`` and the ``executor:`` section of a
  profile (the resources of one run on Ray).
- :mod:`~mudenet_core.workbook.ray_executor`: one Ray task per run, on an existing cluster or a local one.
- :mod:`~mudenet_core.workbook.manifest`: the one writer of ``manifest.json`` (per profile and per run).
- :mod:`~mudenet_core.workbook.render`: HTML of executed notebooks and the profile's ``index.html``.
- :mod:`~mudenet_core.workbook.console`: one clean progress line per notebook.
- :mod:`~mudenet_core.workbook.gitstate`: tracked files, a clean tree for ``--reference``.
- :mod:`~mudenet_core.workbook.errors`: :class:`PlanError` (exit 2) and :class:`RunAllError` (exit 1).
- :mod:`~mudenet_core.workbook.cli`: the command line (``python run_all.py``).
"""
