"""``run_all.py`` options that cannot be silently ignored: each user error exits 2, one line, before work.

Nothing here executes a notebook: ``run_profile`` is replaced by a function that fails the test, so a check
that is missing shows up as a failure in seconds instead of a training run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mudenet_core.data import DataConfig
from mudenet_core.workbook import cli as wcli
from mudenet_core.workbook import plan as wplan
from mudenet_core.workbook.cli import build_parser, main
from mudenet_core.workbook.plan import PlanError, make_plan

REPO = Path(__file__).resolve().parents[2]
ONE_ERROR_LINE = re.compile(r"\[run_all\] ERROR: [^\n]+\n")


def plan_for(*argv):
    return make_plan(build_parser().parse_args(list(argv)))


@pytest.fixture
def no_execution(monkeypatch):
    """``main`` must stop before executing anything."""
    def refuse(*a, **k):
        pytest.fail("run_all executed notebooks for arguments it should have refused")

    monkeypatch.setattr(wcli, "run_profile", refuse)


def run_main(capsys, *argv) -> tuple[int, str]:
    """``main(argv)``, and its stderr, which must be exactly one ``[run_all] ERROR:`` line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert ONE_ERROR_LINE.fullmatch(err), f"expected one error line, got:\n{err}"
    return code, err


