"""Executing the plan: one notebook (papermill), one (dataset, category, seed) run, the whole profile.

Runs execute in this process (``--jobs 1``), in a spawned process pool (``--jobs N``) or as Ray tasks
(``--executor ray``, :mod:`~mudenet_core.workbook.ray_executor`). Whatever the executor, one file has one
writer: only this process (the driver) writes the profile manifest
(:class:`~mudenet_core.workbook.manifest.ProfileManifest`), from the results the runs return to it, one at a
time; a run's own ``<run>/manifest.json`` is written only by the one process executing that run (after every
notebook, so an interrupted run resumes where it stopped). No two processes ever read-modify-write the same
manifest, so no record can be lost between them.

Every entry carries the ``invocation`` id of the run_all call that wrote it. An attempt that finds entries of
its own invocation is a retry (Ray reran a run whose worker died): it skips the notebooks that attempt
completed and reruns the interrupted one (allowed to ``REUSE`` its checkpoints), even without ``--resume``.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import logging
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
import uuid
from pathlib import Path

from mudenet_core.workbook import manifest as mf
from mudenet_core.workbook import render, resume
from mudenet_core.workbook.console import Console
from mudenet_core.workbook.plan import (
    NO_INPUT_NOTEBOOKS,
    NOTEBOOKS,
    REPO_ROOT,
    Plan,
    PlanError,
    RunAllError,
    RunKey,
    notebook_declarations,
    notebook_parameters,
    notebook_path,
    read_notebook,
)


# ------------------------------------------------------------------------------------------------------------
# The kernels
# ------------------------------------------------------------------------------------------------------------
def kernel_env(plan: Plan) -> dict[str, str]:
    """Environment for the kernels: quiet progress bars and a fair share of the CPU threads per job.

    Threads: the caller's ``OMP_NUM_THREADS``, else ``cpu_count // jobs`` (local) or the profile's
    ``executor.num_cpus`` (Ray: the CPUs the run holds).
    """
    # an OMP_NUM_THREADS set by the caller wins (two run_all processes sharing a machine)
    share = plan.resources.num_cpus if plan.executor == "ray" else max(1, (os.cpu_count() or 1) // plan.jobs)
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or share
    return {
        "MUDENET_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONWARNINGS": "ignore:IProgress not found",  # tqdm.auto without ipywidgets: bars are off anyway
        **plan.extra_env,
    }


def kernel_config(kernel_name: str = "python3"):
    """The traitlets config of the kernel manager papermill starts: an encrypted or local transport.

    By default jupyter_client connects to the kernel over plain TCP, and ipykernel (>= 7.4) then logs
    "Kernel is running over TCP without encryption" to the console for every notebook. When the kernel
    declares CurveZMQ support (``supported_encryption`` in its kernelspec) and pyzmq has it, the manager
    provisions keys (``transport_encryption="auto"``); otherwise, on POSIX, the kernel talks over local IPC
    sockets instead. Both remove the cause of the warning rather than hiding it.
    """
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if "transport_encryption" in KernelManager.class_trait_names():
        import zmq
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        try:
            supported = KernelSpecManager().get_kernel_spec(kernel_name).metadata.get("supported_encryption")
        except NoSuchKernel:
            supported = None
        if zmq.has("curve") and supported and "curve" in [str(s).lower() for s in supported]:
            return Config({"KernelManager": {"transport_encryption": "auto"}})
    if os.name == "posix":
        return Config({"KernelManager": {"transport": "ipc"}})
    return Config()


class _PapermillInferenceFilter(logging.Filter):
    """Drops papermill's guesses about the parameters cell, which run_all parses exactly.

    papermill re-reads the cell with a line regex that gives up on any line holding two ``=`` (a help
    comment such as ``# run_all.py --set data.KEY=VALUE``), logs "Unable to parse line", then warns "Passed
    unknown parameter" for that very name: false warnings, one per parameter and notebook, on the console.
    :func:`~mudenet_core.workbook.plan.declared_parameters` parses the cell with ``ast`` and run_all injects
    only the names it declares.
    """

    MESSAGES = ("Passed unknown parameter:", "Unable to parse line")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGES)


def quiet_papermill() -> None:
    """Install :class:`_PapermillInferenceFilter` on papermill's loggers (idempotent)."""
    for name in ("papermill", "papermill.translators"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _PapermillInferenceFilter) for f in log.filters):
            log.addFilter(_PapermillInferenceFilter())


