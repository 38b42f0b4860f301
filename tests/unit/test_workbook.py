"""mudenet_core.workbook without executing notebooks: resume keys, REUSE, arguments, results layout.

Notebook execution is replaced by a fake ``execute_one`` that writes its files and returns an entry, so the
bookkeeping of ``run_all.py --resume`` is tested in seconds; ``tests/integration/test_run_all.py`` runs the
real notebooks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mudenet_core import io
from mudenet_core.workbook import execute, gitstate, resume
from mudenet_core.workbook import plan as wplan
from mudenet_core.workbook.cli import build_parser, main
from mudenet_core.workbook.plan import PlanError, make_plan

REPO = Path(__file__).resolve().parents[2]


def plan_for(*argv):
    return make_plan(build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------------- code hash
def _tree(root: Path) -> None:
    (root / "mudenet_core" / "sub" / "__pycache__").mkdir(parents=True)
    (root / "mudenet_core" / "a.py").write_text("A = 1\n")
    (root / "mudenet_core" / "sub" / "b.py").write_text("B = 2\n")
    (root / "mudenet_core" / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"x")
    (root / "configs" / "augment").mkdir(parents=True)
    (root / "configs" / "augment" / "mpdd.yaml").write_text("metal_plate: {hflip: false}\n")
    (root / "notebooks").mkdir()
    (root / "notebooks" / "00_x.py").write_text("# %%\n")


def test_code_hash_covers_package_modules_and_every_config(tmp_path):
    _tree(tmp_path)
    io.code_hash.cache_clear()
    h0 = io.code_hash(tmp_path)
    assert io.code_hash(tmp_path) == h0 and len(h0) == 16
    (tmp_path / "mudenet_core" / "sub" / "b.py").write_text("B = 3\n")  # a package module
    io.code_hash.cache_clear()
    h1 = io.code_hash(tmp_path)
    assert h1 != h0
    (tmp_path / "configs" / "augment" / "mpdd.yaml").write_text("metal_plate: {hflip: true}\n")  # augment
    io.code_hash.cache_clear()
    h2 = io.code_hash(tmp_path)
    assert h2 != h1
    (tmp_path / "mudenet_core" / "c.py").write_text("")  # a new module
    io.code_hash.cache_clear()
    h3 = io.code_hash(tmp_path)
    assert h3 != h2
    # bytecode and notebooks are not package code
    (tmp_path / "mudenet_core" / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"y")
    (tmp_path / "notebooks" / "00_x.py").write_text("# %%\nprint(1)\n")
    io.code_hash.cache_clear()
    assert io.code_hash(tmp_path) == h3
    io.code_hash.cache_clear()
    assert io.code_hash() == io.code_hash(io.REPO_ROOT)  # the repository's own, cached per process


# ------------------------------------------------------------------------------------- data fingerprint
@pytest.fixture
def data_copy(synthetic_root, tmp_path) -> Path:
    """A private copy of the generated dataset (tests delete images in it)."""
    dst = tmp_path / "data"
    shutil.copytree(synthetic_root, dst)
    return dst


def test_data_fingerprint_sees_deleted_and_replaced_training_images(data_copy, tmp_path):
    plan = plan_for("--profile", "smoke", "--data-root", str(data_copy), "--categories", "plate",
                    "--only", "00", "--results-root", str(tmp_path / "res"))
    key = plan.runs[0]
    fp0 = resume.data_fingerprint(plan, key)
    assert resume.data_fingerprint(plan, key) == fp0
    images = sorted((data_copy / "plate" / "train" / "good").iterdir())
    (data_copy / "weave" / "train" / "good" / "extra.png").write_bytes(b"other category")  # not this run's
    assert resume.data_fingerprint(plan, key) == fp0
    data = images[0].read_bytes()
    images[0].write_bytes(data)  # replaced in place: same name, same size, new mtime
    os.utime(images[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    fp1 = resume.data_fingerprint(plan, key)
    assert fp1 != fp0
    images[1].unlink()
    assert resume.data_fingerprint(plan, key) != fp1


# ------------------------------------------------------------------ resume and REUSE with a fake executor
class FakeExecutor:
    """Stands in for execute.execute_one: writes ``<name>.ipynb`` and one table, records the calls."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, name, params, out_dir, *, env=None, inputs=None):
        self.calls.append((name, params.get("REUSE")))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.ipynb").write_text("{}")
        (out_dir / "tables").mkdir(exist_ok=True)
        (out_dir / "tables" / f"{name}.csv").write_text("x\n1\n")
        assert env["OMP_NUM_THREADS"]
        return {"notebook": name, **inputs, "parameters": params, "executed": str(out_dir / f"{name}.ipynb"),
                "status": "ok", "start": "2026-01-01T00:00:00+00:00", "duration_s": 0.0,
                "files": [f"{name}.ipynb", f"tables/{name}.csv"]}

    def take(self):
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def code_copy(tmp_path, monkeypatch) -> Path:
    """io.code_hash over a private copy of the package and configs (so a test may edit them)."""
    root = tmp_path / "code"
    shutil.copytree(REPO / "mudenet_core", root / "mudenet_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", root / "configs")
    real = io.code_hash.__wrapped__
    monkeypatch.setattr(io, "code_hash", lambda: real(root))
    return root


