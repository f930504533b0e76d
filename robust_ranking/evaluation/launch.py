"""Run a universal or transfer evaluation inside a Lightning ``Trainer.test``, on 1 or N devices.

The per-sample ranking runner reaches DDP through ``Trainer.test`` with the
:class:`callbacks.RobustnessEvaluation` callback; the universal and transfer runners take the same
road with a tiny LightningModule whose only job is to call ``work(collectives, device)`` once on
every rank (in ``on_test_epoch_end``, after a one-item test loop). So ``devices > 1`` uses
Lightning's own DDP launch (``strategy="ddp"``: the script is started again for every other rank)
and no process is started here. ``work`` receives the engine's
:class:`evaluation.engine.StrategyCollectives` and the rank's device; it runs outside inference
mode and with gradients enabled (the attacks differentiate), whatever Lightning's test loop uses
(``inference_mode`` on GPU, ``no_grad`` with gloo).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from robust_ranking.evaluation.engine import Collectives, StrategyCollectives

__all__ = ["run_distributed", "stop_vote"]


class _Work(pl.LightningModule):
    """Calls ``work(collectives, device)`` once per rank; keeps its return value (no parameters, no data)."""

    def __init__(self, work: Callable[[Collectives, torch.device], Any]) -> None:
        super().__init__()
        self._work = work
        self.result: Any = None

    def test_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=1)  # one step per rank (no distributed sampler: see the Trainer)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def on_test_epoch_end(self) -> None:
        trainer = self.trainer
        with torch.inference_mode(False), torch.enable_grad():
            self.result = self._work(StrategyCollectives(trainer), trainer.strategy.root_device)


def run_distributed(work: Callable[[Collectives, torch.device], Any], *, accelerator: str = "auto",
                    devices: int = 1, num_nodes: int = 1, strategy: str | None = None) -> Any:
    """``work(collectives, device)`` on ``devices * num_nodes`` processes (more than one: DDP, or the
    ``strategy`` given); its result on rank 0, ``None`` on the other ranks. Exceptions raised by
    ``work`` propagate (on every rank)."""
    if strategy is None or (strategy == "auto" and devices * num_nodes > 1):
        strategy = "ddp" if devices * num_nodes > 1 else "auto"
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        use_distributed_sampler=False,
        inference_mode=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = _Work(work)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        trainer.test(module, verbose=False)
    return module.result if trainer.is_global_zero else None


def stop_vote(collectives: Any, should_stop: Callable[[], bool] | None, device: Any) -> bool:
    """``should_stop()`` on any rank, agreed by every rank (a collective under DDP: call it on all ranks)."""
    if should_stop is None:
        return False
    stop = bool(should_stop())
    if collectives is not None and int(collectives.world_size) > 1:
        flag = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64, device=device)
        stop = bool(collectives.all_gather(flag).amax() > 0)
    return stop
