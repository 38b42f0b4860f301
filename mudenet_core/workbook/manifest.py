"""The one writer of the manifests: ``<profile>/manifest.json`` and ``<run>/manifest.json`` (atomic writes).

The profile manifest records the profile, the command lines that wrote into the folder (``invocations``), the
git SHA, package versions, the CPU thread settings of the kernels, the executor (local, or Ray with its
address and the resources of one run), start/end times, and per run the entry of every notebook (parameters,
inputs, status, times, files produced, the invocation and the host that executed it). The run manifest holds
the same entries for one (dataset, category, seed), rewritten after every notebook, so an interrupted run
resumes where it stopped.

Each file has one writing process: the profile manifest only the driver (:class:`ProfileManifest`, fed the
results the runs return, whatever the executor), a run manifest only the process executing that run.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import sys
from pathlib import Path

from mudenet_core.workbook.plan import NOTEBOOKS, Plan

PACKAGES = (
    "mudenet_core",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "papermill",
    "nbconvert",
    "nbformat",
    "jupytext",
    "ipykernel",
)
ORDER = [n for n, _ in NOTEBOOKS]


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter for the results."""
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def thread_settings(kernel_env: dict[str, str], jobs: int, *, executor: str = "local") -> dict:
    """The CPU threads of each kernel: what run_all set, and why (results depend on it, see the README)."""
    n = int(kernel_env["OMP_NUM_THREADS"])
    default = "the profile's executor.num_cpus" if executor == "ray" else "cpu_count // jobs"
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": int(kernel_env.get("MKL_NUM_THREADS", n)),
        "torch_num_threads": n,  # torch's intra-op pool follows OMP_NUM_THREADS in each kernel
        "jobs": jobs,
        "cpu_count": os.cpu_count(),  # of the driver's machine
        "chosen_by": "the caller's OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else default,
    }


def executor_settings(plan: Plan) -> dict:
    """The executor of an invocation: ``local``, or ``ray`` with its address and one run's resources."""
    if plan.executor != "ray":
        return {"name": "local", "jobs": plan.jobs}
    return {"name": "ray", "address": plan.address or "local cluster", "cluster_cpus": plan.cluster_cpus,
            **plan.resources.to_dict()}


def _save(path: Path, obj: dict) -> None:
    from mudenet_core.io import save_json

    save_json(path, obj)


def sorted_entries(entries: dict[str, dict]) -> list[dict]:
    """Entries in notebook order."""
    return sorted(entries.values(), key=lambda e: ORDER.index(e["notebook"]))


def read_run_manifest(path: Path) -> dict[str, dict]:
    """Entries of a run manifest by notebook name (``{}`` when missing or unreadable)."""
    from mudenet_core.io import load_json

    if not path.is_file():
        return {}
    try:
        return {e["notebook"]: e for e in load_json(path).get("notebooks", [])}
    except (ValueError, KeyError, AttributeError, TypeError):
        return {}


def write_run_manifest(path: Path, label: str, entries: dict[str, dict]) -> None:
    """Rewrite ``<run>/manifest.json``."""
    _save(path, {"run": label, "notebooks": sorted_entries(entries)})


class ProfileManifest:
    """``<profile_dir>/manifest.json``: runs of earlier invocations are kept, this plan's own are replaced.

    Args:
        plan: the plan being executed.
        git_sha: the commit (taken once, before anything is written).
        threads: :func:`thread_settings`.
        argv: the command line.
    """

    def __init__(self, plan: Plan, *, git_sha: str, threads: dict, argv: list[str]):
        from mudenet_core.io import load_json

        self.path = plan.profile_dir / "manifest.json"
        previous = load_json(self.path) if self.path.is_file() else {}
        started = now()
        this_plan = {key.label for key in plan.runs}
        executor = executor_settings(plan)
        self.data: dict = {
            "profile": plan.profile,
            "reference": plan.reference,
            "argv": argv,
            "git_sha": git_sha,
            "packages": package_versions(),
            "threads": threads,
            "executor": executor,
            "started": started,
            "data_root": str(plan.data_root),
            "methods": plan.methods,
            "notebooks": plan.notebooks,
            # runs of earlier invocations are kept; this plan's own only when resuming (else they rerun)
            "runs": {k: v for k, v in previous.get("runs", {}).items() if plan.resume or k not in this_plan},
            "report": previous.get("report"),
            # every invocation that wrote into this profile folder (runs of other datasets stay in the report)
            "invocations": [*previous.get("invocations", []),
                            {"argv": argv, "git_sha": git_sha, "started": started, "threads": threads,
                             "executor": executor, "invocation": plan.invocation}],
        }

    @property
    def report(self) -> dict | None:
        """The report notebook's entry of the last execution."""
        return self.data.get("report")

    def record_run(self, label: str, entries: list[dict], *, save: bool) -> None:
        """Set the entries of one run; write the file when ``save``."""
        self.data["runs"][label] = entries
        if save:
            self.save()

    def record_report(self, entry: dict) -> None:
        """Set the report notebook's entry and write the file."""
        self.data["report"] = entry
        self.save()

    def finish(self, executed: int) -> None:
        """Stamp the end time and the number of notebooks executed (not written: see :meth:`save`)."""
        self.data["finished"] = now()
        self.data["executed"] = executed

    def save(self) -> None:
        """Write the file (atomically)."""
        _save(self.path, self.data)
