"""MuDeNet's two stages learn (losses fall), and stage 2 never touches the distilled teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mudenet_core import train
from mudenet_core.data import DataConfig, make_splits
from mudenet_core.methods import load_config
from mudenet_core.mudenet import MuDeNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits(synthetic_root):
    return make_splits(
        DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate", image_size=64)
    )


def _head_tail(values, k=8):
    v = np.asarray(values, dtype=float)
    return v[:k].mean(), v[-k:].mean()


def test_stage1_and_stage2_losses_decrease(splits, tmp_path):
    cfg = load_config("mudenet", "smoke", overrides=["distill.steps=60", "train.steps=60", "train.lr=0.002"])
    det = MuDeNet(cfg)
    log = det.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=tmp_path,
    )
    first, last = _head_tail(log["distill"]["L_dist"])
    assert last < 0.8 * first, (first, last)  # the teacher learns its target
    for key in ("L1", "LA", "L2", "L"):
        first, last = _head_tail(log["train"][key])
        assert last < first, (key, first, last)


def test_stage2_leaves_the_teacher_bit_identical(splits, tmp_path):
    cfg = load_config("mudenet", "smoke", overrides=["train.steps=10"])
    det = MuDeNet(cfg)
    det.distill(
        splits.train, generator=torch.Generator().manual_seed(0), show_progress=False, checkpoint_dir=tmp_path
    )
    distilled = torch.load(tmp_path / MuDeNet.CHECKPOINT_NAME, weights_only=False)["state_dict"]
    teacher_before = {k: v.clone() for k, v in distilled.items() if k.startswith("teacher.")}
    assert teacher_before
    det.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    after = det.nets.state_dict()
    for k, v in teacher_before.items():
        assert torch.equal(after[k].cpu(), v), k
    # and the students did change (stage 2 ran)
    assert any(not torch.equal(after[k].cpu(), distilled[k]) for k in distilled if k.startswith("student."))


def test_stage2_updates_no_teacher_parameter_gradient(splits):
    cfg = load_config("mudenet", "smoke")
    det = MuDeNet(cfg)
    images = train.stack_dataset(splits.train)
    train.train_end_to_end(
        det.nets,
        images,
        steps=2,
        lr=1e-3,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    assert all(p.grad is None for p in det.nets.teacher.parameters())
