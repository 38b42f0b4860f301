"""Backbones: shapes, strides, channels, freezing, real weights, offline error, feature concatenation."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mudenet_core.nets.backbones import (
    BACKBONES,
    DEFAULT_LAYERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWeightsError,
    build_backbone,
    concat_features,
    lite0_weights_path,
)
from mudenet_core.nets.efficientnet_lite import Conv2dSame

# Independent expectations (torchvision / TF-Lite architecture tables): layer -> (channels, stride).
EXPECTED_DEFAULT = {
    "wide_resnet50_2": {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16)},
    "resnet18": {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16)},
    "efficientnet_lite0": {"stage2": (24, 4), "stage3": (40, 8), "stage5": (112, 16)},
}
EXPECTED_DEEPEST = {"wide_resnet50_2": ("layer4", 2048, 32), "resnet18": ("layer4", 512, 32),
                    "efficientnet_lite0": ("stage7", 320, 32)}
TORCHVISION_FILES = {
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "resnet18": "resnet18-f37072fd.pth",
}
IMAGENET_CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def random_backbone(request):
    """Each registered backbone with random weights (the ResNet weights cannot be downloaded here)."""
    torch.manual_seed(0)
    return build_backbone(request.param, pretrained=False)


def test_registry_has_the_three_backbones():
    assert set(BACKBONES) == set(EXPECTED_DEFAULT)
    assert set(DEFAULT_LAYERS) == set(EXPECTED_DEFAULT)


@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_default_layers_shapes_channels_strides(random_backbone, size):
    name = random_backbone.name
    expected = EXPECTED_DEFAULT[name]
    assert DEFAULT_LAYERS[name] == tuple(expected)
    assert random_backbone.layers == tuple(expected)
    assert random_backbone.channels == {k: c for k, (c, _) in expected.items()}
    assert random_backbone.strides == {k: s for k, (_, s) in expected.items()}
    assert sorted(s for _, s in expected.values()) == [4, 8, 16]

    h, w = size
    with torch.no_grad():
        feats = random_backbone(torch.randn(2, 3, h, w))
    assert list(feats) == list(expected)
    for k, (c, s) in expected.items():
        assert tuple(feats[k].shape) == (2, c, math.ceil(h / s), math.ceil(w / s)), k
        assert torch.isfinite(feats[k]).all()


def test_every_layer_matches_its_spec(random_backbone):
    spec = BACKBONES[random_backbone.name]
    bb = build_backbone(spec.name, layers=spec.layer_names, pretrained=False)
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 96))
    for k in spec.layer_names:
        assert tuple(feats[k].shape) == (1, spec.channels[k], 64 // spec.strides[k], 96 // spec.strides[k]), k
    deepest, c, s = EXPECTED_DEEPEST[spec.name]
    assert spec.layer_names[-1] == deepest and spec.channels[deepest] == c and spec.strides[deepest] == s


def test_requested_order_is_kept_and_deeper_stages_are_skipped():
    bb = build_backbone("resnet18", layers=["layer2", "layer1"], pretrained=False)
    calls = []
    bb.stages["layer3"].register_forward_hook(lambda *_: calls.append("layer3"))
    bb.stages["layer4"].register_forward_hook(lambda *_: calls.append("layer4"))
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["layer2", "layer1"]
    assert calls == []  # the forward pass stopped at layer2


def test_backbone_is_frozen_and_stays_in_eval_mode():
    bb = build_backbone("efficientnet_lite0")
    assert all(not p.requires_grad for p in bb.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = {k: v.clone() for k, v in bb(x).items()}
    state = {k: v.clone() for k, v in bb.state_dict().items()}

    assert bb.train() is bb
    nn.Sequential(bb).train()  # a parent switching to train mode must not flip it either
    assert not bb.training and not any(m.training for m in bb.modules())
    with torch.no_grad():
        after = bb(x)
    for k, v in bb.state_dict().items():  # BatchNorm running statistics did not move
        assert torch.equal(v, state[k]), k
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_gradients_reach_the_input_but_not_the_weights():
    bb = build_backbone("resnet18", pretrained=False)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    bb(x)["layer3"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_invalid_names_are_rejected():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet50", pretrained=False)
    with pytest.raises(ValueError, match="layer5"):
        build_backbone("resnet18", layers=["layer1", "layer5"], pretrained=False)
    with pytest.raises(ValueError):
        build_backbone("resnet18", layers=[], pretrained=False)
    with pytest.raises(ValueError):
        build_backbone("resnet18", layers=["layer1", "layer1"], pretrained=False)


def test_input_normalisation_conversion():
    raw = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # images in [0, 1]
    x = imagenet_normalize(raw)
    lite = build_backbone("efficientnet_lite0", pretrained=False)
    # TF-Lite training normalisation: (255 * raw - 127) / 128
    torch.testing.assert_close(lite.to_network_input(x), (255 * raw - 127) / 128, atol=1e-5, rtol=0)
    resnet = build_backbone("resnet18", pretrained=False)
    assert torch.equal(resnet.to_network_input(x), x)


def test_lite0_loads_the_packaged_weights_and_classifies_the_cat():
    skimage_data = pytest.importorskip("skimage.data")
    bb = build_backbone("efficientnet_lite0")
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(bb.stages["stem"][0].weight, state["_conv_stem.weight"])
    assert torch.equal(bb.stages["stage5"][2]._project_conv.weight, state["_blocks.10._project_conv.weight"])

    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 300, 451)
    cat = F.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = bb.logits(imagenet_normalize(cat)).softmax(dim=1)[0]  # (1000,)
    top5 = probs.topk(5).indices.tolist()
    assert IMAGENET_CAT_CLASSES & set(top5), f"top-5 {top5} has no cat class"
    assert top5[0] in IMAGENET_CAT_CLASSES and probs[top5[0]] > 0.5, (top5, probs[top5[0]].item())

    random_bb = build_backbone("efficientnet_lite0", pretrained=False)
    assert not torch.equal(random_bb.stages["stem"][0].weight, state["_conv_stem.weight"])


def test_tf_same_padding_puts_the_odd_pixel_bottom_right():
    conv = Conv2dSame(1, 1, kernel_size=3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # windows rows/cols {0,1,2} and {2,3,pad}: no padding at the top/left, one row/col at the bottom/right
    expected = torch.tensor([[0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10, 2 + 3 + 6 + 7 + 10 + 11],
                             [8 + 9 + 10 + 12 + 13 + 14, 10 + 11 + 14 + 15]], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(conv(x)[0, 0], expected)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub folder and a download function that refuses (and records) every request."""
    requested = []

    def refuse(url, dst, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "hub" / "checkpoints", requested


@pytest.mark.parametrize("name", sorted(TORCHVISION_FILES))
def test_missing_torchvision_weights_raise_a_clear_error(offline_hub, name):
    folder, requested = offline_hub
    filename = TORCHVISION_FILES[name]
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone(name)
    msg = str(info.value)
    url = f"https://download.pytorch.org/models/{filename}"
    assert filename in msg and str(folder) in msg and url in msg, msg
    assert requested == [url]  # the torchvision loader tried the real URL, and the test blocked it


def test_corrupt_cached_weights_raise_a_clear_error(offline_hub):
    folder, requested = offline_hub
    folder.mkdir(parents=True)
    path = folder / TORCHVISION_FILES["resnet18"]
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="corrupt") as info:
        build_backbone("resnet18")
    assert str(path) in str(info.value)
    assert requested == []


