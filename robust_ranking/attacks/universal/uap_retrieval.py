"""UAP-IR: universal adversarial perturbations against image retrieval (label / pair / list-wise).

Li et al., "Universal Perturbation Attack Against Image Retrieval", ICCV 2019 (ECCV 2020
ref. [36]), as summarized by the UAP-for-retrieval slides (``uap_image_retrieval_slides.txt``):

- label-wise (baseline, "same as UAP on classification"): ``L = -H(f(x_adv), y_gt)``, the
  cross-entropy of a classifier is maximized;
- pair-wise: a triplet loss with positive and negative swapped,
  ``L = ||f'_i - f_n||^2 - ||f'_i - f_p||^2 + alpha``, with ``f_p`` / ``f_n`` positive /
  negative *cluster* features (k-means on the gallery features);
- list-wise: drive the NDCG of the retrieved list to 0, ``DCG = sum_i (2^{y_i} - 1) / log2(i + 1)``;
- random resizing: the perturbation is resized to each input size, so one r attacks queries
  of various sizes;
- metrics: mAP, mP@10 (both lower = stronger attack) and the drop rate
  ``mDR = (mAP_clean - mAP_adv) / mAP_clean`` (higher = stronger).

Protocol: the attacked images are queries ranked against a database (the :class:`Gallery`);
when the queries are gallery members (``sample_indices`` given), each query's own entry is
removed from its ranking, as in the ECCV protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from robust_ranking.attacks.attack import _check_nonneg_float, _check_positive_int, autograd_usable, frozen_eval
from robust_ranking.attacks.gallery import Gallery, QuerySet
from robust_ranking.attacks.universal.sharding import (
    batch_starts,
    is_distributed,
    map_batches,
    pad_rows,
    reduce_batch_gradient,
    shard_slice,
)
from robust_ranking.attacks.universal.universal_ranking_attack import ScalarImageLogger, check_schedule, perturbation_image
from robust_ranking.retrieval.average_precision import average_precision, ranked_relevance

__all__ = ["UAPRetrieval", "UAPRetrievalResult", "resize_perturbation", "retrieval_metrics"]

Objective = Literal["label", "pair", "list"]


def resize_perturbation(r: Tensor, size: Sequence[int], eps: float | None = None) -> Tensor:
    """``r [C, H, W]`` resized bilinearly to ``size = (H', W')``, then clamped to ``[-eps, eps]``.

    Bilinear interpolation is a convex combination, so it cannot exceed ``||r||_inf``; the clamp
    guards the budget anyway (and applies a smaller ``eps`` when given). Differentiable in r.
    """
    if r.dim() != 3:
        raise ValueError(f"perturbation must be [C, H, W], got shape {tuple(r.shape)}")
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise ValueError(f"size must be positive, got {size}")
    out = r if tuple(r.shape[1:]) == size else F.interpolate(
        r[None], size=size, mode="bilinear", align_corners=False)[0]
    return out if eps is None else out.clamp(-eps, eps)


def _scaled_size(x: Tensor, scale: float) -> tuple[int, int]:
    if scale == 1.0:
        return (int(x.shape[-2]), int(x.shape[-1]))
    return (max(1, round(scale * x.shape[-2])), max(1, round(scale * x.shape[-1])))


def _resize_images(x: Tensor, scale: float) -> Tensor:
    if scale == 1.0:
        return x
    return F.interpolate(x, size=_scaled_size(x, scale), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def retrieval_metrics(
    model: nn.Module, gallery: Gallery, query_embeddings: Tensor, query_labels: Tensor,
    sample_indices: Tensor | None = None, cutoff: int = 10,
) -> dict[str, Tensor]:
    """Per-query AP over the whole ranking and precision at ``cutoff`` -> ``{"ap": [Q], "p@10": [Q]}``.

    Ranking by ``model.distance`` in float32 (ties by gallery index, stable); with
    ``sample_indices`` the query's own gallery entry is dropped from its ranking. AP is the
    full-ranking AP of UAP-IR's mAP (:func:`retrieval.average_precision.average_precision`,
    ``k=None``, float32).
    """
    d = model.distance(query_embeddings, gallery.embeddings).float()  # [Q, N]
    relevant = ranked_relevance(d, query_labels, gallery.labels, exclude_index=sample_indices)
    k = min(cutoff, relevant.shape[1])
    return {"ap": average_precision(relevant), f"p@{cutoff}": relevant[:, :k].float().mean(1)}


@dataclass
class UAPRetrievalResult:
    """A fitted UAP-IR perturbation and its effect.

    Attributes:
        perturbation: the frozen ``r [C, H, W]``.
        fit / unseen: ``{"mAP_clean", "mAP", "mP@10_clean", "mP@10", "mDR"}`` on each set.
        history: the objective's mean loss on the fit set after each epoch (lower = stronger).
    """

    perturbation: Tensor
    fit: dict[str, float]
    unseen: dict[str, float] | None = None
    history: list[float] = field(default_factory=list)


class UAPRetrieval:
    """UAP-IR (Li et al. 2019): one perturbation that corrupts retrieval for any query.

    Schedule: as :class:`attacks.UniversalRankingAttack` -- r = 0; for ``epochs`` epochs, for
    every batch of ``batch_size`` fit queries (index order): momentum over L1-normalized
    gradients, signed step ``step``, r clipped to ``[-eps, eps]``, each image clipped to
    ``[0, 1]``. With ``resize_range = (lo, hi)`` every batch draws a scale ``s ~ U(lo, hi)``
    (seeded), the query images are resized to ``s * (H, W)`` and r is resized to that size
    (:func:`resize_perturbation`) -- the slides' "random resizing"; the model must accept the
    sizes (a backbone with global pooling).

    With ``collectives`` (DDP) the fit and the measurements are split over the ranks as in
    :class:`attacks.UniversalRankingAttack` (per-sample gradients of each rank's slice of a batch,
    summed in sample order; measurements by whole batches); every rank draws the same resize
    scales and gets the same r and metrics.

    Objectives (each a per-query loss that is *minimized*):

    - ``"label"``: ``-CE(W f(x + r), y)``. The retrieval models have no classifier, so W is a
      linear probe trained with Adam for ``probe_steps`` full-batch steps on the clean gallery
      embeddings and labels (seeded), then frozen -- our stand-in for the "target classifier".
    - ``"pair"``: ``[d(f', c_n) - d(f', c_p) + margin]_+`` with ``c_p`` the k-means centre
      nearest to the clean query feature and ``c_n`` the farthest one (``negative="farthest"``;
      the slides do not say which negative: the farthest is the strongest swap) or the
      second-nearest one (``negative="nearest"``, the easiest swap). k-means (``num_clusters``,
      ``kmeans_iters`` Lloyd steps, seeded init) runs on the gallery embeddings; ``d`` is the
      ranker's own ``distance`` rather than the slides' squared L2, so cosine rankers are
      attacked in their own geometry.
    - ``"list"``: NDCG of the clean top-``ndcg_k`` list (relevance = same label as the query,
      gain ``2^y - 1``), with each item's position replaced by a sigmoid soft rank over the
      database (temperature ``tau``, in distance units), so it is differentiable.
      Only the clean top-k items enter (``O(B k N)`` memory instead of ``O(B N^2)``).

    Args:
        objective: ``"label"`` | ``"pair"`` | ``"list"``.
        eps: L-inf budget (pixel units).
        epochs, batch_size, step, momentum: the fit schedule (``step=None`` -> ECCV alpha rule).
        resize_range: ``(lo, hi)`` scale factors of the random resizing, ``None`` = off.
        seed: seed of the probe, k-means and resize draws.
        negative: the pair-wise objective's negative cluster, ``"farthest"`` or ``"nearest"``
            (the nearest centre other than the query's own).
        input_size: the model's fixed input size ``(H, W)`` (or one int), for backbones with
            fully-connected layers (LeNet, C2F1): every query, resized or not, is resized
            (bilinear) back to it right before ``model.embed``, as a retrieval pipeline's
            preprocessing would. The perturbation then has to survive that resampling.
            ``None``: queries are fed at their own size (needs a backbone with global pooling).
    """

    def __init__(
        self,
        objective: Objective,
        *,
        eps: float,
        epochs: int = 10,
        batch_size: int = 64,
        step: float | None = None,
        momentum: float = 0.9,
        resize_range: tuple[float, float] | None = None,
        num_clusters: int = 8,
        kmeans_iters: int = 20,
        margin: float = 0.1,
        negative: Literal["farthest", "nearest"] = "farthest",
        ndcg_k: int = 10,
        tau: float = 0.01,
        probe_steps: int = 100,
        seed: int = 0,
        input_size: int | Sequence[int] | None = None,
    ) -> None:
        if objective not in ("label", "pair", "list"):
            raise ValueError(f"objective must be 'label', 'pair' or 'list', got {objective!r}")
        self.epochs, self.batch_size, self.step, self.momentum = check_schedule(eps, epochs, batch_size, step, momentum)
        self.objective = objective
        self.eps = float(eps)
        if resize_range is not None:
            lo, hi = (float(v) for v in resize_range)
            if not 0.0 < lo <= hi or not math.isfinite(hi):
                raise ValueError(f"resize_range must be (lo, hi) with 0 < lo <= hi, got {resize_range!r}")
            resize_range = (lo, hi)
        self.resize_range = resize_range
        self.num_clusters = _check_positive_int(num_clusters, "num_clusters", minimum=2)
        self.kmeans_iters = _check_positive_int(kmeans_iters, "kmeans_iters")
        self.margin = _check_nonneg_float(margin, "margin")
        if negative not in ("farthest", "nearest"):
            raise ValueError(f"negative must be 'farthest' or 'nearest', got {negative!r}")
        self.negative = negative
        self.ndcg_k = _check_positive_int(ndcg_k, "ndcg_k")
        self.tau = _check_nonneg_float(tau, "tau", strictly_positive=True)
        self.probe_steps = _check_positive_int(probe_steps, "probe_steps")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if input_size is not None:
            pair = [input_size, input_size] if isinstance(input_size, int) else list(input_size)
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
                raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
            input_size = (pair[0], pair[1])
        self.input_size: tuple[int, int] | None = input_size

    @property
    def name(self) -> str:
        return f"UAP-IR/{self.objective}"

    @property
    def hparams(self) -> dict[str, Any]:
        return {"attack": self.name, "eps": self.eps, "epochs": self.epochs, "batch_size": self.batch_size,
                "step": self.step, "momentum": self.momentum, "resize_range": self.resize_range, "seed": self.seed,
                "input_size": self.input_size, **({"negative": self.negative} if self.objective == "pair" else {})}

    # ------------------------------------------------------------------ objectives
    def _probe(self, gallery: Gallery) -> nn.Linear:
        """Linear classifier on clean gallery embeddings (the label-wise baseline's classifier)."""
        classes = int(gallery.labels.max()) + 1
        probe = nn.Linear(gallery.embeddings.shape[1], classes).to(gallery.embeddings)
        with torch.no_grad():  # zero init: the problem is convex, and no global RNG is touched
            probe.weight.zero_()
            probe.bias.zero_()
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(self.probe_steps):
            loss = F.cross_entropy(probe(gallery.embeddings), gallery.labels.to(gallery.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return probe.requires_grad_(False)

    def _kmeans(self, model: nn.Module, emb: Tensor) -> Tensor:
        """Lloyd k-means with the ranker's distance (centres are means; seeded random init)."""
        k = min(self.num_clusters, emb.shape[0])
        g = torch.Generator().manual_seed(self.seed)
        centres = emb[torch.randperm(emb.shape[0], generator=g)[:k].to(emb.device)]
        for _ in range(self.kmeans_iters):
            assign = model.distance(emb, centres).argmin(1)
            onehot = F.one_hot(assign, k).to(emb.dtype)  # [N, k]
            counts = onehot.sum(0)
            means = onehot.T @ emb / counts.clamp_min(1.0)[:, None]
            centres = torch.where(counts[:, None] > 0, means, centres)  # empty cluster keeps its centre
        return centres

    def _loss_factory(self, model: nn.Module, gallery: Gallery):
        """Build ``loss(f_adv [B, D], f_clean [B, D], labels [B]) -> [B]`` for the objective."""
        if self.objective == "label":
            probe = self._probe(gallery)
            return lambda f, f0, y: -F.cross_entropy(probe(f), y, reduction="none")
        if self.objective == "pair":
            centres = self._kmeans(model, gallery.embeddings)

            def pair(f: Tensor, f0: Tensor, y: Tensor) -> Tensor:
                d0 = model.distance(f0, centres)  # [B, k] clean: which cluster is positive / negative
                pos = d0.argmin(1, keepdim=True)
                if self.negative == "farthest":
                    neg = d0.argmax(1, keepdim=True)
                else:  # the second-nearest centre: the closest cluster that is not the query's own
                    neg = d0.topk(2, dim=1, largest=False).indices[:, 1:2]
                d = model.distance(f, centres)
                return torch.relu(d.gather(1, neg) - d.gather(1, pos) + self.margin).squeeze(1)

            return pair
        k = min(self.ndcg_k, len(gallery))
        discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=gallery.embeddings.dtype,
                                                 device=gallery.device))

        def listwise(f: Tensor, f0: Tensor, y: Tensor) -> Tensor:
            top = model.distance(f0, gallery.embeddings).topk(k, dim=1, largest=False).indices  # [B, k]
            gain = (gallery.labels.to(y.device)[top] == y[:, None]).to(f.dtype)  # 2^1 - 1 = 1 / 0
            ideal = (gain.sort(1, descending=True).values * discount).sum(1).clamp_min(1e-12)
            d = model.distance(f, gallery.embeddings)  # [B, N]
            d_top = d.gather(1, top)
            soft_rank = 0.5 + torch.sigmoid((d_top[:, :, None] - d[:, None, :]) / self.tau).sum(-1)  # ~1-based
            return (gain / torch.log2(1.0 + soft_rank)).sum(1) / ideal  # NDCG, driven to 0

        return listwise

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
    ) -> UAPRetrievalResult:
        """Fit r on the fit queries, freeze it, measure mAP / mP@10 / mDR on fit and unseen queries.

        ``collectives``: split the work over the ranks of a DDP run (same result on every rank).
        """
        for name, queries in (("fit", fit), ("unseen", unseen)):
            if queries is not None and queries.labels is None:
                raise ValueError(f"UAP-IR measures retrieval: the {name} QuerySet needs labels")
        r, history = self.fit(model, gallery, fit.images, fit.labels, logger=logger, progress=progress,
                              collectives=collectives)
        fit_metrics = self.evaluate(model, gallery, fit.images, fit.labels, r, sample_indices=fit.indices,
                                    collectives=collectives)
        unseen_metrics = None
        if unseen is not None:
            unseen_metrics = self.evaluate(model, gallery, unseen.images, unseen.labels, r,
                                           sample_indices=unseen.indices, collectives=collectives)
        return UAPRetrievalResult(r, fit_metrics, unseen_metrics, history)

    def apply(self, images: Tensor, r: Tensor) -> Tensor:
        """``clip(x + resize(r))``: r resized to the images' size, each image kept in ``[0, 1]``."""
        return (images + resize_perturbation(r, images.shape[-2:], self.eps).to(images)).clamp(0.0, 1.0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, gallery: Gallery, images: Tensor, labels: Tensor, r: Tensor,
                 sample_indices: Tensor | None = None, scale: float = 1.0,
                 collectives: Any = None) -> dict[str, float]:
        """mAP / mP@10 clean and attacked, and mDR, with queries (and r) resized by ``scale``.

        The queries are embedded in batches of ``batch_size`` (split over the ranks of
        ``collectives``, whole batches, gathered by copying); the ranking runs on all of them at once.
        """
        if r.dim() != 3 or r.shape[0] != images.shape[1]:
            raise ValueError(f"perturbation must be [C={images.shape[1]}, H, W], got {tuple(r.shape)}")

        def embed(start: int, stop: int) -> dict[str, Tensor]:
            x = _resize_images(images[start:stop], scale)
            return {"clean": self._forward(model, x), "adv": self._forward(model, self.apply(x, r))}

        with frozen_eval(model):
            emb = map_batches(collectives, images.shape[0], self.batch_size, embed)
            clean = retrieval_metrics(model, gallery, emb["clean"], labels, sample_indices)
            adv = retrieval_metrics(model, gallery, emb["adv"], labels, sample_indices)
        map_clean, map_adv = float(clean["ap"].mean()), float(adv["ap"].mean())
        return {"mAP_clean": map_clean, "mAP": map_adv,
                "mP@10_clean": float(clean["p@10"].mean()), "mP@10": float(adv["p@10"].mean()),
                "mDR": (map_clean - map_adv) / map_clean if map_clean > 0 else 0.0}

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        """``model.embed(x)``, with x resized to ``input_size`` first for fixed-input backbones."""
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return model.embed(x)

    def fit(self, model: nn.Module, gallery: Gallery, images: Tensor, labels: Tensor,
            logger: ScalarImageLogger | None = None, progress: bool = False,
            collectives: Any = None) -> tuple[Tensor, list[float]]:
        """Optimize r with the class docstring's schedule -> ``(r [C, H, W], history)``; ``progress``: a tqdm bar.

        ``collectives``: each rank takes a slice of every batch (see the class docstring).
        """
        if images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError("images must be [B, C, H, W] with labels [B]")
        distributed = is_distributed(collectives)
        gen = torch.Generator().manual_seed(self.seed)
        r = torch.zeros(images.shape[1:], dtype=images.dtype, device=images.device)
        velocity = torch.zeros_like(r)
        history: list[float] = []
        with torch.inference_mode(False), torch.enable_grad(), frozen_eval(model):
            gallery = Gallery(autograd_usable(gallery.embeddings), autograd_usable(gallery.labels))
            images, labels = autograd_usable(images), autograd_usable(labels)
            loss_fn = self._loss_factory(model, gallery)
            batches = [(images[s : s + self.batch_size], labels[s : s + self.batch_size])
                       for s in range(0, images.shape[0], self.batch_size)]
            bar = tqdm(range(self.epochs), desc=self.name, unit="epoch", leave=False, disable=not progress)
            for epoch in bar:
                for x, y in batches:
                    scale = 1.0
                    if self.resize_range is not None:  # every rank draws the same scale
                        lo, hi = self.resize_range
                        scale = lo + (hi - lo) * float(torch.rand((), generator=gen))
                    batch_len = x.shape[0]
                    start, stop, width = shard_slice(collectives, batch_len) if distributed else (0, batch_len,
                                                                                                 batch_len)
                    r_var = r.clone().requires_grad_(True)
                    r_sized = resize_perturbation(r_var, _scaled_size(x, scale), self.eps)
                    # Per-sample input gradients of this rank's queries, summed over the batch in sample
                    # order (as autograd sums the broadcast r in one process), then through the resize.
                    if stop <= start:
                        grads = torch.zeros((width, *r_sized.shape), dtype=r.dtype, device=r.device)
                    else:
                        xs, ys = x[start:stop], y[start:stop]
                        if distributed:
                            xs, ys = pad_rows(xs, width), pad_rows(ys, width)
                        xs = _resize_images(xs, scale)
                        with torch.no_grad():
                            f0 = self._forward(model, xs)
                        adv = (xs + r_sized.detach()).requires_grad_(True)
                        (grads,) = torch.autograd.grad(
                            loss_fn(self._forward(model, adv.clamp(0.0, 1.0)), f0, ys).sum(), adv)
                    summed = (reduce_batch_gradient(collectives, grads, start, stop, batch_len, width)
                              if distributed else grads.sum(0))
                    (grad,) = torch.autograd.grad(r_sized, r_var, grad_outputs=summed)
                    velocity = self.momentum * velocity + grad / grad.abs().mean().clamp_min(1e-12)
                    r = (r - self.step * velocity.sign()).clamp(-self.eps, self.eps)
                with torch.no_grad():  # effect curve: the objective on the (unresized) fit set
                    def objective(start: int, stop: int, r: Tensor = r) -> dict[str, Tensor]:
                        x, y = images[start:stop], labels[start:stop]
                        return {"loss": loss_fn(self._forward(model, self.apply(x, r)), self._forward(model, x), y)}

                    per_query = map_batches(collectives, images.shape[0], self.batch_size, objective)["loss"]
                    total = sum(float(per_query[s : s + self.batch_size].sum())
                                for s in batch_starts(images.shape[0], self.batch_size))
                history.append(total / images.shape[0])
                bar.set_postfix(fit_loss=f"{history[-1]:.4f}")
                if logger is not None:
                    logger.add_scalar(f"universal/{self.name}/fit_loss", history[-1], epoch)
                    logger.add_image(f"universal/{self.name}/perturbation", perturbation_image(r, self.eps), epoch)
        return r.detach(), history
