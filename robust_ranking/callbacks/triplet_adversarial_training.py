"""Triplet-based adversarial training of RobRank / RobDML as Lightning callbacks any ranker can use:

- :class:`AntiCollapseTripletTraining` (ACT): Zhou et al., "Adversarial Attack and Defense in Deep
  Ranking" (TPAMI, arXiv 2106.03614). For triplets mined on the clean embeddings, PGD moves the
  positive and the negative *towards each other* (``min d(f(p + r_p), f(n + r_n))``: the collapse an
  attacker aims at), and the model trains on ``(a, p + r_p, n + r_n)`` with the anchor clean.
- :class:`HardnessManipulationTraining` (HM): Zhou & Patel, "Enhancing Adversarial Robustness for Deep
  Metric Learning" (CVPR 2022). For source triplets, PGD perturbs ``(a, p, n)`` until their hardness
  ``H = d(a, p) - d(a, n)`` reaches a destination hardness ``H_D`` (Eq. 3,
  ``min || max(0, H_D - H~_S) ||^2``); ``H_D`` is the hardness of another sampling strategy's triplets
  (HM[S, M]: softhard source, semihard destination) or the linear gradual adversary
  ``g_LGA = -margin * min(margin, loss_{t-1}) / margin``; the optional intra-class structure term
  ``L_ICS = lambda * max(0, d(a, a~) - d(a, p))`` is added to the training loss.

Both rewrite the training batch *in place* into the triplet layout ``[anchors; positives; negatives]``
(``Tensor.set_`` on the image, label and index tensors, so the very batch object Lightning hands to
``training_step`` changes), and the ranker's unmodified ``training_step`` trains its own loss on it.
Crafting runs in eval mode with frozen parameters (BatchNorm buffers and parameter gradients
untouched), and calls ``pl_module.embed`` directly, not the DDP wrapper. See docs/defense.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor

from robust_ranking.attacks.attack import frozen_eval
from robust_ranking.callbacks.max_shift_adversarial_training import _derived_seed, _is_int, _is_number

__all__ = ["AntiCollapseTripletTraining", "HardnessManipulationTraining", "mine_triplets"]

STRATEGIES = ("random", "semihard", "softhard")
_STREAM_MINE, _STREAM_DEST = 2, 3
_SATURATION = 1e-7  # RobDML stops PGD once its objective changes by less than this


# ---------------------------------------------------------------------------------------------- mining
def _pick(mask: Tensor, fallback: Tensor, generator: torch.Generator) -> Tensor:
    """Per row, a uniformly random column where ``mask`` is true, else where ``fallback`` is."""
    use = torch.where(mask.any(dim=1, keepdim=True), mask, fallback)
    scores = torch.rand(use.shape, generator=generator).to(use.device)
    return torch.where(use, scores, torch.full_like(scores, -1.0)).argmax(dim=1)


def anchor_positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """SPC-2 pairs of a class-balanced batch: per class, its images in batch order are paired
    ``(1st, 2nd), (3rd, 4th), ...``; the first of a pair is an anchor, the second its positive."""
    anchors, positives = [], []
    for cls in torch.unique(labels, sorted=True):
        idx = torch.nonzero(labels == cls).flatten()
        pairs = idx[: 2 * (idx.numel() // 2)].view(-1, 2)
        anchors.append(pairs[:, 0])
        positives.append(pairs[:, 1])
    if not anchors:
        empty = labels.new_zeros(0, dtype=torch.long)
        return empty, empty
    anchor, positive = torch.cat(anchors), torch.cat(positives)
    order = anchor.argsort()
    return anchor[order], positive[order]


def mine_triplets(dist_matrix: Tensor, labels: Tensor, strategy: str, margin: float,
                  generator: torch.Generator, anchors: Tensor | None = None,
                  positives: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(anchors, positives, negatives)`` index tensors, one triplet per SPC-2 pair, following
    RobRank's ``spc2-*`` miners (``robrank/losses/miner.py``) with the model's own distance:

    - ``random``: the negative is a uniformly random image of another class;
    - ``semihard``: a random negative with ``d(a, p) < d(a, n) < d(a, p) + margin`` (Schroff et al.),
      falling back to ``random`` when the anchor has none;
    - ``softhard``: a random negative closer than the anchor's farthest positive and a random
      positive farther than its nearest negative (Roth et al.), each falling back to any.

    Rows whose anchor has no image of another class in the batch are dropped.
    """
    if anchors is None or positives is None:
        anchors, positives = anchor_positive_pairs(labels)
    other = labels[anchors].unsqueeze(1) != labels.unsqueeze(0)  # [T, B] negative candidates
    keep = other.any(dim=1)
    anchors, positives, other = anchors[keep], positives[keep], other[keep]
    d = dist_matrix[anchors]  # [T, B]
    d_ap = d.gather(1, positives.unsqueeze(1))  # [T, 1]
    if strategy == "random":
        negatives = _pick(other, other, generator)
    elif strategy == "semihard":
        negatives = _pick(other & (d > d_ap) & (d < d_ap + margin), other, generator)
    elif strategy == "softhard":
        same = ~other
        same[torch.arange(len(anchors), device=d.device), anchors] = False  # not the anchor itself
        far_pos = torch.where(same, d, torch.full_like(d, -math.inf)).amax(dim=1, keepdim=True)
        near_neg = torch.where(other, d, torch.full_like(d, math.inf)).amin(dim=1, keepdim=True)
        negatives = _pick(other & (d < far_pos), other, generator)
        positives = torch.where(same.any(dim=1), _pick(same & (d > near_neg), same, generator), positives)
    else:
        raise ValueError(f"unknown triplet strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return anchors, positives, negatives


# ---------------------------------------------------------------------------------------------- PGD
def signed_pgd_descent(pl_module: Any, x: Tensor, objective: Callable[[Tensor], Tensor], eps: float,
                       alpha: float, steps: int, stop_when_saturated: bool = False) -> tuple[Tensor, int]:
    """L-inf PGD that *minimizes* ``objective(embed(x~))`` from ``x~ = x`` (RobRank's update: a step of
    ``alpha * sign(grad)``, ``eps * sign(grad)`` when ``steps == 1``; projection onto the eps-ball and
    ``[0, 1]``). Gradients w.r.t. the input only. Returns the detached images and the steps taken."""
    step = eps if steps == 1 else alpha
    x0 = x.detach()
    x_adv = x0.clone()
    previous, taken = None, 0
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = objective(pl_module.embed(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach() - step * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
            taken += 1
            value = float(loss.detach())
            if stop_when_saturated and previous is not None and abs(previous - value) < _SATURATION:
                break
            previous = value
    return x_adv.detach(), taken


def _pair_distance(pl_module: Any, a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ``d(a_i, b_i)`` with the ranker's broadcasting distance."""
    return pl_module.distance(a.unsqueeze(1), b.unsqueeze(1)).reshape(-1)


# ---------------------------------------------------------------------------------------------- base
class _TripletAdversarialTraining(pl.Callback):
    """Shared parts: argument checks, triplet mining, the in-place batch rewrite, logging."""

    NAME = "TripletAdversarialTraining"

    def __init__(self, eps: float, alpha: float, steps: int, margin: float, warmup_epochs: int,
                 seed: int) -> None:
        super().__init__()
        name = self.NAME
        if not _is_number(eps) or not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
            raise ValueError(f"{name}: eps must be a number in [0, 1] (pixel units), got {eps!r}")
        if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{name}: alpha must be a finite number > 0, got {alpha!r}")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"{name}: steps must be an integer >= 1, got {steps!r}")
        if not _is_number(margin) or not math.isfinite(margin) or margin <= 0:
            raise ValueError(f"{name}: margin must be a finite number > 0, got {margin!r}")
        if not _is_int(warmup_epochs) or warmup_epochs < 0:
            raise ValueError(f"{name}: warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if not _is_int(seed):
            raise ValueError(f"{name}: seed must be an integer, got {seed!r}")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.margin, self.warmup_epochs, self.seed = float(margin), int(warmup_epochs), int(seed)
        self._crafted_batch_size = 0

    @staticmethod
    def _check_strategy(name: str, key: str, value: Any, allowed: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name}: {key} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def current_eps(self, epoch: int) -> float:
        return 0.0 if epoch < self.warmup_epochs else self.eps

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        missing = [m for m in ("embed", "distance") if not callable(getattr(pl_module, m, None))]
        if missing:
            raise TypeError(f"{self.NAME} needs a ranker with embed() and distance() (lightning_modules.Ranker); "
                            f"{type(pl_module).__name__} lacks {', '.join(missing)}")

    def _generator(self, trainer: pl.Trainer, batch_idx: int, stream: int) -> torch.Generator:
        rank = int(getattr(trainer, "global_rank", 0))
        return torch.Generator().manual_seed(_derived_seed(self.seed, trainer.current_epoch, batch_idx, rank, stream))

    @staticmethod
    def _unpack(batch: Any, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        if (isinstance(batch, Sequence) and len(batch) >= 2 and isinstance(batch[0], Tensor)
                and batch[0].is_floating_point() and batch[0].dim() >= 2 and isinstance(batch[1], Tensor)):
            extra = batch[2] if len(batch) >= 3 and isinstance(batch[2], Tensor) else None
            return batch[0], batch[1], extra
        raise TypeError(f"{name} expects batches (images [B, C, H, W] float, labels, indices), "
                        f"got {type(batch).__name__}")

    @staticmethod
    def _rewrite(batch_tensors: tuple[Tensor, Tensor, Tensor | None], order: Tensor, images: Tensor) -> None:
        """The batch becomes ``images`` with labels / indices gathered by ``order``, in place
        (``set_``: the same tensor objects, now of ``len(order)`` rows)."""
        x, y, idx = batch_tensors
        with torch.no_grad():
            y_new = y.index_select(0, order.to(y.device)).contiguous()
            idx_new = idx.index_select(0, order.to(idx.device)).contiguous() if idx is not None else None
            x.set_(images.to(x.dtype).contiguous())
            y.set_(y_new)
            if idx is not None:
                idx.set_(idx_new)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        batch_size, self._crafted_batch_size = self._crafted_batch_size, 0
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        loss = loss.detach()
        if pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it before handing it over
        self._after_step(float(loss), batch_size > 0)
        if batch_size > 0:
            pl_module.log("train/adv_loss", loss, on_step=True, on_epoch=True, batch_size=batch_size)

    def _after_step(self, loss: float, crafted: bool) -> None:
        """Hook for state that follows the training loss (HM's gradual adversary)."""


# ---------------------------------------------------------------------------------------------- ACT
class AntiCollapseTripletTraining(_TripletAdversarialTraining):
    """Anti-collapse triplet (ACT) adversarial training (RobRank, TPAMI; ``robrank/defenses/pnp.py``,
    ``pnp_training_step`` / ``pncollapse``).

    Per training step: embed the clean batch (eval mode, no grad), mine one triplet per SPC-2 pair with
    ``strategy`` (RobRank's default for its triplet losses: ``random``); PGD ``steps`` times on the
    positives and negatives together, *descending* ``mean d(f(p~), f(n~))`` (collapsing each pair, no
    random start, step ``alpha``); then the batch becomes ``[a; p~; n~]`` (anchors clean) with labels
    ``[y_a; y_p; y_n]`` and the ranker's own ``training_step`` trains on it.

    Args:
        eps: L-inf budget in pixel units; 0 disables the defense (the batch is never touched).
            RobRank on 28x28 data: 77/255 (0.302).
        alpha: PGD step (RobRank 28x28: 3/255).
        steps: PGD iterations (RobRank 28x28: 32; ``eps * sign`` when 1).
        strategy: triplet sampling of the clean batch: random, semihard, softhard (ACT[R], ACT[M], ACT[S]).
        margin: the semihard miner's margin (RobRank: 0.2 for cosine / unit-sphere distances).
        warmup_epochs: vanilla epochs first.
        seed: seed of the mining draws (private generators, per (seed, epoch, batch, rank)).

    Logged: ``train/adv_eps``, ``train/act_pn_distance_clean`` / ``train/act_pn_distance`` (mean
    ``d(p, n)`` before / after the collapse, eval mode), ``train/adv_loss`` (the step's loss).
    """

    NAME = "AntiCollapseTripletTraining"

    def __init__(self, eps: float = 77 / 255, alpha: float = 3 / 255, steps: int = 32, strategy: str = "random",
                 margin: float = 0.2, warmup_epochs: int = 0, seed: int = 0) -> None:
        super().__init__(eps, alpha, steps, margin, warmup_epochs, seed)
        self.strategy = self._check_strategy(self.NAME, "strategy", strategy, STRATEGIES)

    def __repr__(self) -> str:
        return (f"{self.NAME}(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, strategy={self.strategy!r}, "
                f"margin={self.margin}, warmup_epochs={self.warmup_epochs}, seed={self.seed})")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._crafted_batch_size = 0
        x, y, idx = self._unpack(batch, self.NAME)
        eps_now = self.current_eps(trainer.current_epoch)
        pl_module.log("train/adv_eps", eps_now, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if eps_now == 0.0:
            return  # vanilla step: batch, model and every RNG untouched
        with frozen_eval(pl_module):
            with torch.no_grad():
                emb = pl_module.embed(x)
                a, p, n = mine_triplets(pl_module.distance(emb, emb), y, self.strategy, self.margin,
                                        self._generator(trainer, batch_idx, _STREAM_MINE))
            if a.numel() == 0:
                return  # no triplet in this batch: a vanilla step
            t = a.numel()

            def collapse(e: Tensor) -> Tensor:
                return _pair_distance(pl_module, e[:t], e[t:]).mean()

            pn_adv, _ = signed_pgd_descent(pl_module, torch.cat([x[p], x[n]]), collapse, eps_now, self.alpha,
                                           self.steps)
            with torch.no_grad():
                before = _pair_distance(pl_module, emb[p], emb[n]).mean()
                after = collapse(pl_module.embed(pn_adv))
        self._rewrite((x, y, idx), torch.cat([a, p, n]), torch.cat([x[a].detach(), pn_adv]))
        self._crafted_batch_size = 3 * t
        pl_module.log("train/act_pn_distance_clean", before, on_step=True, on_epoch=True, batch_size=t)
        pl_module.log("train/act_pn_distance", after, on_step=True, on_epoch=True, batch_size=t)


# ---------------------------------------------------------------------------------------------- HM
class HardnessManipulationTraining(_TripletAdversarialTraining):
    """Hardness-manipulation (HM) adversarial training (RobDML, CVPR 2022; ``defenses/amd.py``,
    ``hm_training_step`` / ``HardnessManipulate``, the paper's ET objective, Eq. 3).

    Per training step: embed the clean batch (eval mode, no grad); mine ``source`` triplets and the
    destination hardness ``H_D`` per anchor (``destination`` triplets of the same anchors, or
    ``"lga"``: ``-margin * min(margin, max(0, loss_{t-1})) / margin``, the linear gradual adversary, with
    ``loss_{t-1}`` the previous step's training loss, 2.0 before the first); PGD ``steps`` times on
    ``(a, p, n)`` *descending* ``mean(max(0, H_D - H(a~, p~, n~))^2)``, stopping early once that value
    changes by less than 1e-7 (e.g. all triplets already as hard as their destination); the batch
    becomes ``[a~; p~; n~]`` and the ranker's own ``training_step`` trains on it. ``source ==
    destination`` perturbs nothing (RobDML's HM[S, S] = regular training on the source triplets).

    With ``ics_weight > 0`` the intra-class structure term
    ``ics_weight * mean(max(0, d(a, a~) - d(a, p)))`` (train mode: clean anchors and positives and the
    adversarial anchors) is added to the loss's gradient after the training step's backward (and
    averaged across DDP ranks); BatchNorm buffers are restored after its forward, so only the training
    step updates them.

    Args:
        eps, alpha, steps: the PGD budget (RobDML on 224x224: 8/255, 1/255, 8; defaults here: RobRank's
            28x28 budget 77/255, 3/255, 32).
        source: sampling of the perturbed triplets: random, semihard, softhard (paper's best: softhard).
        destination: random, semihard, softhard, or lga (gradual adversary; the paper's HM[S, g_LGA]).
        margin: gamma: semihard margin and the LGA scale/normalizer u (paper: u = gamma = 0.2).
        ics_weight: lambda of L_ICS (paper: 0.5; 0.05 on SOP); 0 = HM without ICS.
        warmup_epochs, seed: as for ACT.

    Logged: ``train/adv_eps``, ``train/hm_source_hardness`` / ``train/hm_destination_hardness`` (clean
    means), ``train/hm_adv_hardness`` (after PGD, eval mode), ``train/hm_pgd_steps``, ``train/ics_loss``,
    ``train/adv_loss``.
    """

    NAME = "HardnessManipulationTraining"
    DESTINATIONS = (*STRATEGIES, "lga")
    INITIAL_LOSS = 2.0  # RobDML: model._hm_prev_loss = 2.0 before the first step

    def __init__(self, eps: float = 77 / 255, alpha: float = 3 / 255, steps: int = 32, source: str = "softhard",
                 destination: str = "lga", margin: float = 0.2, ics_weight: float = 0.5, warmup_epochs: int = 0,
                 seed: int = 0) -> None:
        super().__init__(eps, alpha, steps, margin, warmup_epochs, seed)
        self.source = self._check_strategy(self.NAME, "source", source, STRATEGIES)
        self.destination = self._check_strategy(self.NAME, "destination", destination, self.DESTINATIONS)
        if not _is_number(ics_weight) or not math.isfinite(ics_weight) or ics_weight < 0:
            raise ValueError(f"{self.NAME}: ics_weight must be a finite number >= 0, got {ics_weight!r}")
        self.ics_weight = float(ics_weight)
        self.previous_loss = self.INITIAL_LOSS
        self._ics_images: tuple[Tensor, Tensor, Tensor] | None = None
        self._ics_step = False

    def __repr__(self) -> str:
        return (f"{self.NAME}(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, source={self.source!r}, "
                f"destination={self.destination!r}, margin={self.margin}, ics_weight={self.ics_weight}, "
                f"warmup_epochs={self.warmup_epochs}, seed={self.seed})")

    # gradual adversary state (resumes with the checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {"previous_loss": self.previous_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_loss = float(state_dict.get("previous_loss", self.INITIAL_LOSS))

    def _after_step(self, loss: float, crafted: bool) -> None:
        if crafted and math.isfinite(loss):
            self.previous_loss = loss

    def gradual_hardness(self) -> float:
        """``g_LGA = -margin * min(margin, max(0, loss_{t-1})) / margin`` in ``[-margin, 0]``."""
        return -self.margin * min(self.margin, max(0.0, self.previous_loss)) / self.margin

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if self.ics_weight > 0 and scaler is not None:
            raise ValueError(f"{self.NAME}: ics_weight > 0 is not supported with a gradient scaler (16-mixed); "
                             f"use 32-true or bf16-mixed, or ics_weight 0")

    def _hardness(self, pl_module: Any, ea: Tensor, ep: Tensor, en: Tensor) -> Tensor:
        return _pair_distance(pl_module, ea, ep) - _pair_distance(pl_module, ea, en)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._crafted_batch_size = 0
        self._ics_images = None
        x, y, idx = self._unpack(batch, self.NAME)
        eps_now = self.current_eps(trainer.current_epoch)
        self._ics_step = eps_now > 0 and self.ics_weight > 0  # identical on every rank (collective below)
        pl_module.log("train/adv_eps", eps_now, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if eps_now == 0.0:
            return
        with frozen_eval(pl_module):
            with torch.no_grad():
                emb = pl_module.embed(x)
                dmat = pl_module.distance(emb, emb)
                a, p, n = mine_triplets(dmat, y, self.source, self.margin,
                                        self._generator(trainer, batch_idx, _STREAM_MINE))
                if a.numel() == 0:
                    return
                h_src = self._hardness(pl_module, emb[a], emb[p], emb[n])
                if self.destination == "lga":
                    h_dst = torch.full_like(h_src, self.gradual_hardness())
                else:
                    da, dp, dn = mine_triplets(dmat, y, self.destination, self.margin,
                                               self._generator(trainer, batch_idx, _STREAM_DEST), anchors=a,
                                               positives=self._base_positives(a, y))
                    h_dst = self._hardness(pl_module, emb[da], emb[dp], emb[dn])
            t = a.numel()

            def shortfall(e: Tensor) -> Tensor:
                h = self._hardness(pl_module, e[:t], e[t:2 * t], e[2 * t:])
                return (h - h_dst).clamp(max=0.0).square().mean()

            x_apn = torch.cat([x[a], x[p], x[n]]).detach()
            if self.destination == self.source:
                x_adv, taken = x_apn, 0
            else:
                x_adv, taken = signed_pgd_descent(pl_module, x_apn, shortfall, eps_now, self.alpha, self.steps,
                                                  stop_when_saturated=True)
            with torch.no_grad():
                e_adv = pl_module.embed(x_adv)
                h_adv = self._hardness(pl_module, e_adv[:t], e_adv[t:2 * t], e_adv[2 * t:])
        if self._ics_step:
            self._ics_images = (x[a].detach().clone(), x_adv[:t].clone(), x[p].detach().clone())
        self._rewrite((x, y, idx), torch.cat([a, p, n]), x_adv)
        self._crafted_batch_size = 3 * t
        for key, value in (("hm_source_hardness", h_src.mean()), ("hm_destination_hardness", h_dst.mean()),
                           ("hm_adv_hardness", h_adv.mean()), ("hm_pgd_steps", float(taken))):
            pl_module.log(f"train/{key}", value, on_step=True, on_epoch=True, batch_size=t)

    @staticmethod
    def _base_positives(anchors: Tensor, labels: Tensor) -> Tensor:
        a0, p0 = anchor_positive_pairs(labels)
        lookup = torch.full((labels.numel(),), -1, dtype=torch.long, device=labels.device)
        lookup[a0] = p0
        return lookup[anchors]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ics_step:
            return
        self._ics_step = False
        images, self._ics_images = self._ics_images, None
        params = [q for q in pl_module.parameters() if q.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        ics_value, t = None, 0
        if images is not None:
            clean_a, adv_a, clean_p = images
            t = clean_a.shape[0]
            buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
            try:
                with torch.enable_grad():
                    e = pl_module.embed(torch.cat([clean_a, adv_a, clean_p]))
                    ea, ea_adv, ep = e[:t], e[t:2 * t], e[2 * t:]
                    ics = (_pair_distance(pl_module, ea, ea_adv) - _pair_distance(pl_module, ea, ep)).clamp(min=0).mean()
                    scale = self.ics_weight / (trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)
                    grads = list(torch.autograd.grad(ics * scale, params, allow_unused=True))
                ics_value = ics.detach()
            finally:
                with torch.no_grad():  # only the training step updates BatchNorm statistics
                    for b, saved in buffers:
                        b.copy_(saved)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        with torch.no_grad():
            for q, g in zip(params, grads):
                g = torch.zeros_like(q) if g is None else g
                if world > 1:  # every rank takes part, also one without triplets this step
                    dist.all_reduce(g)
                    g = g / world
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.add_(g)
        if ics_value is not None:
            pl_module.log("train/ics_loss", ics_value, on_step=True, on_epoch=True, batch_size=t)
