"""Universal (image-agnostic) ranking attacks I-CA+ / I-CA- / I-QA+ / I-QA-, ECCV 2020 Sec. 5.2.

Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, Eq. (14):

    r = argmin_{r in Gamma} sum_{c in C} L_CA+(c + r, Q; X)                       (Eq. 14)

i.e. ONE perturbation ``r [C, H, W]`` shared by every attacked candidate (I-CA) or query
(I-QA), with the per-sample losses of Sec. 3 (Eq. 4 / 7 / 9 / 11). Following Moosavi-Dezfooli
et al. (the paper's [49]) and Table 6, r is fitted on a "fit" set (5% of X), frozen, and then
measured on the fit set and on a disjoint "unseen" 5% of X.

Loss reuse: the per-sample :class:`CandidateAttack` / :class:`QueryAttack` build their loss as a
closure over the batch's targets and hand it to :meth:`Attack.pgd`. A private subclass
replaces ``pgd`` by "record the closure, return ``clip(x + r)``", so the universal attack
optimizes exactly the per-sample loss (same targets, same exclusions) and is measured with
exactly the per-sample metric code, without touching those modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from robust_ranking.attacks.attack import (
    AttackResult,
    _check_nonneg_float,
    _check_positive_int,
    autograd_usable,
    frozen_eval,
)
from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.gallery import Gallery, QuerySet
from robust_ranking.attacks.pgd import check_eps, eccv_step_rules
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.selection import nearest_excluding
from robust_ranking.attacks.universal.sharding import (
    is_distributed,
    map_batches,
    pad_rows,
    reduce_batch_gradient,
    shard_slice,
)

__all__ = ["UniversalRankingAttack", "UniversalRankingResult", "check_schedule", "fit_unseen_split",
           "perturbation_image"]

LossFn = Callable[[Tensor], Tensor]


class ScalarImageLogger(Protocol):
    """What the fit logs to: a ``torch.utils.tensorboard.SummaryWriter`` (or ``trainer.logger.experiment``)."""

    def add_scalar(self, tag: str, value: float, global_step: int) -> Any: ...

    def add_image(self, tag: str, img: Tensor, global_step: int) -> Any: ...


class _SharedPerturbation:
    """Mixin for a per-sample ranking attack: ``pgd`` adds a fixed ``shared`` r instead of optimizing.

    After a call, ``loss_fn`` is the attack's per-instance loss closure for that batch.
    """

    shared: Tensor | None = None
    loss_fn: LossFn | None = None

    def pgd(self, loss_fn: LossFn, images: Tensor, sample_indices: Tensor, delta0: Tensor | None = None) -> Tensor:
        self.loss_fn = loss_fn
        if self.shared is None:
            return images
        return (images + self.shared.to(images)).clamp(0.0, 1.0)  # c + r in Gamma: the box per sample


class _SharedCandidateAttack(_SharedPerturbation, CandidateAttack):
    #: ``[w]`` gallery indices: one query set Q for every candidate (Eq. 14 read literally), or None.
    shared_targets: Tensor | None = None

    def select_queries(self, gallery: Gallery, model: nn.Module, sample_indices: Tensor) -> Tensor:
        if self.shared_targets is None:
            return super().select_queries(gallery, model, sample_indices)
        return self.shared_targets.to(sample_indices.device)[None, :].expand(sample_indices.shape[0], -1)


class _SharedQueryAttack(_SharedPerturbation, QueryAttack):
    #: ``[m]`` gallery indices: one candidate set C for every query, or None (per-query draws).
    shared_targets: Tensor | None = None

    def select_targets(self, gallery: Gallery, model: nn.Module, sample_indices: Tensor) -> tuple[Tensor, Tensor]:
        cands, sp = super().select_targets(gallery, model, sample_indices)
        if self.shared_targets is None:
            return cands, sp
        shared = self.shared_targets.to(cands.device)[None, :].expand(cands.shape[0], -1)
        if self.G == 0:
            return shared, sp
        d_q = model.distance(gallery.embeddings[sample_indices], gallery.embeddings)
        arange = torch.arange(len(gallery), device=d_q.device)
        not_sp = (arange == sample_indices[:, None]) | (arange == shared[:, :, None]).any(1)
        return shared, nearest_excluding(d_q, self.G, exclude=not_sp)


def check_schedule(eps: float, epochs: Any, batch_size: Any, step: Any, momentum: Any) -> tuple[int, int, float, float]:
    """Validate the fit schedule shared by every universal attack -> ``(epochs, batch_size, step, momentum)``.

    ``step=None`` becomes the ECCV alpha rule for ``eps`` (:func:`attacks.pgd.eccv_step_rules`);
    momentum must lie in ``[0, 1)`` (1 would never forget the first gradient).
    """
    check_eps(eps)
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size")
    step = eccv_step_rules(float(eps))[0] if step is None else _check_nonneg_float(step, "step", True)
    momentum = _check_nonneg_float(momentum, "momentum")
    if momentum >= 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return epochs, batch_size, step, momentum


def fit_unseen_split(n: int, fraction: float = 0.05, seed: int = 0, size: int | None = None) -> tuple[Tensor, Tensor]:
    """Two disjoint random index sets of ``max(1, round(fraction * n))`` items each (Sec. 5.2: 5% + 5% of X).

    ``size`` gives the number of items per set directly (``fraction`` is then ignored).
    """
    if size is None:
        if not 0.0 < fraction <= 0.5:
            raise ValueError(f"fraction must be in (0, 0.5], got {fraction!r}")
        k = max(1, round(fraction * n))
    else:
        k = _check_positive_int(size, "size")
    if 2 * k > n:
        raise ValueError(f"a gallery of {n} items cannot hold two disjoint sets of {k}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values, perm[k : 2 * k].sort().values


def perturbation_image(r: Tensor, eps: float) -> Tensor:
    """``r [C, H, W]`` mapped from ``[-eps, eps]`` to ``[0, 1]`` (0 -> grey) for TensorBoard."""
    scale = eps if eps > 0 else 1.0
    return (r.detach().cpu() / (2.0 * scale) + 0.5).clamp(0.0, 1.0)


@dataclass
class UniversalRankingResult:
    """A fitted universal perturbation and its effect (Table 6 layout).

    Attributes:
        perturbation: the frozen ``r [C, H, W]``, ``||r||_inf <= eps``.
        fit: per-sample metrics on the fit set (``"rank"``, ``"rank_clean"``, percent; QA adds
            ``"sp_rank"`` / ``"sp_rank_clean"``).
        unseen: the same on the unseen set (``None`` when none was given).
        history: mean ``"rank"`` on the fit set after each epoch (the effect curve).
        fit_targets / unseen_targets: ``[B, k]`` target indices (Q for I-CA, C for I-QA).
    """

    perturbation: Tensor
    fit: dict[str, Tensor]
    unseen: dict[str, Tensor] | None = None
    history: list[float] = field(default_factory=list)
    fit_targets: Tensor | None = None
    unseen_targets: Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Mean clean / adversarial ranks, e.g. ``{"fit/rank_clean": 50.1, "fit/rank": 18.3, ...}``."""
        out: dict[str, float] = {}
        for split, metrics in (("fit", self.fit), ("unseen", self.unseen)):
            for key in ("rank_clean", "rank"):
                if metrics is not None:
                    out[f"{split}/{key}"] = float(metrics[key].float().mean())
        return out