def _snapshot(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    out = {}
    if not folder.is_dir():
        return out
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.name.startswith(".") and not any(rel.startswith(e) for e in exclude):
            st = p.stat()
            out[rel] = (st.st_mtime_ns, st.st_size)
    return out


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's terminated, reaped children (the notebook kernels)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------------------------------
# One notebook
# ------------------------------------------------------------------------------------------------------------
def execute_one(name: str, params: dict, out_dir: Path, *, env: dict | None = None,
                inputs: dict | None = None) -> dict:
    """Execute one notebook into ``out_dir/<name>.ipynb`` and render ``<name>.html``; return a manifest entry.

    The entry's ``status`` is "ok" or "failed" (with ``error``); the executed copy is kept in both cases.
    ``inputs`` (:func:`~mudenet_core.workbook.resume.notebook_inputs`) are recorded in the entry.
    """
    import papermill

    quiet_papermill()
    src = notebook_path(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    ipynb, html_path = out_dir / f"{name}.ipynb", out_dir / f"{name}.html"
    exclude = ("runs/",) if name in NO_INPUT_NOTEBOOKS else ()
    before = _snapshot(out_dir, exclude)
    entry = {
        "notebook": name,
        "source": str(src.relative_to(REPO_ROOT)),
        **(inputs if inputs is not None else resume.notebook_inputs(name)),
        "parameters": params,
        "executed": str(ipynb),
        "html": str(html_path),
        "start": mf.now(),
    }
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        papermill.execute_notebook(
            read_notebook(src),
            str(ipynb),
            parameters=params,
            kernel_name="python3",
            cwd=str(REPO_ROOT),
            progress_bar=False,
            log_output=False,
            config=kernel_config("python3"),
        )
        entry["status"] = "ok"
    except Exception as e:  # papermill raises PapermillExecutionError; keep going to render the failed copy
        entry["status"] = "failed"
        evalue = getattr(e, "evalue", None) or str(e)
        entry["error"] = f"{getattr(e, 'ename', type(e).__name__)}: {str(evalue).strip()[:2000]}"
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if ipynb.is_file():
        try:
            render.render_html(ipynb, html_path, no_input=name in NO_INPUT_NOTEBOOKS)
        except Exception as e:  # a rendering problem must not hide the execution result
            entry.setdefault("error", f"HTML rendering failed: {type(e).__name__}: {e}")
            if entry["status"] == "ok":
                entry["status"] = "failed"
    entry["end"] = mf.now()
    entry["duration_s"] = round(time.perf_counter() - t0, 2)
    # CPU seconds of the finished kernel (user + system): comparable across machine loads, unlike wall time
    entry["kernel_cpu_s"] = round(_children_cpu_s() - cpu0, 2)
    after = _snapshot(out_dir, exclude)
    entry["files"] = sorted(k for k, v in after.items() if before.get(k) != v)
    return entry


# ------------------------------------------------------------------------------------------------------------
# One (dataset, category, seed) run
# ------------------------------------------------------------------------------------------------------------
def execute_run(plan: Plan, key: RunKey, queue=None) -> dict:
    """Execute the run notebooks of one (dataset, category, seed) in order; stop at the first failure.

    With ``plan.resume`` a notebook whose outputs are complete is skipped (until one re-runs: every later one
    re-runs too, its inputs changed), and a notebook that runs gets ``REUSE`` only when
    :func:`~mudenet_core.workbook.resume.reuse_allowed`. The run manifest is rewritten (atomically) before
    and after every notebook, so an interrupted run resumes where it stopped. An entry of this very
    invocation (``plan.invocation``) is treated the same way without ``--resume``: it was written by an
    earlier attempt of this run whose worker died (a Ray retry).

    Returns:
        ``{"key", "entries", "executed", "failed"}``.
    """
    run_dir = plan.run_dir(key)
    mpath = run_dir / "manifest.json"
    old = mf.read_run_manifest(mpath)
    entries: dict[str, dict] = dict(old)
    executed, failed = 0, None
    emit = queue.put if queue is not None else (lambda ev: None)
    fingerprint = resume.data_fingerprint(plan, key)
    dirty = False
    for name, scope in NOTEBOOKS:
        if scope != "run" or name not in plan.notebooks:
            continue
        try:
            params = notebook_parameters(plan, name, key, notebook_declarations(name))
        except RunAllError as e:
            failed = {"notebook": name, "error": str(e), "executed": "(not executed)"}
            break
        inputs = resume.notebook_inputs(name, fingerprint)
        prev = old.get(name)
        retry = bool(plan.invocation) and (prev or {}).get("invocation") == plan.invocation
        if plan.resume or retry:
            why = "an earlier notebook ran" if dirty else resume.why_incomplete(prev, name, params, run_dir,
                                                                                inputs)
            if why is None:
                executed += retry  # executed in this invocation, by an earlier attempt
                emit(("skip", key.label, name, None))
                continue
            if retry and prev.get("status") == "running":
                why = "the worker of the previous attempt died during it (retried)"
            emit(("rerun", key.label, name, why))
        dirty = True
        if "REUSE" in params:
            params["REUSE"] = (plan.resume or retry) and resume.reuse_allowed(prev, name, params, inputs)
        # recorded before it starts: an interrupted execution still says which inputs its checkpoints have
        here = {"run": key.label, "invocation": plan.invocation, "host": socket.gethostname()}
        entries[name] = {"notebook": name, **here, "status": "running", **inputs, "parameters": params,
                         "start": mf.now()}
        mf.write_run_manifest(mpath, key.label, entries)
        emit(("start", key.label, name, None))
        entry = execute_one(name, params, run_dir, env=kernel_env(plan), inputs=inputs)
        entry.update(here)
        entries[name] = entry
        executed += 1
        mf.write_run_manifest(mpath, key.label, entries)
        emit((entry["status"], key.label, name, entry["duration_s"]))
        if entry["status"] != "ok":
            failed = {"notebook": name, "error": entry.get("error", ""), "executed": entry["executed"]}
            break
    return {"key": key.label, "entries": mf.sorted_entries(entries), "executed": executed, "failed": failed}


def completed_run(plan: Plan, key: RunKey) -> dict | None:
    """With ``--resume``: the result of a run whose every planned notebook is complete, else None.

    The same test as :func:`execute_run` makes, without executing anything, so an executor can leave complete
    runs out before it starts workers (a ``--resume`` with nothing left to do needs no Ray cluster).
    """
    if not plan.resume:
        return None
    run_dir = plan.run_dir(key)
    old = mf.read_run_manifest(run_dir / "manifest.json")
    fingerprint = resume.data_fingerprint(plan, key)
    for name, scope in NOTEBOOKS:
        if scope != "run" or name not in plan.notebooks:
            continue
        try:
            params = notebook_parameters(plan, name, key, notebook_declarations(name))
        except RunAllError:
            return None
        inputs = resume.notebook_inputs(name, fingerprint)
        if resume.why_incomplete(old.get(name), name, params, run_dir, inputs) is not None:
            return None
    return {"key": key.label, "entries": mf.sorted_entries(old), "executed": 0, "failed": None}


def _execute_run_worker(plan: Plan, key: RunKey, queue) -> dict:
    try:
        return execute_run(plan, key, queue)
    except Exception as e:  # report, never hang the pool
        return {
            "key": key.label,
            "entries": [],
            "executed": 0,
            "failed": {
                "notebook": "(runner)",
                "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                "executed": "(not executed)",
            },
        }


class _Direct:
    """A queue that hands events straight to a callback (runs in this process)."""

    def __init__(self, callback):
        self.put = callback


def _execute_runs(plan: Plan, record, on_event) -> None:
    """Every run of the plan: on Ray, in this process, or in a spawned pool of ``plan.jobs`` workers.

    ``record`` (the driver's, the one writer of the profile manifest) gets each run's result in turn.
    """
    if plan.executor == "ray":
        from mudenet_core.workbook import ray_executor

        ray_executor.execute_runs(plan, record, on_event)
        return
    if plan.jobs == 1 or len(plan.runs) == 1:
        for key in plan.runs:
            record(execute_run(plan, key, _Direct(on_event)))
        return
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        with cf.ProcessPoolExecutor(max_workers=plan.jobs, mp_context=ctx) as pool:
            pending = {pool.submit(_execute_run_worker, plan, key, queue) for key in plan.runs}
            try:
                while pending:
                    done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                    while not queue.empty():
                        on_event(queue.get())
                    for fut in done:
                        record(fut.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            while not queue.empty():
                on_event(queue.get())


# ------------------------------------------------------------------------------------------------------------
# The whole profile
# ------------------------------------------------------------------------------------------------------------
def prepare_data(plan: Plan) -> None:
    """Generate the embedded synthetic dataset once, before any job starts (no races between jobs).

    A folder given with ``--data-root`` that already holds a generated dataset is used as it is.
    """
    if not any(k.dataset == "synthetic" for k in plan.runs):
        return
    from mudenet_core.data import DataError, synthetic

    if plan.explicit_root and (plan.data_root / synthetic.PARAMS_FILE).is_file():
        return
    try:
        synthetic.ensure(plan.data_root, **plan.synthetic)
    except (DataError, OSError, TypeError, ValueError) as e:  # e.g. a --data-root of other files
        raise PlanError(f"cannot generate the synthetic dataset in {plan.data_root}: {e}") from e


def _report_outputs(profile_dir: Path, start_iso: str) -> list[str]:
    """Files under ``tables/`` and ``figures/`` (relative to the profile folder) written by the report."""
    start = dt.datetime.fromisoformat(start_iso).timestamp() - 1
    out = []
    for sub in ("tables", "figures"):
        for p in sorted((profile_dir / sub).glob("*")):
            if p.is_file() and p.stat().st_mtime >= start:
                out.append(p.relative_to(profile_dir).as_posix())
    return out


def _run_report(plan: Plan, manifest: mf.ProfileManifest, executed: int, on_event) -> int:
    """The profile notebooks (90_report) after every run; returns how many executed."""
    count = 0
    for name, scope in NOTEBOOKS:
        if scope != "profile" or name not in plan.notebooks:
            continue
        params = notebook_parameters(plan, name, None, notebook_declarations(name))
        runs = sorted(k.label for k in plan.runs)
        out_dir = plan.profile_dir / "report"
        inputs = resume.notebook_inputs(name)
        prev = manifest.report or {}
        if plan.resume:
            why = ("a run executed" if executed else "other runs" if prev.get("_runs") != runs
                   else resume.why_incomplete(prev, name, params, out_dir.parent, inputs))
            if why is None:
                on_event(("skip", "profile", name, None))
                continue
            on_event(("rerun", "profile", name, why))
        on_event(("start", "profile", name, None))
        entry = execute_one(name, params, out_dir, env=kernel_env(plan), inputs=inputs)
        # files are relative to the profile folder for the report notebook
        entry["files"] = [f"report/{f}" for f in entry["files"]] + _report_outputs(plan.profile_dir,
                                                                                    entry["start"])
        entry["_runs"] = runs
        manifest.record_report(entry)
        count += 1
        on_event((entry["status"], "profile", name, entry["duration_s"]))
        if entry["status"] != "ok":
            raise RunAllError(f"notebook {name} failed: {entry.get('error', '')}\n"
                              f"  executed copy: {entry['executed']}")
    return count


def run_profile(plan: Plan, *, show_progress: bool = True, argv: list[str] | None = None) -> dict:
    """Execute the plan; write the manifest and the index. Returns a summary with ``executed`` (count).

    Raises:
        PlanError: the dataset could not be prepared (before any notebook ran).
        RunAllError: naming the failed notebook, its run and its executed copy.
    """
    import sys

    from mudenet_core.io import clean_stale_temps, git_sha
    from mudenet_core.workbook import gitstate

    argv = sys.argv[1:] if argv is None else argv
    plan.invocation = uuid.uuid4().hex[:12]  # recorded in every entry: a retry recognises its own
    sha = git_sha()  # once, before this run writes anything
    plan.profile_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(plan.profile_dir)  # what writes killed in an earlier run left behind
    prepare_data(plan)
    n_run = sum(1 for n, s in NOTEBOOKS if s == "run" and n in plan.notebooks)
    n_prof = sum(1 for n, s in NOTEBOOKS if s == "profile" and n in plan.notebooks)
    console = Console(n_run * len(plan.runs) + n_prof, profile=plan.profile, enabled=show_progress)
    executed = 0
    # Ray workers on other nodes must read the kernels' git index: keep it on the (shared) results filesystem
    tmp_parent = plan.profile_dir if plan.executor == "ray" and plan.reference else None
    with tempfile.TemporaryDirectory(prefix=".run_all-", dir=tmp_parent) as tmp:
        if plan.reference:  # the run's own writes into tracked reference files must not make the SHA dirty
            plan.extra_env = gitstate.index_ignoring(plan.profile_dir, Path(tmp))
        threads = mf.thread_settings(kernel_env(plan), plan.jobs, executor=plan.executor)
        manifest = mf.ProfileManifest(plan, git_sha=sha, threads=threads, argv=argv)

        def record(res: dict) -> None:
            nonlocal executed
            executed += res["executed"]
            manifest.record_run(res["key"], res["entries"], save=bool(res["executed"] or res["failed"]))
            if res["failed"]:
                f = res["failed"]
                raise RunAllError(
                    f"notebook {f['notebook']} failed for run {res['key']}: {f['error']}\n"
                    f"  executed copy: {f['executed']}\n"
                    f"  (fix it, then re-run with --resume to continue from there)"
                )

        try:
            _execute_runs(plan, record, console)
            executed += _run_report(plan, manifest, executed, console)
        finally:
            console.close()
            plan.extra_env = {}
    manifest.finish(executed)
    index = plan.profile_dir / "index.html"
    has_tables = (plan.profile_dir / "tables").is_dir()
    if executed or (has_tables and not index.is_file()):  # a --resume with nothing to do writes nothing
        manifest.save()
        render.write_index(plan, manifest.data)
    return {"executed": executed, "manifest": str(manifest.path), "index": str(index)}
