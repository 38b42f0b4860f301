"""RGPKD detects the generated plate's defects clearly, and a sign-flipped RGPKD fails the same check.

Follows ``tests/integration/test_method_quality.py``: a small generated ``plate`` category (128 px, 30
training images), the ``cpu`` profile with fewer epochs; the image AUROC must clear a margin well below what
the method reaches here, and the negated scores (a sign error) must not. Both prompt settings are checked.
"""

from __future__ import annotations

import pytest
import torch

from mudenet_core import harness, metrics
from mudenet_core.baselines.rgpkd import RGPKD
from mudenet_core.data import DataConfig, make_splits, synthetic
from mudenet_core.methods import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EPOCHS = 20  # the cpu profile's recipe, shortened for the test (fit: about 40 s of one thread)
# Measured here (seed 0, one thread; image / pixel AUROC): without prompts at test 0.875 / 0.816, with them
# 0.817 / 0.855. A sign flip gives 1 - AUROC (0.125 / 0.183 image).
MARGIN = 0.7  # image AUROC
PIXEL_MARGIN = 0.75  # pixel AUROC


@pytest.fixture(scope="module")
def plate_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plate128")
    synthetic.generate(root, categories=["plate"], image_size=128, n_train=30, n_test_good=8,
                       n_test_per_defect=3, seed=0)
    return root


def clears_margin(labels, scores, margin: float) -> bool:
    """The quality check: image AUROC of these scores is at least ``margin``."""
    return metrics.image_auroc(labels, scores) >= margin


def test_rgpkd_detects_generated_defects_and_a_sign_flip_fails(plate_root):
    cfg = load_config("rgpkd", "cpu", overrides=[f"epochs={EPOCHS}"])
    assert cfg.image_size == 128
    data = DataConfig(dataset="synthetic", root=str(plate_root), category="plate", image_size=128)
    splits = make_splits(data, show_progress=False)
    det = RGPKD(cfg)
    det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    for prompts_at_test in (False, True):
        det.config = cfg.replace(prompts_at_test=prompts_at_test)
        result = harness.evaluate(det, splits.test, show_progress=False)
        labels, scores = result.scores["label"].to_numpy(), result.scores["score"].to_numpy()
        seen = (prompts_at_test, result.metrics["image_auroc"], result.metrics["pixel_auroc"])
        assert clears_margin(labels, scores, MARGIN), seen
        assert not clears_margin(labels, -scores, MARGIN), seen  # a sign error is caught by the same check
        # the maps point at the defects too (pixel level), and flipped maps would not
        assert result.metrics["pixel_auroc"] >= PIXEL_MARGIN, seen
        assert metrics.pixel_auroc(result.masks, -result.maps) < 0.5, seen
