"""Robustness evaluation as a Lightning callback: every N validation epochs and at ``trainer.test``.

It runs the attack suite through :class:`evaluation.engine.RobustnessEvaluator` (the
same engine as ``eval.py``) against the gallery X = ``trainer.datamodule.eval_set`` and logs:

- scalars ``robust/<attack>/eps=<e>/<w or m>=<k>`` (mean normalized rank in percent, Zhou et
  al., ECCV 2020, Sec. 4; ES: ``robust/ES/eps=<e>``, the mean embedding shift) and
  ``robust/score`` (:mod:`evaluation.score`), through ``pl_module.log`` so they reach
  every logger, ``trainer.callback_metrics`` and the dict ``trainer.test`` returns; under DDP
  every rank logs the same (all-gathered) values, Lightning writes rank 0's;
- with a TensorBoard logger (rank 0 only): per attack a grid of clean / adversarial /
  perturbation images (rescaled: gray = 0, black / white = -eps / +eps) at the largest
  epsilon, and a retrieval strip: for a few queries, the top-k of the gallery before (upper
  row) and after (lower row) a QA attack; frames are green for the query's class, red
  otherwise, blue for the attack's target candidates;
- with ``report_dir``: a JSON + Markdown report per evaluation (rank 0), see
  :class:`evaluation.report.Report`, written in ``on_validation_end`` / ``on_test_end`` so that it
  carries the clean Recall@1 / mAP the ranker logged for the same epoch.

Use it from a LightningCLI config::

    trainer:
      callbacks:
        - class_path: callbacks.RobustnessEvaluation
          init_args: {suite: configs/suites/quick.yaml, every_n_epochs: 5}

The suite is parsed (and validated) when the callback is built; the gallery-size checks run in
``setup``, before the first training step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid

from evaluation.report import Report, write_atomic
from evaluation.engine import (
    ConfigResult,
    RobustnessEvaluator,
    RobustnessResults,
    StrategyCollectives,
)
from evaluation.suite import Suite
from data.retrieval_batch import collate_retrieval_batch
from retrieval.index import stable_topk

__all__ = ["RobustnessEvaluation"]

_GREEN = (0.1, 0.75, 0.1)
_RED = (0.85, 0.1, 0.1)
_BLUE = (0.15, 0.35, 0.95)
_GRAY = (0.6, 0.6, 0.6)


class RobustnessEvaluation(pl.Callback):
    """Run an attack suite during ``fit`` (every ``every_n_epochs`` validation epochs, never
    during the sanity check) and at ``trainer.test``; log scalars, images and reports.

    Args:
        suite: path of a suite YAML (``configs/suites/*.yaml``).
        every_n_epochs: evaluate after the validation of epochs N, 2N, ... (1-based count).
        num_samples: overrides the suite's T (``-1``: the whole gallery).
        log_images: log example grids and retrieval strips to TensorBoard (rank 0).
        report_dir: write ``<stage>-epoch<NNN>.json`` / ``.md`` reports there (rank 0).
        batch_size: overrides the suite's attack batch size.
        num_images: examples per attack in the image grids.
        strip_queries: queries in the retrieval strip.
        strip_topk: gallery items shown per query in the retrieval strip.
        progress: tqdm progress bar over the attack batches (rank 0).
        partial_report: if set, a JSON file rewritten (rank 0) after every configuration with
            the results so far -- progress of long runs; ``eval.py`` removes it at the end.
        partial_meta: extra fields stored in the partial report's ``meta`` (``eval.py``: what
            identifies the run, so that a resumed run can check it continues the same one).
        completed: results of an interrupted earlier run of the same suite and model (read
            from its partial report): the first evaluation does not run them again.
        should_stop: polled before every attack batch; ``True`` stops the evaluation with
            :class:`evaluation.engine.EvaluationInterrupted` (``eval.py``: SIGINT / SIGTERM).
        clean_metrics: rank the gallery with the engine's clean-metric function
            (:func:`evaluation.engine.clean_metrics`, float64, the number every report family gives)
            instead of copying the ranker's logged float32 values (``eval.py`` sets it).

    Attack names resolve through :data:`evaluation.registry.ATTACKS` (register new attack
    families there).

    After a run, ``last_results`` holds the :class:`RobustnessResults` and ``history`` lists
    ``(stage, epoch)`` of every evaluation.
    """

    def __init__(
        self,
        suite: str,
        every_n_epochs: int = 1,
        num_samples: int | None = None,
        log_images: bool = True,
        report_dir: str | None = None,
        batch_size: int | None = None,
        num_images: int = 8,
        strip_queries: int = 4,
        strip_topk: int = 8,
        progress: bool = True,
        partial_report: str | None = None,
        partial_meta: dict | None = None,
        completed: Sequence[ConfigResult] = (),
        should_stop: Callable[[], bool] | None = None,
        clean_metrics: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.suite_path = str(suite)
        self.evaluator = RobustnessEvaluator(
            Suite.from_yaml(suite),
            num_samples=num_samples,
            batch_size=batch_size,
            keep_examples=max(num_images, strip_queries) if log_images else 0,
            # By default the ranker's own logged <stage>/recall@1 and <stage>/map are copied into the
            # report in on_<stage>_end instead of ranking the gallery a second time (float32 values).
            clean_metrics=clean_metrics,
            progress=progress,
        )
        self.every_n_epochs = every_n_epochs
        self.log_images = log_images
        self.report_dir = Path(report_dir) if report_dir else None
        self.num_images = num_images
        self.strip_queries = strip_queries
        self.strip_topk = strip_topk
        self.partial_report = Path(partial_report) if partial_report else None
        self.partial_meta = dict(partial_meta or {})
        self.completed = list(completed)
        self.should_stop = should_stop
        self.last_results: RobustnessResults | None = None
        self.history: list[tuple[str, int]] = []
        self._pending: str | None = None  # stage whose report waits for the clean metrics

    @property
    def suite(self) -> Suite:
        return self.evaluator.suite

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before any work if the suite cannot run on this gallery (w / m too large)."""
        eval_set = getattr(trainer.datamodule, "eval_set", None) if trainer.datamodule is not None else None
        if eval_set is not None:
            self.evaluator.check(len(eval_set))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module, "test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> RobustnessResults:
        """Run the suite now (all ranks), log scalars and (rank 0) images; the report follows in
        :meth:`finalize`, once the ranker has logged its clean metrics."""
        dataset = self._gallery(trainer)
        finished: list[ConfigResult] = []

        def on_result(result: ConfigResult) -> None:
            finished.append(result)
            if self.partial_report is not None:
                meta = {**self.partial_meta, "stage": stage, "epoch": trainer.current_epoch}
                # Resumed results first, in suite order with the new ones (the engine's order).
                done = [r for r in completed if r.key not in {f.key for f in finished}] + finished
                write_atomic(self.partial_report, Report.partial_json(self.suite, done, meta))

        completed, self.completed = self.completed, []  # resumed once, by the first evaluation

        datamodule = trainer.datamodule
        # Query / database attacks (PQ-AG, SDHA ...) run when the data has that split.
        split = getattr(datamodule, "protocol", None) == "query_database"
        results = self.evaluator.run(
            pl_module,
            dataset,
            collectives=StrategyCollectives(trainer),
            embed_batch_size=int(getattr(datamodule, "eval_batch_size", 500)),
            on_result=on_result,
            query_set=getattr(datamodule, "query_set", None) if split else None,
            database_set=getattr(datamodule, "database_set", None) if split else None,
            completed=completed,
            should_stop=self.should_stop,
        )
        self.last_results = results
        self.history.append((stage, trainer.current_epoch))
        self._pending = stage
        # Identical on every rank (all-gathered), so no sync_dist.
        pl_module.log_dict(self.scalars(results), sync_dist=False)
        if trainer.is_global_zero and self.log_images:
            self._log_images(trainer, pl_module, results, dataset)
        return results

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the ranker's epoch-end metrics: fill in the clean metrics, write the report."""
        if self._pending is None or self.last_results is None:
            return
        stage, results, self._pending = self._pending, self.last_results, None
        if results.clean is not None:  # computed by the engine (clean_metrics=True)
            clean = results.clean
        else:
            metrics = trainer.callback_metrics
            keys = [k for k in ("recall@1", "map", "map@r") if f"{stage}/{k}" in metrics]
            clean = {k: float(metrics[f"{stage}/{k}"]) for k in keys}
        if not clean and trainer.is_global_zero and results.gallery is not None:
            # Not a Ranker (nothing logged): rank the gallery ourselves.
            clean = self.evaluator.clean_metrics_of(pl_module, results.gallery)
        results.clean = clean or None
        if trainer.is_global_zero and self.report_dir is not None:
            name = "test" if stage == "test" else f"{stage}-epoch{trainer.current_epoch:03d}"
            report = Report.from_results(
                results, title=f"{stage} epoch {trainer.current_epoch}",
                meta={"stage": stage, "epoch": trainer.current_epoch, "global_step": trainer.global_step},
            )
            report.write(self.report_dir / f"{name}.json", self.report_dir / f"{name}.md")

    @staticmethod
    def scalars(results: RobustnessResults) -> dict[str, float]:
        """``robust/<attack>/eps=<e>/<w|m>=<k>`` -> mean metric, and ``robust/score``."""
        out: dict[str, float] = {}
        for r in results.results:
            if r.invalid:  # no number to plot: the report says why
                continue
            key = f"robust/{r.attack}/eps={r.eps:g}"
            if r.size_key is not None:
                key += f"/{r.size_key}={r.size}"
            out[key] = float(r.mean)
        if results.score.value is not None:
            out["robust/score"] = float(results.score.value)
        return out

    @staticmethod
    def _gallery(trainer: pl.Trainer) -> Dataset:
        dataset = getattr(trainer.datamodule, "eval_set", None) if trainer.datamodule is not None else None
        if dataset is None:
            raise RuntimeError(
                "RobustnessEvaluation needs a data.RetrievalDataModule with eval_set (the gallery X): "
                "pass datamodule=... to trainer.fit / trainer.test"
            )
        return dataset

    # ------------------------------------------------------------------ images
    def _log_images(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: RobustnessResults, dataset: Dataset
    ) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not results.examples:
            return
        writer = logger.experiment
        step = trainer.global_step
        for attack, example in results.examples.items():
            n = min(self.num_images, example.images.shape[0])
            clean, adv = example.images[:n], example.adversarial[:n]
            scale = 2.0 * example.eps if example.eps > 0 else 1.0
            perturbation = ((adv - clean) / scale + 0.5).clamp(0.0, 1.0)
            grid = make_grid(torch.cat([clean, adv, perturbation]), nrow=n, padding=2, pad_value=1.0)
            size = f" {example.size_key}={example.size}" if example.size_key else ""
            tag = f"robust_images/{attack} eps={example.eps:g}{size} (clean|adv|perturbation)"
            writer.add_image(tag, grid, step)
        strip = self._retrieval_strip(pl_module, results, dataset)
        if strip is not None:
            writer.add_image(f"robust_images/retrieval strip {strip[1]} (before|after)", strip[0], step)

    def _retrieval_strip(
        self, pl_module: pl.LightningModule, results: RobustnessResults, dataset: Dataset
    ) -> tuple[Tensor, str] | None:
        """Top-k of the gallery for a few queries, clean (upper row) and attacked (lower row)."""
        example = next((results.examples[a] for a in ("QA+", "QA-") if a in results.examples), None)
        if example is None or results.gallery is None:
            return None
        gallery = results.gallery
        n = min(self.strip_queries, example.indices.numel())
        k = min(self.strip_topk, len(gallery) - 1)
        queries = example.indices[:n].to(gallery.device)
        with torch.inference_mode(False), torch.no_grad():
            adv_emb = pl_module.embed(example.adversarial[:n].to(gallery.device))
            rows = torch.arange(n, device=gallery.device)
            d_clean = pl_module.distance(gallery.embeddings[queries], gallery.embeddings).clone()
            d_adv = pl_module.distance(adv_emb, gallery.embeddings).clone()
            for d in (d_clean, d_adv):  # the query itself is not a result (self excluded)
                d[rows, queries] = float("inf")
            top = torch.stack([stable_topk(d_clean, k)[1], stable_topk(d_adv, k)[1]], dim=1)  # [n, 2, k]
        labels = gallery.labels
        targets = example.targets[:n].to(gallery.device) if example.targets is not None else None
        shown = top.reshape(-1)
        same_class = labels[shown] == labels[queries].repeat_interleave(2 * k)
        green, red = torch.tensor(_GREEN, device=shown.device), torch.tensor(_RED, device=shown.device)
        colors = torch.where(same_class[:, None], green, red)
        if targets is not None:
            is_target = (top[..., None] == targets[:, None, None, :]).any(-1).reshape(-1)
            colors[is_target] = torch.tensor(_BLUE, device=shown.device)
        items = _framed(_fetch(dataset, shown.cpu()), colors.cpu())
        query_images = torch.stack([example.images[:n], example.adversarial[:n]], dim=1).reshape(
            2 * n, *example.images.shape[1:])
        query_tiles = _framed(query_images, torch.tensor(_GRAY).expand(2 * n, 3))
        tiles = torch.cat([query_tiles[:, None], items.reshape(2 * n, k, *items.shape[1:])], dim=1)
        grid = make_grid(tiles.reshape(-1, *tiles.shape[2:]), nrow=k + 1, padding=2, pad_value=1.0)
        size = f" {example.size_key}={example.size}" if example.size_key else ""
        return grid, f"{example.attack} eps={example.eps:g}{size}"


def _fetch(dataset: Dataset, indices: Tensor) -> Tensor:
    """Gallery images by index, in the given order (one batched fetch)."""
    loader = DataLoader(dataset, batch_size=max(int(indices.numel()), 1), sampler=indices.tolist(),
                        collate_fn=collate_retrieval_batch)
    return next(iter(loader)).images


def _framed(images: Tensor, colors: Tensor, width: int = 2) -> Tensor:
    """RGB copies of ``images [B, C, H, W]`` inside a ``width``-pixel frame of ``colors [B, 3]``."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    b, _, h, w = rgb.shape
    out = colors.to(rgb.dtype)[:, :, None, None].expand(b, 3, h + 2 * width, w + 2 * width).clone()
    out[:, :, width : width + h, width : width + w] = rgb
    return out
