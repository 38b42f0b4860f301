"""Every method detects the generated plate's defects clearly, and a broken (sign-flipped) method fails.

Each method is fitted on a small generated ``plate`` category (128 px) with a test-sized version of its
``cpu`` profile; its image AUROC must clear a margin well below what it reaches, and the same check applied
to the negated scores (what a sign error would produce) must fail. So the test fails for a method that
detects nothing, or detects backwards, without pinning the numbers of a healthy one.
"""

from __future__ import annotations

import pytest
import torch

from mudenet_core import harness, metrics
from mudenet_core.data import DataConfig, make_splits, synthetic
from mudenet_core.methods import get_method, load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# method -> (cpu-profile overrides for a test-sized run, image AUROC margin). Measured on this data
# (seed 0, one thread; image / pixel AUROC): PaDiM 0.983 / 0.996, PatchCore 0.892 / 0.992, autoencoder
# (20 epochs) 0.792 / 0.927, MuDeNet (150 + 150 steps) 0.725 / 0.949. A sign flip gives 1 - AUROC.
# Uninformed Students has its own quality test in tests/unit/test_uninformed_students.py; GLASS, PAGMFR and
# RGPKD theirs in tests/integration/test_{glass,pagmfr,rgpkd}_quality.py.
CASES = {
    "padim": ([], 0.85),
    "patchcore": ([], 0.75),
    "ae": (["epochs=20"], 0.65),
    "mudenet": (["distill.steps=150", "train.steps=150"], 0.6),
}


@pytest.fixture(scope="module")
def plate_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plate128")
    synthetic.generate(
        root, categories=["plate"], image_size=128, n_train=30, n_test_good=8, n_test_per_defect=3, seed=0
    )
    return root


def clears_margin(labels, scores, margin: float) -> bool:
    """The quality check: image AUROC of these scores is at least ``margin``."""
    return metrics.image_auroc(labels, scores) >= margin


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_detects_generated_defects_and_a_sign_flip_fails(method, plate_root):
    overrides, margin = CASES[method]
    cfg = load_config(method, "cpu", overrides=overrides or None)
    if "image_size" in cfg.field_names() and cfg.image_size != 128:
        cfg = cfg.replace(image_size=128)
    splits = make_splits(
        DataConfig(dataset="synthetic", root=str(plate_root), category="plate", image_size=128)
    )
    det_cls, _ = get_method(method)
    det = det_cls(cfg)
    det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    result = harness.evaluate(det, splits.test, show_progress=False)
    labels, scores = result.scores["label"].to_numpy(), result.scores["score"].to_numpy()
    assert clears_margin(labels, scores, margin), (method, result.metrics["image_auroc"])
    assert not clears_margin(labels, -scores, margin)  # a sign error is caught by the same check
    # the maps point at the defects too (pixel level), and flipped maps would not
    assert result.metrics["pixel_auroc"] >= 0.8
    assert metrics.pixel_auroc(result.masks, -result.maps) < 0.5
