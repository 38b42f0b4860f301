"""Shared fixtures: a small generated MVTec-layout dataset (session-scoped) and the real MPDD category."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MPDD_METAL_PLATE = SHARED_DATA / "mpdd" / "metal_plate"
DTD_IMAGES = SHARED_DATA / "dtd" / "images"


def pytest_collection_modifyitems(config, items):
    """Apply the ``gpu`` marker to tests whose name mentions CUDA, and skip them without a GPU."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.name.lower() or "gpu" in item.keywords:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _no_tracking():
    """No MLflow logging unless a test asks for it (tests/unit/test_tracking.py and test_serve.py turn it on).

    Logging costs 4-10 s per fit and would write into the repository's results/mlflow.db from CLI tests.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("MUDENET_TRACKING", "0")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (tiny convolutions: no OpenMP oversubscription on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small generated dataset in the MVTec AD layout (both categories, 64 px, few images)."""
    from mudenet_core.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, image_size=64, n_train=12, n_test_good=4, n_test_per_defect=2, seed=0)
    return root


@pytest.fixture(scope="session")
def mpdd_root() -> Path:
    """The real MPDD ``metal_plate`` category from ../shared/data (skips where absent)."""
    if not MPDD_METAL_PLATE.is_dir():
        pytest.skip(f"real data not present: {MPDD_METAL_PLATE} (only on the project's machines)")
    return MPDD_METAL_PLATE


@pytest.fixture(scope="session")
def dtd_root() -> Path:
    """The DTD texture images from ../shared/data (skips where absent)."""
    if not DTD_IMAGES.is_dir():
        pytest.skip(f"real data not present: {DTD_IMAGES} (only on the project's machines)")
    return DTD_IMAGES


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(optim_cls, at_step)``: a context in which call ``at_step`` of ``optim_cls.step``
    raises ``KeyboardInterrupt`` (a simulated kill mid-run); the real ``step`` is back when the context ends.

    Used by the resume tests: run with an interruption, then resume, then compare with an uninterrupted run.
    """
    import contextlib

    @contextlib.contextmanager
    def interrupt(optim_cls: type, at_step: int):
        real_step, calls = optim_cls.step, {"n": 0}

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == at_step:
                raise KeyboardInterrupt("simulated interruption")
            return real_step(self, *a, **k)

        monkeypatch.setattr(optim_cls, "step", step)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(optim_cls, "step", real_step)

    return interrupt
