"""RetrievalDataModule behaviour on the synthetic dataset: loaders, protocols, DDP sharding."""

from types import SimpleNamespace

import pytest
import torch

from robust_ranking.data import RetrievalBatch, SyntheticDataModule, TensorImageDataset


def _fake_trainer(world_size: int, rank: int, use_distributed_sampler: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=world_size,
        global_rank=rank,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler),
    )


def _dm(**kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_attributes_and_batch_format():
    dm = _dm(num_classes=5, train_per_class=8, test_per_class=6, image_shape=(3, 8, 8), batch_size=10,
             samples_per_class=2)
    assert dm.num_classes == 5 and dm.image_shape == (3, 8, 8)
    assert len(dm.train_set) == 40 and len(dm.eval_set) == 30
    assert dm.query_set is dm.eval_set and dm.database_set is dm.eval_set  # gallery protocol
    images, labels, indices = batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, RetrievalBatch)
    assert images.shape == (10, 3, 8, 8) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    # indices point at the very samples returned
    ref_images, ref_labels, _ = dm.train_set.__getitems__(indices.tolist())
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    single = dm.train_set[int(indices[0])]
    assert torch.equal(single[0], images[0]) and single[1] == labels[0] and single[2] == indices[0]


def test_eval_loader_is_ordered_and_complete():
    dm = _dm(eval_batch_size=7)
    batches = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(len(dm.eval_set)))
    assert torch.equal(torch.cat([b.labels for b in batches]), dm.eval_labels)
    assert [len(b.indices) for b in dm.test_dataloader()] == [len(b.indices) for b in batches]


def test_synthetic_is_seeded_and_class_separable():
    a, b, c = _dm(seed=1), _dm(seed=1), _dm(seed=2)
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(a.train_set.images, c.train_set.images)
    # nearest class mean (from train) classifies the test split perfectly
    x_train = a.train_set.images.flatten(1).float()
    means = torch.stack([x_train[a.train_labels == k].mean(0) for k in range(a.num_classes)])
    pred = torch.cdist(a.eval_set.images.flatten(1).float(), means).argmin(1)
    assert (pred == a.eval_labels).float().mean() == 1.0


def test_batch_size_must_be_divisible_by_samples_per_class():
    with pytest.raises(ValueError, match="divisible by samples_per_class"):
        SyntheticDataModule(batch_size=10, samples_per_class=4)


def test_loader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup"):
        SyntheticDataModule().train_dataloader()


def test_query_database_protocol_test_rest():
    dm = _dm(protocol="query_database", database="test_rest", num_queries=10, test_per_class=8)
    assert len(dm.query_set) == 10 and len(dm.database_set) == 32 - 10
    q, d = set(dm.query_source_indices.tolist()), set(dm.database_source_indices.tolist())
    assert not q & d and q | d == set(range(32))
    assert torch.equal(dm.query_labels, dm.eval_labels[dm.query_source_indices])
    assert torch.equal(dm.database_labels, dm.eval_labels[dm.database_source_indices])
    # items are re-indexed within each set, images match their source
    batch = next(iter(dm.query_dataloader()))
    assert torch.equal(batch.indices, torch.arange(10))
    assert torch.equal(batch.images, dm.eval_set.__getitems__(dm.query_source_indices.tolist()).images)
    assert len(dm.eval_set) == 32  # val/test still run on the whole test split
    # queries are seeded
    again = _dm(protocol="query_database", database="test_rest", num_queries=10, test_per_class=8)
    assert torch.equal(again.query_source_indices, dm.query_source_indices)


def test_query_database_protocol_train_database():
    dm = _dm(protocol="query_database", database="train", num_queries=5)
    assert len(dm.query_set) == 5
    assert len(dm.database_set) == len(dm.train_set)
    assert torch.equal(dm.database_labels, dm.train_labels)
    assert sum(len(b.indices) for b in dm.database_dataloader()) == len(dm.train_set)


def test_too_many_queries_is_a_clear_error():
    dm = SyntheticDataModule(
        protocol="query_database", database="test_rest", num_queries=64, test_per_class=16
    )
    with pytest.raises(ValueError, match="num_queries"):
        dm.setup()


@pytest.mark.parametrize("loader", ["val_dataloader", "query_dataloader"])
def test_eval_loader_under_simulated_ddp_pads_and_covers_every_index(loader):
    dm = _dm(test_per_class=5, num_classes=3, eval_batch_size=4)  # 15 samples over 2 ranks
    per_rank = []
    for rank in (0, 1):
        dm.trainer = _fake_trainer(2, rank)
        per_rank.append(torch.cat([b.indices for b in getattr(dm, loader)()]))
    assert len(per_rank[0]) == len(per_rank[1]) == 8  # ceil(15 / 2), padded with a repeat
    union = torch.cat(per_rank)
    assert set(union.tolist()) == set(range(15))
    assert torch.equal(per_rank[0], torch.arange(0, 15, 2))  # rank r: r, r + 2, ...
    assert torch.equal(per_rank[1][:-1], torch.arange(1, 15, 2))


def test_train_loader_under_simulated_ddp_is_disjoint_with_equal_lengths():
    dm = _dm(train_per_class=40)
    loaders = []
    for rank in (0, 1):
        dm.trainer = _fake_trainer(2, rank)
        loaders.append(dm.train_dataloader())
    assert len(loaders[0]) == len(loaders[1]) == 160 // 16 // 2
    seen = [torch.cat([b.indices for b in loader]) for loader in loaders]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_lightning_distributed_sampler_must_be_disabled_under_ddp():
    dm = _dm()
    dm.trainer = _fake_trainer(2, 0, use_distributed_sampler=True)
    with pytest.raises(ValueError, match="use_distributed_sampler=false"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="use_distributed_sampler=false"):
        dm.val_dataloader()
    dm.trainer = _fake_trainer(1, 0, use_distributed_sampler=True)  # single process: harmless
    dm.train_dataloader()


def test_worker_processes_return_the_same_batches():
    dm = _dm(eval_batch_size=16)
    expected = list(dm.val_dataloader())
    dm_workers = _dm(eval_batch_size=16, num_workers=1)
    got = list(dm_workers.val_dataloader())
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)


def test_tensor_dataset_subset_and_validation():
    ds = TensorImageDataset(torch.arange(4 * 2 * 2, dtype=torch.uint8).reshape(4, 2, 2), [0, 1, 0, 1])
    assert ds.image_shape == (1, 2, 2)
    sub = ds.subset([3, 1])
    assert torch.equal(sub.labels, torch.tensor([1, 1]))
    assert torch.equal(sub[0][0], ds[3][0]) and int(sub[0][2]) == 0
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 1, 2, 2), [0, 1])


def test_lightning_fit_advances_the_sampler_epoch():
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(28 * 28, 4)
            self.first_batches: list[torch.Tensor] = []
            self.epochs_seen: list[int] = []

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            if batch_idx == 0:
                self.first_batches.append(idx.clone())
                self.epochs_seen.append(self.trainer.train_dataloader.batch_sampler.epoch)
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2, limit_val_batches=0,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=SyntheticDataModule())
    assert model.epochs_seen == [0, 1, 2]
    assert not torch.equal(model.first_batches[0], model.first_batches[1])