def test_cached_torchvision_weights_are_loaded(offline_hub):
    """With the file in the hub cache (a user's machine), the torchvision weights API loads it offline."""
    folder, requested = offline_hub
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(saved, folder / TORCHVISION_FILES["resnet18"])
    bb = build_backbone("resnet18")
    assert requested == []
    assert torch.equal(bb.stages["stem"][0].weight, saved["conv1.weight"])
    assert torch.equal(bb.stages["stem"][1].running_var, saved["bn1.running_var"])
    assert torch.equal(bb.stages["layer3"][1].conv2.weight, saved["layer3.1.conv2.weight"])
    assert torch.equal(bb.head[2].bias, saved["fc.bias"])


def test_concat_features_nearest_hand_case():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    b = torch.tensor([[7.0]]).view(1, 1, 1, 1)
    out = concat_features({"a": a, "b": b}, ["a", "b"])
    assert torch.equal(out, torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[7.0, 7.0], [7.0, 7.0]]]]))

    up = concat_features({"a": a, "b": b}, ["a", "b"], size=(4, 4))
    assert torch.equal(up[0, 0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    assert torch.equal(up[0, 1], torch.full((4, 4), 7.0))

    down = concat_features({"a": a, "b": b}, ["b", "a"])  # the first layer's grid (1x1) is the target
    assert torch.equal(down.flatten(), torch.tensor([7.0, 1.0]))


def test_concat_features_on_backbone_output():
    bb = build_backbone("efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, 64, 80))
    out = concat_features(feats, bb.layers)
    assert tuple(out.shape) == (2, 24 + 40 + 112, 16, 20)
    torch.testing.assert_close(out[:, :24], feats["stage2"])  # the first layer passes through unchanged
    bil = concat_features(feats, bb.layers, size=(32, 40), mode="bilinear")
    assert tuple(bil.shape) == (2, 176, 32, 40)


def test_concat_features_rejects_bad_input():
    f = {"a": torch.zeros(1, 2, 4, 4), "b": torch.zeros(2, 2, 2, 2)}
    with pytest.raises(KeyError, match="c"):
        concat_features(f, ["a", "c"])
    with pytest.raises(ValueError):
        concat_features(f, [])
    with pytest.raises(ValueError):
        concat_features(f, ["a"], mode="linear")
    with pytest.raises(AssertionError):
        concat_features(f, ["a", "b"])  # batch sizes differ
