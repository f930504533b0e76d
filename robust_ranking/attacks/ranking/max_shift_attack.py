"""Maximum-shift-distance attack (ES), ECCV 2020 Sec. 3.3, and the crafting function of Eq. 13."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult, autograd_usable
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.pgd import pgd_linf
from robust_ranking.attacks.selection import keyed_uniform

__all__ = ["MaxShiftAttack", "max_shift_perturb", "embedding_shift"]

#: Amplitude (fraction of eps) of the symmetry-breaking start used without random start.
JITTER = 1e-2


def embedding_shift(model: nn.Module, x_adv: Tensor, clean_embeddings: Tensor) -> Tensor:
    """``d(f(x_adv), f(x))`` per sample ``[B]``: the model's distance on diagonal pairs only
    (``[B, 1, D]`` views through the batched ``distance``, not a ``[B, B]`` matrix)."""
    return model.distance(model.embed(x_adv)[:, None, :], clean_embeddings[:, None, :]).view(-1)


def _shift_loss(model: nn.Module, clean_embeddings: Tensor):
    def loss_fn(x: Tensor) -> Tensor:
        return -embedding_shift(model, x, clean_embeddings)  # maximize the shift

    return loss_fn


def max_shift_perturb(
    model: nn.Module,
    x: Tensor,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Craft ``x + argmax_{r in Gamma} d(f(x + r), f(x))`` for a batch (Eq. 13's inner max).

    For the adversarial-training callback: the model's train/eval mode and its parameters'
    ``requires_grad`` flags are left exactly as the caller set them (the callback decides,
    e.g., how BatchNorm behaves while crafting: in train mode every one of the ``steps + 1``
    forwards here updates BatchNorm running statistics). Gradients are taken w.r.t. the input only
    (``torch.autograd.grad``), so no parameter ``.grad`` is created or changed. Works under
    ``no_grad`` / ``inference_mode`` callers too.

    Without ``random_start`` the first iterate is ``x`` plus a tiny uniform jitter of
    amplitude ``JITTER * eps`` drawn from ``generator`` (see :class:`MaxShiftAttack` for why).
    Returns the detached adversarial batch.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = autograd_usable(x).detach()
        eps_t = eps.to(x) if isinstance(eps, Tensor) else None
        with torch.no_grad():
            clean = model.embed(x).detach()
        amplitude = (eps_t.view(-1, *([1] * (x.dim() - 1))) if eps_t is not None else float(eps))
        amplitude = amplitude * (1.0 if random_start else JITTER)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta0 = (2.0 * u - 1.0) * amplitude
        return pgd_linf(_shift_loss(model, clean), x, eps, alpha, steps, delta0=delta0)


class MaxShiftAttack(Attack):
    """Push each embedding as far as possible from its clean position (ES).

    Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, Sec. 3.3:
    ``r = argmax_{r in Gamma} d(x + r, x)``, i.e. PGD on ``-d(f(x~), f(x))`` with the model's
    own ``distance``. The paper uses it to craft the adversarial training examples of its
    defense (Eq. 13) and reports the resulting embedding shift (Fig. 2).

    Departure: the gradient of any distance vanishes at its minimum ``r = 0``, so PGD started
    exactly at x cannot move (Euclidean: exactly zero gradient; cosine: only float round-off).
    Without ``random_start`` we therefore start from x plus a tiny uniform jitter of amplitude
    ``JITTER * eps`` (1% of eps), keyed per sample index like every other random draw here,
    so results stay deterministic and independent of batching. With ``random_start`` the
    start is uniform in the full eps-ball.

    Metric: ``metrics["shift"] = d(f(x~), f(x))`` per sample, with f(x) from a fresh embed of
    the clean images (so eps = 0 gives d(f(x), f(x)), i.e. 0 up to the distance's round-off).

    Args:
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
    """

    name = "ES"

    def __init__(
        self,
        eps: float,
        alpha: float | None = None,
        steps: int | None = None,
        random_start: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed)

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        with torch.no_grad():
            clean = model.embed(images)
        delta0 = None
        if self.eps > 0:
            u = keyed_uniform(self.seed, sample_indices, tuple(images.shape[1:]), stream=f"{self.name}/start",
                              dtype=images.dtype)
            delta0 = (2.0 * u - 1.0) * (self.eps * (1.0 if self.random_start else JITTER))
        adversarial = self.pgd(_shift_loss(model, clean), images, sample_indices, delta0=delta0)
        with torch.no_grad():
            shift = embedding_shift(model, adversarial, clean)
        return AttackResult(
            adversarial=adversarial,
            perturbation=adversarial - images,
            metrics={"shift": shift},
            targets=None,
        )
