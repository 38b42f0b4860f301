"""``run_all.py --executor ray`` on real Ray clusters, with real notebooks (slow).

- the smoke grid (2 categories x 2 seeds) gives the same tables as the local executor, on a local cluster
  that run_all starts itself; and ``--resume`` finds either executor's results complete;
- a worker killed with SIGKILL in the middle of a notebook is retried by Ray, and the retry completes the run
  (on a cluster started here with ``ray start --head`` on 127.0.0.1, joined with ``--address``);
- a driver killed with SIGKILL is resumed with ``--resume``: the runs it finished are kept, the rest run.

Everything executes from a snapshot of the repository (package, configs, notebooks, params; imported first
through ``PYTHONPATH``), so edits to the working tree while these tests run cannot change the code between a
run and its ``--resume``. The cluster uses a token of its own (``RAY_AUTH_TOKEN``), never ``~/.ray``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from mudenet_core.workbook.ray_executor import TEST_KILL_ENV

pytest.importorskip("ray", reason="the optional extra 'ray' is not installed")

REPO = Path(__file__).resolve().parents[2]
KEYS = ["method", "dataset", "category", "seed", "split", "metric"]
TRAINING_FREE = ["padim", "patchcore"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """A snapshot of what run_all executes."""
    dst = tmp_path_factory.mktemp("repo")
    for folder in ("mudenet_core", "configs", "notebooks", "params"):
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    shutil.copy2(REPO / "run_all.py", dst / "run_all.py")
    return dst


@pytest.fixture(scope="module")
def env(repo_copy) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MUDENET_TRACKING": "0",
           "PYTHONPATH": str(repo_copy), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(TEST_KILL_ENV, None)
    where = subprocess.run([sys.executable, "-c", "import mudenet_core; print(mudenet_core.__file__)"],
                           env=env, cwd=repo_copy, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(repo_copy)), where  # the snapshot, not the working tree, is imported
    return env


@pytest.fixture(scope="module")
def head(env) -> str:
    """A one-node cluster (2 CPUs, no GPU) started with ``ray start --head --block``; stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray_cli = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus",
         "2", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp,
         "--block"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, lines = threading.Event(), []

    def read() -> None:  # keep draining, or a full pipe would block the head
        for line in proc.stdout:
            lines.append(line)
            if "block forever" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(180) and proc.poll() is None, "ray start failed:\n" + "".join(lines[-30:])
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def run_all(repo_copy: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo_copy / "run_all.py"), *args], cwd=repo_copy, env=env,
                          capture_output=True, text=True, timeout=timeout)