class UniversalRankingAttack:
    """Fit one perturbation r for a set of candidates (I-CA+/-) or queries (I-QA+/-), ECCV 2020 Eq. 14.

    Schedule (the paper gives none; ours follows the batched UAP practice of [49] with
    signed steps as in Eq. 6):

    - r starts at 0; the fit set is cut, in index order, into batches of ``batch_size``
      (targets of each batch are drawn once, per sample index, as in the per-sample attacks);
    - for ``epochs`` epochs, for every batch: ``g = grad_r sum_b L(clip(x_b + r))`` (the
      per-sample CA/QA loss of every instance, all sharing r), momentum accumulation of the
      L1-normalized gradient ``m <- momentum * m + g / mean|g|`` (MI-FGSM style, so batch loss
      scale does not matter), step ``r <- clip_[-eps, eps](r - step * sign(m))``;
    - each perturbed sample is clipped to ``[0, 1]`` (Gamma of Eq. 2, per sample);
    - after each epoch the mean normalized rank on the fit set is recorded (``history``) and,
      with a ``logger``, written to TensorBoard with the perturbation image.

    With ``collectives`` (DDP, see :mod:`attacks.universal.sharding`) every rank computes the
    per-sample gradients of its slice of each fit batch, the batch's gradient is their sum in sample
    order (as one process sums it), and every rank takes the same step; the measurements are split
    by whole batches. Every rank ends with the same r and the same metrics.

    Args:
        kind: ``"CA"`` (perturb candidates, targets are w queries) or ``"QA"`` (perturb queries,
            targets are m candidates).
        direction: ``"+"`` raise / ``"-"`` lower the rank of the targets.
        size: w (I-CA) or m (I-QA); Table 6 uses 1.
        eps: L-inf budget in pixel units.
        epochs, batch_size: the fit schedule.
        step: signed step size; ``None`` -> the ECCV rule's alpha for eps
            (:func:`attacks.pgd.eccv_step_rules`).
        momentum: momentum of the signed steps (0 = plain signed gradient descent).
        seed: target-selection seed (keyed per sample index, as in the per-sample attacks).
        percent: top-ranking pool of the "-" attacks (Sec. 4: 1%).
        xi, G: SP term of I-QA; Table 6 sets ``xi = 0`` (our default, and ``G = 0``).
        shared_targets: "+" attacks only: ONE target set (w queries for I-CA, m candidates for
            I-QA) for every attacked sample -- Eq. 14 read literally ("a set of queries Q",
            the same for every c in C) -- drawn once (seeded) from X outside the fit and
            unseen sets. ``False`` (default): each sample draws its own targets, keyed by its
            index, exactly as the per-sample attack.
    """

    def __init__(
        self,
        kind: Literal["CA", "QA"],
        direction: Literal["+", "-"],
        size: int = 1,
        *,
        eps: float,
        epochs: int = 10,
        batch_size: int = 64,
        step: float | None = None,
        momentum: float = 0.9,
        seed: int = 0,
        percent: float = 1.0,
        xi: float = 0.0,
        G: int = 0,
        shared_targets: bool = False,
    ) -> None:
        if kind not in ("CA", "QA"):
            raise ValueError(f"kind must be 'CA' or 'QA', got {kind!r}")
        self.epochs, self.batch_size, self.step, self.momentum = check_schedule(eps, epochs, batch_size, step, momentum)
        self.kind = kind
        self.eps = float(eps)
        if not isinstance(shared_targets, bool):
            raise ValueError(f"shared_targets must be true or false, got {shared_targets!r}")
        if shared_targets and direction != "+":
            raise ValueError("shared_targets needs a '+' attack (the '-' targets are each sample's own top-ranked "
                             "neighbours)")
        self.shared_targets = shared_targets
        # The per-sample attack validates direction / size / percent / xi / G and owns the loss.
        self.inner: _SharedCandidateAttack | _SharedQueryAttack
        if kind == "CA":
            self.inner = _SharedCandidateAttack(direction, size, eps=eps, seed=seed, percent=percent)
        else:
            self.inner = _SharedQueryAttack(direction, size, eps=eps, seed=seed, percent=percent, xi=xi, G=G)

    @property
    def name(self) -> str:
        return f"I-{self.inner.name}"

    @property
    def hparams(self) -> dict[str, Any]:
        inner = {k: v for k, v in self.inner.hparams.items() if k not in ("attack", "alpha", "steps", "random_start")}
        return {"attack": self.name, **inner, "epochs": self.epochs, "batch_size": self.batch_size,
                "step": self.step, "momentum": self.momentum, "shared_targets": self.shared_targets}

    def draw_shared_targets(self, gallery_size: int, exclude: Tensor) -> Tensor | None:
        """With ``shared_targets``: draw the one target set (seeded) from X minus ``exclude`` and use it."""
        if not self.shared_targets:
            return None
        size = self.inner.w if isinstance(self.inner, CandidateAttack) else self.inner.m
        allowed = torch.ones(gallery_size, dtype=torch.bool)
        allowed[torch.as_tensor(exclude).long().cpu()] = False
        pool = allowed.nonzero().flatten()
        if pool.numel() < size:
            raise ValueError(f"shared_targets: {size} targets needed outside the attacked sets, {pool.numel()} left")
        pick = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(self.inner.seed))[:size]
        self.inner.shared_targets = pool[pick]
        return self.inner.shared_targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams.items())})"

    # ------------------------------------------------------------------------- API
    def __call__(
        self,
        model: nn.Module,
        gallery: Gallery,
        fit: QuerySet,
        unseen: QuerySet | None = None,
        logger: ScalarImageLogger | None = None,
        progress: bool = False,
        collectives: Any = None,
    ) -> UniversalRankingResult:
        """Fit r on the fit set, freeze it, measure it on the fit and the unseen set (Table 6).

        ``collectives``: split the work over the ranks of a DDP run (every rank calls this with the
        same arguments and gets the same result); ``None``: one process.
        """
        attacked = [torch.as_tensor(fit.indices)] + ([] if unseen is None else [torch.as_tensor(unseen.indices)])
        if unseen is not None and bool(torch.isin(torch.as_tensor(unseen.indices),
                                                  torch.as_tensor(fit.indices)).any()):
            raise ValueError("the unseen set must be disjoint from the fit set")
        self.draw_shared_targets(len(gallery), torch.cat(attacked))
        r, history = self.fit(model, gallery, fit.images, fit.indices, logger=logger, progress=progress,
                              collectives=collectives)
        fit_metrics, fit_targets = self.measure(model, gallery, fit.images, fit.indices, r, collectives)
        unseen_metrics, unseen_targets = None, None
        if unseen is not None:
            unseen_metrics, unseen_targets = self.measure(model, gallery, unseen.images, unseen.indices, r,
                                                          collectives)
        return UniversalRankingResult(
            perturbation=r,
            fit=fit_metrics,
            unseen=unseen_metrics,
            history=history,
            fit_targets=fit_targets,
            unseen_targets=unseen_targets,
        )

    def measure(self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor, r: Tensor,
                collectives: Any = None) -> tuple[dict[str, Tensor], Tensor]:
        """The per-sample metrics and ``[B, k]`` targets of the frozen ``r`` (:meth:`evaluate` without
        the images), split by whole batches over the ranks of ``collectives``."""
        self._check_perturbation(r, images)
        indices = torch.as_tensor(sample_indices)

        def batch(start: int, stop: int) -> dict[str, Tensor]:
            self.inner.shared = r.detach()
            try:
                res = self.inner(model, gallery, images[start:stop], indices[start:stop])
            finally:
                self.inner.shared, self.inner.loss_fn = None, None
            return {**{f"metric/{k}": v for k, v in res.metrics.items()}, "targets": res.targets}

        rows = map_batches(collectives, images.shape[0], self.batch_size, batch)
        metrics = {k.removeprefix("metric/"): v for k, v in rows.items() if k.startswith("metric/")}
        return metrics, rows["targets"]

    def evaluate(self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
                 r: Tensor) -> AttackResult:
        """Apply the frozen ``r`` to every image; metrics as the per-sample attack computes them."""
        self._check_perturbation(r, images)
        results = []
        for start in range(0, images.shape[0], self.batch_size):
            self.inner.shared = r.detach()
            try:
                results.append(self.inner(model, gallery, images[start : start + self.batch_size],
                                          torch.as_tensor(sample_indices)[start : start + self.batch_size]))
            finally:
                self.inner.shared, self.inner.loss_fn = None, None
        return AttackResult(
            adversarial=torch.cat([res.adversarial for res in results]),
            perturbation=torch.cat([res.perturbation for res in results]),
            metrics={k: torch.cat([res.metrics[k] for res in results]) for k in results[0].metrics},
            targets=torch.cat([res.targets for res in results]),
            sp_targets=None if results[0].sp_targets is None else torch.cat([res.sp_targets for res in results]),
        )

    def fit(
        self,
        model: nn.Module,
        gallery: Gallery,
        images: Tensor,
        sample_indices: Tensor,
        logger: ScalarImageLogger | None = None,
        progress: bool = False,
        collectives: Any = None,
    ) -> tuple[Tensor, list[float]]:
        """Optimize r (Eq. 14) with the schedule of the class docstring -> ``(r [C, H, W], history)``.

        ``progress`` shows a tqdm bar over the epochs (postfix: the fit set's mean rank).
        ``collectives``: each rank takes a slice of every batch (see the class docstring).
        """
        sample_indices = torch.as_tensor(sample_indices)
        if self.shared_targets and self.inner.shared_targets is None:
            self.draw_shared_targets(len(gallery), sample_indices)
        distributed = is_distributed(collectives)
        # One capture per batch: target selection + the loss closure, constant over the epochs. Under
        # DDP: this rank's slice of the batch, padded to the common slice width (None: an empty slice).
        losses: list[tuple[Tensor | None, LossFn | None, int, int, int, int]] = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            indices = sample_indices[start : start + self.batch_size]
            batch_len = len(batch)
            lo, hi, width = shard_slice(collectives, batch_len) if distributed else (0, batch_len, batch_len)
            if hi <= lo:
                losses.append((None, None, lo, hi, width, batch_len))
                continue
            if distributed:
                batch, indices = pad_rows(batch[lo:hi], width), pad_rows(indices[lo:hi], width)
            try:
                self.inner(model, gallery, batch, indices)
                assert self.inner.loss_fn is not None
                losses.append((autograd_usable(batch), self.inner.loss_fn, lo, hi, width, batch_len))
            finally:
                self.inner.loss_fn = None
        r = torch.zeros(images.shape[1:], dtype=images.dtype, device=images.device)
        velocity = torch.zeros_like(r)
        history: list[float] = []
        bar = tqdm(range(self.epochs), desc=self.name, unit="epoch", leave=False, disable=not progress)
        for epoch in bar:
            with torch.inference_mode(False), torch.enable_grad(), frozen_eval(model):
                for batch, loss_fn, lo, hi, width, batch_len in losses:
                    # Per-sample input gradients, summed over the batch in sample order: exactly what
                    # autograd does with the broadcast r in one process (``sum_to`` over dim 0).
                    if loss_fn is None:
                        grads = torch.zeros((width, *r.shape), dtype=r.dtype, device=r.device)
                    else:
                        x = (batch + r).requires_grad_(True)
                        (grads,) = torch.autograd.grad(loss_fn(x.clamp(0.0, 1.0)).sum(), x)
                    grad = (reduce_batch_gradient(collectives, grads, lo, hi, batch_len, width) if distributed
                            else grads.sum(0))
                    velocity = self.momentum * velocity + grad / grad.abs().mean().clamp_min(1e-12)
                    r = (r - self.step * velocity.sign()).clamp(-self.eps, self.eps)
            mean_rank = float(self.measure(model, gallery, images, sample_indices, r, collectives)[0]["rank"].mean())
            history.append(mean_rank)
            bar.set_postfix(fit_rank=f"{mean_rank:.1f}")
            if logger is not None:
                logger.add_scalar(f"universal/{self.name}/fit_rank", mean_rank, epoch)
                logger.add_image(f"universal/{self.name}/perturbation", perturbation_image(r, self.eps), epoch)
        return r.detach(), history

    def _check_perturbation(self, r: Tensor, images: Tensor) -> None:
        if r.shape != images.shape[1:]:
            raise ValueError(f"perturbation shape {tuple(r.shape)} does not match images {tuple(images.shape[1:])}")
        if float(r.abs().max()) > self.eps + 1e-6:
            raise ValueError(f"perturbation exceeds eps={self.eps}")
