"""Batched L-inf projected gradient descent in ``[0, 1]`` pixel space, and the ECCV 2020 step rules.

Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, Eq. (6):

    c~_{t+1} = Clip_{c, Gamma}{ c~_t - alpha * sign(grad L(c~_t)) },
    Gamma = { r : ||r||_inf <= eps, c + r in [0, 1] }                       (Eq. 2)

Every attack in this package minimizes a per-instance loss with :func:`pgd_linf`; instances
are independent, so the gradient of the *sum* of the per-instance losses gives each
instance its own gradient in one backward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GradientDiagnostics", "eccv_step_rules", "observe_step", "pgd_linf", "project_linf",
           "record_gradient_diagnostics"]

# Guard for float error in 2 * eps / alpha, e.g. 2 * 0.06 / 0.006 = 19.999999999999996.
_ROUND_TOL = 1e-9


def eccv_step_rules(eps: float) -> tuple[float, int]:
    """PGD step size and iteration count of ECCV 2020 Sec. 4 ("Hyper-parameters").

    ``alpha = min(max(eps / 10, 1 / 255), 0.01)`` and
    ``steps = min(max(10, 2 * eps / alpha), 30)``.

    The paper does not say how ``2 * eps / alpha`` becomes an integer. We truncate it
    (Python ``int``, i.e. floor for these positive values) after adding a 1e-9 guard so
    that exact ratios that float arithmetic lands just below an integer (eps = 0.06 ->
    19.999...) are not lost. Consequences: eps 0.01 -> (1/255, 10), 0.03 -> (1/255, 15),
    0.06 -> (0.006, 20), 0.1 -> (0.01, 20), 0.3 -> (0.01, 30). With ceil instead, eps = 0.03
    would take 16 steps; every other table epsilon is unaffected.
    """
    check_eps(eps)
    alpha = min(max(eps / 10.0, 1.0 / 255.0), 0.01)
    steps = min(max(10, int(2.0 * eps / alpha + _ROUND_TOL)), 30)
    return alpha, steps


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number in [0, 1], got {eps!r}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (pixel units), got {eps}")


@dataclass
class GradientDiagnostics:
    """What the optimizer saw during one attack call, per instance (``[B]`` bool tensors).

    Attributes:
        zero_grad: the input gradient at the first step was exactly zero (an attack that cannot
            move: gradient masking, a saturated loss, or nothing left to do).
        nonfinite_grad: the input gradient at the first step had a NaN / inf entry.
        nonfinite_loss: the loss was NaN / inf at some step.

    ``None`` until a step was observed (an attack with its own optimizer loop that does not
    report its steps leaves them ``None``: "not recorded", never "fine").
    """

    zero_grad: Tensor | None = None
    nonfinite_grad: Tensor | None = None
    nonfinite_loss: Tensor | None = None

    def observe(self, loss: Tensor, grad: Tensor) -> None:
        """Record one optimizer step: per-instance ``loss [B]`` and input gradient ``grad [B, ...]``."""
        bad_loss = ~torch.isfinite(loss.detach())
        self.nonfinite_loss = bad_loss if self.nonfinite_loss is None else self.nonfinite_loss | bad_loss
        if self.zero_grad is None:  # the first step only: where the attack starts from
            flat = grad.detach().flatten(1)
            self.nonfinite_grad = ~torch.isfinite(flat).all(dim=1)
            self.zero_grad = (flat == 0).all(dim=1)


_RECORDER: ContextVar[GradientDiagnostics | None] = ContextVar("gradient_diagnostics", default=None)


@contextlib.contextmanager
def record_gradient_diagnostics() -> Iterator[GradientDiagnostics]:
    """Collect the :class:`GradientDiagnostics` of the optimizer steps run inside the block.

    The evaluation engine wraps each attack call in it; the attacks themselves need not know
    (:func:`pgd_linf` reports its steps through :func:`observe_step`). Observation only: the
    attack's result does not change.
    """
    recorder = GradientDiagnostics()
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def observe_step(loss: Tensor, grad: Tensor) -> None:
    """Report one optimizer step to the active recorder, if any (see :func:`record_gradient_diagnostics`)."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.observe(loss, grad)


