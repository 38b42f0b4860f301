"""Static checks of the committed notebook sources (fast): one literal parameters cell, no outputs, no defs.

The notebooks themselves are executed end to end by ``test_run_all.py`` (marked slow).
"""

from __future__ import annotations

import ast
import json
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
    assert not any(c.get("outputs") for c in code_cells(nb))


def test_no_committed_notebook_has_outputs():
    """Any .ipynb that git tracks must be output-stripped (the percent scripts are the source)."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "*.ipynb"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git not available")
    for rel in tracked:
        nb = json.loads((REPO / rel).read_text())
        for cell in nb.get("cells", []):
            assert not cell.get("outputs"), f"{rel}: committed notebook has outputs (run nbstripout)"
            assert cell.get("execution_count") is None, f"{rel}: committed notebook has execution counts"


def test_jupytext_pairing_config():
    text = (REPO / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in text
    hooks = (REPO / ".pre-commit-config.yaml").read_text()
    assert "id: jupytext" in hooks and "--sync" in hooks and "id: nbstripout" in hooks
    assert "notebooks/*.ipynb" in (REPO / ".gitignore").read_text()
