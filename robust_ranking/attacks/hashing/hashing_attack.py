"""Shared machinery of the deep-hashing attacks SDHA, HAG and DHTA (Lu et al., ICMR 2021, Sec. 4-5).

Protocol (query / database, the hashing literature): the attacked ``images`` are queries, the
``gallery`` is the database. ``gallery.embeddings`` may hold the database sign codes
(``model.encode``, the recommended choice: what the retrieval index stores) or the tanh codes
(``model.embed``); either way the attack binarizes them with ``sgn`` (``> 0`` -> +1), so both
give the same codes. The queries' own labels are passed per call::

    gallery = Gallery(model.encode(database_images), database_labels)
    result = SDHAAttack()(model, gallery, query_images, query_indices, query_labels=query_labels)

Without ``query_labels`` the queries are taken to be gallery members (the ECCV gallery
protocol): labels ``gallery.labels[sample_indices]``, and each query's own database entry is
left out of its ranking and of its relevant set.

Every attack here runs the same loop (batched over queries, no per-sample Python loop), inside
the :class:`attacks.Attack` lifecycle (eval mode, frozen parameters, grad enabled):

1. one forward ``g = model.hash_logits(q + delta)`` of the batch of queries gives both the
   binary code ``sgn(g)`` (for the AP check and the AP weights) and the relaxed code
   ``f = tanh(gamma_t * g)`` with the schedule of Sec. 5.1 ("gamma = 0.1 for the first half of
   the iterations, then 0.2, 0.3, 0.5, 0.7, 1.0 for every 10% increment");
2. every ``check_every`` iterations (and after the last) the AP@topk of each query is
   measured against the database (Hamming distance, ties by database index); a query whose
   AP reached its bound (``goal_ap``: 0 untargeted, 1 targeted by default, Sec. 4.4) stops: its perturbation and
   optimizer state are frozen (masked). The batch keeps its shape (fixed-shape kernels keep a
   query's numbers independent of the others), and the loop ends when every query stopped;
3. one backward of the attack's per-query objective, and the attack's own optimizer step
   (SDHA: Adam, HAG: SGD with momentum, DHTA: sign steps) on the running queries, projected
   onto ``||delta||_inf <= eps`` and ``q + delta in [0, 1]``.

Per-query metrics (``AttackResult.metrics``, ``[B]`` each): ``ap`` (final), ``ap_clean``,
``l2`` (final perturbation norm), ``l2_at_target`` (l2 at the first check where the query's AP
reached its bound; NaN if never, so a mean over queries is the mean over the successful
ones), ``success`` (1 if the bound was reached), ``iterations`` (update steps taken). The AP is
measured w.r.t. the query's label (untargeted) or the target label (targeted). The per-check
trajectories are in :attr:`HashingAttackResult.trace` (see :mod:`attacks.hashing.attack_trace` for the
dataset-level "l2 at a preset mAP" and "mAP at an l2 budget").

Targeted attacks take the target label at construction: an int (every query gets it), or
``"random"``: for each query a label drawn uniformly among the gallery's labels other than the
query's, keyed by ``(seed, sample index)`` (the DHTA / SDHA protocol "a random label different
from the query's"), the same for every attack with the same seed, so SDHA, SDHA-UW and DHTA
attack towards the same targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult, NotApplicableError, _check_positive_int
from robust_ranking.attacks.hashing.attack_trace import AttackTrace
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.pgd import project_linf
from robust_ranking.attacks.selection import keys
from robust_ranking.lightning_modules.capabilities import HashingRanker
from robust_ranking.retrieval.average_precision import average_precision
from robust_ranking.retrieval.hashing_metrics import hamming_distance, sign_codes
from robust_ranking.retrieval.index import stable_topk

__all__ = ["PAPER_TANH_SCALES", "HashingAttack", "HashingAttackResult", "HashingContext", "logit_scale_factor",
           "scaled_tanh_scales"]

#: (fraction of the iterations from which it applies, tanh scale gamma), SDHA Sec. 5.1.
PAPER_TANH_SCALES: tuple[tuple[float, float], ...] = (
    (0.0, 0.1), (0.5, 0.2), (0.6, 0.3), (0.7, 0.5), (0.8, 0.7), (0.9, 1.0),
)

#: RNG stream of the random target labels, shared by every targeted hashing attack.
TARGET_STREAM = "hashing/target-label"

TargetLabel = int | Literal["random"] | None


@dataclass
class HashingAttackResult(AttackResult):
    """:class:`attacks.AttackResult` plus the hashing attacks' extras.

    Attributes:
        goal_labels: ``[B]`` the label the AP is measured against (query label when
            untargeted, target label when targeted).
        trace: per-check AP / l2 of every query (:class:`attacks.hashing.attack_trace.AttackTrace`).
    """

    goal_labels: Tensor | None = None
    trace: AttackTrace | None = None


@dataclass(frozen=True)
class HashingContext:
    """What an attack's objective may read; per-query tensors are indexed by batch row.

    Attributes:
        codes: ``[N, K]`` database sign codes (float ``{-1, 1}``).
        relevant: ``[B, N]`` database items with the goal label (own entry excluded).
        excluded: ``[B, N]`` items left out of the ranking (the query's own entry), or None.
        clean_codes: ``[B, K]`` sign codes of the clean queries.
        goal_labels: ``[B]`` see :class:`HashingAttackResult`.
        sample_indices: ``[B]`` the queries' indices (for per-query seeded draws).
    """

    codes: Tensor
    relevant: Tensor
    excluded: Tensor | None
    clean_codes: Tensor
    goal_labels: Tensor
    sample_indices: Tensor


@torch.no_grad()
def logit_scale_factor(model: nn.Module, images: Tensor) -> float:
    """``1 / median |g(q)|`` over clean queries: the factor that puts the gamma schedule in logit units.

    The gamma schedule of HAG / SDHA (0.1 ... 1.0) keeps ``tanh(gamma g)`` off its flat tails for
    hash layers whose logits ``g`` are large (tanh saturated). A model with small logits (a DCH
    trained with a cosine-normalized Cauchy loss is scale-free: our 64-bit model has median
    ``|g|`` = 0.12) gets ``tanh(0.1 g) ~ 0.01`` from it: the relaxed code is ~0 in every
    dimension, and SDHA's dimension-wise logistic ``sigma f h`` cannot tell dimensions apart.
    Multiplying the schedule by this factor makes ``gamma g`` of a median logit equal gamma, so
    the attack behaves the same for any rescaling of the hash layer (``g -> c g``). Compute it
    once per model and workload (not per batch: a batch-dependent schedule would make a query's
    result depend on its batch) and pass ``tanh_scales=scaled_tanh_scales(factor)``.
    """
    median = float(model.hash_logits(images).abs().median())
    if not (math.isfinite(median) and median > 0):
        raise ValueError(f"the median |hash logit| of the queries is {median}; cannot calibrate the tanh scale")
    return 1.0 / median


def scaled_tanh_scales(factor: float) -> tuple[tuple[float, float], ...]:
    """The paper's gamma schedule with every gamma multiplied by ``factor`` (> 0)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise ValueError(f"tanh_scale_factor must be a number > 0, got {factor!r}")
    return tuple((f, g * float(factor)) for f, g in PAPER_TANH_SCALES)


def _check_tanh_scales(scales: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    out = tuple((float(f), float(g)) for f, g in scales)
    fractions = [f for f, _ in out]
    if not out or fractions[0] != 0.0 or fractions != sorted(fractions) or fractions[-1] >= 1.0:
        raise ValueError(f"tanh_scales must start at fraction 0 and increase below 1, got {scales!r}")
    if any(not (math.isfinite(g) and g > 0) for _, g in out):
        raise ValueError(f"tanh scales must be finite and > 0, got {scales!r}")
    return out


class HashingAttack(Attack):
    """Base of the iterative deep-hashing attacks (the loop of the module docstring).

    Subclasses set :attr:`targeted` and implement :meth:`objective` (per-query loss to
    minimize) and the optimizer (:meth:`init_optimizer`, :meth:`update`); they may add setup
    (:meth:`prepare`) and an extra stopping rule (:meth:`finished`).

    Args:
        eps: L-inf budget in pixel units (SDHA: 0.039).
        steps: maximum number of iterations.
        lr: the optimizer's step size (Adam / SGD learning rate, sign-step size).
        target_label: targeted attacks: an int label or ``"random"`` (see the module
            docstring); must be None for untargeted ones.
        topk: AP@topk of the retrieval (SDHA / HAG: 1000).
        check_every: iterations between AP checks (SDHA: 10).
        tanh_scales: the gamma schedule as ``(fraction of steps, gamma)`` pairs.
        early_stop: stop each query when its AP reaches its bound (Sec. 4.4).
        goal_ap: the AP bound: a query that reaches it counts as successful (``success``,
            ``l2_at_target``) and stops (with ``early_stop``). None: the paper's, 0 untargeted
            and 1 targeted (Sec. 4.4); a looser bound (e.g. the workload's preset mAP) freezes
            a query as soon as it is good enough instead of pushing on to AP = 1.
        seed: seed of random target labels and other per-query draws.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"hash_bits"})
    targeted: bool = False

    def __init__(
        self,
        *,
        eps: float,
        steps: int,
        lr: float,
        target_label: TargetLabel = None,
        topk: int = 1000,
        check_every: int = 10,
        tanh_scales: Sequence[Sequence[float]] = PAPER_TANH_SCALES,
        early_stop: bool = True,
        goal_ap: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(eps, alpha=lr, steps=steps, random_start=False, seed=seed)
        self.lr = self.alpha
        self.topk = _check_positive_int(topk, "topk")
        self.check_every = _check_positive_int(check_every, "check_every")
        self.tanh_scales = _check_tanh_scales(tanh_scales)
        if not isinstance(early_stop, bool):
            raise ValueError(f"early_stop must be a bool, got {early_stop!r}")
        self.early_stop = early_stop
        if goal_ap is None:
            goal_ap = 1.0 if self.targeted else 0.0
        if isinstance(goal_ap, bool) or not isinstance(goal_ap, (int, float)) or not 0.0 <= goal_ap <= 1.0:
            raise ValueError(f"goal_ap must be an AP in [0, 1] or None, got {goal_ap!r}")
        self.goal_ap = float(goal_ap)
        if self.targeted:
            if target_label is None:
                raise ValueError(f"{type(self).__name__} is a targeted attack and needs target_label: an int class "
                                 "label, or 'random' for a per-query label different from the query's")
            if target_label != "random" and (isinstance(target_label, bool) or not isinstance(target_label, int)):
                raise ValueError(f"target_label must be an int label or 'random', got {target_label!r}")
        elif target_label is not None:
            raise ValueError(f"{type(self).__name__} is untargeted; target_label must be None, got {target_label!r}")
        self.target_label = target_label

    # ------------------------------------------------------------------ description
    @property
    def hparams(self) -> dict[str, Any]:
        base = {k: v for k, v in super().hparams.items() if k not in ("alpha", "random_start")}
        return {**base, "lr": self.lr, "targeted": self.targeted, "target_label": self.target_label,
                "topk": self.topk, "check_every": self.check_every,
                "tanh_scales": [list(s) for s in self.tanh_scales], "early_stop": self.early_stop,
                "goal_ap": self.goal_ap}

    # -------------------------------------------------------------------- lifecycle
    def check_applicable(self, model: nn.Module) -> None:
        """``hash_bits`` (the declared capability) and the ``hash_logits`` the attack differentiates."""
        super().check_applicable(model)
        if not isinstance(model, HashingRanker):
            raise NotApplicableError(f"{self.name} needs a lightning_modules.HashingRanker (hash_bits and "
                                     f"hash_logits(x)), which {type(model).__name__} is not")

    @property
    def check_iterations(self) -> list[int]:
        """The iterations at which AP and l2 are checked (and traced): every ``check_every`` and the last."""
        return list(range(0, self.steps, self.check_every)) + [self.steps]

    def tanh_scale(self, step: int) -> float:
        """gamma at iteration ``step`` (0-based) of the schedule."""
        frac = step / self.steps
        return next(g for f, g in reversed(self.tanh_scales) if frac >= f)

    def goal_labels(self, query_labels: Tensor, gallery: Gallery, sample_indices: Tensor) -> Tensor:
        """Untargeted: the query labels; targeted: the target labels (fixed or seeded random)."""
        if not self.targeted:
            return query_labels
        classes = torch.unique(gallery.labels)
        if self.target_label == "random":
            others = classes[None, :] != query_labels[:, None]
            if not bool(others.any(1).all()):
                raise ValueError("target_label='random' needs a gallery with at least two labels")
            k = keys(self.seed, sample_indices, torch.arange(classes.numel(), device=classes.device), TARGET_STREAM)
            k = k.masked_fill(~others, torch.iinfo(torch.int64).max)
            return classes[k.argmin(1)]
        if not bool((classes == self.target_label).any()):
            raise ValueError(f"target_label {self.target_label} does not occur in the gallery labels")
        return torch.full_like(query_labels, int(self.target_label))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- subclass hooks
    def prepare(self, ctx: HashingContext) -> dict[str, Tensor]:
        """Per-query constant tensors (``[B, ...]``) the objective needs, e.g. DHTA's anchor code."""
        return {}

    def objective(self, f: Tensor, signs: Tensor, delta: Tensor, ctx: HashingContext, rows: Tensor,
                  consts: dict[str, Tensor]) -> Tensor:
        """Per-query loss ``[b]`` to minimize, for the rows ``rows`` of the batch.

        ``f [b, K]`` relaxed codes ``tanh(gamma g)``; ``signs [b, K]`` their sign codes (no
        gradient); ``delta [b, ...]`` the perturbations (with gradient). Per-query tensors of
        ``ctx`` and ``consts`` are indexed with ``rows``.
        """
        raise NotImplementedError

    def init_optimizer(self, delta: Tensor) -> dict[str, Tensor]:
        """Per-query optimizer state for the whole batch."""
        return {}

    def update(self, delta: Tensor, grad: Tensor, state: dict[str, Tensor], rows: Tensor, step: int) -> Tensor:
        """The new perturbations of ``rows`` (projection is done by the caller)."""
        raise NotImplementedError

    def finished(self, signs: Tensor, ctx: HashingContext, rows: Tensor) -> Tensor:
        """Extra per-query stopping rule ``[b]`` checked with the AP (default: none)."""
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)

    # ------------------------------------------------------------------------ attack
    def average_precision(self, signs: Tensor, ctx: HashingContext, rows: Tensor) -> Tensor:
        """AP@topk ``[b]`` of query codes ``signs`` w.r.t. the goal labels (Hamming, stable ties).

        The hashing literature's AP@topk, normalized by the relevant items among the first ``topk``
        (:func:`retrieval.average_precision.average_precision` on the cut list, float32).
        """
        d = hamming_distance(signs, ctx.codes)
        if ctx.excluded is not None:
            d = d.masked_fill(ctx.excluded[rows], float("inf"))
        _, ids = stable_topk(d, min(self.topk, d.shape[1]))
        return average_precision(ctx.relevant[rows].gather(1, ids))

    def _reached(self, ap: Tensor) -> Tensor:
        return ap >= self.goal_ap - 1e-6 if self.targeted else ap <= self.goal_ap + 1e-6

    def _context(self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
                 query_labels: Tensor | None) -> HashingContext:
        device = images.device
        codes = sign_codes(gallery.embeddings.to(device).float())
        bits = getattr(model, "hash_bits", None)
        if codes.shape[1] != bits:
            raise ValueError(f"gallery codes have {codes.shape[1]} bits but the model has hash_bits={bits}; "
                             "build the gallery with model.encode(database images)")
        db_labels = gallery.labels.to(device)
        excluded = None
        if query_labels is None:  # gallery protocol: queries are gallery members
            query_labels = db_labels[sample_indices]
            excluded = torch.arange(len(gallery), device=device)[None, :] == sample_indices[:, None]
        else:
            query_labels = query_labels.to(device)
        goal = self.goal_labels(query_labels, Gallery(codes, db_labels), sample_indices)
        relevant = db_labels[None, :] == goal[:, None]
        if excluded is not None:
            relevant &= ~excluded
        with torch.no_grad():
            clean_codes = sign_codes(model.hash_logits(images))
        return HashingContext(codes, relevant, excluded, clean_codes, goal, sample_indices)

    def perturb(self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
                query_labels: Tensor | None = None) -> HashingAttackResult:
        ctx = self._context(model, gallery, images, sample_indices, query_labels)
        return self._optimize(model, images, ctx, self.prepare(ctx))

    def _optimize(self, model: nn.Module, images: Tensor, ctx: HashingContext,
                  consts: dict[str, Tensor]) -> HashingAttackResult:
        """One run of the loop of the module docstring from the clean queries."""
        batch = images.shape[0]
        delta = torch.zeros_like(images)
        opt_state = self.init_optimizer(delta)
        checks = self.check_iterations
        ap_trace = torch.zeros(batch, len(checks), device=images.device)
        l2_trace = torch.zeros_like(ap_trace)
        l2_at_target = torch.full((batch,), math.nan, device=images.device)
        iterations = torch.full((batch,), self.steps, dtype=torch.long, device=images.device)
        active = torch.ones(batch, dtype=torch.bool, device=images.device)
        every = torch.arange(batch, device=images.device)
        column = 0
        for step in range(self.steps + 1):
            if not bool(active.any()):
                break
            # The whole batch goes through the model every iteration, stopped queries masked:
            # fixed shapes keep each query's numbers independent of which others are still
            # running (batch-size dependent kernels), so results do not depend on batching.
            d = delta.clone().requires_grad_(step < self.steps)
            logits = model.hash_logits(images + d)
            signs = sign_codes(logits.detach())
            if step == checks[column]:
                with torch.no_grad():
                    ap = self.average_precision(signs, ctx, every)
                    ap_trace[:, column] = torch.where(active, ap, ap_trace[:, column - 1] if column else ap)
                    l2 = torch.linalg.vector_norm(delta.flatten(1), dim=1)
                    l2_trace[:, column] = l2
                    reached = active & self._reached(ap)
                    first = reached & torch.isnan(l2_at_target)
                    l2_at_target[first] = l2[first]
                    if self.early_stop:
                        done = active & (reached | self.finished(signs, ctx, every))
                        active &= ~done
                        iterations[done] = step
                column += 1
            if step == self.steps or not bool(active.any()):
                continue
            f = torch.tanh(self.tanh_scale(step) * logits)
            loss = self.objective(f, signs, d, ctx, every, consts)
            (grad,) = torch.autograd.grad(loss[active].sum(), d)
            rows = torch.nonzero(active).flatten()
            with torch.no_grad():
                new = self.update(delta[rows], grad[rows], opt_state, rows, step)
                x = images[rows]
                delta[rows] = project_linf(x + new, x, self.eps) - x
        if column < len(checks):  # everyone stopped early: carry the last values forward
            ap_trace[:, column:] = ap_trace[:, column - 1 : column]
            l2_trace[:, column:] = l2_trace[:, column - 1 : column]
        adversarial = (images + delta).clamp(0.0, 1.0).detach()
        final_ap = ap_trace[:, -1].clone()
        metrics = {
            "ap": final_ap,
            "ap_clean": ap_trace[:, 0].clone(),
            "l2": torch.linalg.vector_norm((adversarial - images).flatten(1), dim=1),
            "l2_at_target": l2_at_target,
            "success": (~torch.isnan(l2_at_target)).float(),
            "iterations": iterations.float(),
        }
        trace = AttackTrace(torch.tensor(checks), ap_trace.cpu(), l2_trace.cpu(), self.targeted)
        return HashingAttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics,
                                   targets=consts.get("targets"), goal_labels=ctx.goal_labels, trace=trace)
