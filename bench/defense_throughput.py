"""Training throughput of the defenses (max-shift, ACT, HM) relative to vanilla training.

For each ``--steps`` value, one Lightning ``fit`` of the model (same initialization, same
batches) in which training batches *alternate* between vanilla (even batch index) and defended
(odd batch index: :class:`callbacks.MaxShiftAdversarialTraining` crafts the batch). Every batch
is timed from the first ``on_train_batch_start`` hook (before crafting) to ``on_train_batch_end``
(after the optimizer step). Throughput = ``batch_size`` / median batch time, separately for the
vanilla and the defended batches of the same run; pairing them this way keeps the ratio honest
on a shared machine whose load changes from minute to minute.

Crafting costs ``steps`` forward+backward passes (input gradient only) plus two no-grad
forwards for the logged shift, so the ideal throughput ratio is about ``1 / (steps + 1)``.

CPU run reported in docs/defense.md (about 2 minutes on 2 idle cores)::

    .venv/bin/python bench/defense_throughput.py --data fashion-mnist --backbone c2f1 \
        --batch-size 128 --pairs 12 --warmup-pairs 1 --steps 10 30 --threads 2

``--defense act hm`` times the triplet defenses instead (docs/defense.md, "ACT and HM"): their
defended step trains on ``[a; p~; n~]``, 1.5x the loader batch, and HM's PGD may stop early; images/s
count the loader batch (``--batch-size``) for both columns. HM is timed with its ICS term (one extra
forward + backward of 1.5x the batch)::

    .venv/bin/python bench/defense_throughput.py --data synthetic --backbone c2f1 --batch-size 32 \
        --samples-per-class 4 --pairs 4 --warmup-pairs 1 --steps 8 --defense max_shift act hm --threads 2

``--data synthetic`` uses 28x28 synthetic images when Fashion-MNIST is not installed;
``--device cuda`` times on a GPU (synchronizing around each batch).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.callbacks import (
    AntiCollapseTripletTraining,
    HardnessManipulationTraining,
    MaxShiftAdversarialTraining,
)
from robust_ranking.data import FashionMNISTDataModule, RetrievalDataModule, SyntheticDataModule
from robust_ranking.lightning_modules import C2F1, LeNet, MetricRanker


class BatchTimer(pl.Callback):
    """Wall time of each training batch (crafting + training step + optimizer step) by batch index."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[int, float] = {}
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times[batch_idx] = time.perf_counter() - self._start


class OddBatches:
    """Mixin: the defense on odd batch indices only, so vanilla and defended batches interleave."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % 2 == 1:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % 2 == 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class OddBatchDefense(OddBatches, MaxShiftAdversarialTraining):
    pass


class OddBatchACT(OddBatches, AntiCollapseTripletTraining):
    pass


class OddBatchHM(OddBatches, HardnessManipulationTraining):
    pass  # on_after_backward (ICS) only acts on steps whose on_train_batch_start crafted


DEFENSES = {
    "max_shift": lambda a, steps: OddBatchDefense(eps=a.eps, alpha=a.alpha, steps=steps),
    "act": lambda a, steps: OddBatchACT(eps=a.eps, alpha=a.alpha, steps=steps),
    "hm": lambda a, steps: OddBatchHM(eps=a.eps, alpha=a.alpha, steps=steps),
}


def make_data(kind: str, batch_size: int, samples_per_class: int, batches: int) -> RetrievalDataModule:
    if kind == "fashion-mnist":
        return FashionMNISTDataModule(batch_size=batch_size, samples_per_class=samples_per_class, download=False)
    per_class = -(-batches * batch_size // 10) + samples_per_class  # enough for `batches` batches
    return SyntheticDataModule(batch_size=batch_size, samples_per_class=samples_per_class, num_classes=10,
                               train_per_class=per_class, test_per_class=4)


def make_model(backbone: str, embedding_dim: int) -> MetricRanker:
    torch.manual_seed(0)
    net = C2F1(embedding_dim=embedding_dim) if backbone == "c2f1" else LeNet(embedding_dim=embedding_dim)
    return MetricRanker(backbone=net, loss=TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))


def time_pairs(args: argparse.Namespace, data: RetrievalDataModule, steps: int,
               defense_name: str = "max_shift") -> tuple[list[float], list[float]]:
    """``(vanilla, defended)`` wall times of the timed pairs (after ``--warmup-pairs``)."""
    device = torch.device(args.device)
    timer = BatchTimer(device)
    defense = DEFENSES[defense_name](args, steps)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=2 * (args.warmup_pairs + args.pairs),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[timer, defense],  # the timer first, so its start precedes the crafting
    )
    trainer.fit(make_model(args.backbone, args.embedding_dim), datamodule=data)
    timed = [i for i in sorted(timer.times) if i >= 2 * args.warmup_pairs]
    return [timer.times[i] for i in timed if i % 2 == 0], [timer.times[i] for i in timed if i % 2 == 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["fashion-mnist", "synthetic"], default="synthetic")
    parser.add_argument("--backbone", choices=["c2f1", "lenet"], default="c2f1")
    parser.add_argument("--embedding-dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=12, help="timed (vanilla, defended) batch pairs per run")
    parser.add_argument("--warmup-pairs", type=int, default=1, help="untimed pairs first")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30], help="PGD steps of the defense")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--defense", nargs="+", choices=sorted(DEFENSES), default=["max_shift"])
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.warmup_pairs < 0:
        parser.error("--pairs must be >= 1 and --warmup-pairs >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the table readable
    warnings.filterwarnings("ignore")

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # One data module (hence the same batches) for every run.
    data = make_data(args.data, args.batch_size, args.samples_per_class, 2 * (args.warmup_pairs + args.pairs))
    rows = []
    for defense_name in args.defense:
        for steps in args.steps:
            vanilla_times, defended_times = time_pairs(args, data, steps, defense_name)
            vanilla, defended = statistics.median(vanilla_times), statistics.median(defended_times)
            ratio, ideal = vanilla / defended, 1.0 / (steps + 1)
            rows.append(f"| {defense_name} | {steps} | {args.batch_size / vanilla:.1f} | "
                        f"{args.batch_size / defended:.1f} | {ratio:.4f} | {ideal:.4f} | {ratio / ideal:.2f} |")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"\n{args.backbone} (dim {args.embedding_dim}), {args.data}, batch {args.batch_size}, medians of "
          f"{args.pairs} interleaved (vanilla, defended) pairs after {args.warmup_pairs} untimed, eps {args.eps}, "
          f"alpha {args.alpha}, {device_name}, torch {torch.__version__}, "
          f"1-min load average {load_before:.2f} before / {load_after:.2f} after\n")
    print("| defense | PGD steps | vanilla images/s | defended images/s | ratio | ideal 1/(steps+1) | ratio / ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
