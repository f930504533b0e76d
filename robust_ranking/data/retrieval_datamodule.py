"""Base LightningDataModule for retrieval: class-balanced training batches, ordered evaluation splits."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from robust_ranking.data.class_balanced_batch_sampler import ClassBalancedBatchSampler, check_batch_arguments
from robust_ranking.data.errors import DataConfigError
from robust_ranking.data.retrieval_batch import collate_retrieval_batch


class RetrievalDataModule(pl.LightningDataModule):
    """Shared loaders and evaluation protocols; subclasses only say how to load the two splits.

    Items/batches are ``(images, labels, indices)``: float32 images in [0, 1] (never mean/std-normalised:
    models normalise inside, so attack budgets stay in pixel units), int64 labels, and int64 ``indices``,
    each sample's position in the dataset being iterated (``train_set``, ``eval_set``, ``query_set`` or
    ``database_set``) -- used to de-duplicate DDP padding and to seed per-sample attacks.

    Protocols (``protocol``):

    * ``"gallery"`` (ECCV 2020 robust-ranking protocol): every test image is a query against the rest
      of the test split (self excluded). ``query_set`` and ``database_set`` are both ``eval_set``.
    * ``"query_database"`` (hashing protocol): ``num_queries`` test images drawn with ``seed`` are the
      queries; the database is the training split (``database="train"``, served without augmentation)
      or the remaining test images (``database="test_rest"``). Indices in ``query_set`` and
      ``database_set`` count from 0 within each set; ``query_source_indices`` /
      ``database_source_indices`` map them back to their split.

    ``val_dataloader`` / ``test_dataloader`` iterate ``eval_set`` -- the whole test split -- under both
    protocols (deliberately never the concatenation query_set + database_set: with ``database="train"``
    that would embed the training split at every validation); ``query_dataloader`` /
    ``database_dataloader`` iterate the explicit sets.

    Attributes after :meth:`setup`: ``train_set``, ``eval_set``, ``query_set``, ``database_set``,
    ``num_classes`` (number of training classes), ``image_shape`` ``(C, H, W)``.

    DDP: the loaders shard themselves, so the Trainer must run with ``use_distributed_sampler=False``.

    Settings are checked as early as they can be: the arguments in ``__init__``, what depends on the
    training split (enough classes and samples for one batch) by :meth:`check_training_batches` once
    the data is loaded (and again when the training loader is built). Both raise
    :class:`data.DataConfigError` naming the argument and the fix. A ``batch_size`` larger than the
    training split is refused unless ``sample_with_replacement`` asks for repeated samples.
    """

    # Subclasses that know these without loading data override them (so models can be built before setup);
    # otherwise setup() fills them in.
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        samples_per_class: int = 8,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        protocol: Literal["gallery", "query_database"] = "gallery",
        num_queries: int = 1000,
        database: Literal["train", "test_rest"] = "train",
        seed: int = 0,
        sample_with_replacement: bool = False,
    ) -> None:
        super().__init__()
        check_batch_arguments(batch_size, samples_per_class)
        if eval_batch_size < 1:
            raise DataConfigError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise DataConfigError(f"num_workers must be >= 0, got {num_workers}")
        if protocol not in ("gallery", "query_database"):
            raise DataConfigError(f"protocol must be 'gallery' or 'query_database', got {protocol!r}")
        if database not in ("train", "test_rest"):
            raise DataConfigError(f"database must be 'train' or 'test_rest', got {database!r}")
        if num_queries < 1:
            raise DataConfigError(f"num_queries must be >= 1, got {num_queries}")
        if seed < 0:
            raise DataConfigError(f"seed must be >= 0, got {seed}")
        self.root = root
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.protocol = protocol
        self.num_queries = num_queries
        self.database = database
        self.seed = seed
        self.sample_with_replacement = sample_with_replacement

        self.train_set: Dataset | None = None
        self.eval_set: Dataset | None = None
        self.query_set: Dataset | None = None
        self.database_set: Dataset | None = None
        self.query_source_indices: Tensor | None = None
        self.database_source_indices: Tensor | None = None

    # ----------------------------------------------------------------- hooks for subclasses
    def load_splits(self) -> tuple[Dataset, Dataset]:
        """Return ``(train_set, test_set)``; both must expose an int64 ``labels`` tensor and ``subset()``."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_splits()")

    def eval_view(self, dataset: Dataset) -> Dataset:
        """``dataset`` without training augmentation (used when the training split is the database)."""
        return dataset

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Load both splits once (later calls are no-ops) and build the query/database sets.

        Whether the training split can fill the batches is checked when the training loader is built,
        or earlier by :meth:`check_training_batches` (``train.py`` calls it before training starts).
        """
        if self.train_set is None:
            self._load()

    def check_training_batches(self, num_replicas: int | None = None) -> None:
        """Raise :class:`data.DataConfigError` unless the training split fills this module's batches.

        Call after :meth:`setup`. Builds the batch sampler :meth:`train_dataloader` would (on
        ``num_replicas`` ranks, by default the attached trainer's): too few classes for
        ``batch_size / samples_per_class`` per batch, a batch larger than the training split without
        ``sample_with_replacement``, or too few samples for one batch per rank are refused with the
        fix in the message.
        """
        self._require_setup()
        world_size, rank = self.distributed_info()
        if num_replicas is not None:
            world_size, rank = num_replicas, 0
        self._train_batch_sampler(world_size, rank)

    def _train_batch_sampler(self, world_size: int, rank: int) -> ClassBalancedBatchSampler:
        return ClassBalancedBatchSampler(
            self.train_set.labels,  # type: ignore[union-attr]
            batch_size=self.batch_size,
            samples_per_class=self.samples_per_class,
            num_replicas=world_size,
            rank=rank,
            seed=self.seed,
            sample_with_replacement=self.sample_with_replacement,
        )

    def _load(self) -> None:
        train_set, test_set = self.load_splits()
        self.train_set, self.eval_set = train_set, test_set
        if self.num_classes is None:
            self.num_classes = int(torch.unique(train_set.labels).numel())
        if self.image_shape is None:
            self.image_shape = tuple(test_set[0][0].shape)  # type: ignore[assignment]

        if self.protocol == "gallery":
            self.query_set = self.database_set = test_set
            self.query_source_indices = self.database_source_indices = torch.arange(len(test_set))
            return
        n_test = len(test_set)
        if self.num_queries > n_test or (self.database == "test_rest" and self.num_queries == n_test):
            raise DataConfigError(
                f"num_queries ({self.num_queries}) must be smaller than the test split ({n_test} images); "
                "lower --data.num_queries"
            )
        generator = torch.Generator().manual_seed(self.seed)
        is_query = torch.zeros(n_test, dtype=torch.bool)
        is_query[torch.randperm(n_test, generator=generator)[: self.num_queries]] = True
        # Kept in split order (sorted) so queries are read sequentially.
        self.query_source_indices = torch.nonzero(is_query).flatten()
        self.query_set = test_set.subset(self.query_source_indices)
        if self.database == "train":
            self.database_set = self.eval_view(train_set)
            self.database_source_indices = torch.arange(len(train_set))
        else:
            self.database_source_indices = torch.nonzero(~is_query).flatten()
            self.database_set = test_set.subset(self.database_source_indices)

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for a dataloader")

    # ----------------------------------------------------------------- convenience label views
    @property
    def train_labels(self) -> Tensor:
        self._require_setup()
        return self.train_set.labels  # type: ignore[union-attr]

    @property
    def eval_labels(self) -> Tensor:
        self._require_setup()
        return self.eval_set.labels  # type: ignore[union-attr]

    @property
    def query_labels(self) -> Tensor:
        self._require_setup()
        return self.query_set.labels  # type: ignore[union-attr]

    @property
    def database_labels(self) -> Tensor:
        self._require_setup()
        return self.database_set.labels  # type: ignore[union-attr]

    # ----------------------------------------------------------------- DDP
    def distributed_info(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached trainer, ``(1, 0)`` without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        world_size = int(getattr(trainer, "world_size", 1))
        rank = int(getattr(trainer, "global_rank", 0))
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            # Lightning would wrap our self-sharding samplers in a second DistributedSampler.
            raise DataConfigError(
                f"{type(self).__name__} shards its own dataloaders across ranks: "
                "set trainer.use_distributed_sampler=false (Trainer(use_distributed_sampler=False))"
            )
        return world_size, rank

    # ----------------------------------------------------------------- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "collate_fn": collate_retrieval_batch,
            # Eval loaders are re-iterated every epoch: keep workers instead of re-forking them.
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        """Class-balanced batches (``batch_size // samples_per_class`` classes x ``samples_per_class``).

        Each rank gets its own disjoint batches; the schedule depends on ``(seed, epoch)``, and Lightning
        sets the epoch through ``dataloader.batch_sampler.sampler.set_epoch``.
        """
        self._require_setup()
        sampler = self._train_batch_sampler(*self.distributed_info())
        return DataLoader(
            self.train_set, batch_sampler=sampler, **self._loader_kwargs()  # type: ignore[arg-type]
        )

    def ordered_dataloader(self, dataset: Dataset) -> DataLoader:
        """``dataset`` in order, ``eval_batch_size`` per batch; under DDP each rank gets every W-th sample
        (``DistributedSampler(shuffle=False, drop_last=False)``: the last samples are padded with repeats
        from the start, which consumers de-duplicate by index)."""
        world_size, rank = self.distributed_info()
        sampler = None
        if world_size > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
            )
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        """The evaluation split (``eval_set``, the test split) in order."""
        self._require_setup()
        return self.ordered_dataloader(self.eval_set)  # type: ignore[arg-type]

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        self._require_setup()
        return self.ordered_dataloader(self.eval_set)  # type: ignore[arg-type]

    def query_dataloader(self) -> DataLoader:
        """The query set in order (the whole eval split under the gallery protocol)."""
        self._require_setup()
        return self.ordered_dataloader(self.query_set)  # type: ignore[arg-type]

    def database_dataloader(self) -> DataLoader:
        """The database set in order (the whole eval split under the gallery protocol)."""
        self._require_setup()
        return self.ordered_dataloader(self.database_set)  # type: ignore[arg-type]
