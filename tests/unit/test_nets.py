import pytest
import torch

from mudenet_core.nets.autoencoder import Autoencoder
from mudenet_core.nets.mudenet import MuDeNetNets
from mudenet_core.nets.pdn import DescriptorNet, receptive_fields


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_descriptor_net_has_paper_parameter_count():
    # stem 3*64*49+64 = 9472; 3x3 block 2*64*64*9 + 2*2*64 = 73984 (x3);
    # 5x5 block 2*64*64*25 + 256 = 205056 (x2);
    # three 1x1 heads 3*(64*128+128) = 24960  -> 666,496
    assert n_params(DescriptorNet()) == 9472 + 3 * 73984 + 2 * 205056 + 24960 == 666_496


def test_teacher_and_students_share_architecture_not_weights():
    nets = MuDeNetNets(image_size=64, width=8, out_channels=4, latent_dim=4, ae_width=8)
    shapes = [
        [tuple(p.shape) for p in m.parameters()] for m in (nets.teacher, nets.student, nets.logical_student)
    ]
    assert shapes[0] == shapes[1] == shapes[2]
    assert not torch.equal(next(nets.teacher.parameters()), next(nets.student.parameters()))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_descriptor_and_autoencoder_shapes(size):
    x = torch.randn(2, 3, size, size)
    outs = DescriptorNet(width=8, out_channels=6)(x)
    assert [tuple(o.shape) for o in outs] == [(2, 6, size // 2, size // 2)] * 3
    ae = Autoencoder(image_size=size, out_channels=6, latent_dim=5, width=16)
    assert tuple(ae.encode(x).shape) == (2, 5, 1, 1)
    assert ae.encoder[-1].kernel_size == (size // 32, size // 32)
    assert [tuple(o.shape) for o in ae(x)] == [(2, 6, size // 2, size // 2)] * 3


def test_paper_autoencoder_layers():
    ae = Autoencoder()  # 256 px: 1 -> 4 -> 8 -> 16 -> 32 -> 64 -> 128
    convs = [m for m in ae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 32),
        (32, 64),
        (64, 128),
        (128, 128),
        (128, 128),
        (128, 32),
    ]
    dec = [m for m in ae.decoders[0] if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(dec) == 6 and dec[0].stride == (4, 4) and dec[-1].out_channels == 128
    assert not isinstance(list(ae.decoders[0])[-1], torch.nn.ReLU)


def test_autoencoder_rejects_bad_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        Autoencoder(image_size=100)
    with pytest.raises(ValueError, match="power of two"):
        Autoencoder(image_size=96)


def test_receptive_fields_match_gradient_support():
    assert receptive_fields() == [16, 32, 64]
    torch.manual_seed(0)
    net = DescriptorNet(width=4, out_channels=2).eval()
    for level, rf in enumerate(receptive_fields()):
        x = torch.randn(1, 3, 160, 160, requires_grad=True)
        out = net(x)[level]
        out[0, :, 40, 40].sum().backward()  # grid cell 40 covers input pixels 80-81
        cols = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero().flatten()
        assert int(cols.max() - cols.min() + 1) == rf


def test_teacher_maps_are_normalised_with_buffers():
    nets = MuDeNetNets(image_size=64, width=8, out_channels=4, latent_dim=4, ae_width=8).eval()
    x = torch.randn(1, 3, 64, 64)
    raw = nets.teacher(x)
    nets.teacher_mean.fill_(1.0)
    nets.teacher_std.fill_(2.0)
    for r, n in zip(raw, nets.teacher_maps(x), strict=True):
        torch.testing.assert_close(n, (r - 1.0) / 2.0)
    assert {"channel_idx", "target_mean", "teacher_std", "map_stats"} <= set(nets.state_dict())