def _per_sample(value: float | Tensor, x: Tensor, name: str) -> float | Tensor:
    """A float, or a ``[B]`` tensor reshaped to broadcast against ``x`` ``[B, ...]``."""
    if not isinstance(value, Tensor):
        return float(value)
    if value.dim() == 0:
        return float(value)
    if value.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must be a float or a [B]={x.shape[0]} tensor, got shape {tuple(value.shape)}"
        )
    return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def project_linf(x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
    """Project ``x_adv`` onto ``{||x_adv - x||_inf <= eps} ∩ [0, 1]`` (``x`` itself in [0, 1]).

    Clamping to the eps-box first and to [0, 1] second lands in the intersection, because
    ``x`` is in both sets. ``eps`` is a float or a tensor broadcastable against ``x``.
    """
    if isinstance(eps, Tensor):
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        x_adv = torch.clamp(x_adv, x - eps, x + eps) if eps > 0 else x.clone()
    return x_adv.clamp_(0.0, 1.0)


def pgd_linf(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    delta0: Tensor | None = None,
) -> Tensor:
    """Minimize ``loss_fn`` over the L-inf ball around ``x`` by signed-gradient steps.

    Args:
        loss_fn: maps a batch ``x_adv [B, ...]`` to per-instance losses ``[B]``; it is
            minimized (attacks that maximize something return its negative).
        x: clean inputs ``[B, ...]`` in ``[0, 1]``; never modified.
        eps: L-inf radius, a float or a per-sample ``[B]`` tensor (e.g. for eps ramps).
        alpha: step size, a float or a per-sample ``[B]`` tensor.
        steps: number of iterations (one forward + one backward of ``loss_fn`` each).
        random_start: start from ``x + U(-eps, eps)`` (Madry et al.) instead of ``x``;
            the ECCV 2020 evaluation uses no random start (its footnote 3).
        generator: torch RNG for the random start.
        delta0: an explicit initial perturbation ``[B, ...]`` (projected onto the ball);
            takes precedence over ``random_start``. Attacks use it for random starts that
            are seeded per sample index, so that results do not depend on batching.

    Returns:
        The adversarial batch after ``steps`` iterations (the last iterate, as in Eq. 6),
        detached, with ``||x_adv - x||_inf <= eps`` and ``x_adv in [0, 1]``. Where eps is
        0 the output equals ``x`` exactly.

    Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so no
    parameter ``.grad`` is ever populated. The caller chooses eval/train mode and
    grad mode (:class:`attacks.attack.Attack` handles both).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    x = x.detach()
    eps_b = _per_sample(eps, x, "eps")
    alpha_b = _per_sample(alpha, x, "alpha")
    if isinstance(eps_b, float):
        if eps_b == 0.0:
            return x.clone()  # nothing to optimize: exactly the clean input
        if eps_b < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps_b}")
    elif bool((eps_b < 0).any()):
        raise ValueError("eps must be >= 0 for every sample")
    elif bool((eps_b == 0).all()):
        return x.clone()

    if delta0 is not None:
        if delta0.shape != x.shape:
            raise ValueError(f"delta0 must have the shape of x {tuple(x.shape)}, got {tuple(delta0.shape)}")
        x_adv = project_linf(x + delta0.to(x), x, eps_b)
    elif random_start:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = project_linf(x + (2.0 * u - 1.0) * eps_b, x, eps_b)
    else:
        x_adv = x.clone()

    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(x_adv)
        if loss.shape != (x.shape[0],):
            raise ValueError(
                f"loss_fn must return per-instance losses of shape [{x.shape[0]}], got {tuple(loss.shape)}"
            )
        # Instances are independent: d(sum)/dx_i = dL_i/dx_i.
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        observe_step(loss, grad)
        x_adv = project_linf(x_adv.detach() - alpha_b * grad.sign(), x, eps_b)
    return x_adv.detach()