def failed(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


def tidy(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).sort_values(KEYS).reset_index(drop=True)


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def started(entry: dict) -> float:
    return dt.datetime.fromisoformat(entry["start"]).timestamp()


def test_ray_gives_the_same_tables_as_local(synthetic_root, repo_copy, env, tmp_path):
    grid = ["--profile", "smoke", "--data-root", str(synthetic_root), "--categories", "plate", "weave",
            "--seeds", "0", "1", "--methods", *TRAINING_FREE, "ae", "--only", "40", "90"]
    walls, results = {}, {}
    for name, executor in (("local", ["--jobs", "2"]), ("ray", ["--executor", "ray"])):  # a local cluster
        t0 = time.perf_counter()
        results[name] = run_all(repo_copy, env, *grid, *executor, "--out", str(tmp_path / name), "--quiet")
        walls[name] = time.perf_counter() - t0
        assert results[name].returncode == 0, failed(results[name])
    assert "[run_all] Ray: 1 node(s)" in results["ray"].stdout
    # the console carries run_all's lines only: no worker logs, no warnings
    err = results["ray"].stderr
    assert "pid=" not in err and "WARNING" not in err, err

    local, ray = (tidy(tmp_path / n / "smoke" / "tables" / "synthetic.csv") for n in ("local", "ray"))
    assert list(ray.columns) == list(local.columns)
    assert ray[KEYS].equals(local[KEYS])  # the same rows, every method
    assert set(local["method"]) == {*TRAINING_FREE, "ae"} and set(local["seed"]) == {0, 1}
    assert set(local["category"]) == {"plate", "weave"} and set(local["split"]) >= {"test", "val"}
    assert ray["config_hash"].equals(local["config_hash"])
    free = local["method"].isin(TRAINING_FREE)
    assert free.sum() > 20
    assert (ray.loc[free, "value"].to_numpy() == local.loc[free, "value"].to_numpy()).all()  # bit for bit
    timings = [tidy(tmp_path / n / "smoke" / "tables" / "timings.csv")[KEYS] for n in ("local", "ray")]
    assert timings[0].equals(timings[1])

    manifest = json.loads((tmp_path / "ray" / "smoke" / "manifest.json").read_text())
    assert manifest["executor"]["name"] == "ray" and manifest["executor"]["address"] == "local cluster"
    invocation = manifest["invocations"][-1]["invocation"]
    assert sorted(manifest["runs"]) == [f"synthetic/{c}/seed{s}" for c in ("plate", "weave") for s in (0, 1)]
    for entries in manifest["runs"].values():
        (entry,) = entries
        assert entry["status"] == "ok" and entry["invocation"] == invocation and entry["host"]
    assert manifest["report"]["status"] == "ok"

    # --resume across executors: either one's results are complete for the other (and Ray is not started)
    for out, executor in (("local", ["--executor", "ray"]), ("ray", [])):
        before = mtimes(tmp_path / out / "smoke")
        res = run_all(repo_copy, env, *grid, *executor, "--resume", "--out", str(tmp_path / out))
        assert res.returncode == 0 and "nothing to do" in res.stdout, failed(res)
        assert "[run_all] Ray:" not in res.stdout
        assert mtimes(tmp_path / out / "smoke") == before
    print(f"smoke grid (2 categories x 2 seeds, 40+90): local --jobs 2 {walls['local']:.1f} s, "
          f"ray (local cluster, 2 CPUs) {walls['ray']:.1f} s")


def test_a_worker_killed_mid_notebook_is_retried(head, synthetic_root, repo_copy, env, tmp_path):
    marker, out, label = tmp_path / "killed", tmp_path / "res", "synthetic/plate/seed7"
    res = run_all(repo_copy, {**env, TEST_KILL_ENV: f"{label}:40_baselines={marker}"}, "--profile", "smoke",
                  "--data-root", str(synthetic_root), "--categories", "plate", "--seeds", "7", "--methods",
                  "padim", "--only", "00", "40", "--executor", "ray", "--address", head, "--out", str(out))
    assert res.returncode == 0, failed(res)
    pid, notebook = marker.read_text().split()
    assert notebook == "40_baselines"
    killed_at = marker.stat().st_mtime
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)  # that worker is gone
    assert re.search(rf"{label}\s+40_baselines\s+runs again: the worker of the previous attempt died",
                     res.stderr), res.stderr
    manifest = json.loads((out / "smoke" / "manifest.json").read_text())
    entries = {e["notebook"]: e for e in manifest["runs"][label]}
    assert [e["status"] for e in entries.values()] == ["ok", "ok"]
    assert started(entries["00_data_exploration"]) < killed_at  # finished by the first attempt, kept
    assert started(entries["40_baselines"]) >= int(killed_at)  # executed again by the retry ...
    assert entries["40_baselines"]["parameters"]["REUSE"] is True  # ... and may reuse same-input checkpoints
    nb = nbformat.read(out / "smoke" / "runs" / label / "40_baselines.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)  # the executed copy is complete, not the killed one's
    assert (out / "smoke" / "runs" / label / "tables" / "metrics_padim.csv").is_file()


def test_a_killed_driver_is_resumed_with_nothing_lost(head, synthetic_root, repo_copy, env, tmp_path):
    out, keys = tmp_path / "res", [f"synthetic/plate/seed{s}" for s in (3, 4, 5)]  # 2 CPUs: 2, then 1
    args = ["--profile", "smoke", "--data-root", str(synthetic_root), "--categories", "plate", "--seeds", "3",
            "4", "5", "--methods", "padim", "--only", "40", "--executor", "ray", "--address", head,
            "--out", str(out)]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, str(repo_copy / "run_all.py"), *args], cwd=repo_copy, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    profile_manifest = out / "smoke" / "manifest.json"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and driver.poll() is None:  # until the driver has recorded one run
            time.sleep(0.5)
            if profile_manifest.is_file() and json.loads(profile_manifest.read_text()).get("runs"):
                break
    finally:
        driver.kill()  # SIGKILL
        driver.wait(60)
        log.close()
    assert driver.returncode == -9, (tmp_path / "driver.log").read_text()[-3000:]
    time.sleep(3)  # Ray ends the workers of a job whose driver died
    recorded = json.loads(profile_manifest.read_text())["runs"]
    done = {}  # runs finished on disk before the driver died (recorded or not)
    for key in keys:
        path = out / "smoke" / "runs" / key / "manifest.json"
        entries = json.loads(path.read_text())["notebooks"] if path.is_file() else []
        if entries and entries[0]["status"] == "ok":
            done[key] = entries
    assert recorded and set(recorded) <= set(done) and len(done) < 3, (recorded.keys(), done.keys())

    resumed = run_all(repo_copy, env, *args, "--resume")
    assert resumed.returncode == 0, failed(resumed)
    final = json.loads(profile_manifest.read_text())
    assert sorted(final["runs"]) == keys
    assert all(e["status"] == "ok" for entries in final["runs"].values() for e in entries)
    for key, entries in done.items():
        assert final["runs"][key] == entries  # kept as they were: not executed again
        assert re.search(rf"{key}\s+40_baselines\s+complete, skipped", resumed.stderr), resumed.stderr
    assert final["executed"] == 3 - len(done)
