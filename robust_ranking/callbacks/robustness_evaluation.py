"""Robustness evaluation as a Lightning callback: every N validation epochs and at ``trainer.test``.

It runs the attack suite through :class:`evaluation.engine.RobustnessEvaluator` (the
same engine as ``eval.py``) against the gallery X = ``trainer.datamodule.eval_set`` and logs:

- scalars ``robust/<attack>/eps=<e>/<w or m>=<k>`` (mean normalized rank in percent, Zhou et
  al., ECCV 2020, Sec. 4; ES: ``robust/ES/eps=<e>``, the mean embedding shift) and
  ``robust/score`` (:mod:`evaluation.score`), through ``pl_module.log`` so they reach
  every logger, ``trainer.callback_metrics`` and the dict ``trainer.test`` returns; under DDP
  every rank logs the same (all-gathered) values, Lightning writes rank 0's;
- with a TensorBoard logger (rank 0 only), through :mod:`evaluation.tensorboard` (the one code
  path of eval.py and training): per attack and EVERY epsilon a grid of clean / adversarial /
  perturbation images, retrieval strips of the query-side attacks (QA, ES, PQ-AG, hashing) before /
  after with a text legend and the attack's targets, metric-vs-eps figures ``robust_curves/<attack>``,
  and at ``trainer.test`` an HParams session with clean R@1 / mAP and the robustness score;
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

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import Dataset

from robust_ranking.evaluation.engine import (
    ConfigResult,
    RobustnessEvaluator,
    RobustnessResults,
    StrategyCollectives,
)
from robust_ranking.evaluation.options import resolve_suite
from robust_ranking.evaluation.report import Report, write_atomic
from robust_ranking.evaluation.score import ERS
from robust_ranking.evaluation.suite import Suite
from robust_ranking.evaluation.tensorboard import hparam_metrics, scalar_values, write_evaluation, write_hparams

__all__ = ["RobustnessEvaluation"]


#: Attacked samples per configuration under ``Trainer(fast_dev_run=...)``: the loop is exercised,
#: the numbers mean nothing (as Lightning's other fast_dev_run shortcuts).
FAST_DEV_RUN_SAMPLES = 4


class RobustnessEvaluation(pl.Callback):
    """Run an attack suite during ``fit`` (every ``every_n_epochs`` validation epochs, never
    during the sanity check) and at ``trainer.test``; log scalars, images and reports.

    Args:
        suite: path of a suite YAML, or a shipped suite's name (``quick`` -> ``configs/suites/quick.yaml``).
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
        tensorboard_hparams: extra entries of the HParams session written at ``trainer.test``.
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
        tensorboard_hparams: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.suite_path = str(resolve_suite(suite))
        self.evaluator = RobustnessEvaluator(
            Suite.from_yaml(self.suite_path),
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
        self.tensorboard_hparams = dict(tensorboard_hparams or {})
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
        evaluator = self.evaluator
        if trainer.fast_dev_run:  # a smoke run of the loop: every configuration, on a few samples, no sanity checks
            evaluator = copy.copy(self.evaluator)
            evaluator.suite = evaluator.suite.with_overrides(num_samples=FAST_DEV_RUN_SAMPLES, sanity=False)
        results = evaluator.run(
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
        # Identical on every rank (all-gathered): a max-reduction over ranks returns them exactly and
        # keeps Lightning from warning about unsynchronized epoch-level values under DDP.
        pl_module.log_dict(self.scalars(results), sync_dist=True, reduce_fx="max")
        self._log_tensorboard(trainer, pl_module, results, dataset)  # rank 0, TensorBoard loggers only
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
        if stage == "test":
            self._log_hparams(trainer, pl_module, results, stage)
        if trainer.is_global_zero and self.report_dir is not None:
            name = "test" if stage == "test" else f"{stage}-epoch{trainer.current_epoch:03d}"
            report = Report.from_results(
                results, title=f"{stage} epoch {trainer.current_epoch}",
                meta={"stage": stage, "epoch": trainer.current_epoch, "global_step": trainer.global_step},
            )
            report.write(self.report_dir / f"{name}.json", self.report_dir / f"{name}.md")

    @staticmethod
    def scalars(results: RobustnessResults) -> dict[str, float]:
        """``robust/<attack>/eps=<e>/<w|m>=<k>`` -> mean metric, ``robust/score`` and
        ``robust/score/<attack>`` (:func:`evaluation.tensorboard.scalar_values`)."""
        return scalar_values(results)

    @staticmethod
    def _gallery(trainer: pl.Trainer) -> Dataset:
        dataset = getattr(trainer.datamodule, "eval_set", None) if trainer.datamodule is not None else None
        if dataset is None:
            raise RuntimeError(
                "RobustnessEvaluation needs a data.RetrievalDataModule with eval_set (the gallery X): "
                "pass datamodule=... to trainer.fit / trainer.test"
            )
        return dataset

    # ------------------------------------------------------------------ TensorBoard
    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> Any:
        """The SummaryWriter of the trainer's first TensorBoard logger (rank 0), else ``None``."""
        if not trainer.is_global_zero:
            return None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        return None if logger is None else logger.experiment

    def _log_tensorboard(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: RobustnessResults, dataset: Dataset
    ) -> None:
        writer = self._tensorboard(trainer)
        if writer is None:
            return
        datamodule = trainer.datamodule
        split = getattr(datamodule, "protocol", None) == "query_database"
        names = {r.attack for r in results.results} | {a for a, _ in results.examples}
        write_evaluation(
            writer, results, trainer.global_step, images=self.log_images, model=pl_module,
            datasets={"gallery": dataset,
                      "query": getattr(datamodule, "query_set", None) if split else None,
                      "database": getattr(datamodule, "database_set", None) if split else None},
            query_database=[a for a in names if self.evaluator.registry.get(a).protocol == "query_database"],
            num_images=self.num_images, strip_queries=self.strip_queries, strip_topk=self.strip_topk,
        )
        writer.flush()

    def _log_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: RobustnessResults,
                     stage: str) -> None:
        """HParams session of a ``trainer.test`` evaluation (eval.py: one per checkpoint sub-run)."""
        writer = self._tensorboard(trainer)
        if writer is None:
            return
        metrics = hparam_metrics(results.clean, results.score, ERS.from_results(results.results).value)
        if not metrics:
            return
        model_hparams = {k: v for k, v in dict(getattr(pl_module, "hparams", {}) or {}).items()}
        params = {"model": type(pl_module).__name__, "suite": self.suite.name, "num_samples": results.num_samples,
                  "gallery_size": results.gallery_size, "world_size": results.world_size, "stage": stage,
                  "epoch": trainer.current_epoch,
                  **({"checkpoint": str(self.partial_meta["checkpoint"])} if "checkpoint" in self.partial_meta else {}),
                  **self.tensorboard_hparams, **{f"model/{k}": v for k, v in
                                                                                 model_hparams.items()}}
        write_hparams(writer, params, metrics, trainer.global_step)
        writer.flush()
