"""The :class:`Attack` base class: argument validation and the attack lifecycle.

An attack is configured once (``eps``, PGD ``alpha`` / ``steps``, random start, seed, plus
its own arguments) and then called on batches::

    result = attack(model, gallery, images, sample_indices)

The base class owns everything that is not specific to an attack:

- capability check (``needs``) -> :class:`NotApplicableError`;
- input validation (shapes, index range, images finite and in ``[0, 1]``);
- model in eval mode, parameters with ``requires_grad=False`` for the duration of the call,
  both restored afterwards (per submodule / per parameter, also on error);
- ``torch.inference_mode(False)`` + ``torch.enable_grad()``, so an attack also works when the
  evaluation engine calls it from inside Lightning's ``trainer.test`` (inference mode) or a
  ``no_grad`` block; inference-mode input tensors are cloned into normal tensors, since
  autograd cannot save inference tensors for backward;
- PGD with the ECCV step rules, ``[0, 1]`` clamping and L-inf projection, with random starts
  seeded per sample index (:meth:`Attack.pgd`).

Subclasses implement :meth:`Attack.perturb`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.pgd import check_eps, eccv_step_rules, pgd_linf
from robust_ranking.attacks.selection import keyed_uniform

__all__ = ["Attack", "AttackResult", "NotApplicableError", "frozen_eval", "autograd_usable"]


class NotApplicableError(Exception):
    """The model lacks a capability the attack needs (e.g. ``codebooks`` for PQ attacks).

    Deliberately not a ``ValueError``: the suite runner skips and reports such
    combinations, while a ``ValueError`` means bad input.
    """


@dataclass
class AttackResult:
    """Outcome of one batched attack call (``B`` independent attack instances).

    Attributes:
        adversarial: ``[B, C, H, W]`` adversarial images.
        perturbation: ``adversarial - images``.
        metrics: per-instance ``[B]`` values, e.g. ``"rank"`` / ``"rank_clean"`` (normalized
            rank in percent, CA / QA), ``"sp_rank"`` / ``"sp_rank_clean"`` (QA),
            ``"shift"`` (ES).
        targets: ``[B, k]`` gallery indices of the chosen queries (CA) / candidates (QA).
        sp_targets: ``[B, G]`` gallery indices of the semantics-preserving set C_SP (QA).
    """

    adversarial: Tensor
    perturbation: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    targets: Tensor | None = None
    sp_targets: Tensor | None = None


def autograd_usable(t: Tensor) -> Tensor:
    """A tensor autograd can save: inference-mode tensors are cloned (call outside inference mode)."""
    return t.clone() if t.is_inference() else t


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters inside the block; previous state restored afterwards.

    Modes are restored per submodule (a model may deliberately keep, e.g., a frozen
    BatchNorm in eval mode while training), ``requires_grad`` per parameter.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_nonneg_float(value: Any, name: str, strictly_positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > 0 if strictly_positive else value >= 0)
    if not ok:
        bound = "> 0" if strictly_positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class Attack:
    """Base class of all attacks.

    Args:
        eps: L-inf budget in pixel units, in ``[0, 1]`` (ECCV 2020 Eq. 2).
        alpha: PGD step size; ``None`` -> the ECCV rule (:func:`attacks.pgd.eccv_step_rules`).
        steps: PGD iterations; ``None`` -> the ECCV rule.
        random_start: start PGD from a uniform point of the eps-ball. The noise is keyed by
            ``(seed, attack name, sample index)``, so it does not depend on batching. The
            paper's evaluation uses no random start.
        seed: seed of the target selection and of the random start.

    Class attributes:
        name: short name used in reports and as the RNG stream ("CA+", "QA-", "ES").
        needs: capabilities (``model.capabilities``) the attack requires.
        needs_query_labels: whether ``query_labels`` must be passed (query / database protocol).
    """

    name: ClassVar[str] = "attack"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the attack measures against a database and needs the attacked queries' labels
    needs_query_labels: ClassVar[bool] = False

    def __init__(
        self,
        eps: float,
        alpha: float | None = None,
        steps: int | None = None,
        random_start: bool = False,
        seed: int = 0,
    ) -> None:
        check_eps(eps)
        default_alpha, default_steps = eccv_step_rules(float(eps))
        self.eps = float(eps)
        if alpha is not None:
            default_alpha = _check_nonneg_float(alpha, "alpha", strictly_positive=True)
        self.alpha = default_alpha
        self.steps = default_steps if steps is None else _check_positive_int(steps, "steps")
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be a bool, got {random_start!r}")
        self.random_start = random_start
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed

    # ------------------------------------------------------------------ description
    @property
    def hparams(self) -> dict[str, Any]:
        """The resolved configuration (defaults filled in), for reports."""
        return {"attack": self.name, "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
                "random_start": self.random_start, "seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items() if k != "attack")
        return f"{type(self).__name__}({args})"

    # -------------------------------------------------------------------- lifecycle
    def check_applicable(self, model: nn.Module) -> None:
        """Raise :class:`NotApplicableError` if ``model`` lacks a capability in ``needs``."""
        missing = set(self.needs) - set(getattr(model, "capabilities", set()) or set())
        if missing:
            raise NotApplicableError(
                f"{self.name} needs model capabilities {sorted(missing)}, which {type(model).__name__} lacks"
            )

    def __call__(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        """Attack ``images`` against ``gallery``: the one call signature of every per-sample attack.

        ``sample_indices`` are the attacked samples' indices (gallery members under the ECCV
        protocol, query-set indices under the query / database protocol); ``query_labels [B]`` are
        the queries' labels, which attacks of the query / database protocol need
        (:attr:`needs_query_labels`) and the others ignore.
        """
        self.check_applicable(model)
        sample_indices = self._validate_inputs(gallery, images, sample_indices)
        if query_labels is not None:
            query_labels = torch.as_tensor(query_labels)
            if query_labels.shape != (images.shape[0],):
                raise ValueError(f"query_labels must be [B={images.shape[0]}], got shape {tuple(query_labels.shape)}")
        elif self.needs_query_labels:
            raise ValueError(f"{self.name} measures AP against a database: pass query_labels=<the attacked "
                             "queries' labels [B]>")
        with torch.inference_mode(False), torch.enable_grad(), frozen_eval(model):
            images = autograd_usable(images)
            sample_indices = autograd_usable(sample_indices).to(images.device)
            embeddings = autograd_usable(gallery.embeddings).to(images.device)
            gallery = Gallery(embeddings, autograd_usable(gallery.labels))
            if query_labels is not None:
                query_labels = autograd_usable(query_labels).to(images.device)
            return self.perturb(model, gallery, images, sample_indices, query_labels)

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        """The attack proper; runs inside the lifecycle (eval, frozen, grad enabled)."""
        raise NotImplementedError

    def _validate_inputs(self, gallery: Gallery, images: Tensor, sample_indices: Tensor) -> Tensor:
        if not isinstance(gallery, Gallery):
            raise ValueError(f"gallery must be an attacks.Gallery, got {type(gallery).__name__}")
        if not isinstance(images, Tensor) or images.dim() < 2 or not images.is_floating_point():
            raise ValueError("images must be a floating tensor [B, ...]")
        if not isinstance(sample_indices, Tensor):
            sample_indices = torch.as_tensor(sample_indices)
        if sample_indices.dim() != 1 or sample_indices.shape[0] != images.shape[0]:
            raise ValueError(
                f"sample_indices must be [B={images.shape[0]}], got shape {tuple(sample_indices.shape)}"
            )
        if sample_indices.dtype.is_floating_point or sample_indices.dtype == torch.bool:
            raise ValueError(f"sample_indices must be an integer tensor, got {sample_indices.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images must contain at least one sample")
        n = len(gallery)
        if int(sample_indices.min()) < 0 or int(sample_indices.max()) >= n:
            raise ValueError(f"sample_indices must be gallery indices in [0, {n})")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images must be finite (they contain NaN / inf values)")
        if float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise ValueError("images must be in [0, 1] (normalization belongs inside the model)")
        return sample_indices.long()

    # ---------------------------------------------------------------------- helpers
    def pgd(self, loss_fn: Callable[[Tensor], Tensor], images: Tensor, sample_indices: Tensor,
            delta0: Tensor | None = None) -> Tensor:
        """:func:`attacks.pgd.pgd_linf` with this attack's eps / alpha / steps.

        With ``random_start`` the start is keyed per sample index (stream ``"<name>/start"``),
        so a sample gets the same start whatever batch it is in. ``delta0`` overrides it.
        """
        if delta0 is None and self.random_start and self.eps > 0:
            u = keyed_uniform(self.seed, sample_indices, tuple(images.shape[1:]), stream=f"{self.name}/start",
                              dtype=images.dtype)
            delta0 = (2.0 * u - 1.0) * self.eps
        return pgd_linf(loss_fn, images, self.eps, self.alpha, self.steps, delta0=delta0)