def _images(folder: Path, n: int, suffix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB" if not suffix else "L", (32, 32), 40 * i).save(folder / f"{i:03d}{suffix}.png")


@pytest.fixture
def base(tmp_path) -> list[str]:
    """A synthetic-dataset plan (nothing is generated while planning)."""
    return ["--data-root", str(tmp_path / "gen"), "--categories", "plate",
            "--results-root", str(tmp_path / "r")]


# ------------------------------------------------------------------------------------------ --set keys
def test_unknown_method_or_key_exits_2_with_one_line_listing_the_valid_names(capsys, base, no_execution):
    code, err = run_main(capsys, *base, "--set", "mudnet.distill.steps=2")
    assert code == 2 and "unknown method 'mudnet'" in err and "mudenet, padim, patchcore, ae, us" in err
    code, err = run_main(capsys, *base, "--set", "mudenet.distill.stepz=2")
    assert code == 2 and "'stepz'" in err and "valid keys of mudenet:" in err and "distill.steps" in err
    code, err = run_main(capsys, *base, "--set", "data.folder_anomaly=x")
    assert code == 2 and "'folder_anomaly'" in err and "folder_anomaly_dir" in err and "val_fraction" in err
    code, err = run_main(capsys, *base, "--set", "mudenet.width=-4")
    assert code == 2 and "MuDeNetConfig.width must be > 0, got -4" in err
    code, err = run_main(capsys, *base, "--set", "mudenet.train.steps=-1")
    assert code == 2 and "TrainConfig.steps must be >= 0, got -1" in err


def test_a_data_key_the_dataset_ignores_is_an_error(tmp_path, base):
    with pytest.raises(PlanError, match=r"folder_anomaly_dir=x would be ignored.*--dataset folder only"):
        plan_for(*base, "--set", "data.folder_anomaly_dir=x")  # the generated dataset has no folder options
    loco = tmp_path / "loco"
    (loco / "pushpins" / "train" / "good").mkdir(parents=True)
    with pytest.raises(PlanError, match="val_fraction=0.2 would be ignored: mvtec_loco validates on its own"):
        plan_for("--dataset", "mvtec_loco", "--data-root", str(loco), "--set", "data.val_fraction=0.2")


def test_data_overrides_reach_every_notebook_that_loads_data(base):
    plan = plan_for(*base, "--set", "data.val_fraction=0.3", "data.augment.hflip=true")
    want = {"val_fraction": 0.3, "augment.hflip": True}
    assert plan.common["DATA_OVERRIDES"] == want
    run_notebooks = [n for n, scope in wplan.NOTEBOOKS if scope == "run"]
    assert set(run_notebooks) <= set(plan.notebooks)
    for name in run_notebooks:
        source = wplan.notebook_path(name).read_text()
        assert re.search(r"build_splits\([^)]*DATA_OVERRIDES", source), f"{name} ignores DATA_OVERRIDES"
        params = wplan.notebook_parameters(plan, name, plan.runs[0], wplan.notebook_declarations(name))
        assert params["DATA_OVERRIDES"] == want, name
        # applied as the notebook applies it (experiment.build_splits): nested keys reach nested configs
        cfg = DataConfig(category="plate").with_overrides(params["DATA_OVERRIDES"])
        assert cfg.val_fraction == 0.3 and cfg.augment is not None and cfg.augment.hflip is True


# --------------------------------------------------------------------------------- default categories
def test_categories_default_to_the_datasets_categories_on_disk(tmp_path, capsys):
    root = tmp_path / "mpdd"
    (root / "connector" / "train" / "good").mkdir(parents=True)
    (root / "tubes" / "test" / "good").mkdir(parents=True)
    (root / "notes" / "train").mkdir(parents=True)  # looks like a category, but MPDD has none of that name
    (root / "empty").mkdir()
    r = ["--results-root", str(tmp_path / "r")]
    plan = plan_for("--dataset", "mpdd", "--data-root", str(root), *r)
    assert [k.category for k in plan.runs] == ["connector", "tubes"]  # not the profile's plate/weave
    assert "left out folder(s) ['notes']" in capsys.readouterr().out
    assert [k.category for k in plan_for("--dataset", "mpdd", "--data-root", str(root), "--categories",
                                         "notes", *r).runs] == ["notes"]  # named explicitly: runs
    other = tmp_path / "other"
    (other / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(PlanError, match=r"no mpdd categories found under .*not mpdd categories: widget"):
        plan_for("--dataset", "mpdd", "--data-root", str(other), *r)
    with pytest.raises(PlanError, match=r"a category folder itself.*--data-root .*mpdd --categories tubes"):
        plan_for("--dataset", "mpdd", "--data-root", str(root / "tubes"), *r)
    with pytest.raises(PlanError, match="no mpdd categories found"):
        plan_for("--dataset", "mpdd", "--data-root", str(root / "empty"), *r)


# -------------------------------------------------------------------------------------- folder dataset
def test_folder_dataset_needs_its_anomaly_folder_before_any_training(tmp_path, capsys, no_execution):
    root = tmp_path / "parts"
    _images(root / "good", 6)
    r = ["--results-root", str(tmp_path / "r"), "--dataset", "folder", "--data-root", str(root)]
    code, err = run_main(capsys, *r)
    assert code == 2 and "--set data.folder_anomaly_dir=PATH" in err and "all labels are normal" in err
    with pytest.raises(PlanError, match="missing anomaly folder"):
        plan_for(*r, "--set", "data.folder_anomaly_dir=scratched")
    (root / "scratched").mkdir()
    with pytest.raises(PlanError, match="no images in anomaly folder"):
        plan_for(*r, "--set", "data.folder_anomaly_dir=scratched")
    _images(root / "scratched", 2)
    masks = ["data.folder_anomaly_dir=scratched", f"data.folder_mask_dir={tmp_path / 'masks'}",
             "data.folder_mask_suffix=_mask"]  # an absolute mask folder
    with pytest.raises(PlanError, match="missing mask folder"):
        plan_for(*r, "--set", *masks)
    (tmp_path / "masks").mkdir()
    with pytest.raises(PlanError, match=r"scratched/000.png has no mask"):
        plan_for(*r, "--set", *masks)
    _images(tmp_path / "masks", 2, suffix="_mask")
    plan = plan_for(*r, "--set", *masks)
    assert [k.category for k in plan.runs] == ["parts"]
    params = wplan.notebook_parameters(plan, "00_data_exploration", plan.runs[0],
                                       wplan.notebook_declarations("00_data_exploration"))
    assert params["DATA_OVERRIDES"]["folder_anomaly_dir"] == "scratched"
    assert params["DATA_OVERRIDES"]["folder_mask_dir"] == str(tmp_path / "masks")


# ------------------------------------------------------------------------------- other user errors
@pytest.mark.parametrize("bad", [["--seeds", "x"], ["--bogus"], ["--jobs", "0"], ["--seeds", "-1"],
                                 ["--profile", "nope"], ["--only", "77"], ["--allow-dirty"]])
def test_bad_arguments_exit_2_with_one_line(capsys, base, no_execution, bad):
    code, _ = run_main(capsys, *base, *bad)
    assert code == 2


def test_an_unwritable_results_root_exits_2(tmp_path, capsys, no_execution):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_main(capsys, "--data-root", str(tmp_path / "gen"), "--categories", "plate",
                         "--results-root", str(blocker / "results"))
    assert code == 2 and "is not a folder" in err


def test_a_synthetic_data_root_of_other_files_exits_2_before_any_notebook(tmp_path, capsys, monkeypatch):
    from mudenet_core.workbook import execute

    monkeypatch.setattr(execute, "execute_one", lambda *a, **k: pytest.fail("a notebook was executed"))
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.txt").write_text("not a generated dataset")
    code, err = run_main(capsys, "--data-root", str(other), "--categories", "plate", "--only", "00",
                         "--results-root", str(tmp_path / "r"), "--quiet")
    assert code == 2 and "cannot generate the synthetic dataset" in err and "is not empty" in err
    assert (other / "holiday.txt").is_file()


def test_usage_errors_from_the_command_line_are_one_line_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "run_all.py"), "--seeds", "x"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert ONE_ERROR_LINE.fullmatch(res.stderr) and "--seeds" in res.stderr, res.stderr