def test_resume_redoes_work_when_code_configs_or_data_change(data_copy, code_copy, tmp_path, monkeypatch):
    fake = FakeExecutor()
    monkeypatch.setattr(execute, "execute_one", fake)
    plan = plan_for("--profile", "smoke", "--data-root", str(data_copy), "--categories", "plate", "--methods",
                    "padim", "--only", "00", "40", "--resume", "--results-root", str(tmp_path / "res"))
    key = plan.runs[0]
    both = ["00_data_exploration", "40_baselines"]

    def run():
        res = execute.execute_run(plan, key)
        assert res["failed"] is None
        return fake.take()

    assert run() == [(n, False) for n in both]  # nothing before: no checkpoint may be reused
    assert run() == []  # complete
    # a package module changes: everything reruns, and no notebook reuses checkpoints of the old code
    (code_copy / "mudenet_core" / "metrics.py").write_text((code_copy / "mudenet_core" / "metrics.py")
                                                          .read_text() + "\n# changed\n")
    assert run() == [(n, False) for n in both]
    assert run() == []
    # an augmentation table changes
    aug = code_copy / "configs" / "augment" / "synthetic.yaml"
    aug.write_text(aug.read_text() + "\n# changed\n")
    assert run() == [(n, False) for n in both]
    assert run() == []
    # a training image is deleted
    next((data_copy / "plate" / "train" / "good").iterdir()).unlink()
    assert run() == [(n, False) for n in both]
    assert run() == []
    # an output file disappears: that notebook and every later one rerun, reusing (same inputs)
    (plan.run_dir(key) / "tables" / "40_baselines.csv").unlink()
    assert run() == [("40_baselines", True)]
    # an interrupted execution (entry written before it started) may be continued with the same inputs ...
    mpath = plan.run_dir(key) / "manifest.json"
    m = json.loads(mpath.read_text())
    m["notebooks"][1]["status"] = "running"
    mpath.write_text(json.dumps(m))
    assert run() == [("40_baselines", True)]
    # ... but not after the code changed
    m["notebooks"][1]["status"] = "running"
    mpath.write_text(json.dumps(m))
    (code_copy / "mudenet_core" / "metrics.py").write_text("")
    assert run() == [(n, False) for n in both]


def test_run_profile_records_threads_and_writes_only_what_it_ran(data_copy, tmp_path, monkeypatch):
    fake = FakeExecutor()
    monkeypatch.setattr(execute, "execute_one", fake)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = plan_for("--profile", "smoke", "--data-root", str(data_copy), "--categories", "plate", "--methods",
                    "padim", "--only", "00", "--resume", "--results-root", str(tmp_path / "res"))
    assert execute.run_profile(plan, show_progress=False, argv=["x"])["executed"] == 1
    manifest = json.loads((plan.profile_dir / "manifest.json").read_text())
    assert manifest["threads"]["OMP_NUM_THREADS"] == 1 and manifest["threads"]["torch_num_threads"] == 1
    assert manifest["invocations"][-1]["threads"]["jobs"] == 1 and manifest["reference"] is False
    entry = manifest["runs"]["synthetic/plate/seed0"][0]
    assert entry["code_hash"] == io.code_hash() and entry["data_fingerprint"]
    before = {p: p.stat().st_mtime_ns for p in plan.profile_dir.rglob("*")}
    assert execute.run_profile(plan, show_progress=False, argv=["x"])["executed"] == 0
    assert {p: p.stat().st_mtime_ns for p in plan.profile_dir.rglob("*")} == before


