"""PAGMFR detects the generated plate's defects, and a broken (sign-flipped) PAGMFR fails the same check.

The pattern of ``test_method_quality.py``: the ``cpu`` profile shortened to fit a test (fewer epochs) is
fitted on a small generated ``plate`` category at 128 px; its image AUROC must clear a margin well below what
it reaches, and the negated scores (what a sign error produces) must not.
"""

from __future__ import annotations

import pytest
import torch

from mudenet_core import harness, metrics
from mudenet_core.data import DataConfig, make_splits, synthetic
from mudenet_core.methods import get_method, load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

OVERRIDES = ["epochs=30"]
# measured (seed 0, one thread): image AUROC 0.950, pixel AUROC 0.991, fit 45 s; a sign flip gives 0.05
MARGIN = 0.7  # image AUROC


@pytest.fixture(scope="module")
def plate_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plate128")
    synthetic.generate(
        root, categories=["plate"], image_size=128, n_train=30, n_test_good=8, n_test_per_defect=3, seed=0
    )
    return root


def test_pagmfr_detects_generated_defects_and_a_sign_flip_fails(plate_root):
    cfg = load_config("pagmfr", "cpu", overrides=OVERRIDES)
    splits = make_splits(DataConfig(dataset="synthetic", root=str(plate_root), category="plate",
                                    image_size=cfg.image_size), show_progress=False)
    det_cls, _ = get_method("pagmfr")
    det = det_cls(cfg)
    log = det.fit(splits.train, splits.val, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert log["kind"] == "object"
    result = harness.evaluate(det, splits.test, show_progress=False)
    labels, scores = result.scores["label"].to_numpy(), result.scores["score"].to_numpy()
    auroc = metrics.image_auroc(labels, scores)
    assert auroc >= MARGIN, auroc
    assert metrics.image_auroc(labels, -scores) < MARGIN  # a sign error is caught by the same check
    assert result.metrics["pixel_auroc"] >= 0.75, result.metrics["pixel_auroc"]
    assert metrics.pixel_auroc(result.masks, -result.maps) < 0.5
