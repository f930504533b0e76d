"""The ranker contract shared by every model family.

Attacks, defenses and evaluation talk to a model only through this interface, so that
each of them works on every family without ``if family == ...`` branches:

- :meth:`Ranker.embed` -- the differentiable continuous representation that attacks take
  gradients through (normalized embedding, tanh-relaxed hash code, soft-PQ feature).
- :meth:`Ranker.distance` -- the differentiable pairwise distance between two batches of
  ``embed`` outputs (smaller means closer). Ranking losses and attacks use it.
- :meth:`Ranker.encode` -- the representation stored in a retrieval index (float embedding,
  hard PQ codes, packed binary codes); not differentiable.
- :meth:`Ranker.code_distance` -- the pairwise distance between two batches of ``encode``
  outputs that retrieval ranks by; clean metrics are computed with it.
- :meth:`Ranker.build_index` -- a search index over ``encode`` outputs.
- optional capabilities, ``None`` unless a family has them: :attr:`Ranker.codebooks` (product
  quantization) and :attr:`Ranker.hash_bits` (hashing). An attack declares the capabilities it
  needs and the evaluation engine skips (and reports) combinations that cannot apply.

Images are in ``[0, 1]``; any input normalization happens inside the model, so attack
budgets are in pixel units.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from robust_ranking.retrieval.index import RetrievalIndex, TorchFlatIndex
from robust_ranking.retrieval.retrieval_metrics import RetrievalMetrics


class Ranker(pl.LightningModule):
    """Base class of all rankers: the contract above plus the clean retrieval evaluation.

    Subclasses implement :meth:`embed`, :meth:`distance` and ``training_step``. Validation and
    test embed the evaluation split (query set = gallery, self excluded) and log
    ``<stage>/recall@1``, ``<stage>/map``, ``<stage>/map@r`` and ``<stage>/nmi``.
    Batches are ``(images, labels, sample_indices)``; the indices let the metrics drop the
    duplicates a distributed sampler pads with, so that DDP and single-process numbers agree.
    """

    #: ``(M, K, D/M)`` codebooks for product-quantization rankers, else ``None``.
    codebooks: Tensor | None = None
    #: number of code bits for hashing rankers, else ``None``.
    hash_bits: int | None = None
    #: injected by subclasses: ``optimizer(params)`` and an optional ``lr_scheduler(optimizer)``.
    optimizer_factory: Any = None
    lr_scheduler_factory: Any = None
    #: the clean metric logged as ``hp_metric`` after every validation (TensorBoard's HParams tab),
    #: replacing Lightning's ``-1`` placeholder; ``None``: ``"map"`` for PQ / hashing rankers,
    #: ``"recall@1"`` otherwise (:attr:`main_metric`).
    hp_metric_key: str | None = None
    _hparams_session_of: int | None = None  # id() of the Trainer whose run has its HParams session

    def __init__(self, recall_ks: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.recall_ks = tuple(recall_ks)
        # build_index is the metrics' faiss path for large splits where retrieval.index.search_backend
        # picks it (docs/evaluation.md, "Large galleries and GPU faiss"); otherwise torch, as before.
        self.val_metrics = RetrievalMetrics(distance=self.code_distance, recall_ks=self.recall_ks,
                                            index_factory=self.build_index)
        self.test_metrics = RetrievalMetrics(distance=self.code_distance, recall_ks=self.recall_ks,
                                             index_factory=self.build_index)

    def save_config_hyperparameters(self, module_args: Sequence[str]) -> None:
        """``save_hyperparameters`` for rankers that receive modules (backbone, loss ...).

        Built by ``train.py`` (LightningCLI), the hyper-parameters are the config itself
        (``class_path`` + ``init_args``, plain data), which lets :func:`load_ranker` rebuild the
        whole model: keep everything. Built directly in Python, the module arguments are left
        out (they would be pickled a second time beside the state dict).
        """
        given = _given_hyperparameters.get()  # set by LightningCLI while it instantiates
        caller = inspect.currentframe().f_back  # the subclass __init__ whose arguments are saved
        self.save_hyperparameters(ignore=None if given is not None else list(module_args), frame=caller)

    # ----------------------------------------------------------------- contract
    def embed(self, x: Tensor) -> Tensor:
        """Differentiable ``[B, D]`` representation of images ``x`` in ``[0, 1]``."""
        raise NotImplementedError

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Pairwise ``[A, B]`` differentiable distance between ``embed`` outputs."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """What the retrieval index stores; by default the embedding itself."""
        return self.embed(x)

    def code_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Pairwise distance between ``encode`` outputs; by default :meth:`distance`."""
        return self.distance(a, b)

    def build_index(self, codes: Tensor, use_gpu: bool | None = None) -> RetrievalIndex:
        """An exact search index over ``codes``, ranking like :meth:`code_distance` with ties by
        index. Families override this with a faiss index (``use_gpu``: ``None`` = GPU faiss when
        available, ``True`` / ``False`` = force / forbid it); the default is a brute-force torch
        index over :meth:`code_distance` (on the codes' device; ``use_gpu`` is ignored)."""
        index = TorchFlatIndex(distance=self.code_distance)
        index.add(codes)
        return index

    @property
    def capabilities(self) -> set[str]:
        """Names of the optional capabilities this ranker has (``codebooks``, ``hash_bits``)."""
        return {name for name in ("codebooks", "hash_bits") if getattr(self, name) is not None}

    def configure_optimizers(self) -> Any:
        """The injected optimizer factory on all parameters, plus the scheduler if one is given."""
        if self.optimizer_factory is None:
            raise NotImplementedError(f"{type(self).__name__} was given no optimizer factory")
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    @property
    def main_metric(self) -> str:
        """The clean metric a run is judged by: mAP for PQ / hashing rankers, Recall@1 otherwise."""
        if self.hp_metric_key is not None:
            return self.hp_metric_key
        return "map" if self.capabilities else "recall@1"

    # ------------------------------------------------------- clean evaluation
    def _eval_step(self, metrics: RetrievalMetrics, batch: Any) -> None:
        x, y, idx = batch
        metrics.update(self.encode(x), y, idx)

    def _eval_epoch_end(self, metrics: RetrievalMetrics, stage: str) -> None:
        if metrics.update_count == 0:  # e.g. sanity checking disabled / no batches
            return
        values = metrics.compute()
        # Every rank holds the gathered, de-duplicated gallery, so the values are identical
        # across ranks and need no further reduction.
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False)
        if stage == "val" and self.main_metric in values and not self.trainer.sanity_checking:
            # TensorBoard's HParams tab reads ``hp_metric``: the main metric of the latest validation.
            self._open_hparams_session(float(values[self.main_metric]))
            self.log("hp_metric", values[self.main_metric], sync_dist=True, reduce_fx="max")  # identical on every rank
        metrics.reset()

    def _open_hparams_session(self, value: float) -> None:
        """Write the HParams session with the first real ``hp_metric`` (once per run, rank 0): a
        TensorBoard logger with ``default_hp_metric=False`` (``configs/base/trainer.yaml``) writes none
        at fit start, where Lightning's default would write its ``-1`` placeholder."""
        if self._hparams_session_of == id(self.trainer):  # once per fit / validate run
            return
        self._hparams_session_of = id(self.trainer)
        for logger in self.loggers:
            # Lightning's flag (a private attribute since 1.x): False = no session was written at fit start
            if isinstance(logger, TensorBoardLogger) and not getattr(logger, "_default_hp_metric", True):
                logger.log_hyperparams(self.hparams, {"hp_metric": value})

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")


def load_ranker(checkpoint_path: str, map_location: Any = "cpu") -> Ranker:
    """The :class:`Ranker` stored in a checkpoint written by ``train.py``.

    LightningCLI records the model's ``class_path`` in the checkpoint's hyper-parameters; the
    model is rebuilt from that config by the class itself (``Ranker.load_from_checkpoint`` on the
    base class would drop it and build a bare ``Ranker``). Nothing in the file can run code: it is
    read with ``weights_only=True`` and the recorded classes are checked against the project's
    allow-lists before any is imported (:mod:`lightning_modules.checkpoint_io`).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: (a ``ValueError``) the file would need to run code to load, names
            classes outside the allow-lists, or is not a checkpoint at all.
        ValueError: not a Lightning checkpoint of a ranker trained through ``train.py``.
    """
    from robust_ranking.lightning_modules.checkpoint_io import load_checkpoint, ranker_from_checkpoint

    checkpoint = load_checkpoint(checkpoint_path, map_location=map_location)
    return ranker_from_checkpoint(checkpoint, str(checkpoint_path))
