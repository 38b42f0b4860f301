"""The fast inference paths compute what the original modules compute.

* BatchNorm folding: against ``torch.nn.utils.fusion.fuse_conv_bn_eval`` (an independent implementation) and
  the TF "same" padding against an explicit ``F.pad`` reference on odd and even sizes.
* The folded EfficientNet-Lite0 backbone on real MPDD images: its error against a float64 evaluation of the
  original network is no larger than the original float32 network's own (so the folding adds no error
  beyond float32 rounding), and it is close to the original features. The literal tolerance
  ``allclose(rtol=1e-4, atol=1e-5)`` is below float32's noise floor for this network: the original float32
  features differ from their own float64 evaluation by more than that (asserted below, so the statement
  stays true).
* The folded copies follow weight changes (``load_state_dict``, optimiser steps) and never enter the state
  dict; with gradients on, the original modules run.
* PatchCore's k-NN (``addmm`` into a reused buffer + argmin / top-k) against a float64 brute force.
* MuDeNet's networks (folded DescriptorNet, channels-last autoencoder) against their training-mode path.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mudenet_core.baselines.patchcore import nearest_neighbors
from mudenet_core.nets.autoencoder import Autoencoder
from mudenet_core.nets.backbones import build_backbone, fold_stage
from mudenet_core.nets.efficientnet_lite import (
    Conv2dSame,
    FoldedConv2d,
    fold_batchnorm,
    inference_path_enabled,
)
from mudenet_core.nets.pdn import DescriptorNet

pytestmark = pytest.mark.usefixtures("one_thread")

MPDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "mpdd" / "metal_plate"


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so that folding is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


# --- BatchNorm folding and padding --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_fold_batchnorm_matches_torch_fusion(bias):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(6, eps=1e-3)
    _randomise_bn(bn)
    conv.eval(), bn.eval()
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    ref = fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(w, ref.weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, ref.bias.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [15, 16, 17, 32])
@pytest.mark.parametrize("stride, kernel", [(1, 3), (1, 5), (2, 3), (2, 5)])
def test_folded_conv_same_padding_equals_explicit_tf_padding(size, stride, kernel):
    """TF "same": total pad max((ceil(n/s)-1)s + k - n, 0), the odd pixel after; checked with F.pad."""
    g = torch.Generator().manual_seed(size * 10 + kernel)
    conv = Conv2dSame(3, 3, kernel, stride=stride, groups=3, bias=False)
    bn = nn.BatchNorm2d(3)
    _randomise_bn(bn, seed=size)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, size, size + 1, generator=g)
    total = [max((-(-n // stride) - 1) * stride + kernel - n, 0) for n in (size, size + 1)]
    pad = [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    with torch.no_grad():
        ref = bn(F.conv2d(F.pad(x, pad), conv.weight, None, stride, 0, 1, 3))
        out = FoldedConv2d(conv, bn)(x)
        pre = FoldedConv2d(conv, bn)(F.pad(x, pad), padded=True)
    assert out.shape == (2, 3, -(-size // stride), -(-(size + 1) // stride))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pre, ref, rtol=1e-5, atol=1e-5)


def test_pad_output_writes_a_zero_border_around_the_activation():
    conv = nn.Conv2d(2, 4, 1)
    x = torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(0)) * 10
    with torch.no_grad():
        out = FoldedConv2d(conv, None, "relu6")(x, pad_output=[1, 2, 0, 1])  # left, right, top, bottom
        ref = F.pad(F.relu6(conv(x)), [1, 2, 0, 1])
    assert out.shape == (1, 4, 6, 9)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --- the frozen backbones -----------------------------------------------------------------------------------


def _mpdd_images(n: int, size: int) -> torch.Tensor:
    from mudenet_core.data import DataConfig, make_splits

    if not MPDD.is_dir():
        pytest.skip(f"real MPDD images not found at {MPDD} (../shared/data is absent in a user's clone)")
    splits = make_splits(DataConfig(dataset="mvtec_ad", root=str(MPDD.parent), category="metal_plate",
                                    image_size=size), show_progress=False)
    step = len(splits.test) // n
    return torch.stack([splits.test[i * step]["image"] for i in range(n)])  # (n, 3, H, W)


def test_folded_lite0_features_on_real_images_are_as_exact_as_the_original():
    x = _mpdd_images(4, 128)
    layers = ["stem", "stage2", "stage3", "stage5", "stage7"]
    bb = build_backbone("efficientnet_lite0", layers=layers)
    ref64 = copy.deepcopy(bb).double()
    ref64.fold_inference = False
    with torch.no_grad():
        folded = bb(x)
        bb.fold_inference = False
        plain = bb(x)
        exact = ref64(x.double())
    for k in layers:
        scale = float(exact[k].abs().max())
        err_plain = float((plain[k].double() - exact[k]).abs().max())
        err_folded = float((folded[k].double() - exact[k]).abs().max())
        assert folded[k].shape == plain[k].shape and folded[k].is_contiguous()
        # folding adds no error beyond float32 rounding: within 2x of the original float32 path's own error
        assert err_folded <= 2 * err_plain + 1e-6 * scale, (k, err_folded, err_plain)
        torch.testing.assert_close(folded[k], plain[k], rtol=1e-4, atol=2e-5 * scale)
    # why the brief's atol=1e-5 cannot hold: the original float32 features miss their float64 values by more
    deep = "stage5"
    assert not torch.allclose(plain[deep].double(), exact[deep], rtol=1e-4, atol=1e-5)


def test_folded_lite0_logits_keep_the_imagenet_prediction():
    """Same top-1 class and logits within 1e-3 on real images (the weights' own check, folded)."""
    x = _mpdd_images(2, 224)
    bb = build_backbone("efficientnet_lite0", layers=["stage7"])  # folded up to the last stage
    with torch.no_grad():
        h = bb.to_network_input(x)
        for stage in bb._folded_stages().values():
            h = stage(h)
        folded = bb.head(h)
        plain = bb.logits(x)  # the original modules
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-3)
    assert torch.equal(folded.argmax(1), plain.argmax(1))


