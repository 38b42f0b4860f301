"""Static checks of the committed notebook sources (fast): one literal parameters cell, no outputs, no defs.

The notebooks themselves are executed end to end by ``test_run_all.py`` (marked slow).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import jupytext
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
EXPECTED = [
    "00_data_exploration",
    "10_distillation",
    "20_training",
    "30_evaluation",
    "40_baselines",
    "50_ablations",
    "90_report",
]
RUN_PARAMETERS = {
    "SMOKE",
    "OUT_DIR",
    "SEED",
    "DATASET",
    "DATA_ROOT",
    "CATEGORY",
    "IMAGE_SIZE",
    "PROFILE",
    "DEVICE",
    "REUSE",
}


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_is_first_and_literal(path):
    nb = jupytext.read(path)
    cells = code_cells(nb)
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one 'parameters' cell, found {len(tagged)}"
    assert cells[0] is tagged[0], f"{path.name}: the parameters cell must be the first code cell"
    src = tagged[0].source
    names = {}
    for node in ast.parse(src).body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name), (
            f"{path.name}: only 'NAME: type = literal' in the parameters cell, got {ast.unparse(node)!r}"
        )
        name = node.target.id
        assert name.isupper(), f"{path.name}: parameter {name} must be UPPER_CASE"
        assert node.value is not None, f"{path.name}: {name} has no default"
        names[name] = ast.literal_eval(node.value)  # raises for anything but a literal
        line = src.splitlines()[node.lineno - 1]
        assert "#" in line.split("=", 1)[1] and line.split("#", 1)[1].strip(), (
            f"{path.name}: {name} needs a help comment"
        )
    assert isinstance(names.get("SMOKE"), bool) and isinstance(names.get("OUT_DIR"), str)
    assert isinstance(names.get("SEED"), int)
    if path.stem != "90_report":
        assert RUN_PARAMETERS <= set(names), f"{path.name}: missing {sorted(RUN_PARAMETERS - set(names))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_shape_header_imports_and_no_definitions(path):
    nb = jupytext.read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: must open with a markdown header"
    for word in ("Purpose", "Inputs", "Outputs"):
        assert f"**{word}" in first.source, f"{path.name}: header must state {word}"
    imports = code_cells(nb)[1]
    assert all(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.parse(imports.source).body), (
        f"{path.name}: the second code cell is the one import cell"
    )
    for cell in code_cells(nb):
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda), (
                f"{path.name}: notebooks call the package; "
                f"move {getattr(node, 'name', 'lambda')} into mudenet_core"
            )
    # (outputs: jupytext percent scripts cannot hold any; test_no_committed_notebook_has_outputs checks git)


# Text that only an executed notebook carries: nbformat output fields, IPython prompts, tracebacks.
OUTPUT_MARKERS = ('"outputs":', '"output_type"', '"execution_count": 1', "Out[",
                  "Traceback (most recent call last)")


def notebook_output_problems(repo: Path) -> list[str]:
    """Why the committed notebooks of ``repo`` are not output-free (``[]`` when they are).

    The percent scripts are the source and ``.ipynb`` are generated, so any ``.ipynb`` that git tracks is a
    problem (its outputs, if any, are named); so is a tracked percent script with an output marker.
    """
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True, check=True,
                             timeout=30).stdout.split("\0")
    problems = []
    for rel in (p for p in tracked if p.endswith(".ipynb")):
        cells = json.loads((repo / rel).read_text()).get("cells", [])
        n_out = sum(1 for c in cells if c.get("outputs") or c.get("execution_count") is not None)
        problems.append(f"{rel}: .ipynb tracked by git (the percent script is the source)"
                        + (f"; {n_out} cell(s) with outputs or execution counts" if n_out else ""))
    for rel in (p for p in tracked if p.startswith("notebooks/") and p.endswith(".py")):
        text = (repo / rel).read_text()
        for marker in OUTPUT_MARKERS:
            if marker in text:
                problems.append(f"{rel}: contains the output marker {marker!r}")
    return problems


def test_no_committed_notebook_has_outputs():
    """No .ipynb is tracked at all, and no percent script carries pasted outputs."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    assert notebook_output_problems(REPO) == []


def test_output_check_fails_on_a_tracked_notebook_with_outputs(tmp_path):
    """The check above can fail: a temporary repository with a tracked, executed notebook."""
    if shutil.which("git") is None:
        pytest.skip("git not available")
    import nbformat

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_x.py").write_text("# %%\nx = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "clean"], cwd=tmp_path, check=True)
    assert notebook_output_problems(tmp_path) == []
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    nb.cells = [cell]
    nbformat.write(nb, tmp_path / "notebooks" / "00_x.ipynb")
    (tmp_path / ".gitignore").write_text("*.ipynb\n")  # ignored, yet force-added: still tracked
    subprocess.run(["git", "add", "-f", "notebooks/00_x.ipynb"], cwd=tmp_path, check=True)
    (tmp_path / "notebooks" / "00_x.py").write_text("# %%\nx = 1\n# Out[1]: 2\n")
    subprocess.run(["git", "add", "notebooks/00_x.py"], cwd=tmp_path, check=True)
    problems = notebook_output_problems(tmp_path)
    assert len(problems) == 2, problems
    assert "notebooks/00_x.ipynb: .ipynb tracked by git" in problems[0]
    assert "1 cell(s) with outputs" in problems[0]
    assert "notebooks/00_x.py: contains the output marker 'Out['" in problems[1]


def test_jupytext_pairing_config():
    text = (REPO / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in text
    hooks = (REPO / ".pre-commit-config.yaml").read_text()
    assert "id: jupytext" in hooks and "--sync" in hooks and "id: nbstripout" in hooks
    assert "notebooks/*.ipynb" in (REPO / ".gitignore").read_text()
