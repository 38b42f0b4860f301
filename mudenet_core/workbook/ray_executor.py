"""``run_all.py --executor ray``: each (dataset, category, seed) run is one Ray task.

How it runs:

- **Resources.** Each run asks for the ``executor:`` section of ``params/<profile>.yaml``
  (:class:`~mudenet_core.workbook.executor_config.ExecutorConfig`: ``num_cpus``, ``num_gpus``,
  ``max_retries``), so a cluster with N GPUs runs N paper runs (``num_gpus: 1``) at once. The notebook
  kernels of a run use ``num_cpus`` threads (unless the caller set ``OMP_NUM_THREADS``) and see the GPUs
  Ray gave the run (``CUDA_VISIBLE_DEVICES``; none when it asks for ``num_gpus: 0``).
- **Cluster.** ``--address auto | HOST:PORT | ray://HOST:PORT`` joins an existing cluster; otherwise a
  local one is started for the invocation (``--jobs N`` runs at once, default every core) and shut down at
  the end. No dashboard, no worker logs on the console.
- **Shared filesystem.** Workers write the run folders under ``--results-root`` and read the dataset
  under ``--data-root`` (the generated dataset included: the driver generates it there first), at the
  *same absolute paths* as the driver: on a cluster both must be on a filesystem every node mounts at the
  same place (NFS, a parallel filesystem, a bind mount into the containers), and every node needs the
  same checkout of this repository (package, configs, notebooks; e.g. the repository itself on that
  filesystem, or the Docker image). A worker checks both before it starts and the run fails with a message
  naming the node otherwise. MLflow's SQLite store (``<profile>/mlflow.db``) is not safe on a network
  filesystem: point ``MLFLOW_TRACKING_URI`` at a tracking server, or set ``MUDENET_TRACKING=0``; the
  driver's values of both are passed on to the kernels.
- **One writer per manifest.** A worker executes its run with
  :func:`~mudenet_core.workbook.execute.execute_run` (which keeps ``<run>/manifest.json`` up to date after
  every notebook) and *returns* the entries; only the driver writes the profile manifest, one result at a
  time, as on the local executor. Entries are the same whichever executor wrote them, so ``--resume``
  works across executors; runs that are already complete are left out before any cluster is contacted.
- **Failures.** A worker that dies (``kill -9``, out of memory, a lost node) is rerun by Ray, at most
  ``max_retries`` times; the retry skips the notebooks its previous attempt finished and reruns the
  interrupted one (whose entry still says ``running``: its partial outputs never count as complete). A
  notebook that fails stops the invocation as on the local executor: the other runs are cancelled and
  the error names the notebook. A killed driver takes its tasks with it (Ray ends a job's workers when its
  driver dies); ``--resume`` then continues from the run manifests, nothing lost.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from mudenet_core.workbook import execute, resume
from mudenet_core.workbook import manifest as mf
from mudenet_core.workbook.errors import PlanError
from mudenet_core.workbook.executor_config import require_ray
from mudenet_core.workbook.plan import Plan, RunAllError, RunKey, notebook_path

# tests only: "<run label>[:<notebook>]=<marker file>" kills the worker of that run (SIGKILL) once, while
# that notebook (default: the first it executes) runs; set in the driver's environment
TEST_KILL_ENV = "MUDENET_RUN_ALL_TEST_KILL"
# the driver's values reach every node: the tracking store (or tracking off), and the test hook
FORWARDED_ENV = ("MUDENET_TRACKING", "MLFLOW_TRACKING_URI", TEST_KILL_ENV)


# ------------------------------------------------------------------------------------------------------------
# What the driver asks of Ray
# ------------------------------------------------------------------------------------------------------------
def init_options(plan: Plan) -> dict:
    """Keyword arguments of ``ray.init``: join ``plan.address``, or start a local cluster of ``cluster_cpus``.

    ``address="local"`` always starts a new cluster (never one that ``ray start`` left on this machine).
    """
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if plan.address:
        return {"address": plan.address, **quiet}
    return {"address": "local", "num_cpus": plan.cluster_cpus, "include_dashboard": False, **quiet}


def task_options(plan: Plan, key: RunKey) -> dict:
    """Options of the Ray task of one run: the profile's resources and retries, and a readable name."""
    r = plan.resources
    return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "max_retries": r.max_retries,
            "retry_exceptions": False, "name": f"run_all {key.label}"}