@pytest.mark.parametrize("name, layers", [("resnet18", None), ("wide_resnet50_2", ["layer2"])])
def test_folded_resnets_match_the_original(name, layers):
    torch.manual_seed(0)
    bb = build_backbone(name, layers=layers, pretrained=False)
    _randomise_bn(bb)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        folded = bb(x)
        bb.fold_inference = False
        plain = bb(x)
    for k in folded:
        scale = float(plain[k].abs().max())
        torch.testing.assert_close(folded[k], plain[k], rtol=1e-4, atol=1e-5 * scale)


def test_fold_cache_follows_new_weights_and_stays_out_of_the_state_dict():
    torch.manual_seed(0)
    bb = build_backbone("efficientnet_lite0", layers=["stage3"], pretrained=False)
    keys = list(bb.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = bb(x)["stage3"]
    assert list(bb.state_dict()) == keys  # the folded copy is not registered
    torch.manual_seed(1)
    other = build_backbone("efficientnet_lite0", layers=["stage3"], pretrained=False)
    _randomise_bn(other, seed=3)
    bb.load_state_dict(other.state_dict())  # in-place copies: the cache key changes
    with torch.no_grad():
        second = bb(x)["stage3"]
        other.fold_inference = False
        expected = other(x)["stage3"]
    assert not torch.allclose(first, second, atol=1e-3)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-4)


def test_gradients_and_tracing_use_the_original_modules():
    bb = build_backbone("resnet18", layers=["layer1"], pretrained=False)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    bb(x)["layer1"].sum().backward()  # the folded copy is built under no_grad: it would have no graph
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    seen = []

    def probe(t):
        seen.append(inference_path_enabled())
        return t * 2

    with torch.no_grad():
        assert inference_path_enabled()
        torch.jit.trace(probe, torch.zeros(1), check_trace=False)
    assert seen == [False]


def test_fold_stage_refuses_unknown_stateful_modules():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    with pytest.raises(TypeError, match="Odd"):
        fold_stage(Odd())


