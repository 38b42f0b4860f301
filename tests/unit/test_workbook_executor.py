"""``run_all.py --executor local|ray`` without a cluster: selection, resources, one manifest writer, retries.

Ray is replaced by :class:`FakeRay`, a stand-in module that runs each task in this process when it is
submitted and reruns a task whose "worker died" (a :class:`WorkerDied` raised inside it) up to its
``max_retries``, as Ray does; notebooks are replaced by a fake ``execute_one``. So the executor's bookkeeping
is tested in seconds; ``tests/integration/test_run_all_ray.py`` runs real notebooks on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from mudenet_core import io
from mudenet_core.data import synthetic
from mudenet_core.workbook import cli as wcli
from mudenet_core.workbook import execute, ray_executor
from mudenet_core.workbook import plan as wplan
from mudenet_core.workbook.cli import build_parser, main
from mudenet_core.workbook.errors import PlanError, RunAllError
from mudenet_core.workbook.plan import make_plan

REPO = Path(__file__).resolve().parents[2]
ONE_ERROR_LINE = re.compile(r"\[run_all\] ERROR: [^\n]+\n")


def plan_for(*argv):
    return make_plan(build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------------------ fakes
class WorkerDied(BaseException):
    """Raised inside a fake task: its worker process is gone (Ray would see SIGKILL)."""


class FakeRayError(Exception):
    """Stands in for ray.exceptions.RayError."""


class FakeRef:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeQueue:
    def __init__(self, actor_options=None):
        self.items, self.actor_options = [], actor_options

    def put(self, item, block=True):
        self.items.append(item)

    def get(self, block=True):
        if not self.items:
            raise LookupError("empty")
        return self.items.pop(0)


class FakeRemote:
    def __init__(self, ray, fn, options=None):
        self.ray, self.fn, self.opts = ray, fn, options or {}

    def options(self, **kw):
        self.ray.options.append(kw)
        return FakeRemote(self.ray, self.fn, kw)

    def remote(self, *args):
        args = [a.value if isinstance(a, FakeRef) else a for a in args]
        for _ in range(self.opts.get("max_retries", 0) + 1):
            self.ray.attempts.append(self.opts.get("name"))
            self.ray.in_task = True
            try:
                return FakeRef(self.fn(*args))
            except WorkerDied:
                continue
            finally:
                self.ray.in_task = False
        return FakeRef(error=FakeRayError("the worker died unexpectedly"))


class FakeRay(types.ModuleType):
    """The part of the ray API the executor uses; tasks run when submitted, in this process."""

    def __init__(self, cpus: float = 2.0, gpus: float = 0.0):
        super().__init__("ray")
        self.exceptions = types.SimpleNamespace(RayError=FakeRayError)
        self.init_kwargs, self.options, self.attempts, self.cancelled = [], [], [], []
        self.resources = {"CPU": cpus, "GPU": gpus}
        self.in_task, self.shut_down = False, 0

    def init(self, **kw):
        self.init_kwargs.append(kw)

    def shutdown(self):
        self.shut_down += 1

    def nodes(self):
        return [{"Alive": True, "Resources": dict(self.resources)}, {"Alive": False, "Resources": {"GPU": 8}}]

    def put(self, obj):
        return FakeRef(obj)

    def remote(self, fn):
        return FakeRemote(self, fn)

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)


@pytest.fixture
def fake_ray(monkeypatch) -> FakeRay:
    ray = FakeRay()
    util = types.ModuleType("ray.util")
    queue = types.ModuleType("ray.util.queue")
    queue.Queue = FakeQueue
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.util", util)
    monkeypatch.setitem(sys.modules, "ray.util.queue", queue)
    return ray


class FakeNotebooks:
    """Stands in for execute.execute_one: writes ``<name>.ipynb``; ``die`` = {(run, notebook): times}."""

    def __init__(self, die=None):
        self.calls, self.die = [], dict(die or {})

    def __call__(self, name, params, out_dir, *, env=None, inputs=None):
        run = "/".join(Path(params["OUT_DIR"]).parts[-3:])
        self.calls.append((run, name, params.get("REUSE")))
        if self.die.get((run, name), 0) > 0:
            self.die[(run, name)] -= 1
            raise WorkerDied
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.ipynb").write_text("{}")
        return {"notebook": name, **inputs, "parameters": params, "executed": str(out_dir / f"{name}.ipynb"),
                "status": "ok", "start": "2026-01-01T00:00:00+00:00", "duration_s": 0.0,
                "files": [f"{name}.ipynb"]}


@pytest.fixture
def data(tmp_path) -> Path:
    """An (empty) generated-dataset folder that planning accepts; the fake notebooks never read it."""
    root = tmp_path / "data"
    for c in ("plate", "weave"):
        (root / c / "train" / "good").mkdir(parents=True)
    (root / synthetic.PARAMS_FILE).write_text("{}")  # marks it as generated: prepare_data leaves it alone
    return root


def smoke(data: Path, tmp_path: Path, *extra: str):
    return plan_for("--profile", "smoke", "--data-root", str(data), "--categories", "plate", "weave",
                    "--methods", "padim", "--only", "00", "40", "--results-root", str(tmp_path / "res"),
                    *extra)


# ------------------------------------------------------------------------------------- selection, options
def test_executor_selection_and_cluster_options(data, tmp_path, fake_ray, monkeypatch):
    local = smoke(data, tmp_path)
    assert (local.executor, local.address, local.cluster_cpus) == ("local", None, None)
    ray_plan = smoke(data, tmp_path, "--executor", "ray")
    assert ray_plan.executor == "ray" and ray_plan.address is None
    assert ray_plan.cluster_cpus == os.cpu_count()  # a local cluster of every core by default
    assert smoke(data, tmp_path, "--executor", "ray", "--jobs", "3").cluster_cpus == 3  # 3 runs x 1 CPU
    assert ray_executor.init_options(smoke(data, tmp_path, "--executor", "ray", "--jobs", "3")) == {
        "address": "local", "num_cpus": 3, "include_dashboard": False, "log_to_driver": False,
        "logging_level": 40}
    joined = smoke(data, tmp_path, "--executor", "ray", "--address", "ray://head:10001")
    assert joined.address == "ray://head:10001" and joined.cluster_cpus is None
    assert ray_executor.init_options(joined) == {"address": "ray://head:10001", "log_to_driver": False,
                                                 "logging_level": 40}
    with pytest.raises(PlanError, match="--address only applies to --executor ray"):
        smoke(data, tmp_path, "--address", "auto")
    with pytest.raises(PlanError, match="--jobs does not apply with --address"):
        smoke(data, tmp_path, "--executor", "ray", "--address", "auto", "--jobs", "2")
    # the executor decides the path: the Ray one is taken only for --executor ray
    taken = []
    monkeypatch.setattr(ray_executor, "execute_runs", lambda plan, record, ev: taken.append(plan.executor))
    monkeypatch.setattr(execute, "execute_run", lambda plan, key, q=None: taken.append("in-process") or {
        "key": key.label, "entries": [], "executed": 0, "failed": None})
    execute._execute_runs(ray_plan, lambda res: None, lambda ev: None)
    execute._execute_runs(local, lambda res: None, lambda ev: None)
    assert taken == ["ray", "in-process", "in-process"]


def test_resources_come_from_the_profile(tmp_path, fake_ray, monkeypatch):
    mvtec = tmp_path / "mvtec"
    (mvtec / "bottle" / "train" / "good").mkdir(parents=True)
    out = ["--results-root", str(tmp_path / "res"), "--executor", "ray"]
    paper = plan_for("--profile", "paper", "--data-root", str(mvtec), "--methods", "padim", *out)
    opts = ray_executor.task_options(paper, paper.runs[0])
    assert opts["num_gpus"] == 1  # the paper profile: one GPU per training run
    assert opts["name"] == "run_all mvtec_ad/bottle/seed0" and opts["retry_exceptions"] is False
    for profile in ("smoke", "cpu", "paper"):  # every field as written in params/<profile>.yaml
        section = yaml.safe_load((REPO / "params" / f"{profile}.yaml").read_text())["executor"]
        plan = plan_for("--profile", profile, "--data-root", str(mvtec), "--dataset", "mvtec_ad",
                        "--methods", "padim", *out)
        got = ray_executor.task_options(plan, plan.runs[0])
        assert {k: got[k] for k in section} == section, profile
        # the kernels of a run use the CPUs it holds (unless the caller fixed OMP_NUM_THREADS)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert execute.kernel_env(plan)["OMP_NUM_THREADS"] == str(section["num_cpus"])
        # a run without GPUs sees none; one with GPUs sees those Ray sets for it
        shipped = ray_executor.kernel_env(plan)
        assert (shipped.get("CUDA_VISIBLE_DEVICES") == "") == (section["num_gpus"] == 0), profile
    assert yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())["executor"]["num_gpus"] == 0
    # a bad section names the file and the key
    params = tmp_path / "params"
    params.mkdir()
    text = (REPO / "params" / "smoke.yaml").read_text().replace("num_gpus: 0", "num_gpu: 0")
    (params / "smoke.yaml").write_text(text)
    monkeypatch.setattr(wplan, "PARAMS_DIR", params)
    with pytest.raises(PlanError, match=r"smoke.yaml: executor: ExecutorConfig: unknown key\(s\) \['num_gpu"):
        wplan.load_profile("smoke")
    (params / "smoke.yaml").write_text(text.replace("num_gpu: 0", "num_gpus: -1"))
    with pytest.raises(PlanError, match="num_gpus must be >= 0, got -1"):
        wplan.load_profile("smoke")


def test_missing_ray_is_one_line_and_exit_2(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now raises ImportError
    monkeypatch.setattr(wcli, "run_profile", lambda *a, **k: pytest.fail("executed without Ray"))
    out = tmp_path / "res"
    code = main(["--profile", "smoke", "--data-root", str(data), "--categories", "plate", "--methods",
                 "padim", "--results-root", str(out), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and ONE_ERROR_LINE.fullmatch(err), err
    assert "--executor ray needs Ray" in err and "pip install" in err
    assert not out.exists()
    # the local executor never imports it
    plan = smoke(data, tmp_path)
    assert plan.executor == "local"


def test_a_local_cluster_too_small_for_one_run_is_a_clear_error(data, tmp_path, fake_ray):
    plan = smoke(data, tmp_path, "--executor", "ray")
    plan.resources = plan.resources.replace(num_gpus=1)
    with pytest.raises(PlanError, match=r"no node of the Ray cluster has the 1 CPU\(s\) and 1 GPU\(s\)"):
        ray_executor.check_feasible(fake_ray, plan)  # (the dead node's 8 GPUs do not count)
    plan.address = "auto"  # an existing cluster may grow (autoscaler): a note, not an error
    assert "the runs wait until such a node joins" in ray_executor.check_feasible(fake_ray, plan)
    fake_ray.resources["GPU"] = 1.0
    assert "1 node(s), 2 CPU(s), 1 GPU(s)" in ray_executor.check_feasible(fake_ray, plan)


def test_a_node_without_the_shared_folders_or_code_refuses_the_run(data, tmp_path, fake_ray):
    plan = smoke(data, tmp_path, "--executor", "ray")
    identity = ray_executor.code_identity(plan)
    assert "does not see the results folder" in ray_executor.node_problem(plan, identity)  # not created yet
    plan.profile_dir.mkdir(parents=True)
    assert ray_executor.node_problem(plan, identity) is None
    assert "other package code" in ray_executor.node_problem(plan, {**identity, "code_hash": "0" * 16})
    other = {**identity, "sources": {**identity["sources"], "40_baselines": "x"}}
    assert "other notebook sources than the driver (40_baselines)" in ray_executor.node_problem(plan, other)
    res = ray_executor.run_task(plan, plan.runs[0], FakeQueue(), {**identity, "code_hash": "0" * 16})
    assert res["failed"]["notebook"] == "(runner)" and res["executed"] == 0


# ------------------------------------------------------------------------------ the one manifest writer
def test_only_the_driver_writes_the_profile_manifest(data, tmp_path, fake_ray, monkeypatch):
    fake = FakeNotebooks()
    monkeypatch.setattr(execute, "execute_one", fake)
    writes = []
    real = io.save_json
    monkeypatch.setattr(io, "save_json", lambda path, obj, **k: writes.append((Path(path), fake_ray.in_task))
                        or real(path, obj, **k))
    plan = smoke(data, tmp_path, "--executor", "ray")
    summary = execute.run_profile(plan, show_progress=False, argv=["x"])
    assert summary["executed"] == 4
    profile_manifest = plan.profile_dir / "manifest.json"
    run_manifests = {plan.run_dir(k) / "manifest.json" for k in plan.runs}
    assert {p for p, _ in writes} == {profile_manifest} | run_manifests
    assert all(not in_task for p, in_task in writes if p == profile_manifest)  # the driver alone
    assert all(in_task for p, in_task in writes if p in run_manifests)  # each run's own task
    manifest = json.loads(profile_manifest.read_text())
    invocation = manifest["invocations"][-1]["invocation"]
    assert manifest["executor"]["name"] == "ray" and manifest["executor"]["num_cpus"] == 1
    assert sorted(manifest["runs"]) == ["synthetic/plate/seed0", "synthetic/weave/seed0"]
    for entries in manifest["runs"].values():
        assert [(e["notebook"], e["status"], e["invocation"]) for e in entries] == [
            ("00_data_exploration", "ok", invocation), ("40_baselines", "ok", invocation)]
    assert fake_ray.init_kwargs[0]["address"] == "local" and fake_ray.shut_down == 1
    assert [o["num_cpus"] for o in fake_ray.options] == [1, 1]


def test_resume_across_executors_and_nothing_to_do_needs_no_cluster(data, tmp_path, fake_ray, monkeypatch):
    fake = FakeNotebooks()
    monkeypatch.setattr(execute, "execute_one", fake)
    local = smoke(data, tmp_path, "--resume")
    assert execute.run_profile(local, show_progress=False, argv=["x"])["executed"] == 4
    fake.calls.clear()
    on_ray = smoke(data, tmp_path, "--resume", "--executor", "ray")
    assert execute.run_profile(on_ray, show_progress=False, argv=["x"])["executed"] == 0
    assert fake.calls == [] and fake_ray.init_kwargs == []  # complete runs: no cluster was even started
    # one output gone: only that run goes to Ray, and only its missing notebook runs there
    (local.run_dir(local.runs[1]) / "40_baselines.ipynb").unlink()
    assert execute.run_profile(on_ray, show_progress=False, argv=["x"])["executed"] == 1
    assert fake.calls == [("synthetic/weave/seed0", "40_baselines", True)]
    assert [o["name"] for o in fake_ray.options] == ["run_all synthetic/weave/seed0"]
    # and back: the local executor finds the Ray run complete
    fake.calls.clear()
    assert execute.run_profile(local, show_progress=False, argv=["x"])["executed"] == 0 and fake.calls == []


# ------------------------------------------------------------------------------------------- retries
def test_a_dead_worker_is_retried_and_the_retry_continues_where_it_died(data, tmp_path, fake_ray,
                                                                        monkeypatch):
    fake = FakeNotebooks(die={("synthetic/plate/seed0", "40_baselines"): 1})
    monkeypatch.setattr(execute, "execute_one", fake)
    plan = smoke(data, tmp_path, "--executor", "ray")  # no --resume: the retry alone skips 00
    summary = execute.run_profile(plan, show_progress=False, argv=["x"])
    assert summary["executed"] == 4
    assert fake.calls[:3] == [("synthetic/plate/seed0", "00_data_exploration", False),
                              ("synthetic/plate/seed0", "40_baselines", False),  # the worker dies
                              ("synthetic/plate/seed0", "40_baselines", True)]  # retried, may reuse
    assert fake_ray.attempts.count("run_all synthetic/plate/seed0") == 2
    manifest = json.loads((plan.profile_dir / "manifest.json").read_text())
    assert [e["status"] for e in manifest["runs"]["synthetic/plate/seed0"]] == ["ok", "ok"]


def test_a_worker_lost_more_often_than_retried_fails_keeping_what_finished(data, tmp_path, fake_ray,
                                                                           monkeypatch):
    fake = FakeNotebooks(die={("synthetic/plate/seed0", "40_baselines"): 5})
    monkeypatch.setattr(execute, "execute_one", fake)
    plan = smoke(data, tmp_path, "--executor", "ray")
    with pytest.raises(RunAllError, match=r"notebook 40_baselines failed for run synthetic/plate/seed0: the "
                                          r"Ray task of this run did not finish after 3 attempt\(s\)"):
        execute.run_profile(plan, show_progress=False, argv=["x"])
    assert fake_ray.attempts.count("run_all synthetic/plate/seed0") == 3  # max_retries: 2 (params/smoke.yaml)
    assert fake_ray.cancelled  # the other run was cancelled
    entries = json.loads((plan.profile_dir / "manifest.json").read_text())["runs"]["synthetic/plate/seed0"]
    assert [(e["notebook"], e["status"]) for e in entries] == [("00_data_exploration", "ok"),
                                                               ("40_baselines", "running")]
    # a later --resume keeps the finished notebook and reruns only the interrupted one
    fake.die.clear()
    fake.calls.clear()
    resumed = smoke(data, tmp_path, "--executor", "ray", "--resume")
    assert execute.run_profile(resumed, show_progress=False, argv=["x"])["executed"] == 1
    assert fake.calls == [("synthetic/plate/seed0", "40_baselines", True)]
    # the other run finished in its worker after the driver stopped: recorded now, nothing lost
    runs = json.loads((plan.profile_dir / "manifest.json").read_text())["runs"]
    assert {k: [e["status"] for e in v] for k, v in runs.items()} == {
        "synthetic/plate/seed0": ["ok", "ok"], "synthetic/weave/seed0": ["ok", "ok"]}


def test_progress_counts_each_notebook_once_across_retries():
    seen = []
    progress = ray_executor._Progress(seen.append)
    for ev in [("start", "r", "00", None), ("ok", "r", "00", 1.0), ("start", "r", "40", None),
               ("skip", "r", "00", None), ("rerun", "r", "40", "retried"), ("ok", "r", "40", 2.0)]:
        progress(ev)
    assert [e[0] for e in seen] == ["start", "ok", "start", "rerun", "ok"]