def test_run_profile_removes_temp_files_a_killed_run_left(data_copy, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(execute, "execute_one", FakeExecutor())
    plan = plan_for("--profile", "smoke", "--data-root", str(data_copy), "--categories", "plate", "--methods",
                    "padim", "--only", "00", "--results-root", str(tmp_path / "res"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = plan.profile_dir / "runs" / "x" / f".metrics.csv.{dead}.a1b2.tmp"  # as io.atomic_path names it
    stale.parent.mkdir(parents=True)
    stale.write_text("half a table")
    execute.run_profile(plan, show_progress=False, argv=["x"])
    assert not stale.exists()


# ----------------------------------------------------------------------------------------- arguments
def test_set_overrides_are_validated_before_any_work(tmp_path):
    base = ["--data-root", str(tmp_path), "--categories", "plate", "--results-root", str(tmp_path / "r")]
    with pytest.raises(PlanError, match=r"unknown method 'mudnet'; valid: mudenet, padim"):
        plan_for(*base, "--set", "mudnet.distill.steps=2")
    with pytest.raises(PlanError, match=r"\['stepz'\].*\n.*valid keys of mudenet:.*distill.steps"):
        plan_for(*base, "--set", "mudenet.distill.stepz=2")
    with pytest.raises(PlanError, match="expected an integer"):
        plan_for(*base, "--set", "mudenet.distill.steps=many")
    with pytest.raises(PlanError, match="'padim' is not among the methods of this run"):
        plan_for(*base, "--methods", "patchcore", "--set", "padim.n_features=50")
    with pytest.raises(PlanError, match="no notebook of this run .*declares the parameter OVERRIDES"):
        plan_for(*base, "--only", "00", "--set", "padim.n_features=50")
    with pytest.raises(PlanError, match=r"DataConfig: unknown key\(s\) \['val_fractio'\]"):
        plan_for(*base, "--set", "data.val_fractio=0.2")
    with pytest.raises(PlanError, match="use --categories"):
        plan_for(*base, "--set", "data.category=weave")
    with pytest.raises(PlanError, match="val_fraction must be in"):
        plan_for(*base, "--set", "data.val_fraction=2")
    assert main([*base, "--set", "mudnet.distill.steps=2"]) == 2


def test_data_overrides_and_texture_dir_reach_only_declaring_notebooks(tmp_path, monkeypatch):
    real = wplan.notebook_declarations
    new = {"DATA_OVERRIDES": {}, "TEXTURE_DIR": ""}
    declaring = {"00_data_exploration"}

    def declared(name):  # only the notebooks in `declaring` declare the two parameters
        d = {k: v for k, v in real(name).items() if k not in new}
        return {**d, **new} if name in declaring else d

    monkeypatch.setattr(wplan, "notebook_declarations", declared)
    tex = tmp_path / "textures"
    tex.mkdir()
    plan = plan_for("--data-root", str(tmp_path), "--categories", "plate",
                    "--results-root", str(tmp_path / "r"), "--texture-dir", str(tex),
                    "--set", "data.val_fraction=0.2", "data.normalize=false")
    assert plan.common["DATA_OVERRIDES"] == {"val_fraction": 0.2, "normalize": False}
    name = "00_data_exploration"
    p00 = wplan.notebook_parameters(plan, name, plan.runs[0], declared(name))
    assert p00["DATA_OVERRIDES"] == {"val_fraction": 0.2, "normalize": False}
    assert p00["TEXTURE_DIR"] == str(tex)
    p40 = wplan.notebook_parameters(plan, "40_baselines", plan.runs[0], declared("40_baselines"))
    assert "DATA_OVERRIDES" not in p40 and "TEXTURE_DIR" not in p40
    with pytest.raises(PlanError, match="is not a folder"):
        plan_for("--data-root", str(tmp_path), "--categories", "plate", "--texture-dir", str(tmp_path / "no"))
    declaring.clear()  # an option that no planned notebook declares is an error, not silently dropped
    with pytest.raises(PlanError, match="--texture-dir would be ignored"):
        plan_for("--data-root", str(tmp_path), "--categories", "plate", "--texture-dir", str(tex))
    with pytest.raises(PlanError, match=r"--set data.\* would be ignored.*DATA_OVERRIDES"):
        plan_for("--data-root", str(tmp_path), "--categories", "plate", "--set", "data.val_fraction=0.2")


def test_other_dataset_defaults_to_its_categories_on_disk(tmp_path):
    root = tmp_path / "mpdd"
    for cat, sub in (("metal_plate", "train"), ("tubes", "test")):
        (root / cat / sub).mkdir(parents=True)
    (root / "notes").mkdir()  # not a category
    plan = plan_for("--dataset", "mpdd", "--data-root", str(root), "--results-root", str(tmp_path / "r"))
    assert [k.category for k in plan.runs] == ["metal_plate", "tubes"]  # not the profile's plate/weave
    with pytest.raises(PlanError, match=r"unknown mpdd category \['bracket'\].*found: metal_plate, tubes"):
        plan_for("--dataset", "mpdd", "--data-root", str(root), "--categories", "bracket")
    assert main(["--dataset", "mpdd"]) == 2  # no --data-root
    assert main(["--dataset", "mpdd", "--data-root", str(tmp_path / "none")]) == 2


# ------------------------------------------------------------------------------------- results layout
def test_user_runs_write_an_ignored_folder_and_reference_runs_need_a_clean_tree(tmp_path, monkeypatch):
    if not gitstate.is_repository():
        pytest.skip("not a git checkout")
    base = ["--data-root", str(tmp_path), "--categories", "plate"]
    plan = plan_for(*base)
    assert plan.profile_dir == REPO / "results" / "cpu"
    for path in ("results/cpu/manifest.json", "results/smoke/runs/x.csv", "results/paper/index.html"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path}: results/<profile>/ must be git-ignored"
    kept = subprocess.run(["git", "check-ignore", "-q", "results/reference/cpu/tables/x.csv"], cwd=REPO)
    assert kept.returncode == 1, "the reference results are committed"
    assert not gitstate.tracked_files(REPO / "results" / "cpu")
    # writing into tracked files needs --reference
    with pytest.raises(PlanError, match="tracked by git.*use --reference"):
        plan_for(*base, "--results-root", str(REPO / "results" / "reference"))
    monkeypatch.setattr(gitstate, "dirty_files", lambda *a, **k: ["mudenet_core/metrics.py"])
    assert main([*base, "--reference"]) == 2
    with pytest.raises(PlanError, match="dirty git tree.*mudenet_core/metrics.py.*--allow-dirty"):
        plan_for(*base, "--reference")
    dirty_ok = plan_for(*base, "--reference", "--allow-dirty")
    assert dirty_ok.profile_dir == REPO / "results" / "reference" / "cpu"
    monkeypatch.setattr(gitstate, "dirty_files", lambda *a, **k: [])
    assert plan_for(*base, "--reference").reference
    assert main([*base, "--allow-dirty"]) == 2  # only with --reference


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_reference_outputs_do_not_make_the_sha_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "results" / "reference" / "cpu").mkdir(parents=True)
    (repo / "src.py").write_text("x = 1\n")
    (repo / "results" / "reference" / "cpu" / "a.csv").write_text("v\n1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    folder = repo / "results" / "reference" / "cpu"
    assert gitstate.tracked_files(folder, repo) == ["results/reference/cpu/a.csv"]
    (folder / "a.csv").write_text("v\n2\n")  # the run rewrites its own output
    assert gitstate.dirty_files(repo) == ["results/reference/cpu/a.csv"]
    (tmp_path / "idx").mkdir()
    env = gitstate.index_ignoring(folder, tmp_path / "idx", repo)
    assert gitstate.dirty_files(repo, env) == []
    (repo / "src.py").write_text("x = 2\n")  # a code change still counts
    assert gitstate.dirty_files(repo, env) == ["src.py"]
    assert sorted(gitstate.dirty_files(repo)) == ["results/reference/cpu/a.csv", "src.py"]  # real index as is
    assert gitstate.index_ignoring(repo / "nothing_tracked", tmp_path / "idx", repo) == {}


def test_kernel_config_avoids_plain_tcp():
    km = execute.kernel_config().KernelManager
    assert km.get("transport_encryption") == "auto" or km.get("transport") == "ipc"
