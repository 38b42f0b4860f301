"""run_all.py: the plan, the parameter injection, resume bookkeeping (fast), and a real smoke run (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_declared_parameters_accepts_literals_only(run_all):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "A: int = 1  # a\nB: list = [1, 'x']  # b", metadata={"tags": ["parameters"]}
        )
    ]
    assert run_all.declared_parameters(nb) == {"A": 1, "B": [1, "x"]}
    nb.cells[0].source = "A: int = 1 + len('x')  # derived"
    with pytest.raises(run_all.RunAllError, match="not a literal"):
        run_all.declared_parameters(nb)
    nb.cells[0].source = "import os"
    with pytest.raises(run_all.RunAllError, match="only 'NAME: type = literal'"):
        run_all.declared_parameters(nb)
    nb.cells.append(nbformat.v4.new_code_cell("C = 1", metadata={"tags": ["parameters"]}))
    with pytest.raises(run_all.RunAllError, match="exactly one cell tagged 'parameters', found 2"):
        run_all.declared_parameters(nb)


def test_plan_and_injected_parameters(run_all, tmp_path):
    args = run_all.build_parser().parse_args(
        [
            "--profile",
            "smoke",
            "--data-root",
            str(tmp_path),
            "--categories",
            "plate,weave",
            "--seeds",
            "0",
            "3",
            "--methods",
            "padim",
            "--only",
            "00",
            "40_baselines",
            "--out",
            str(tmp_path / "res"),
        ]
    )
    plan = run_all.make_plan(args)
    assert [k.label for k in plan.runs] == [
        "synthetic/plate/seed0",
        "synthetic/plate/seed3",
        "synthetic/weave/seed0",
        "synthetic/weave/seed3",
    ]
    assert plan.notebooks == ["00_data_exploration", "40_baselines"]
    assert plan.methods == ["padim"]
    declared = run_all.declared_parameters(run_all.read_notebook(run_all.notebook_path("40_baselines")))
    params = run_all.notebook_parameters(plan, "40_baselines", plan.runs[1], declared)
    assert params["OUT_DIR"] == str(tmp_path / "res" / "smoke" / "runs" / "synthetic" / "plate" / "seed3")
    assert params["SEED"] == 3 and params["CATEGORY"] == "plate" and params["METHODS"] == ["padim"]
    assert params["SMOKE"] is True and params["IMAGE_SIZE"] == 64 and params["PROFILE"] == "smoke"
    assert params["REUSE"] is False and params["DATA_ROOT"] == str(tmp_path)
    assert set(params) <= set(declared)
    # a per-notebook key the notebook does not declare is an error, not silently dropped
    plan.per_notebook["40_baselines"] = {"NOT_A_PARAMETER": 1}
    with pytest.raises(run_all.RunAllError, match="NOT_A_PARAMETER"):
        run_all.notebook_parameters(plan, "40_baselines", plan.runs[0], declared)


def test_bad_arguments_are_clear(run_all, tmp_path):
    parse = run_all.build_parser().parse_args
    with pytest.raises(run_all.RunAllError, match="--data-root is required"):
        run_all.make_plan(parse(["--dataset", "mvtec_ad"]))
    with pytest.raises(run_all.RunAllError, match="unknown method"):
        run_all.make_plan(parse(["--methods", "nope", "--data-root", str(tmp_path), "--categories", "plate"]))
    with pytest.raises(run_all.RunAllError, match="unknown notebook"):
        run_all.make_plan(parse(["--only", "77", "--data-root", str(tmp_path), "--categories", "plate"]))


def test_set_overrides_reach_the_notebooks(run_all, tmp_path):
    parse = run_all.build_parser().parse_args
    args = parse(["--data-root", str(tmp_path), "--categories", "plate",
                  "--set", "mudenet.train.steps=500", "mudenet.distill.source=train+folder",
                  "padim.n_features=50"])
    plan = run_all.make_plan(args)
    assert plan.common["OVERRIDES"] == {"mudenet": ["train.steps=500", "distill.source=train+folder"],
                                        "padim": ["n_features=50"]}
    declared = {"OVERRIDES": "{}", "OUT_DIR": "''", "SEED": "0"}
    params = run_all.notebook_parameters(plan, "20_training", plan.runs[0], declared)
    assert params["OVERRIDES"]["mudenet"] == ["train.steps=500", "distill.source=train+folder"]
    with pytest.raises(run_all.RunAllError, match="METHOD.KEY=VALUE"):
        run_all.make_plan(parse(["--data-root", str(tmp_path), "--categories", "plate", "--set", "steps=5"]))


def test_entry_complete(run_all, tmp_path):
    name = "00_data_exploration"
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "nb.ipynb").write_text("{}")
    inputs = run_all.notebook_inputs(name, "fp0")
    assert set(inputs) == {"source_sha", "code_hash", "data_fingerprint"}
    assert inputs["source_sha"] == run_all.file_sha(run_all.notebook_path(name))
    entry = {
        "notebook": name,
        "status": "ok",
        **inputs,
        "parameters": {"SEED": 0, "REUSE": False},
        "files": ["a.csv"],
        "executed": str(tmp_path / "nb.ipynb"),
    }
    assert run_all.entry_complete(entry, name, {"SEED": 0, "REUSE": True}, tmp_path, inputs)
    assert not run_all.entry_complete(entry, name, {"SEED": 1}, tmp_path, inputs)
    assert not run_all.entry_complete({**entry, "status": "failed"}, name, {"SEED": 0}, tmp_path, inputs)
    assert not run_all.entry_complete({**entry, "status": "running"}, name, {"SEED": 0}, tmp_path, inputs)
    # each input invalidates: the notebook source, the package code and configs, the dataset files
    for k in inputs:
        assert not run_all.entry_complete({**entry, k: "old"}, name, {"SEED": 0}, tmp_path, inputs), k
    # and --resume says why it runs a notebook again
    why = run_all.why_incomplete
    assert why(entry, name, {"SEED": 0}, tmp_path, inputs) is None
    assert why({**entry, "code_hash": "old"}, name, {"SEED": 0}, tmp_path, inputs) == (
        "the package code or a config changed")
    assert why({**entry, "data_fingerprint": "x"}, name, {"SEED": 1}, tmp_path, inputs) == (
        "the dataset files changed; parameters changed: SEED")
    assert why(None, name, {}, tmp_path, inputs) == "no earlier execution"
    (tmp_path / "a.csv").unlink()
    assert not run_all.entry_complete(entry, name, {"SEED": 0}, tmp_path, inputs)
    assert why(entry, name, {"SEED": 0}, tmp_path, inputs) == "output(s) missing: a.csv"


def test_bad_arguments_exit_2_before_any_work(run_all, tmp_path):
    out = tmp_path / "res"
    base = ["--data-root", str(tmp_path), "--categories", "plate", "--results-root", str(out)]
    for bad in (["--set", "mudnet.distill.steps=2"], ["--set", "mudenet.distill.stepz=2"],
                ["--set", "data.nope=1"], ["--texture-dir", str(tmp_path / "missing")], ["--only", "77"],
                ["--jobs", "0"], ["--categories", "screw"], ["--methods", "nope"]):
        assert run_all.main([*base, *bad]) == 2, bad
    assert not out.exists()  # nothing was written


@pytest.mark.slow
def test_smoke_run_then_resume_does_nothing(synthetic_root, tmp_path):
    """Every notebook runs on generated data; tables and index exist; a --resume rerun executes nothing."""
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        str(REPO / "run_all.py"),
        "--profile",
        "smoke",
        "--data-root",
        str(synthetic_root),
        "--categories",
        "plate",
        "--out",
        str(out),
        "--quiet",
    ]
    t0 = time.perf_counter()
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    wall = time.perf_counter() - t0
    assert first.returncode == 0, f"run_all failed:\n{first.stdout[-3000:]}\n{first.stderr[-5000:]}"
    # the kernels do not flood the console (jupyter's "running over TCP without encryption" and the like)
    assert "without encryption" not in first.stderr and "WARNING" not in first.stderr, first.stderr[-3000:]
    prof = out / "smoke"
    manifest = json.loads((prof / "manifest.json").read_text())
    from mudenet_core import methods

    executed = [e["notebook"] for e in manifest["runs"]["synthetic/plate/seed0"]]
    expected = ["00_data_exploration", "40_baselines"]
    if "mudenet" in methods.available_methods():
        expected = [
            "00_data_exploration",
            "10_distillation",
            "20_training",
            "30_evaluation",
            "40_baselines",
            "50_ablations",
        ]
    assert executed == expected
    assert manifest["report"]["status"] == "ok" and manifest["executed"] == len(expected) + 1
    run_dir = prof / "runs" / "synthetic" / "plate" / "seed0"
    for name in expected:
        entry = next(e for e in manifest["runs"]["synthetic/plate/seed0"] if e["notebook"] == name)
        assert entry["status"] == "ok" and entry["files"] and entry["parameters"]["SMOKE"] is True
        assert (run_dir / f"{name}.ipynb").is_file() and (run_dir / f"{name}.html").stat().st_size > 1000
    assert (prof / "report" / "90_report.html").is_file()
    for key in ("git_sha", "packages", "started", "finished"):
        assert manifest[key]
    assert manifest["threads"]["OMP_NUM_THREADS"] >= 1 and manifest["reference"] is False
    table = pd.read_csv(prof / "tables" / "synthetic.csv")
    assert not table.empty and set(table["category"]) == {"plate"}
    assert set(table["method"]) >= {m for m in methods.available_methods() if m != "mudenet"}
    assert table["config_hash"].notna().all() and table["git_sha"].notna().all()
    index = (prof / "index.html").read_text()
    assert "<table" in index and "Paper vs ours" in index
    for name in expected:
        assert f"runs/synthetic/plate/seed0/{name}.html" in index
    mtimes = {p: p.stat().st_mtime_ns for p in prof.rglob("*") if p.is_file()}

    # (not --quiet: the console says why a notebook would run again, e.g. a package file edited meanwhile)
    second = subprocess.run([c for c in cmd if c != "--quiet"] + ["--resume"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to do" in second.stdout, second.stderr[-3000:]
    assert "complete, skipped" in second.stderr and "runs again" not in second.stderr
    # no work: not one file under the profile folder was written (manifest and index included)
    assert {p: p.stat().st_mtime_ns for p in prof.rglob("*") if p.is_file()} == mtimes
    print(f"smoke run: {wall:.1f} s")


@pytest.mark.slow
def test_failed_notebook_stops_with_a_clear_message(tmp_path):
    """A notebook that raises stops the run; the message names the notebook, run and executed copy."""
    empty = tmp_path / "empty_category"
    (empty / "bottle" / "train" / "good").mkdir(parents=True)  # a category folder without images
    (empty / "bottle" / "test" / "good").mkdir(parents=True)
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "run_all.py"), "--profile", "smoke", "--dataset", "mvtec_ad",
           "--data-root", str(empty), "--categories", "bottle", "--methods", "padim",
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    executed = out / "smoke" / "runs" / "mvtec_ad" / "bottle" / "seed0" / "00_data_exploration.ipynb"
    assert "notebook 00_data_exploration failed for run mvtec_ad/bottle/seed0" in res.stderr
    assert f"executed copy: {executed}" in res.stderr
    assert executed.is_file() and executed.with_suffix(".html").is_file()
    manifest = json.loads((out / "smoke" / "manifest.json").read_text())
    assert manifest["runs"]["mvtec_ad/bottle/seed0"][0]["status"] == "failed"
    assert not (out / "smoke" / "runs" / "mvtec_ad" / "bottle" / "seed0" / "40_baselines.ipynb").exists()


@pytest.mark.slow
def test_parallel_jobs_run_categories_independently(synthetic_root, tmp_path):
    """--jobs 2 runs the two categories in separate processes; both runs land in one manifest."""
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "run_all.py"), "--profile", "smoke", "--data-root", str(synthetic_root),
           "--categories", "plate", "weave", "--only", "00", "--jobs", "2", "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "smoke" / "manifest.json").read_text())
    assert sorted(manifest["runs"]) == ["synthetic/plate/seed0", "synthetic/weave/seed0"]
    for key, entries in manifest["runs"].items():
        assert [e["notebook"] for e in entries] == ["00_data_exploration"] and entries[0]["status"] == "ok"
        assert (out / "smoke" / "runs" / key / "tables" / "data_counts.csv").is_file()
    assert manifest["executed"] == 2
