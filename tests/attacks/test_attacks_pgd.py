"""PGD optimizer and the ECCV 2020 step rules (robust_ranking/attacks/pgd.py)."""

from __future__ import annotations

import math

import pytest
import torch

from robust_ranking.attacks import eccv_step_rules, pgd_linf, project_linf


@pytest.mark.parametrize(
    "eps, alpha, steps",
    [
        (0.0, 1 / 255, 10),
        (0.01, 1 / 255, 10),  # eps/10 < 1/255 -> 1/255; 2 eps / alpha = 5.1 -> 10
        (0.03, 1 / 255, 15),  # 2 * 0.03 * 255 = 15.3 -> truncated to 15
        (0.06, 0.006, 20),  # 2 * 0.06 / 0.006 = 19.999... in floats -> guarded to 20
        (0.1, 0.01, 20),
        (0.3, 0.01, 30),  # alpha capped at 0.01; 60 steps capped at 30
        (1.0, 0.01, 30),
    ],
)
def test_eccv_step_rules(eps: float, alpha: float, steps: int) -> None:
    a, s = eccv_step_rules(eps)
    assert a == pytest.approx(alpha, abs=1e-12)
    assert s == steps
    assert isinstance(s, int)


@pytest.mark.parametrize("eps", [-0.01, 1.01, math.nan, math.inf])
def test_eccv_step_rules_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        eccv_step_rules(eps)


def _quadratic_target_loss(target: torch.Tensor):
    return lambda x: ((x - target) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_respects_ball_and_box(random_start: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 5, generator=g)
    x[:, :, 0] = 0.0  # pixels on the box boundary
    x[:, :, 1] = 1.0
    target = torch.randn(6, 1, 5, 5, generator=g) * 3  # far outside the box
    eps = 0.05
    x_adv = pgd_linf(_quadratic_target_loss(target), x, eps, 0.02, 7, random_start=random_start, generator=g)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad


def test_pgd_minimizes_and_reaches_the_ball_corner() -> None:
    x = torch.full((2, 3), 0.5)
    # Loss sum(x): the minimizer in the ball is x - eps everywhere.
    x_adv = pgd_linf(lambda z: z.sum(1), x, 0.1, 0.03, 10)
    torch.testing.assert_close(x_adv, torch.full((2, 3), 0.4))


def test_pgd_eps_zero_returns_input_exactly() -> None:
    x = torch.rand(3, 1, 4, 4)
    calls = []
    out = pgd_linf(lambda z: calls.append(1) or z.flatten(1).sum(1), x, 0.0, 0.01, 5, random_start=True)
    assert torch.equal(out, x)
    assert not calls  # no model evaluation at all


def test_pgd_per_sample_eps_tensor() -> None:
    x = torch.full((3, 4), 0.5)
    eps = torch.tensor([0.0, 0.05, 0.2])
    out = pgd_linf(lambda z: z.sum(1), x, eps, 0.01, 45, random_start=True)  # 45 * 0.01 > 2 * 0.2
    assert torch.equal(out[0], x[0])  # eps = 0 -> exactly the input
    delta = (out - x).abs().amax(1)
    assert torch.all(delta <= eps + 1e-6)
    torch.testing.assert_close(out[1:], torch.stack([torch.full((4,), 0.45), torch.full((4,), 0.3)]))


def test_pgd_independent_instances() -> None:
    """Per-instance losses: each row follows its own gradient (gradient of the sum)."""
    x = torch.full((2, 3), 0.5)
    sign = torch.tensor([[1.0], [-1.0]])
    out = pgd_linf(lambda z: (sign * z).sum(1), x, 0.1, 0.05, 4)
    torch.testing.assert_close(out, torch.tensor([[0.4] * 3, [0.6] * 3]))


def test_pgd_leaves_no_parameter_gradients() -> None:
    lin = torch.nn.Linear(4, 2)
    x = torch.rand(5, 4)
    pgd_linf(lambda z: lin(z).sum(1), x, 0.1, 0.01, 3)
    assert all(p.grad is None for p in lin.parameters())


def test_pgd_rejects_bad_loss_shape_and_steps() -> None:
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="per-instance"):
        pgd_linf(lambda z: z.sum(), x, 0.1, 0.01, 2)
    with pytest.raises(ValueError, match="steps"):
        pgd_linf(lambda z: z.sum(1), x, 0.1, 0.01, 0)
    with pytest.raises(ValueError, match="eps"):
        pgd_linf(lambda z: z.sum(1), x, torch.tensor([0.1, 0.1]), 0.01, 2)


def test_project_linf() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    out = project_linf(torch.tensor([-1.0, 0.9, 2.0]), x, 0.2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.7, 1.0]))