# --- PatchCore k-NN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 9])
def test_nearest_neighbors_match_float64_brute_force(k):
    g = torch.Generator().manual_seed(k)
    bank = torch.randn(700, 16, generator=g)
    queries = torch.cat([torch.randn(300, 16, generator=g), bank[:5]])  # 5 queries equal to bank rows
    # a bank chunk of 256 rows (three chunks to merge) and a 1000-element buffer (several query blocks)
    dist, idx = nearest_neighbors(queries, bank, k=k, chunk_size=256, block_elements=1000)
    d64 = torch.cdist(queries.double(), bank.double())  # (Q, M)
    ref_d, ref_i = torch.sort(d64, dim=1)
    torch.testing.assert_close(dist.double(), ref_d[:, :k], rtol=1e-5, atol=1e-5)
    gap = (ref_d[:, k] - ref_d[:, k - 1]) if k < bank.shape[0] else torch.ones(len(queries))
    clear = gap > 1e-4  # no near-tie at the k-th neighbour: the index sets must agree exactly
    assert clear.float().mean() > 0.95
    same = (idx.sort(1).values == ref_i[:, :k].sort(1).values).all(1)
    assert bool(same[clear].all())
    assert torch.equal(dist[300:, 0], torch.zeros(5)) and torch.equal(idx[300:, 0], torch.arange(5))


def test_nearest_neighbors_do_not_depend_on_the_blocking():
    g = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(513, 8, generator=g), torch.randn(257, 8, generator=g)
    d1, i1 = nearest_neighbors(queries, bank, k=3)
    d2, i2 = nearest_neighbors(queries, bank, k=3, chunk_size=100, block_elements=1)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    assert torch.equal(i1, i2)


# --- MuDeNet's networks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 32])  # below and above CHANNELS_LAST_MIN_WIDTH: both layouts
def test_folded_descriptor_net_matches_the_modules(width):
    torch.manual_seed(0)
    net = DescriptorNet(width=width, out_channels=16).eval()
    _randomise_bn(net)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = net(x)
    plain = net(x)  # gradients on: the original modules
    assert plain[0].requires_grad and not fast[0].requires_grad
    for a, b in zip(fast, plain, strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)


def test_folded_descriptor_net_follows_training_and_train_mode_is_untouched():
    torch.manual_seed(0)
    net = DescriptorNet(width=8, out_channels=4)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # train mode: BatchNorm batch statistics, running statistics move
        opt.zero_grad()
        sum(m.square().mean() for m in net(x)).backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            fast = net(x)
        expected = net(x)
        for a, b in zip(fast, expected, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
        net.train()
    with torch.no_grad():  # train mode without gradients still uses batch statistics (no folding)
        batch_stats = net(x)[0]
    net.eval()
    with torch.no_grad():
        running_stats = net(x)[0]
    assert not torch.allclose(batch_stats, running_stats, atol=1e-3)


def test_autoencoder_inference_layout_gives_the_same_maps():
    torch.manual_seed(0)
    ae = Autoencoder(image_size=64, out_channels=8, latent_dim=4, width=16).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = ae(x)
    plain = ae(x)
    for a, b in zip(fast, plain, strict=True):
        assert a.is_contiguous() and a.shape == (2, 8, 32, 32)
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-6)


# --- the GPU check's Python, on the CPU at tiny sizes -----------------------------------------------------


def test_gpu_check_script_parses():
    import shutil
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    bash = shutil.which("bash")
    assert bash is not None
    assert subprocess.run([bash, "-n", str(script)], capture_output=True).returncode == 0


def test_throughput_loss_curve_runs_on_cpu_and_the_loss_falls(tmp_path):
    import sys

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import throughput

    rc = throughput.main(["--devices", "cpu", "--configs", "smoke", "--image-size", "0", "--loss-curve", "6",
                          "--out-dir", str(tmp_path)])
    assert rc == 0
    df = pd.read_csv(tmp_path / "loss_curve_cpu.csv")
    assert list(df["step"]) == list(range(1, 7)) and set(df["device"]) == {"cpu"}
    assert (df["elapsed_s"].diff().dropna() > 0).all()
    assert df["L"].iloc[-1] < df["L"].iloc[0]  # Adam on six fixed batches: the stage-2 loss goes down
    total = torch.tensor((df["L1"] + df["LA"] + df["L2"]).to_numpy())  # L = L1 + LA + L2 (stage 2)
    torch.testing.assert_close(torch.tensor(df["L"].to_numpy()), total, rtol=1e-4, atol=1e-4)