def kernel_env(plan: Plan) -> dict[str, str]:
    """The kernels' environment, fixed by the driver for every node: threads, forwarded variables, GPUs.

    A run that asks for no GPU sees none (``CUDA_VISIBLE_DEVICES=""``): Ray leaves the variable alone then,
    and ``DEVICE: auto`` would otherwise take a GPU of the node that another run holds.
    """
    env = {**execute.kernel_env(plan), **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    if plan.resources.num_gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def code_identity(plan: Plan) -> dict:
    """What a node must have the same as the driver: package code and configs, and the planned notebooks."""
    from mudenet_core.io import code_hash

    return {"code_hash": code_hash(),
            "sources": {n: resume.file_sha(notebook_path(n)) for n in plan.notebooks}}


def check_feasible(ray, plan: Plan) -> str:
    """One line on the cluster; on a local cluster, an error when no node can hold a run.

    Raises:
        PlanError: a local cluster without a node that has the CPUs and GPUs one run asks for (its tasks
            would wait forever). An existing cluster only gets a note (an autoscaler may add such a node).
    """
    r = plan.resources
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    line = (f"[run_all] Ray: {len(nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s); each run asks for "
            f"num_cpus={r.num_cpus}, num_gpus={r.num_gpus:g} (max_retries={r.max_retries})")
    if any(n.get("CPU", 0) >= r.num_cpus and n.get("GPU", 0) >= r.num_gpus for n in nodes):
        return line
    need = (f"no node of the Ray cluster has the {r.num_cpus} CPU(s) and {r.num_gpus:g} GPU(s) one run asks "
            f"for (params/{plan.profile}.yaml executor:; the cluster: {cpus:g} CPU(s), {gpus:g} GPU(s))")
    if plan.address is None:
        raise PlanError(f"{need}; lower executor.num_cpus/num_gpus, pass --jobs, or join a cluster that has "
                        "them with --address")
    return f"{line}\n[run_all] note: {need}; the runs wait until such a node joins"


# ------------------------------------------------------------------------------------------------------------
# The task (runs in a Ray worker)
# ------------------------------------------------------------------------------------------------------------
class _Events:
    """Progress events to the driver's queue; a queue that is gone (its driver died) is ignored."""

    def __init__(self, queue):
        self.queue = queue

    def put(self, event: tuple) -> None:
        try:
            self.queue.put(event, block=False)
        except Exception:  # noqa: BLE001 - progress must never fail a run
            pass


def node_problem(plan: Plan, identity: dict) -> str | None:
    """Why this node cannot execute runs of the plan (None: it can): folders not shared, other code."""
    host = socket.gethostname()
    for what, folder, option in (("results folder", plan.profile_dir, "--results-root"),
                                 ("dataset folder", plan.data_root, "--data-root")):
        if not folder.is_dir():
            return (f"node {host} does not see the {what} {folder}: {option} must be on a filesystem that "
                    "every node of the Ray cluster mounts at the same path")
    try:
        mine = code_identity(plan)
    except RunAllError as e:
        return f"node {host}: {e} (every node needs the same checkout of the repository)"
    if mine["code_hash"] != identity["code_hash"]:
        return (f"node {host} has other package code or configs than the driver (code hash "
                f"{mine['code_hash']} vs {identity['code_hash']}): every node needs the same checkout")
    other = sorted(n for n, sha in identity["sources"].items() if mine["sources"].get(n) != sha)
    if other:
        return f"node {host} has other notebook sources than the driver ({', '.join(other)})"
    return None


def _test_kill_hook(plan: Plan, key: RunKey, stop: threading.Event) -> None:
    """Tests only (:data:`TEST_KILL_ENV`): SIGKILL this worker once its run's notebook has started executing.

    Fires on the first attempt only: it writes the marker file (``<pid> <notebook>``) just before killing,
    and does nothing when the marker exists.
    """
    target, _, marker = plan.extra_env.get(TEST_KILL_ENV, "").partition("=")
    label, _, notebook = target.partition(":")
    if label != key.label or not marker or Path(marker).exists():
        return
    t0 = time.time()

    def watch() -> None:
        mpath = plan.run_dir(key) / "manifest.json"
        while not stop.is_set():
            running = [e["notebook"] for e in mf.read_run_manifest(mpath).values()
                       if e.get("status") == "running" and e.get("invocation") == plan.invocation
                       and (not notebook or e["notebook"] == notebook)]
            ipynb = plan.run_dir(key) / f"{running[0]}.ipynb" if running else None
            if ipynb is not None and ipynb.is_file() and ipynb.stat().st_mtime >= t0:  # papermill has begun
                time.sleep(1.0)
                Path(marker).write_text(f"{os.getpid()} {running[0]}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="run_all-test-kill").start()


def run_task(plan: Plan, key: RunKey, queue, identity: dict) -> dict:
    """The body of the Ray task of one run: check the node, execute the run, return its result.

    Returns:
        :func:`~mudenet_core.workbook.execute.execute_run`'s result (``key``, ``entries``, ``executed``,
        ``failed``); a node that cannot execute the run gives a failed result naming the reason.
    """
    problem = node_problem(plan, identity)
    if problem:
        return {"key": key.label, "entries": [], "executed": 0,
                "failed": {"notebook": "(runner)", "error": problem, "executed": "(not executed)"}}
    stop = threading.Event()
    _test_kill_hook(plan, key, stop)
    try:
        return execute._execute_run_worker(plan, key, _Events(queue))
    finally:
        stop.set()


# ------------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------------
def lost_run(plan: Plan, key: RunKey, error: BaseException) -> dict:
    """The result of a run whose task ended in a Ray error (its worker died more often than retried, ...).

    The entries are read back from the run manifest (the finished notebooks are not lost); the failure
    names the notebook that was running.
    """
    entries = mf.read_run_manifest(plan.run_dir(key) / "manifest.json")
    mine = [e for e in entries.values() if e.get("invocation") == plan.invocation]
    running = [e for e in mine if e.get("status") == "running"]
    text = " ".join(str(error).split())
    if len(text) > 600:
        text = text[:600] + " ..."
    tries = plan.resources.max_retries + 1
    return {
        "key": key.label,
        "entries": mf.sorted_entries(entries),
        "executed": sum(e.get("status") in ("ok", "failed") for e in mine),
        "failed": {
            "notebook": running[0]["notebook"] if running else "(runner)",
            "error": (f"the Ray task of this run did not finish after {tries} attempt(s) "
                      f"(params/{plan.profile}.yaml executor.max_retries={plan.resources.max_retries}): "
                      f"{type(error).__name__}: {text}"),
            "executed": str(plan.run_dir(key) / f"{running[0]['notebook']}.ipynb") if running else "(none)",
        },
    }


class _Progress:
    """Events to the console, one finish per (run, notebook): a retry's skips of finished ones are dropped."""

    def __init__(self, on_event):
        self.on_event, self.done = on_event, set()

    def __call__(self, event: tuple) -> None:
        kind, label, name = event[:3]
        if kind in ("ok", "failed", "skip"):
            if (label, name) in self.done:
                return
            self.done.add((label, name))
        self.on_event(event)


def execute_runs(plan: Plan, record, on_event) -> None:
    """Every run of the plan as a Ray task; ``record`` (the driver's) gets each result as it arrives.

    Runs that ``--resume`` finds complete are recorded without a task (and without a cluster when none is
    left). ``record`` raises :class:`~mudenet_core.workbook.errors.RunAllError` for a failed run: the tasks
    still pending or running are then cancelled, as they are on Ctrl-C.

    Raises:
        PlanError: Ray missing, the cluster unreachable, or a local cluster too small for one run.
    """
    progress = _Progress(on_event)
    pending = []
    for key in plan.runs:
        done = execute.completed_run(plan, key)
        if done is None:
            pending.append(key)
            continue
        for entry in done["entries"]:
            if entry["notebook"] in plan.notebooks:
                progress(("skip", key.label, entry["notebook"], None))
        record(done)
    if not pending:
        return
    ray = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats notice (nor upload) from run_all
    try:
        ray.init(**init_options(plan))
    except Exception as e:  # noqa: BLE001 - any failure to start or join the cluster is a user-facing error
        where = f"join the Ray cluster at {plan.address}" if plan.address else "start a local Ray cluster"
        hint = (" (is it running? A cluster with token authentication also needs RAY_AUTH_MODE=token and "
                "its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)" if plan.address else "")
        text = " ".join(str(e).split())[:500]
        raise PlanError(f"cannot {where}: {type(e).__name__}: {text}{hint}") from None
    try:
        print(check_feasible(ray, plan), flush=True)
        queue = importlib.import_module("ray.util.queue").Queue(actor_options={"num_cpus": 0})
        shipped = ray.put(dataclasses.replace(plan, extra_env=kernel_env(plan)))
        identity = code_identity(plan)
        task = ray.remote(run_task)
        refs = {task.options(**task_options(plan, key)).remote(shipped, key, queue, identity): key
                for key in pending}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                _drain(queue, progress)
                for ref in done:
                    key = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died more than max_retries times, ...
                        result = lost_run(plan, key, e)
                    _drain(queue, progress)
                    record(result)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()


def _drain(queue, progress) -> None:
    """Hand every queued event to ``progress``."""
    while True:
        try:
            event = queue.get(block=False)
        except Exception:  # noqa: BLE001 - ray.util.queue.Empty, or the queue actor gone
            return
        progress(event)


__all__ = ["FORWARDED_ENV", "TEST_KILL_ENV", "check_feasible", "code_identity", "execute_runs",
           "init_options", "kernel_env", "lost_run", "node_problem", "run_task", "task_options"]
