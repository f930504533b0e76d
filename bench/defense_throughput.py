"""Training throughput of the max-shift defense (ECCV 2020 Eq. 13) relative to vanilla training.

Trains the same model (same initialization, same batches) with a plain Lightning Trainer, once
without and once per ``--steps`` value with :class:`callbacks.MaxShiftAdversarialTraining`, and
times every training batch from the first ``on_train_batch_start`` hook (before crafting) to
``on_train_batch_end`` (after the optimizer step). Throughput is ``batch_size`` over the median
batch time; the settings run interleaved ``--repeats`` times and the fastest median is kept.
Crafting costs ``steps`` forward+backward passes (input gradient only) plus two no-grad forwards
for the logged shift, so the ideal throughput ratio is about ``1 / (steps + 1)``.

CPU run used in docs/defense.md (about 3 minutes on 2 idle cores)::

    .venv/bin/python bench/defense_throughput.py --data fashion-mnist --backbone c2f1 \
        --batch-size 128 --batches 12 --warmup-batches 2 --repeats 3 --steps 10 30 --threads 2

``--data synthetic`` uses 28x28 synthetic images when Fashion-MNIST is not installed;
``--device cuda`` times on a GPU (with synchronization around each batch).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import MaxShiftAdversarialTraining  # noqa: E402
from data import FashionMNISTDataModule, RetrievalDataModule, SyntheticDataModule  # noqa: E402
from lightning_modules import C2F1, LeNet, MetricRanker  # noqa: E402


class BatchTimer(pl.Callback):
    """Wall time of each training batch, crafting + training step + optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)


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


def time_training(args: argparse.Namespace, data: RetrievalDataModule, steps: int | None) -> list[float]:
    """Per-batch wall times of the measured batches (after the warm-up batches)."""
    device = torch.device(args.device)
    timer = BatchTimer(device)
    callbacks: list[pl.Callback] = [timer]  # first, so its start precedes the crafting
    if steps is not None:
        callbacks.append(MaxShiftAdversarialTraining(eps=args.eps, alpha=args.alpha, steps=steps))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.warmup_batches + args.batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    trainer.fit(make_model(args.backbone, args.embedding_dim), datamodule=data)
    return timer.times[args.warmup_batches:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["fashion-mnist", "synthetic"], default="synthetic")
    parser.add_argument("--backbone", choices=["c2f1", "lenet"], default="c2f1")
    parser.add_argument("--embedding-dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="measured batches per run")
    parser.add_argument("--warmup-batches", type=int, default=2, help="untimed batches first")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30], help="PGD steps of the defense")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3,
                        help="round-robin repetitions; the fastest median per setting is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batches < 1 or args.warmup_batches < 0 or args.repeats < 1:
        parser.error("--batches and --repeats must be >= 1, --warmup-batches >= 0")

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the table readable
    warnings.filterwarnings("ignore")

    # Same data module (hence the same batches) for every run. Settings are interleaved and
    # repeated, and the fastest median kept, because other jobs on a shared machine slow down
    # whole stretches of a run.
    data = make_data(args.data, args.batch_size, args.samples_per_class, args.warmup_batches + args.batches)
    settings: list[int | None] = [None, *args.steps]
    best: dict[int | None, float] = {}
    for _ in range(args.repeats):
        for steps in settings:
            median = statistics.median(time_training(args, data, steps))
            best[steps] = min(best.get(steps, float("inf")), median)

    vanilla = best[None]
    rows = [f"| vanilla | {vanilla:.4f} | {args.batch_size / vanilla:.1f} | 1 | 1 | 1 |"]
    for steps in args.steps:
        defended = best[steps]
        ratio, ideal = vanilla / defended, 1.0 / (steps + 1)
        rows.append(f"| defense, {steps} steps | {defended:.4f} | {args.batch_size / defended:.1f} | "
                    f"{ratio:.4f} | {ideal:.4f} | {ratio / ideal:.2f} |")

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"\n{args.backbone} (dim {args.embedding_dim}), {args.data}, batch {args.batch_size}, best of "
          f"{args.repeats} medians of {args.batches} timed batches after {args.warmup_batches} untimed, "
          f"eps {args.eps}, alpha {args.alpha}, {device_name}, torch {torch.__version__}\n")
    print("| training | median s/batch | images/s | ratio to vanilla | ideal 1/(steps+1) | ratio / ideal |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
