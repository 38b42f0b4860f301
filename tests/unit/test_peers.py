"""The EfficientNet-Lite0 -> timm ``tf_efficientnet_lite0`` weight mapping of ``benchmarks/peers.py``.

timm is not installed in the project's environment (anomalib and timm live in a separate venv), so the
mapping is checked on key names and shapes against timm's layout written out here by hand from its
architecture (stage 1 a DepthwiseSeparableConv: conv_dw, bn1, conv_pw, bn2; stages 2-7 InvertedResidual:
conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3; blocks numbered per stage). Loading the mapped weights into a real
timm model and comparing features runs only where timm is importable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from mudenet_core.nets.efficientnet_lite import LITE0_BLOCKS, EfficientNetLite0

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peers  # noqa: E402

REPEATS = [b.num_repeat for b in LITE0_BLOCKS]  # (1, 2, 2, 3, 3, 4, 1) in the TF builder


def timm_lite0_keys() -> list[str]:
    """timm's tf_efficientnet_lite0 state-dict keys, from its architecture (not from the code under test)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv_stem.weight", *[f"bn1.{p}" for p in bn]]
    for stage, repeat in enumerate(REPEATS):
        for i in range(repeat):
            pre = f"blocks.{stage}.{i}"
            if stage == 0:
                parts = [("conv_dw", "bn1"), ("conv_pw", "bn2")]
            else:
                parts = [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")]
            for conv, norm in parts:
                keys += [f"{pre}.{conv}.weight", *[f"{pre}.{norm}.{p}" for p in bn]]
    return keys + ["conv_head.weight", *[f"bn2.{p}" for p in bn], "classifier.weight", "classifier.bias"]


def test_hand_picked_keys():
    assert peers.lite0_key_to_timm("_conv_stem.weight") == "conv_stem.weight"
    assert peers.lite0_key_to_timm("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert peers.lite0_key_to_timm("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert peers.lite0_key_to_timm("_blocks.2._bn1.running_mean") == "blocks.1.1.bn2.running_mean"
    # block 3 opens stage 3 (blocks 0 | 1-2 | 3-4 | 5-7 | 8-10 | 11-14 | 15)
    assert peers.lite0_key_to_timm("_blocks.3._depthwise_conv.weight") == "blocks.2.0.conv_dw.weight"
    assert peers.lite0_key_to_timm("_blocks.14._project_conv.weight") == "blocks.5.3.conv_pwl.weight"
    assert peers.lite0_key_to_timm("_bn1.bias") == "bn2.bias"
    assert peers.lite0_key_to_timm("_fc.weight") == "classifier.weight"


def test_every_key_maps_one_to_one_onto_timms_layout_with_the_shapes_kept():
    state = EfficientNetLite0().state_dict()
    mapped = peers.lite0_to_timm_state_dict(state)
    expected = timm_lite0_keys()
    assert len(mapped) == len(state) == len(expected) == 296
    assert sorted(mapped) == sorted(expected)
    for ours, theirs in zip(state, mapped, strict=True):
        assert mapped[theirs] is state[ours]  # renamed, not copied or transposed
    # shapes that pin the roles: stage-2 first block expands 16 -> 96 channels, depthwise 3x3, projects to 24
    assert mapped["blocks.1.0.conv_pw.weight"].shape == (96, 16, 1, 1)
    assert mapped["blocks.1.0.conv_dw.weight"].shape == (96, 1, 3, 3)
    assert mapped["blocks.1.0.conv_pwl.weight"].shape == (24, 96, 1, 1)


@pytest.mark.parametrize("key", ["_blocks.16._bn0.weight", "_blocks.0._expand_conv.weight", "stem.weight"])
def test_bad_keys_are_refused(key):
    with pytest.raises(KeyError):
        peers.lite0_key_to_timm(key)


def test_timm_layer_names_are_the_same_strides():
    assert peers.TIMM_LAYERS["stage3"] == "blocks.2" and peers.TIMM_LAYERS["stage5"] == "blocks.4"


@pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                    reason="timm is not installed in this environment (it lives in the anomalib venv)")
def test_mapped_weights_give_timm_the_same_features():  # pragma: no cover - needs timm
    import timm

    torch.manual_seed(0)
    ours = EfficientNetLite0()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    state = {k: v for k, v in peers.lite0_to_timm_state_dict(ours.state_dict()).items()
             if not k.startswith(("conv_head", "bn2.", "classifier"))}  # features_only has no head
    net.load_state_dict(state, strict=True)
    net.eval(), ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = net(x)
        h = x
        pieces = list(ours.stage_modules().values())  # stem, stage1 .. stage7
        for piece in pieces[:4]:
            h = piece(h)
        stage3 = h
        for piece in pieces[4:6]:
            h = piece(h)
    torch.testing.assert_close(feats[0], stage3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats[1], h, rtol=1e-4, atol=1e-4)


def test_run_sampled_survives_a_child_that_writes_more_than_a_pipe_holds(tmp_path):
    """A worker printing 1 MiB to stderr and stdout (anomalib's progress at 256 px) must finish and hand back
    both streams; with pipes that nobody drains while sampling, it blocks in write for ever."""
    script = tmp_path / "chatty.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            sys.stderr.write("e" * 2**20)
            sys.stdout.write("o" * 2**20 + "\\n" + '{"done": 1}' + "\\n")
            """
        )
    )
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(out=peers.run_sampled([sys.executable, str(script)], dict(os.environ))),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "run_sampled hangs on a child that fills its output pipe"
    res, _ = result["out"]
    assert res.returncode == 0
    assert res.stdout.splitlines()[-1] == '{"done": 1}'
    assert len(res.stderr) == 2**20
