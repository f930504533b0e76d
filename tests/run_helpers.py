"""Helpers of the tests: tiny rankers, a plain training loop for them, tiny train.py / eval.py runs and
the config they use, and the parsing helper of the config tests (shared by every test package)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from torch import nn

from robust_ranking.cli import train
from robust_ranking.data import SyntheticDataModule
from robust_ranking.evaluation import Collectives
from robust_ranking.lightning_modules import LeNet, MetricRanker

#: The repository root (tests/ is directly under it).
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TinyRanker:
    """A LeNet(16-d) cosine-triplet ranker and its synthetic data (|X| = 100, 4 classes)."""

    model: MetricRanker
    datamodule: SyntheticDataModule


def train_tiny_ranker(epochs: int = 2, seed: int = 0) -> TinyRanker:
    """Train ``LeNet(embedding_dim=16)`` for a few steps (well under a second, one thread)."""
    datamodule = SyntheticDataModule(test_per_class=25, eval_batch_size=64, seed=seed)
    datamodule.setup()
    torch.manual_seed(seed)
    model = MetricRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))
    fit_with_adam(model, datamodule, epochs)
    model.eval()
    for p in model.parameters():
        p.grad = None
    return TinyRanker(model, datamodule)


def fit_with_adam(model: nn.Module, datamodule: Any, epochs: int, lr: float = 1e-3) -> None:
    """Train a ranker outside Lightning: Adam over the data module's training batches, the
    ranker's own loss on its embeddings (the tests' tiny models train in well under a second)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for images, labels, _ in datamodule.train_dataloader():
            loss = model.compute_loss(model.embed(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_in(root: Path, args: list[str]) -> None:
    """``train.py <args>`` with ``root`` as the working directory, so ``runs/`` lands there."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(args)
    finally:
        os.chdir(cwd)


def report_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """An eval.py report without its wall times (which differ from run to run)."""
    results = [{k: v for k, v in r.items() if k != "wall_s"} for r in report["results"]]
    return {"results": results, "clean": report["clean"], "score": report["robustness_score"],
            "T": report["num_samples"], "indices": report["attacked_indices"],
            "clean_query_database": report.get("clean_query_database")}


def tiny_config(test_per_class: int = 25, eval_batch_size: int = 64) -> str:
    """The ``train.py`` config of the tests' tiny CLI-trained ranker: LeNet(16-d), cosine triplet,
    synthetic data (4 classes), one epoch, logged to ``runs/tiny``."""
    return _TINY_CONFIG % {"test_per_class": test_per_class, "eval_batch_size": eval_batch_size}


_TINY_CONFIG = """seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: tiny}
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.LeNet
      init_args: {embedding_dim: 16}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance: {class_path: pytorch_metric_learning.distances.CosineSimilarity}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {test_per_class: %(test_per_class)d, eval_batch_size: %(eval_batch_size)d}
"""

TINY_CONFIG = tiny_config()

# T = 21 is odd: under 2 processes one rank attacks 11 samples, the other 10 (+ padding).
EVAL_SUITE = """name: eval-test
num_samples: 21
seed: 0
batch_size: 8
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1, 2], steps: 3}
  - {attack: CA-, epsilons: [0.1], w: [1], steps: 2}
  - {attack: QA-, epsilons: [0.1], m: [1], steps: 3}
  - {attack: ES, epsilons: [0.1], steps: 3}
