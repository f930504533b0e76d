"""TensorBoard embedding projector (and Hamming PR curves for hashing rankers) at validation.

Every ``every_n_epochs`` validation epochs (never in the sanity check), rank 0 embeds a seeded
subset of ``trainer.datamodule.eval_set`` and writes, to the first TensorBoard logger:

- ``add_embedding``: the ``embed`` outputs of ``num_samples`` images with their class labels as
  metadata and the images as thumbnails (the Projector tab, tag ``embeddings``, one step per epoch);
- for hashing rankers (``hash_bits``): the Hamming-ball precision / recall curve over radius
  ``r = 0 .. K`` (:func:`retrieval.hashing_metrics.hamming_pr_curve`) of those images as queries
  against the rest of the evaluation split, as a PR curve (``hashing/pr_curve``, the PR Curves
  tab; thresholds are the radii, scaled to [0, 1]) and a figure (``hashing/pr_curve_figure``, Images tab).

Config::

    trainer:
      callbacks:
        - class_path: robust_ranking.callbacks.EmbeddingProjector
          init_args: {every_n_epochs: 5, num_samples: 500}
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from robust_ranking.data.retrieval_batch import collate_retrieval_batch
from robust_ranking.retrieval.hashing_metrics import hamming_pr_curve

__all__ = ["EmbeddingProjector"]


class EmbeddingProjector(pl.Callback):
    """Embedding projector with thumbnails and, for hashing rankers, Hamming PR curves.

    Args:
        every_n_epochs: write after the validation of epochs N, 2N, ... (1-based count).
        num_samples: images shown in the projector (a seeded subset of the evaluation split) and
            queries of the PR curve.
        thumbnails: attach the images as sprites (``label_img``).
        pr_curve: hashing rankers: log the Hamming PR curve.
        seed: the subset's seed.
        batch_size: images per forward.
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 500, thumbnails: bool = True,
                 pr_curve: bool = True, seed: int = 0, batch_size: int = 256) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("num_samples", num_samples),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.thumbnails = thumbnails
        self.pr_curve = pr_curve
        self.seed = seed
        self.batch_size = batch_size
        self.history: list[int] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        dataset = getattr(trainer.datamodule, "eval_set", None) if trainer.datamodule is not None else None
        if logger is None or dataset is None:
            return
        self.write(logger.experiment, pl_module, dataset, trainer.global_step)
        self.history.append(trainer.current_epoch)

    def write(self, writer: Any, model: Any, dataset: Any, step: int) -> None:
        """Projector (and PR curve) of ``model`` on ``dataset`` to a SummaryWriter."""
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        chosen, rest = order[: min(self.num_samples, n)], order[min(self.num_samples, n):]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                images, labels, emb = self._embed(model, dataset, chosen, device, model.embed, keep_images=True)
                writer.add_embedding(emb.float().cpu(), metadata=labels.tolist(),
                                     label_img=images if self.thumbnails else None, global_step=step,
                                     tag="embeddings")
                if self.pr_curve and getattr(model, "hash_bits", None) and rest.numel():
                    _, _, q_codes = self._embed(model, dataset, chosen, device, model.encode)
                    _, db_labels, db_codes = self._embed(model, dataset, rest, device, model.encode)
                    self._write_pr(writer, model, q_codes, labels, db_codes, db_labels, step)
        finally:
            model.train(was_training)

    def _embed(self, model: Any, dataset: Any, indices: torch.Tensor, device: torch.device, represent: Any,
               keep_images: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        loader = DataLoader(dataset, batch_size=self.batch_size, sampler=indices.tolist(),
                            collate_fn=collate_retrieval_batch)
        images, labels, out = [], [], []
        for batch in loader:
            x = batch.images
            out.append(represent(x.to(device)))
            labels.append(batch.labels)
            if keep_images:
                images.append(x.float())
        return (torch.cat(images) if keep_images else None), torch.cat(labels), torch.cat(out)

    @staticmethod
    def _write_pr(writer: Any, model: Any, q_codes: torch.Tensor, q_labels: torch.Tensor, db_codes: torch.Tensor,
                  db_labels: torch.Tensor, step: int) -> None:
        bits = int(model.hash_bits)
        distances = model.code_distance(q_codes, db_codes)
        precision, recall = hamming_pr_curve(distances, q_labels, db_labels, bits)
        precision, recall = precision.double().cpu(), recall.double().cpu()
        # Counts summed over queries (the PR plugin's tooltips): within radius r, relevant or not.
        d = distances.round().long().clamp(0, bits).cpu()
        relevant = db_labels.cpu()[None, :] == q_labels.cpu()[:, None]
        radii = torch.arange(bits + 1)
        within = d[:, :, None] <= radii  # [Q, N, K + 1]
        tp = (within & relevant[:, :, None]).sum((0, 1)).double()
        fp = (within & ~relevant[:, :, None]).sum((0, 1)).double()
        fn = relevant.sum().double() - tp
        tn = (~relevant).sum().double() - fp
        # The plugin orders points by threshold: radius K (recall 1) first, radius 0 last.
        writer.add_pr_curve_raw("hashing/pr_curve", tp.flip(0), fp.flip(0), tn.flip(0), fn.flip(0),
                                precision.flip(0), recall.flip(0), step, num_thresholds=bits + 1)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4, 3.2), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(recall.numpy(), precision.numpy(), marker=".")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"Hamming ball r = 0..{bits}")
        ax.grid(alpha=0.3)
        writer.add_figure("hashing/pr_curve_figure", fig, step, close=False)
