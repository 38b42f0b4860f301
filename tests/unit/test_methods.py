"""The method registry: a module that fails to import is an error; only optional extras may be missing."""

from __future__ import annotations

import sys

import pytest

from mudenet_core import methods
from mudenet_core.config import ConfigError


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    """A module on sys.path that raises ImportError when imported (as if a dependency were missing)."""
    (tmp_path / "mudenet_broken_method.py").write_text("raise ImportError('No module named libfoo')\n")
    (tmp_path / "mudenet_syntax_method.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("mudenet_broken_method", "mudenet_syntax_method"):
        sys.modules.pop(name, None)


def test_every_registered_method_imports_here():
    assert methods.available_methods() == list(methods.METHODS)
    assert methods.unavailable_methods() == {}
    assert methods.OPTIONAL_EXTRAS == {}  # nothing optional today


def test_import_error_in_a_package_module_raises(broken_module, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "broken", ("mudenet_broken_method", "Det", "Cfg"))
    with pytest.raises(ConfigError, match=r"'broken'.*mudenet_broken_method failed to import.*libfoo"):
        methods.available_methods()
    with pytest.raises(ConfigError, match="mudenet_broken_method"):
        methods.get_method("broken")


def test_a_missing_module_is_not_silently_dropped(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "ghost", ("mudenet_core.baselines.no_such_module", "Det", "Cfg"))
    with pytest.raises(ConfigError, match=r"no_such_module failed to import \(ModuleNotFoundError"):
        methods.available_methods()


def test_optional_extras_may_be_missing_and_are_reported(broken_module, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "broken", ("mudenet_broken_method", "Det", "Cfg"))
    monkeypatch.setitem(methods.OPTIONAL_EXTRAS, "broken", "foo")
    assert "broken" not in methods.available_methods()
    reason = methods.unavailable_methods()["broken"]
    assert "libfoo" in reason and '.[foo]' in reason
    with pytest.raises(ConfigError, match=r"pip install -e \"\.\[foo\]\""):
        methods.get_method("broken")
    # a module that is broken (not merely missing a dependency) is never optional
    monkeypatch.setitem(methods.METHODS, "syntax", ("mudenet_syntax_method", "Det", "Cfg"))
    monkeypatch.setitem(methods.OPTIONAL_EXTRAS, "syntax", "foo")
    with pytest.raises(ConfigError, match="SyntaxError"):
        methods.available_methods()


def test_run_all_refuses_a_broken_method_before_any_work(broken_module, monkeypatch, tmp_path):
    from mudenet_core.workbook.cli import main

    monkeypatch.setitem(methods.METHODS, "broken", ("mudenet_broken_method", "Det", "Cfg"))
    assert main(["--data-root", str(tmp_path), "--categories", "plate", "--methods", "padim",
                 "--results-root", str(tmp_path / "r")]) == 2