"""


def train_tiny_run(root: Path) -> dict[str, Path]:
    """``train.py fit`` of :data:`TINY_CONFIG` in ``root``: ``<run>/checkpoints/*.ckpt``, ``<run>/config.yaml``
    and :data:`EVAL_SUITE` written next to it."""
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    (root / "suite.yaml").write_text(EVAL_SUITE)
    train_in(root, ["fit", "--config", str(root / "tiny.yaml")])
    run = root / "runs" / "tiny" / "version_0"
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    assert (run / "config.yaml").is_file()
    return {"root": root, "run": run, "ckpt": ckpt, "suite": root / "suite.yaml"}


def run_eval(args: list[str]) -> list:
    """``eval.py <args>`` on the CPU without progress bars, in this process."""
    from robust_ranking.cli import eval as eval_script

    return eval_script.main([*args, "--accelerator", "cpu", "--no-progress"])


def strip_timing(report: dict) -> dict:
    """The numbers of a report, without wall times (which differ from run to run)."""
    results = [{k: v for k, v in r.items() if k != "wall_s"} for r in report["results"]]
    return {"results": results, "clean": report["clean"], "score": report["robustness_score"],
            "T": report["num_samples"], "indices": report["attacked_indices"]}


def resolved_config(*args: str, subcommand: str = "fit") -> dict:
    """What ``train.py <subcommand> <args> --print_config`` prints, as a dict (parsing only: no data,
    no model is built)."""
    import contextlib
    import io

    import pytest
    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        train.main([subcommand, *args, "--print_config"])
    assert exit_info.value.code in (0, None), f"train.py {subcommand} {' '.join(args)} failed"
    return yaml.safe_load(out.getvalue())


# ----------------------------------------------------------------------------- DML benchmark trees
#: Class ids of the fabricated DML trees: train classes, test classes (the official id ranges' ends).
DML_CLASSES = {
    "cub": ([1, 2, 100], [101, 150, 200]),
    "cars": ([1, 50, 98], [99, 150, 196]),
    "sop": ([1, 2, 11318], [11319, 20000, 22634]),
}


def _tiny_jpeg(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> None:
    """A small noisy JPEG (PIL), landscape or portrait by ``size``."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def fabricate_dml_tree(kind: str, root: Path, per_class: int = 4, layout: str = "annos") -> list[Path]:
    """A tiny tree in the official layout of ``kind`` ("cub", "cars" or "sop") under ``root``, with
    ``per_class`` JPEGs for each class of :data:`DML_CLASSES`; returns the image paths in listing order.

    CUB: ``root/CUB_200_2011/{images.txt, image_class_labels.txt, images/<class>/<name>.jpg}``.
    Cars (``layout="annos"``): ``root/cars_annos.mat`` + ``root/car_ims/*.jpg``; (``layout="devkit"``):
    ``devkit/cars_train_annos.mat`` + ``cars_train/``, ``cars_test_annos_withlabels.mat`` + ``cars_test/``.
    SOP: ``root/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <category>_final/*.JPG}``.
    """
    import numpy as np

    train, test = DML_CLASSES[kind]
    rows = [(c, k) for c in train + test for k in range(per_class)]
    paths: list[Path] = []
    if kind == "cub":
        folder = root / "CUB_200_2011"
        images, labels = [], []
        for i, (c, k) in enumerate(rows, start=1):
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k:04d}.jpg"
            _tiny_jpeg(folder / "images" / rel, i, (24, 16) if k % 2 else (16, 24))
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            paths.append(folder / "images" / rel)
        (folder / "images.txt").write_text("\n".join(images) + "\n")
        (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
        (folder / "train_test_split.txt").write_text("\n".join(f"{i} {i % 2}" for i in range(1, len(rows) + 1)))
    elif kind == "cars":
        from scipy.io import savemat

        def struct(entries: list[dict]) -> np.ndarray:
            dtype = [(name, object) for name in entries[0]]
            return np.array([tuple(e.values()) for e in entries], dtype=dtype)

        if layout == "annos":
            entries = []
            for i, (c, k) in enumerate(rows, start=1):
                rel = f"car_ims/{i:06d}.jpg"
                _tiny_jpeg(root / rel, i)
                paths.append(root / rel)
                entries.append({"relative_im_path": rel, "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 10, "bbox_y2": 10,
                                "class": c, "test": int(k % 2)})
            root.mkdir(parents=True, exist_ok=True)
            savemat(str(root / "cars_annos.mat"), {"annotations": struct(entries)})
        else:
            halves = {"cars_train": [], "cars_test": []}
            for i, (c, k) in enumerate(rows, start=1):
                half = "cars_train" if k % 2 == 0 else "cars_test"
                name = f"{len(halves[half]) + 1:05d}.jpg"
                _tiny_jpeg(root / half / name, i)
                halves[half].append({"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 10, "bbox_y2": 10, "class": c, "fname": name})
            paths = [root / half / e["fname"] for half in halves for e in halves[half]]
            (root / "devkit").mkdir(parents=True, exist_ok=True)
            savemat(str(root / "devkit" / "cars_train_annos.mat"), {"annotations": struct(halves["cars_train"])})
            savemat(str(root / "cars_test_annos_withlabels.mat"), {"annotations": struct(halves["cars_test"])})
    elif kind == "sop":
        folder = root / "Stanford_Online_Products"
        image_id = 0
        for split, classes in (("train", train), ("test", test)):
            lines = ["image_id class_id super_class_id path"]
            for c in classes:
                for k in range(per_class):
                    image_id += 1
                    rel = f"bicycle_final/{c}_{k}.JPG"
                    _tiny_jpeg(folder / rel, image_id)
                    paths.append(folder / rel)
                    lines.append(f"{image_id} {c} 1 {rel}")
            (folder / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    else:
        raise ValueError(kind)
    return paths


# ----------------------------------------------------------------------------- ranks simulated by threads
class ThreadCollectives(Collectives):
    """One rank of a world simulated by threads (an :class:`evaluation.Collectives`): a
    barrier-synchronized ``all_gather``, so that the engine's DDP code paths run in one process."""

    def __init__(self, rank: int, slots: list, barrier: Any) -> None:
        self.rank, self.world_size, self.slots, self.sync = rank, len(slots), slots, barrier

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sync.wait()
        self.slots[self.rank] = tensor.clone()
        self.sync.wait()
        out = torch.stack(list(self.slots))
        self.sync.wait()  # everyone has read before the next call overwrites
        return out

    def barrier(self) -> None:
        self.sync.wait()


def on_thread_ranks(work: Any, world_size: int = 2) -> dict[int, Any]:
    """``{rank: work(collectives)}`` for ``world_size`` ranks run as threads; an error on any rank is raised."""
    import threading

    slots, barrier, outputs, errors = [None] * world_size, threading.Barrier(world_size), {}, []

    def rank_main(rank: int) -> None:
        try:
            outputs[rank] = work(ThreadCollectives(rank, slots, barrier))
        except BaseException as err:  # noqa: BLE001 - raised below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outputs


# ----------------------------------------------------------------------------- defended DDP fits
def defense_ddp_config(save_dir: Path, callback: str) -> str:
    """A ``train.py`` config of a tiny defended fit (LeNet, synthetic data, one epoch) with ``callback``
    (a one-line YAML mapping: class_path + init_args) as its only callback; the tests run it with
    ``--trainer.devices 2`` to check a 2-process CPU DDP fit."""
    return _DEFENSE_DDP_CONFIG.format(save_dir=save_dir, callback=callback)


_DEFENSE_DDP_CONFIG = """seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  use_distributed_sampler: false
  limit_val_batches: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args:
      save_dir: {save_dir}
      name: ddp_defense
  callbacks:
    - {callback}
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.LeNet
      init_args:
        embedding_dim: 16
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance:
          class_path: pytorch_metric_learning.distances.CosineSimilarity
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args:
    batch_size: 16
    samples_per_class: 4
    train_per_class: 16
    test_per_class: 4
    eval_batch_size: 16
"""
