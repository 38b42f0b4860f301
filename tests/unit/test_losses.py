import torch
import torch.nn.functional as F

from mudenet_core import losses


def test_level_mse_is_sum_of_per_level_mse():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]
    t = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]
    want = sum(F.mse_loss(a, b) for a, b in zip(p, t, strict=True))
    torch.testing.assert_close(losses.level_mse(p, t), want)
    # hand-computed: errors 1 and 3 on one level of 2 elements -> (1 + 9) / 2
    assert float(losses.level_mse([torch.tensor([[[[1.0, 3.0]]]])], [torch.zeros(1, 1, 1, 2)])) == 5.0


def test_distillation_loss_regresses_same_target_at_every_level():
    e = torch.ones(1, 2, 2, 2)
    maps = [torch.zeros(1, 2, 2, 2), e.clone(), 3 * e]
    assert float(losses.distillation_loss(maps, e)) == 1.0 + 0.0 + 4.0


def test_hard_mse_averages_exactly_the_top_tenth_percent():
    d = torch.randperm(10_000, generator=torch.Generator().manual_seed(0)).float().view(1, 1, 100, 100)
    got = losses.hard_mse(d.sqrt(), torch.zeros_like(d), q=0.999)  # squared errors = 0..9999
    assert float(got) == sum(range(9990, 10000)) / 10


def test_student_equal_teacher_gives_zero_losses():
    x = [torch.randn(1, 4, 8, 8) for _ in range(3)]
    out = losses.mudenet_losses(x, x, x, x)
    assert all(float(v) == 0.0 for v in out.values())
    assert float(losses.penalty_loss([torch.zeros(2, 4, 8, 8)])) == 0.0


def test_total_is_sum_and_detach_blocks_l2_gradient_to_autoencoder():
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(1, 2, 3, 3, generator=g) for _ in range(3)]
    s1 = [torch.randn(1, 2, 3, 3, generator=g) for _ in range(3)]
    s2 = [torch.randn(1, 2, 3, 3, generator=g).requires_grad_() for _ in range(3)]
    for detach in (True, False):
        a = [
            torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
            for _ in range(3)
        ]
        out = losses.mudenet_losses(x, s1, a, s2, detach_ae=detach)
        torch.testing.assert_close(out["L"], out["L1"] + out["LA"] + out["L2"])
        (grad_l2,) = torch.autograd.grad(out["L2"], a[0], allow_unused=True)
        assert (grad_l2 is None) == detach
