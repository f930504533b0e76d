"""Max-shift-distance adversarial training (Zhou et al., "Adversarial Ranking Attack and Defense",
ECCV 2020, Sec. 3.3, Eq. 13) as a Lightning callback that any ranker can use.

Eq. 13 trains the ranking loss on adversarial versions of *every* image of the batch (anchor,
positive and negative alike)::

    L_d-t(q, c_p, c_n) = L_triplet(q + r_q*, c_p + r_p*, c_n + r_n*),
    r_x* = argmax_{r in Gamma} d(f(x + r), f(x)),   Gamma = {||r||_inf <= eps, x + r in [0, 1]}

i.e. each image is pushed as far as possible from its own clean embedding (the "maximum shift
distance" attack) and the model learns to rank those pushed images correctly. The paper trains
"with the strongest adversary following the procedure of Madry defense" (Sec. 4): eps = 0.3,
alpha = 0.01, 30 PGD steps on MNIST / Fashion-MNIST.

The callback crafts the adversarial batch in ``on_train_batch_start`` and writes it into the
batch's image tensor *in place*, so the unmodified ``training_step`` of any ranker trains on it.
See ``docs/defense.md`` for the options, the departures from the paper and the measured cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from robust_ranking.attacks.attack import frozen_eval
from robust_ranking.attacks.pgd import eccv_step_rules
from robust_ranking.attacks.ranking.max_shift_attack import embedding_shift, max_shift_perturb
from robust_ranking.lightning_modules.capabilities import TrainingLossRanker

__all__ = ["MaxShiftAdversarialTraining"]

_NAME = "MaxShiftAdversarialTraining"
# RNG streams derived from (seed, epoch, batch_idx, rank): which samples to replace, PGD start.
_STREAM_SELECT, _STREAM_START = 0, 1


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _derived_seed(*words: int) -> int:
    """A well-mixed 63-bit seed from integer words (numpy's SeedSequence hashing)."""
    entropy = [int(w) & 0xFFFFFFFFFFFFFFFF for w in words]  # SeedSequence wants non-negative ints
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class MaxShiftAdversarialTraining(pl.Callback):
    """Replace (or mix) every training batch's images with their max-shift adversarial versions.

    Args:
        eps: L-inf budget in pixel units, in ``[0, 1]`` (paper: 0.3 on MNIST / Fashion-MNIST).
            ``eps = 0`` disables the defense: the batch is never touched and training is
            bit-identical to vanilla training.
        alpha: PGD step size; ``None`` -> the ECCV 2020 rule
            ``min(max(eps / 10, 1 / 255), 0.01)`` (0.01 for eps = 0.3).
        steps: PGD iterations; ``None`` -> the ECCV rule ``min(max(10, 2 eps / alpha), 30)``
            (30 for eps = 0.3). Crafting costs ``steps`` forward+backward passes per image.
        random_start: start PGD from a uniform point of the eps-ball (Madry et al.); without it
            (the paper) PGD starts from ``x`` plus a 1%-of-eps jitter, because the gradient of
            ``d(f(x + r), f(x))`` vanishes at ``r = 0`` (see :class:`attacks.MaxShiftAttack`).
        mix_ratio: fraction of the batch replaced by adversarial examples. 1.0 replaces all
            images (Eq. 13); ``< 1`` replaces ``round(mix_ratio * B)`` images chosen at random
            (seeded per ``(seed, epoch, batch_idx, global_rank)``) and keeps the others clean,
            so the loss mixes clean and adversarial tuples. Only the chosen images are crafted.
        warmup_epochs: epochs of vanilla training before the defense switches on.
        ramp_epochs: after the warm-up, eps grows linearly from 0 to ``eps`` over this many
            epochs, updated every training step (alpha is scaled by the same factor, so that
            ``alpha * steps / eps`` stays fixed); 0 -> full eps at once.
        seed: seed of the random choices (mix selection, PGD start); the draws are a pure
            function of ``(seed, epoch, batch_idx, global_rank)``, independent of the global RNG,
            so switching the defense on or off does not change any other random draw.

    Logged through ``pl_module.log`` (step and epoch means, like ``train/loss``):

    - ``train/adv_eps``: the eps in force for this step (0 during warm-up);
    - ``train/shift_distance``: mean ``d(f(x_adv), f(x))`` of the crafted images with the model's
      own :meth:`~lightning_modules.Ranker.distance`, in eval mode (the quantity of Fig. 2);
    - ``train/adv_loss``: the loss the training step returned on the (partly) adversarial batch,
      i.e. the same value as the module's ``train/loss``, taken from the step's output (no extra
      forward);
    - ``train/clean_loss`` (only when ``mix_ratio < 1`` and the module has ``compute_loss``): the
      loss of the images left clean, computed under ``no_grad`` in eval mode.
    """

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float | None = None,
        steps: int | None = None,
        random_start: bool = False,
        mix_ratio: float = 1.0,
        warmup_epochs: int = 0,
        ramp_epochs: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not _is_number(eps) or not math.isfinite(eps):
            raise ValueError(f"{_NAME}: eps must be a finite number in [0, 1], got {eps!r}")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"{_NAME}: eps must be in [0, 1] (pixel units), got {eps}")
        default_alpha, default_steps = eccv_step_rules(float(eps))
        if alpha is not None and (not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"{_NAME}: alpha must be a finite number > 0, got {alpha!r}")
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(f"{_NAME}: steps must be an integer >= 1, got {steps!r}")
        if not isinstance(random_start, bool):
            raise ValueError(f"{_NAME}: random_start must be a bool, got {random_start!r}")
        if not _is_number(mix_ratio) or not 0.0 <= mix_ratio <= 1.0:
            raise ValueError(f"{_NAME}: mix_ratio must be a number in [0, 1], got {mix_ratio!r}")
        for name, value in (("warmup_epochs", warmup_epochs), ("ramp_epochs", ramp_epochs)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{_NAME}: {name} must be an integer >= 0, got {value!r}")
        if not _is_int(seed):
            raise ValueError(f"{_NAME}: seed must be an integer, got {seed!r}")
        self.eps = float(eps)
        self.alpha = float(alpha) if alpha is not None else default_alpha
        self.steps = int(steps) if steps is not None else default_steps
        self.random_start = random_start
        self.mix_ratio = float(mix_ratio)
        self.warmup_epochs = int(warmup_epochs)
        self.ramp_epochs = int(ramp_epochs)
        self.seed = int(seed)
        self._crafted_batch_size = 0  # > 0 between a crafting batch start and its batch end

    def __repr__(self) -> str:
        return (
            f"{_NAME}(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, random_start={self.random_start}, "
            f"mix_ratio={self.mix_ratio}, warmup_epochs={self.warmup_epochs}, ramp_epochs={self.ramp_epochs}, "
            f"seed={self.seed})"
        )

    # ------------------------------------------------------------------ schedule
    def current_eps(self, epoch: int, batch_idx: int = 0, num_batches: int | float = 1) -> float:
        """The eps in force at ``(epoch, batch_idx)`` of an epoch of ``num_batches`` steps.

        0 during the warm-up; then ``eps * min(1, t / ramp_epochs)`` with
        ``t = epoch - warmup_epochs + (batch_idx + 1) / num_batches`` (the ramp reaches the full
        eps on the last step of its last epoch). Epochs of unknown length (iterable datasets,
        ``num_batches`` infinite) ramp per epoch instead.
        """
        if self.eps == 0.0 or epoch < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs == 0:
            return self.eps
        if isinstance(num_batches, (int, float)) and math.isfinite(num_batches) and num_batches >= 1:
            progress = (min(batch_idx, int(num_batches) - 1) + 1) / int(num_batches)
        else:
            progress = 1.0
        t = epoch - self.warmup_epochs + progress
        return self.eps * min(1.0, t / self.ramp_epochs)

    def num_adversarial(self, batch_size: int) -> int:
        """How many images of a batch of ``batch_size`` are replaced: ``round(mix_ratio * B)``
        (halves round up)."""
        return min(batch_size, int(math.floor(self.mix_ratio * batch_size + 0.5)))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        missing = [m for m in ("embed", "distance") if not callable(getattr(pl_module, m, None))]
        if missing:
            raise TypeError(
                f"{_NAME} needs a ranker with embed() and distance() (lightning_modules.Ranker); "
                f"{type(pl_module).__name__} lacks {', '.join(missing)}"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._crafted_batch_size = 0
        epoch = trainer.current_epoch
        eps_now = self.current_eps(epoch, batch_idx, trainer.num_training_batches)
        images, labels = self._images_and_labels(batch)
        batch_size = images.shape[0]
        pl_module.log("train/adv_eps", eps_now, on_step=True, on_epoch=True, batch_size=batch_size)
        n_adv = self.num_adversarial(batch_size)
        if eps_now == 0.0 or n_adv == 0:
            return  # vanilla step: the batch, the model and every RNG stay untouched

        rank = int(getattr(trainer, "global_rank", 0))
        chosen: Tensor | None = None
        if n_adv < batch_size:
            # Which images to replace: a private CPU generator keyed by the step, so the choice is
            # reproducible, differs across ranks, and leaves the global RNG alone.
            select = torch.Generator().manual_seed(_derived_seed(self.seed, epoch, batch_idx, rank, _STREAM_SELECT))
            chosen = torch.randperm(batch_size, generator=select)[:n_adv].sort().values.to(images.device)
        start = torch.Generator(device=images.device)
        start.manual_seed(_derived_seed(self.seed, epoch, batch_idx, rank, _STREAM_START))
        alpha_now = self.alpha * eps_now / self.eps  # same alpha/eps geometry during the ramp

        x = images.detach() if chosen is None else images.detach().index_select(0, chosen)
        # Eval mode while crafting: BatchNorm uses (and does not update) its running statistics,
        # dropout is off, SyncBatchNorm does no collective; parameters are frozen so no .grad
        # can appear. Modes and requires_grad flags are restored per submodule afterwards.
        # pl_module.embed is called directly, not through the DDP wrapper: nothing is synced.
        with frozen_eval(pl_module):
            x_adv = max_shift_perturb(
                pl_module, x, eps_now, alpha_now, self.steps, random_start=self.random_start, generator=start
            )
            with torch.no_grad():
                # Two extra no-grad forwards (clean + adversarial) for the logged shift.
                shift = embedding_shift(pl_module, x_adv, pl_module.embed(x)).mean()
                clean_loss = None
                if chosen is not None and isinstance(pl_module, TrainingLossRanker):
                    keep = torch.ones(batch_size, dtype=torch.bool, device=images.device)
                    keep[chosen] = False
                    clean_loss = pl_module.compute_loss(pl_module.embed(images[keep]), labels[keep])

        # In place: Lightning hands this very batch object to training_step (and a NamedTuple
        # cannot be re-assigned), so writing into its image tensor is what the step will see.
        with torch.no_grad():
            if chosen is None:
                images.copy_(x_adv)
            else:
                images.index_copy_(0, chosen, x_adv.to(images.dtype))

        self._crafted_batch_size = batch_size
        pl_module.log("train/shift_distance", shift, on_step=True, on_epoch=True, batch_size=n_adv)
        if clean_loss is not None:
            pl_module.log(
                "train/clean_loss", clean_loss, on_step=True, on_epoch=True, batch_size=batch_size - n_adv
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        batch_size, self._crafted_batch_size = self._crafted_batch_size, 0
        if batch_size == 0:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return  # the step was skipped (returned None) or returned no loss
        loss = loss.detach()
        if pl_module.automatic_optimization:
            # Lightning divides the returned loss by accumulate_grad_batches before handing it over.
            loss = loss * trainer.accumulate_grad_batches
        pl_module.log("train/adv_loss", loss, on_step=True, on_epoch=True, batch_size=batch_size)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _images_and_labels(batch: Any) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of a ``(images, labels, indices)`` batch (``RetrievalBatch`` or tuple)."""
        if (
            isinstance(batch, Sequence)
            and len(batch) >= 2
            and isinstance(batch[0], Tensor)
            and batch[0].is_floating_point()
            and batch[0].dim() >= 2
        ):
            return batch[0], batch[1]
        raise TypeError(
            f"{_NAME} expects batches (images [B, C, H, W] float, labels, indices), got {type(batch).__name__}"
        )
