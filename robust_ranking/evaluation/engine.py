"""The robustness-evaluation engine: run an attack suite against a ranker, single process or DDP.

One implementation serves both front ends, the :class:`callbacks.RobustnessEvaluation`
callback (during ``fit`` and at ``trainer.test``) and ``eval.py`` (checkpoints), following the
evaluation protocol of Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, Sec. 4:

1. **Gallery.** X is the evaluation split (``datamodule.eval_set``, the test split, which is
   also the query set). It is embedded once per evaluation with ``model.embed`` (eval mode,
   no grad) and reused by every attack and epsilon. Under DDP each rank embeds its shard
   (``DistributedSampler``, padded), the shards are all-gathered, de-duplicated by sample index
   and sorted by it, so every rank holds the identical full gallery.
2. **Attacked samples.** The T attacked samples are the first T of a permutation of X seeded
   by the suite seed -- the same T for every attack (the paper performs "T times of independent
   attacks"). Under DDP rank r attacks every W-th of them, in batches of ``batch_size``, with
   images fetched from X by index.
3. **Reduction.** Per-sample metric values are all-gathered (padded to equal length, padding
   dropped), ordered by sample index and reduced in float64: mean, std, T and wall time per
   attack / epsilon / w-or-m, plus the clean value (``rank_clean``) and, for QA, ``sp_rank``.
   Because every target draw is keyed by the attacked sample's index
   (:mod:`attacks.selection`), every forward runs at one fixed batch shape (short batches are
   padded, see :func:`_pad_to`) and the reduction order is fixed, world size 1 and world
   size N give the same numbers, bit for bit. ``all_gather`` puts the values on every rank,
   so every rank reduces them (identically): rank 0 writes the reports, and every rank can
   log the same scalars.

Distributed primitives come through :class:`Collectives` (single process) or
:class:`StrategyCollectives` (a Lightning ``trainer.strategy``); attacks themselves never
communicate. Lightning runs test/validation hooks under ``torch.inference_mode`` (``no_grad``
with gloo); the engine does its work under ``inference_mode(False)`` so the tensors it creates
(gallery, images) are ordinary tensors the attacks can take gradients through.

Attacks whose ``needs`` the model lacks (e.g. PQ attacks on a metric ranker) are skipped and
recorded (:class:`SkippedAttack`), never silently dropped. A w / m the gallery cannot supply
is a :class:`evaluation.suite.SuiteError` before the first attack runs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from robust_ranking.attacks.attack import NotApplicableError, frozen_eval
from robust_ranking.evaluation.registry import (
    ATTACKS,
    AttackEntry,
    AttackRegistry,
    resolve_tanh_scale,
    wants_auto_tanh_scale,
)
from robust_ranking.attacks.hashing.hashing_attack import logit_scale_factor
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.pgd import record_gradient_diagnostics
from robust_ranking.evaluation.score import RobustnessScore
from robust_ranking.evaluation.suite import AttackConfig, Suite
from robust_ranking.data.retrieval_batch import collate_retrieval_batch
from robust_ranking.retrieval.hashing_metrics import evaluate_hashing
from robust_ranking.retrieval.metrics import deduplicate_by_index, evaluate_retrieval
from robust_ranking.retrieval.topk_metrics import evaluate_query_database

__all__ = [
    "AttackExample",
    "Collectives",
    "ConfigResult",
    "EvaluationInterrupted",
    "InvalidInputError",
    "RobustnessEvaluator",
    "RobustnessResults",
    "SanityCheck",
    "SkippedAttack",
    "StrategyCollectives",
    "ZERO_GRADIENT_WARNING",
    "clean_metrics",
    "clean_query_database_metrics",
    "separate_codes",
]

#: Per-sample diagnostics the engine gathers beside each attack's metrics (0 / 1 per sample):
#: a non-finite clean or adversarial embedding / adversarial image, a non-finite loss at some
#: optimizer step, a zero or a non-finite input gradient at the first step.
DIAGNOSTIC_KEYS: tuple[str, ...] = ("nonfinite_embedding", "nonfinite_loss", "zero_grad", "nonfinite_grad")
#: A configuration whose first-step input gradient was zero or non-finite for more than this
#: fraction of its samples is flagged in the report's warnings (gradient masking, a broken loss).
ZERO_GRADIENT_WARNING = 0.5


class InvalidInputError(ValueError):
    """The gallery / query images are not valid attack inputs (NaN / inf, outside ``[0, 1]``)."""


class EvaluationInterrupted(Exception):
    """The evaluation was asked to stop (``should_stop``); the finished configurations are kept.

    Attributes:
        finished: the configurations finished so far (this run's and resumed ones), in order
            (result rows for the universal / transfer runners).
        total: the number of configurations of the whole evaluation.
        partial: the partial report that holds them, when the runner keeps one (set by the runner).
    """

    def __init__(self, finished: list[Any], total: int) -> None:
        super().__init__(f"interrupted after {len(finished)} of {total} configurations")
        self.finished = finished
        self.total = total
        self.partial: Any = None


# --------------------------------------------------------------------------- collectives
class Collectives:
    """The distributed primitives the engine uses, for a single process (world size 1).

    ``all_gather(t)`` returns ``[world_size, *t.shape]``: every rank's tensor, in rank order
    (all ranks must pass tensors of the same shape and dtype; gloo and NCCL both gather
    float32 / float64 / int64).
    """

    world_size: int = 1
    rank: int = 0

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)

    def barrier(self) -> None:
        pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StrategyCollectives(Collectives):
    """:class:`Collectives` through a Lightning trainer's strategy (DDP, single device, ...)."""

    def __init__(self, trainer: Any) -> None:
        self.strategy = trainer.strategy
        self.world_size = int(trainer.world_size)
        self.rank = int(trainer.global_rank)

    def all_gather(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        # NCCL gathers only device tensors: go through the strategy's device, come back.
        root = getattr(self.strategy, "root_device", tensor.device)
        out = self.strategy.all_gather(tensor.contiguous().to(root))
        return out.to(tensor.device)

    def barrier(self) -> None:
        self.strategy.barrier("robustness_evaluation")


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ConfigResult:
    """The reduced result of one configuration (an attack at one epsilon and one w / m).

    Attributes:
        attack, eps, size_key, size: the configuration (``size_key`` "w" / "m" / ``None``).
        metric: the reported metric ("rank": normalized rank in percent; "shift": embedding
            shift). ``mean`` / ``std`` (sample std, ddof = 1; 0 for T = 1) are over the T samples.
        count: T, the number of attacked samples.
        wall_s: wall time of the configuration (the slowest rank under DDP).
        clean: mean of the metric on the clean input (``rank_clean``), ``None`` if undefined.
        direction: "+" / "-" / ``None``, how the robustness score reads the metric.
        extra: means of the attack's other metrics (``sp_rank``, ``sp_rank_clean`` for QA).
        hparams: the attack's resolved configuration (alpha, steps, xi, G, ...).
        invalid: why the numbers of this configuration must not be used (non-finite embeddings,
            losses or metric values), or ``None`` when it is valid. An invalid result never
            enters the robustness score: the score becomes ``None``.
        diagnostics: counts over the T samples of the :data:`DIAGNOSTIC_KEYS` events
            (``None`` where the attack's optimizer does not report them) and the fraction of
            samples whose first-step gradient was zero or non-finite.
        spec_index: the suite entry the configuration comes from (keys resumed results).
        trace: with the suite's ``traces`` (and an attack that records trajectories, the hashing
            attacks), the per-sample record of :func:`_trace_record`: the check iterations, every
            sample's AP and l2 at each check, its per-sample metric values, the tanh scale factor
            used and the model's ``hash_bits``; ``None`` otherwise.
    """

    attack: str
    eps: float
    size_key: str | None
    size: int | None
    metric: str
    mean: float
    std: float
    count: int
    wall_s: float
    clean: float | None = None
    direction: str | None = None
    extra: Mapping[str, float | None] = field(default_factory=dict)
    hparams: Mapping[str, Any] = field(default_factory=dict)
    invalid: str | None = None
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    spec_index: int | None = None
    trace: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        size = f" {self.size_key}={self.size}" if self.size_key else ""
        return f"{self.attack} eps={self.eps:g}{size}"

    @property
    def key(self) -> tuple[int | None, str, float, int | None]:
        """``(spec_index, attack, eps, size)``: identifies the configuration within a suite."""
        return (self.spec_index, self.attack, self.eps, self.size)


def _config_key(config: AttackConfig) -> tuple[int | None, str, float, int | None]:
    return (config.spec_index, config.attack, config.eps, config.size)


@dataclass(frozen=True)
class SanityCheck:
    """One large-budget configuration that must nearly always succeed (see :class:`evaluation.suite.SanitySettings`).

    An attack that cannot reach its goal even without a meaningful budget signals a broken
    attack or gradient masking (Carlini et al., "On Evaluating Adversarial Robustness", 2019).

    Attributes:
        result: the reduced result of the large-budget configuration.
        threshold: the mean normalized rank the attack must reach ("+": at most, "-": at least).
        passed: whether it did (``False`` also when the result is invalid).
    """

    result: ConfigResult
    threshold: float
    passed: bool

    @property
    def message(self) -> str:
        r = self.result
        goal = f"<= {self.threshold:g}" if r.direction == "+" else f">= {self.threshold:g}"
        if r.invalid:
            return f"sanity check {r.label} is invalid ({r.invalid})"
        return (f"sanity check failed: {r.label} reached a mean rank of {r.mean:.1f}% (needs {goal}%): "
                "the attack cannot succeed even with an unbounded budget (broken attack or gradient masking)")


@dataclass(frozen=True)
class SkippedAttack:
    """An attack entry that cannot apply to the model (reported, never silently dropped)."""

    attack: str
    reason: str
    epsilons: tuple[float, ...] = ()
    size_key: str | None = None
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class AttackExample:
    """A few clean / adversarial pairs of one attack (rank 0's first batch), for image logging."""

    attack: str
    eps: float
    size_key: str | None
    size: int | None
    indices: Tensor
    images: Tensor
    adversarial: Tensor
    targets: Tensor | None = None
    #: targeted hashing attacks (SDHA-T, DHTA): the class each query is pushed towards.
    goal_labels: Tensor | None = None

    @property
    def label(self) -> str:
        size = f" {self.size_key}={self.size}" if self.size_key else ""
        return f"{self.attack} eps={self.eps:g}{size}"


@dataclass
class RobustnessResults:
    """Everything one evaluation produced (identical on every rank, except ``clean``,
    ``clean_query_database`` and ``examples``, which only rank 0 computes). ``examples`` is keyed
    by ``(attack, eps)``; ``database`` holds the encoded database (when query / database attacks
    ran or the clean query / database metrics were computed); ``clean_query_database`` is
    :func:`clean_query_database_metrics` of the whole query set (``None`` without a split)."""

    suite: Suite
    results: list[ConfigResult]
    skipped: list[SkippedAttack]
    gallery_size: int
    num_samples: int
    world_size: int
    attacked_indices: list[int]
    score: RobustnessScore
    wall_s: float
    embed_wall_s: float
    clean: dict[str, float] | None = None
    examples: dict[tuple[str, float], AttackExample] = field(default_factory=dict)
    gallery: Gallery | None = None
    database: Gallery | None = None
    sanity: list[SanityCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    invalid: str | None = None
    clean_query_database: dict[str, Any] | None = None

    def find(self, attack: str, eps: float, size: int | None = None) -> ConfigResult:
        """The result of one configuration (``KeyError`` if it was not run)."""
        for result in self.results:
            if result.attack == attack and result.eps == eps and result.size == size:
                return result
        raise KeyError(f"no result for {attack} eps={eps} size={size}")


# --------------------------------------------------------------------------- the engine
class RobustnessEvaluator:
    """Run a :class:`evaluation.suite.Suite` against a ranker (see the module docstring).

    Args:
        suite: the validated suite.
        registry: attack name -> factory (default: :data:`evaluation.registry.ATTACKS`).
        num_samples: overrides the suite's T (-1: whole gallery).
        batch_size: overrides the suite's attack batch size.
        keep_examples: keep this many clean / adversarial examples per attack and epsilon (rank 0,
            at the smallest w / m) for image logging.
        clean_metrics: compute clean Recall@1 / mAP / MAP@R of the gallery (rank 0), ranked by
            ``encode`` / ``code_distance`` as the retrieval index does, for the reports; and,
            when ``run`` is given a query / database split, the clean metrics of all queries
            against the database (:func:`clean_query_database_metrics`, rank 0).
        progress: show a tqdm progress bar (rank 0 only).

    Usage::

        evaluator = RobustnessEvaluator(Suite.from_yaml("configs/suites/quick.yaml"))
        results = evaluator.run(model, datamodule.eval_set)
        results.find("CA+", 0.1, 1).mean      # mean normalized rank in percent
    """

    def __init__(
        self,
        suite: Suite,
        registry: AttackRegistry = ATTACKS,
        num_samples: int | None = None,
        batch_size: int | None = None,
        keep_examples: int = 0,
        clean_metrics: bool = True,
        progress: bool = True,
    ) -> None:
        self.suite = suite.with_overrides(num_samples=num_samples, batch_size=batch_size)
        self.registry = registry
        self.keep_examples = int(keep_examples)
        self.clean_metrics = clean_metrics
        self.progress = progress

    # ------------------------------------------------------------------ planning
    def check(self, gallery_size: int) -> None:
        """Raise :class:`evaluation.suite.SuiteError` if the suite cannot run on this gallery."""
        self.suite.check_gallery(gallery_size, self.registry)

    def plan(
        self, model: nn.Module, query_database: bool = False
    ) -> tuple[list[AttackConfig], list[SkippedAttack]]:
        """The configurations to run on ``model`` and the specs skipped as not applicable.

        ``query_database``: whether a query set and a database are available (attacks of the
        query / database protocol are skipped, and reported, without them).
        """
        capabilities = set(getattr(model, "capabilities", set()) or set())
        configs: list[AttackConfig] = []
        skipped: list[SkippedAttack] = []
        for index, spec in enumerate(self.suite.attacks):
            entry = self.registry.get(spec.attack)
            missing = set(entry.needs) - capabilities
            reason = f"not applicable: needs {', '.join(sorted(missing))}" if missing else None
            if reason is None and entry.protocol == "query_database" and not query_database:
                reason = "not applicable: needs a query / database split (data protocol: query_database)"
            if reason is None:
                # The attack class may declare needs of its own (Attack.needs).
                probe = entry.build(spec.epsilons[0], spec.sizes[0] if spec.sizes else None, self.suite.seed,
                                    **resolve_tanh_scale(spec.options, 1.0))
                try:
                    probe.check_applicable(model)
                except NotApplicableError:
                    reason = f"not applicable: needs {', '.join(sorted(set(probe.needs) - capabilities))}"
            if reason is not None:
                skipped.append(SkippedAttack(spec.attack, reason, spec.epsilons, spec.size_key, spec.sizes))
                continue
            configs.extend(spec.configurations(index))
        return configs, skipped

    def attacked_indices(self, gallery_size: int) -> Tensor:
        """The T attacked gallery indices: the first T of a suite-seeded permutation."""
        generator = torch.Generator().manual_seed(self.suite.seed)
        return torch.randperm(gallery_size, generator=generator)[: self.suite.num_attacked(gallery_size)]

    # ------------------------------------------------------------------ running
    def run(
        self,
        model: nn.Module,
        dataset: Dataset,
        collectives: Collectives | None = None,
        embed_batch_size: int = 500,
        device: torch.device | str | None = None,
        on_result: Callable[[ConfigResult], None] | None = None,
        query_set: Dataset | None = None,
        database_set: Dataset | None = None,
        completed: Iterable[ConfigResult] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> RobustnessResults:
        """Evaluate ``model`` on the gallery ``dataset`` (items ``(image, label, index)``).

        Attacks of the query / database protocol (PQ-AG, SDHA, ...) attack the first T of a
        seeded permutation of ``query_set`` against ``database_set`` encoded once with
        ``model.encode``; without both sets they are skipped and reported.

        Args:
            model: a ranker (``embed`` / ``distance``; ``encode`` / ``code_distance`` if present).
            dataset: the gallery X, e.g. ``datamodule.eval_set``; item ``i`` must carry index ``i``.
            collectives: distributed primitives (default: single process).
            embed_batch_size: images per forward when embedding the gallery.
            device: where to run (default: the model's device).
            on_result: called on rank 0 after each configuration (e.g. partial reports).
            query_set, database_set: the query / database split (``datamodule.query_set`` /
                ``database_set`` with ``protocol="query_database"``).
            completed: results of an earlier, interrupted run of the same suite on the same
                model (a partial report): these configurations are not run again.
            should_stop: polled before every attack batch (and gallery batch); when it returns
                ``True`` on any rank, every rank stops and :class:`EvaluationInterrupted` is raised.

        Raises:
            InvalidInputError: a gallery / query image is NaN / inf or outside ``[0, 1]``.
            EvaluationInterrupted: ``should_stop`` asked to stop.
        """
        dist = collectives or Collectives()
        n = len(dataset)  # type: ignore[arg-type]
        self.check(n)
        has_split = query_set is not None and database_set is not None
        configs, skipped = self.plan(model, query_database=has_split)
        split_configs = [c for c in configs if self.registry.get(c.attack).protocol == "query_database"]
        configs = [c for c in configs if self.registry.get(c.attack).protocol != "query_database"]
        sanity_configs = self.sanity_configurations(configs)
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        device = torch.device(device)
        run = _Run(dist, device, on_result, should_stop,
                   done={r.key: r for r in completed}, total=len(configs) + len(split_configs))
        started = time.perf_counter()
        # Ordinary tensors even inside Lightning's inference-mode test loop: the attacks
        # differentiate through images and gallery embeddings created here.
        with torch.inference_mode(False), torch.no_grad(), frozen_eval(model):
            gallery, codes = self._embed_gallery(model, dataset, dist, embed_batch_size, device,
                                                 check_stop=run.check_stop)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            embed_wall = time.perf_counter() - started
            invalid = _nonfinite_rows(gallery.embeddings, codes, what="gallery embeddings")
            clean = None
            if self.clean_metrics and dist.is_main and invalid is None:
                clean = clean_metrics(model, gallery.embeddings, gallery.labels, codes)
            attacked = self.attacked_indices(n)
            database = None
            results, examples = self._run_attacks(model, dataset, gallery, attacked, configs, run, invalid)
            sanity_results, _ = self._run_attacks(
                model, dataset, gallery, attacked[: self.suite.sanity.num_samples], sanity_configs, run, invalid,
                report=False)
            clean_split = None
            with_clean_split = has_split and self.clean_metrics
            if split_configs or with_clean_split:
                # The database as the retrieval index stores it (hard PQ codes, sign codes ...).
                database, _ = self._embed_gallery(model, database_set, dist, embed_batch_size, device,
                                                  represent=getattr(model, "encode", model.embed),
                                                  check_stop=run.check_stop)
                database_invalid = invalid or _nonfinite_rows(database.embeddings, None, what="database codes")
            if with_clean_split:
                # Every query (features, and codes for PQ / hashing rankers) against the database.
                queries, query_codes = self._embed_gallery(model, query_set, dist, embed_batch_size, device,
                                                           check_stop=run.check_stop, what="queries")
                query_invalid = _nonfinite_rows(queries.embeddings, query_codes, what="query embeddings")
                if dist.is_main and database_invalid is None and query_invalid is None:
                    clean_split = clean_query_database_metrics(
                        model, queries.embeddings, queries.labels, database.embeddings, database.labels,
                        query_codes=query_codes)
            if split_configs:
                split_results, split_examples = self._run_attacks(
                    model, query_set, database, self.attacked_indices(len(query_set)), split_configs, run,
                    database_invalid, pass_labels=True)
                results += split_results
                examples.update(split_examples)
        sanity = [self._sanity_check(r) for r in sanity_results]
        return RobustnessResults(
            suite=self.suite,
            results=results,
            skipped=skipped,
            gallery_size=n,
            num_samples=int(attacked.numel()),
            world_size=dist.world_size,
            attacked_indices=attacked.tolist(),
            score=RobustnessScore.from_results(results),
            wall_s=time.perf_counter() - started,
            embed_wall_s=embed_wall,
            clean=clean,
            examples=examples,
            gallery=gallery,
            database=database,
            sanity=sanity,
            warnings=_warnings(results, sanity),
            invalid=invalid,
            clean_query_database=clean_split,
        )

    # ------------------------------------------------------------------ sanity checks
    def sanity_configurations(self, configs: list[AttackConfig]) -> list[AttackConfig]:
        """One large-budget configuration per scored rank attack of the suite (see :class:`SanityCheck`).

        For each attack name with a direction and the ``rank`` metric (CA+/CA-/QA+/QA-), the
        first suite entry's options at its smallest w / m, with the suite's ``sanity`` eps,
        steps and alpha and the registry entry's ``sanity_options`` (QA: ``G = 0``, no
        semantics-preserving term, whose purpose is to hold the attack back). Only attacks that
        apply to the model (``configs``) are checked.
        """
        settings = self.suite.sanity
        if not settings.enabled:
            return []
        out: list[AttackConfig] = []
        seen: set[str] = set()
        for config in configs:
            entry = self.registry.get(config.attack)
            if config.attack in seen or entry.direction is None or entry.metric != "rank":
                continue
            seen.add(config.attack)
            spec = self.suite.attacks[config.spec_index]
            options = {k: v for k, v in spec.options.items() if k not in ("steps", "alpha", "random_start")}
            options.update(steps=settings.steps, alpha=settings.alpha, **entry.sanity_options)
            size = min(spec.sizes) if spec.sizes else None
            out.append(AttackConfig(config.spec_index, config.attack, settings.eps, spec.size_key, size, options))
        return out

    def _sanity_check(self, result: ConfigResult) -> SanityCheck:
        settings = self.suite.sanity
        if result.direction == "+":
            threshold = settings.max_rank_plus
            passed = result.invalid is None and result.mean <= threshold
        else:
            threshold = settings.min_rank_minus
            passed = result.invalid is None and result.mean >= threshold
        return SanityCheck(result, threshold, bool(passed))

    def _embed_gallery(
        self,
        model: nn.Module,
        dataset: Dataset,
        dist: Collectives,
        batch_size: int,
        device: torch.device,
        represent: Callable[[Tensor], Tensor] | None = None,
        check_stop: Callable[[], None] | None = None,
        what: str | None = None,
    ) -> tuple[Gallery, Tensor | None]:
        """Embed X once: each rank its padded shard, gathered, de-duplicated, sorted by index.

        ``represent`` replaces ``model.embed`` (e.g. ``model.encode`` for a database); the
        second, ``encode`` pass for the clean metrics is then skipped. Every image is checked
        (finite, in ``[0, 1]``); the verdict is gathered so that every rank raises the same
        :class:`InvalidInputError`. ``check_stop`` is called before every batch (see :class:`_Run`).
        ``what`` names the set in the progress messages (default: gallery / database).
        """
        n = len(dataset)  # type: ignore[arg-type]
        sampler = None
        if dist.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=False,
                                         drop_last=False)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                            collate_fn=collate_retrieval_batch)
        # encode() differs from embed() only for PQ / hashing rankers: skip the second pass otherwise.
        with_codes = represent is None and self.clean_metrics and separate_codes(model)
        what = what or ("gallery" if represent is None else "database")
        represent = represent or model.embed
        embeddings, codes, labels, indices, bad_inputs = [], [], [], [], []
        width = min(batch_size, n)
        # Status and bar on rank 0 (a large gallery takes minutes before the first attack batch).
        show = self.progress and dist.is_main
        if show:
            processes = f" on {dist.world_size} processes" if dist.world_size > 1 else ""
            tqdm.write(f"embedding the {what} ({n} images{processes}) ...", file=sys.stderr)
        bar = tqdm(total=len(sampler) if sampler is not None else n, desc=f"embedding the {what}", unit="img",
                   leave=False, disable=not show, dynamic_ncols=True, file=sys.stderr)
        for images, batch_labels, batch_indices in loader:  # equal batch counts on every rank (padded sampler)
            if check_stop is not None:
                check_stop()
            b = images.shape[0]
            bar.update(b)
            images = images.to(device)
            bad_inputs.append(_bad_images(images))
            images = _pad_to(images, width)  # fixed shapes: see _pad_to
            embeddings.append(represent(images)[:b])
            if with_codes:
                codes.append(model.encode(images)[:b])
            labels.append(batch_labels.to(device))
            indices.append(batch_indices.to(device))
        bar.close()
        gathered_idx = dist.all_gather(torch.cat(indices)).reshape(-1)
        gathered_emb = dist.all_gather(torch.cat(embeddings))
        gathered_emb = gathered_emb.reshape(-1, *gathered_emb.shape[2:])
        gathered_lab = dist.all_gather(torch.cat(labels)).reshape(-1)
        gathered_bad = dist.all_gather(torch.cat(bad_inputs)).reshape(-1)
        values = [gathered_emb, gathered_lab, gathered_bad]
        if with_codes:
            gathered_codes = dist.all_gather(torch.cat(codes))
            values.append(gathered_codes.reshape(-1, *gathered_codes.shape[2:]))
        unique_idx, *values = deduplicate_by_index(gathered_idx, *values)
        if unique_idx.numel() != n or not torch.equal(unique_idx.cpu(), torch.arange(n)):
            raise ValueError(
                f"the gallery dataset must yield each index 0..{n - 1} once (items carry their index)")
        bad = torch.nonzero(values[2]).reshape(-1).tolist()
        if bad:
            shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise InvalidInputError(
                f"{len(bad)} of {n} images are not valid attack inputs (NaN / inf, or outside [0, 1]; "
                f"normalization belongs inside the model): dataset indices {shown}")
        return Gallery(values[0], values[1]), (values[3] if with_codes else None)

    def clean_metrics_of(self, model: nn.Module, gallery: Gallery) -> dict[str, float] | None:
        """Clean Recall@1 / mAP / MAP@R of a gathered gallery (ranked by its embeddings); ``None``
        when an embedding is NaN / inf (no number would mean anything)."""
        if _nonfinite_rows(gallery.embeddings, None, what="gallery embeddings") is not None:
            return None
        return clean_metrics(model, gallery.embeddings, gallery.labels)

    def _run_attacks(
        self,
        model: nn.Module,
        dataset: Dataset,
        gallery: Gallery,
        attacked: Tensor,
        configs: list[AttackConfig],
        run: _Run,
        invalid: str | None,
        pass_labels: bool = False,
        report: bool = True,
    ) -> tuple[list[ConfigResult], dict[tuple[str, float], AttackExample]]:
        """Run ``configs`` on the ``attacked`` samples; ``invalid`` (a broken gallery) marks every
        result invalid without attacking. ``report``: count towards progress / ``on_result``."""
        dist, device = run.dist, run.device
        local = attacked[dist.rank :: dist.world_size]  # rank r: every W-th attacked sample
        width = math.ceil(attacked.numel() / dist.world_size)  # equal shapes for all_gather
        padded_idx = torch.full((width,), -1, dtype=torch.long)
        padded_idx[: local.numel()] = local
        gathered_idx = dist.all_gather(padded_idx.to(device)).reshape(-1).cpu()
        valid = gathered_idx >= 0
        order = torch.argsort(gathered_idx[valid])  # reduce in sample-index order, whatever W
        batch_size = self.suite.batch_size
        width_b = min(batch_size, attacked.numel())  # every attack call has this many instances
        # The same number of batch slots on every rank (a rank may have one sample fewer), so that
        # the per-batch stop vote is a collective every rank joins.
        num_batches = math.ceil(width / batch_size)
        example_positions = self._example_positions(configs)

        results: list[ConfigResult] = []
        examples: dict[tuple[str, float], AttackExample] = {}
        tanh_factor: float | None = None
        todo = [c for c in configs if not (report and _config_key(c) in run.done)]
        bar = tqdm(total=len(todo) * max(num_batches, 1), desc="robustness" if report else "sanity checks",
                   unit="batch", leave=False, disable=not (self.progress and dist.is_main), dynamic_ncols=True)
        try:
            for position, config in enumerate(configs):
                if report and _config_key(config) in run.done:  # resumed from a partial report
                    results.append(run.done[_config_key(config)])
                    run.finished.append(results[-1])
                    continue
                entry = self.registry.get(config.attack)
                factor = None
                if wants_auto_tanh_scale(config.options):  # one factor per model and workload
                    if invalid is None and tanh_factor is None:
                        tanh_factor = self._logit_scale_factor(model, dataset, attacked, device)
                    factor = tanh_factor if invalid is None else 1.0
                options = resolve_tanh_scale(config.options, factor) if factor is not None else config.options
                attack = entry.build(config.eps, config.size, self.suite.seed, **options)
                if invalid is not None:
                    results.append(_invalid_result(entry, config, attack.hparams, invalid))
                    continue
                bar.set_postfix_str(config.label)
                keep = self.keep_examples if (dist.is_main and position in example_positions and report) else 0
                start = time.perf_counter()
                keys = (*entry.metrics, *DIAGNOSTIC_KEYS)
                values: dict[str, list[Tensor]] = {key: [] for key in keys}
                traces: list[Any] = []  # the attack's per-batch trajectories (suite traces: true)
                batches = self._batches(dataset, local, batch_size)
                for _ in range(num_batches):
                    run.check_stop()
                    batch = next(batches, None)
                    if batch is None:  # this rank has one sample fewer: only the vote above
                        continue
                    images, labels, indices = batch
                    b = images.shape[0]
                    kwargs = {"query_labels": _pad_to(labels.to(device), width_b)} if pass_labels else {}
                    padded = _pad_to(images.to(device), width_b)
                    with record_gradient_diagnostics() as gradients:
                        out = attack(model, gallery, padded, _pad_to(indices.to(device), width_b), **kwargs)
                    observed = {
                        "nonfinite_embedding": _nonfinite_outputs(model, padded, out.adversarial),
                        "nonfinite_loss": gradients.nonfinite_loss,
                        "zero_grad": gradients.zero_grad,
                        "nonfinite_grad": gradients.nonfinite_grad,
                    }
                    for key in keys:
                        # A metric the attack does not produce on this model (e.g. SDC AP on a
                        # ranker without codebooks) is reported as missing (NaN), not a crash.
                        value = out.metrics.get(key) if key in entry.metrics else observed[key]
                        value = torch.full((b,), math.nan, device=device) if value is None else value[:b]
                        values[key].append(value.detach().to(torch.float64))
                    trace = getattr(out, "trace", None)
                    if self.suite.traces and trace is not None:
                        traces.append((trace, b))
                    if keep and (config.attack, config.eps) not in examples:
                        goal = getattr(out, "goal_labels", None)
                        examples[(config.attack, config.eps)] = AttackExample(
                            config.attack, config.eps, config.size_key, config.size, indices[:keep].cpu(),
                            images[:keep].cpu(), out.adversarial[:keep].detach().cpu(),
                            None if out.targets is None else out.targets[:keep].cpu(),
                            None if not isinstance(goal, Tensor) else goal[:keep].cpu(),
                        )
                    bar.update(1)
                if num_batches == 0:
                    bar.update(1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall = time.perf_counter() - start
                result = self._reduce(entry, config, attack.hparams, values, width, run, valid, order, wall)
                if self.suite.traces:
                    record = self._gather_traces(attack, traces, width, run, valid, order)
                    if record is not None:
                        per_sample = self._gather_values(values, entry.metrics, width, run, valid, order)
                        record.update(
                            indices=torch.sort(attacked).values.tolist(), per_sample=per_sample,
                            tanh_scale_factor=float(factor if factor is not None else
                                                    config.options.get("tanh_scale_factor", 1.0)),
                            hash_bits=getattr(model, "hash_bits", None))
                        result = replace(result, trace=record)
                results.append(result)
                if report and run.on_result is not None and dist.is_main:
                    run.on_result(result)
                if report:
                    run.finished.append(result)
        finally:
            bar.close()
        return results, examples

    @staticmethod
    def _batches(dataset: Dataset, indices: Tensor, batch_size: int) -> Iterator[Any]:
        """The attacked samples of this rank, fetched from X by index, ``batch_size`` at a time."""
        if indices.numel() == 0:
            return iter(())
        loader = DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(), shuffle=False,
                            collate_fn=collate_retrieval_batch)
        return iter(loader)

    def _example_positions(self, configs: list[AttackConfig]) -> set[int]:
        """Per attack and epsilon, the configuration whose examples are logged: the smallest w / m."""
        if self.keep_examples <= 0:
            return set()
        best: dict[tuple[str, float], tuple[int, int]] = {}
        for position, config in enumerate(configs):
            key = (config.attack, config.eps)
            if key not in best or (config.size or 0) < best[key][0]:
                best[key] = (config.size or 0, position)
        return {position for _, position in best.values()}

    @staticmethod
    def _logit_scale_factor(model: nn.Module, dataset: Dataset, attacked: Tensor, device: torch.device) -> float:
        """``tanh_scale_factor: auto``: :func:`attacks.hashing.hashing_attack.logit_scale_factor` of the
        whole workload (the attacked samples in index order, one forward), the same on every rank."""
        loader = DataLoader(dataset, batch_size=max(1, attacked.numel()), sampler=torch.sort(attacked).values.tolist(),
                            shuffle=False, collate_fn=collate_retrieval_batch)
        images = torch.cat([x for x, _, _ in loader]).to(device)
        return logit_scale_factor(model, images)

    @staticmethod
    def _gather_rows(rows: Tensor, width: int, run: _Run, valid: Tensor, order: Tensor) -> Tensor:
        """Per-sample rows ``[n_local, C]`` of every rank, in sample-index order: ``[T, C]``."""
        local = torch.full((width, rows.shape[1]), math.nan, dtype=rows.dtype, device=run.device)
        local[: rows.shape[0]] = rows.to(run.device)
        gathered = run.dist.all_gather(local).cpu()  # [W, width, C]
        return gathered.reshape(-1, rows.shape[1])[valid][order]

    def _gather_traces(self, attack: Any, traces: list[Any], width: int, run: _Run, valid: Tensor,
                       order: Tensor) -> dict[str, Any] | None:
        """The trajectories of the configuration's samples, ``None`` for an attack that records none.

        An attack records them when it has ``check_iterations`` (the grid of its checks, the same
        for every batch and rank: the hashing attacks). Every rank calls it (a collective); a rank
        without samples sends only padding.
        """
        grid = getattr(attack, "check_iterations", None)
        if grid is None:
            return None
        columns = len(grid)
        ap = torch.cat([t.ap[:b].cpu() for t, b in traces]) if traces else torch.zeros(0, columns)
        l2 = torch.cat([t.l2[:b].cpu() for t, b in traces]) if traces else torch.zeros(0, columns)
        return {"iterations": [int(i) for i in grid], "targeted": bool(getattr(attack, "targeted", False)),
                "ap": self._gather_rows(ap, width, run, valid, order).tolist(),
                "l2": self._gather_rows(l2, width, run, valid, order).tolist()}

    def _gather_values(self, values: dict[str, list[Tensor]], metrics: tuple[str, ...], width: int, run: _Run,
                       valid: Tensor, order: Tensor) -> dict[str, list[float]]:
        """Each metric's per-sample values (float64), in sample-index order (a collective)."""
        out = {}
        for key in metrics:
            local = torch.cat(values[key]) if values[key] else torch.zeros(0, dtype=torch.float64)
            out[key] = self._gather_rows(local[:, None], width, run, valid, order)[:, 0].tolist()
        return out

    def _reduce(
        self,
        entry: AttackEntry,
        config: AttackConfig,
        hparams: Mapping[str, Any],
        values: dict[str, list[Tensor]],
        width: int,
        run: _Run,
        valid: Tensor,
        order: Tensor,
        wall: float,
    ) -> ConfigResult:
        """Gather one configuration's per-sample values from every rank and reduce them."""
        dist, device = run.dist, run.device
        keys = list(values)
        local = torch.full((len(keys), width), math.nan, dtype=torch.float64, device=device)
        for row, key in enumerate(keys):
            if values[key]:
                v = torch.cat(values[key]).to(device)
                local[row, : v.numel()] = v
        gathered = dist.all_gather(local).cpu()  # [W, K, width]
        per_sample = gathered.permute(1, 0, 2).reshape(len(keys), -1)[:, valid][:, order]  # [K, T]
        walls = dist.all_gather(torch.tensor([wall], dtype=torch.float64, device=device)).cpu()
        stats = {key: per_sample[row] for row, key in enumerate(keys)}
        main = stats[entry.metric]
        count = int(main.numel())
        std = float(main.std(unbiased=True)) if count > 1 else 0.0
        metric_keys = [k for k in entry.metrics if k not in (entry.metric, entry.clean_metric)]
        extra = {key: _nanmean(stats[key]) for key in metric_keys}
        resolved = {k: v for k, v in hparams.items() if k not in ("attack", "eps", "w", "m")}
        diagnostics = _diagnostics(stats, count)
        checked = [entry.metric] + ([entry.clean_metric] if entry.direction and entry.clean_metric else [])
        return ConfigResult(
            attack=config.attack,
            eps=config.eps,
            size_key=config.size_key,
            size=config.size,
            metric=entry.metric,
            mean=float(main.mean()) if count else math.nan,
            std=std,
            count=count,
            wall_s=float(walls.max()),
            clean=_nanmean(stats[entry.clean_metric]) if entry.clean_metric in stats else None,
            direction=entry.direction,
            extra=extra,
            hparams=resolved,
            invalid=_invalid_reason(diagnostics, {k: stats[k] for k in checked if k in stats}, count),
            diagnostics=diagnostics,
            spec_index=config.spec_index,
        )


@dataclass
class _Run:
    """The state one :meth:`RobustnessEvaluator.run` threads through its phases."""

    dist: Collectives
    device: torch.device
    on_result: Callable[[ConfigResult], None] | None
    should_stop: Callable[[], bool] | None
    done: dict[tuple[int | None, str, float, int | None], ConfigResult]
    total: int
    finished: list[ConfigResult] = field(default_factory=list)  # in suite order, resumed ones included

    def check_stop(self) -> None:
        """Raise :class:`EvaluationInterrupted` when a stop was asked for on any rank (a collective
        under DDP: every rank calls it the same number of times)."""
        if self.should_stop is None:
            return
        stop = bool(self.should_stop())
        if self.dist.world_size > 1:
            flag = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64, device=self.device)
            stop = bool(self.dist.all_gather(flag).amax() > 0)
        if stop:
            raise EvaluationInterrupted(list(self.finished), self.total)


def _bad_images(images: Tensor) -> Tensor:
    """Per image: 1 if it has a NaN / inf pixel or one outside ``[0, 1]``, else 0 (float64, for gathering)."""
    flat = images.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    in_range = ((flat >= 0) & (flat <= 1)).all(dim=1)  # False for NaN too
    return (~(finite & in_range)).to(torch.float64)


def _nonfinite_rows(embeddings: Tensor, codes: Tensor | None, what: str) -> str | None:
    """``"k of N gallery embeddings are NaN / inf"`` or ``None`` when every row is finite."""
    bad = ~torch.isfinite(embeddings.flatten(1).float()).all(dim=1)
    if codes is not None and codes.is_floating_point():
        bad |= ~torch.isfinite(codes.flatten(1)).all(dim=1)
    count = int(bad.sum())
    return f"{count} of {bad.numel()} {what} are NaN / inf" if count else None


def _nonfinite_outputs(model: nn.Module, images: Tensor, adversarial: Tensor) -> Tensor:
    """Per instance: the adversarial image, or the clean or adversarial embedding, has a NaN / inf.

    One extra forward of the clean and adversarial batch (``embed``, no grad): small beside the
    attack's ``steps`` forward + backward passes, and it is what keeps a NaN from scoring.
    """
    b = images.shape[0]
    with torch.no_grad():
        emb = model.embed(torch.cat([images, adversarial.detach()])).flatten(1)
    finite = torch.isfinite(emb).all(dim=1)
    ok = finite[:b] & finite[b:] & torch.isfinite(adversarial.detach().flatten(1)).all(dim=1)
    return ~ok


def _diagnostics(stats: Mapping[str, Tensor], count: int) -> dict[str, Any]:
    """Counts of the :data:`DIAGNOSTIC_KEYS` events over the T samples (``None``: not recorded)."""
    out: dict[str, Any] = {}
    for key in DIAGNOSTIC_KEYS:
        v = stats.get(key)
        recorded = v is not None and count > 0 and not bool(torch.isnan(v).all())
        out[key] = int(torch.nansum(v)) if recorded else None
    if out["zero_grad"] is not None and count:
        both = torch.nan_to_num(stats["zero_grad"]).bool() | torch.nan_to_num(stats["nonfinite_grad"]).bool()
        out["zero_or_nonfinite_grad_fraction"] = float(both.double().mean())
    else:
        out["zero_or_nonfinite_grad_fraction"] = None
    return out


def _invalid_reason(diagnostics: Mapping[str, Any], checked: Mapping[str, Tensor], count: int) -> str | None:
    """Why a configuration's numbers must not be used, or ``None``."""
    reasons = []
    if diagnostics.get("nonfinite_embedding"):
        reasons.append(f"{diagnostics['nonfinite_embedding']} of {count} clean / adversarial embeddings are NaN / inf")
    if diagnostics.get("nonfinite_loss"):
        reasons.append(f"the attack loss was NaN / inf for {diagnostics['nonfinite_loss']} of {count} samples")
    for key, v in checked.items():
        nan = int(torch.isnan(v).sum())
        if nan:
            reasons.append(f"{nan} of {count} '{key}' values are NaN")
    if count == 0:
        reasons.append("no sample was attacked")
    return "; ".join(reasons) or None


def _invalid_result(entry: AttackEntry, config: AttackConfig, hparams: Mapping[str, Any], reason: str) -> ConfigResult:
    """The result of a configuration that was not run because its inputs are broken."""
    resolved = {k: v for k, v in hparams.items() if k not in ("attack", "eps", "w", "m")}
    return ConfigResult(attack=config.attack, eps=config.eps, size_key=config.size_key, size=config.size,
                        metric=entry.metric, mean=math.nan, std=math.nan, count=0, wall_s=0.0, clean=None,
                        direction=entry.direction, hparams=resolved, invalid=reason, spec_index=config.spec_index)


def _warnings(results: list[ConfigResult], sanity: list[SanityCheck]) -> list[str]:
    """Failed sanity checks and configurations whose first-step gradients were mostly zero / non-finite."""
    out = [check.message for check in sanity if not check.passed]
    for r in [*results, *(check.result for check in sanity)]:
        fraction = r.diagnostics.get("zero_or_nonfinite_grad_fraction")
        if fraction is not None and fraction > ZERO_GRADIENT_WARNING:
            out.append(f"{r.label}: the input gradient was zero or NaN / inf at the first step for "
                       f"{100 * fraction:.0f}% of the samples (gradient masking or a broken loss?)")
    return out


def clean_metrics(model: nn.Module, embeddings: Tensor, labels: Tensor, codes: Tensor | None = None) -> dict[str, float]:
    """Clean Recall@1 / mAP / MAP@R of X against itself (self excluded), ranked as retrieval ranks.

    The one clean-metric function of every report (ranking, universal, transfer): by ``codes``
    (``model.encode`` of X: hard PQ codes, sign codes) and ``model.code_distance`` when given,
    else by the embeddings with ``code_distance`` (the same as ``distance`` for metric rankers).

    ``model.build_index`` (faiss) is handed to the metrics when the keys are what ``encode``
    stores; mAP needs the whole ranking, which ``retrieval.index.search_backend`` leaves to the exact
    torch path in element-bounded query chunks on the keys' device (docs/evaluation.md, "Large
    galleries and GPU faiss"), so the numbers are those of the torch path.
    """
    distance = getattr(model, "code_distance", model.distance)
    keys = codes if codes is not None else embeddings
    # build_index indexes encode() outputs: usable when the keys are the codes, or when encode is
    # the embedding itself (metric rankers).
    index_factory = getattr(model, "build_index", None) if (codes is not None or not separate_codes(model)) else None
    with torch.inference_mode(False), torch.no_grad():
        values = evaluate_retrieval(keys, labels, keys, labels, distance, exclude_self=True, recall_ks=(1,), nmi=False,
                                    index_factory=index_factory)
    return {k: float(v) for k, v in values.items()}


#: The ranking cut-off of the query / database mAP@k (SDHA / HAG, DCH, PQN evaluations: mAP@1000).
QUERY_DATABASE_TOPK = 1000
#: The Hamming radius of the hashing papers' "within radius" metrics (DCH: mAP / precision at H <= 2).
HAMMING_RADIUS = 2


def clean_query_database_metrics(
    model: nn.Module,
    query_embeddings: Tensor,
    query_labels: Tensor,
    database_codes: Tensor,
    database_labels: Tensor,
    query_codes: Tensor | None = None,
) -> dict[str, Any]:
    """Clean retrieval of every query against the database (query / database protocol).

    The one function behind a report's ``clean_query_database`` section (no self exclusion; ties
    broken by database index), by the ranker's family:

    - hashing rankers (``hash_bits``): SDHA Table 1 / DCH -- :func:`retrieval.evaluate_hashing` of
      the sign codes: ``map@1000``, ``map`` (whole ranking), ``map@H<=2``, ``precision@H<=2`` and
      the precision / recall curves over Hamming radii 0..K (``pr_radius_precision`` /
      ``pr_radius_recall``);
    - PQ rankers (``codebooks`` and ``adc_distance``): PQ-AG / DPQN tables --
      :func:`retrieval.evaluate_query_database` under SDC (query codes, ``code_distance``) and ADC
      (query features, ``adc_distance``): ``sdc_map``, ``sdc_map@1000``, ``adc_map``,
      ``adc_map@1000``;
    - other rankers: :func:`retrieval.evaluate_retrieval` of the ``encode`` outputs by
      ``code_distance``: ``recall@1``, ``map``, ``map@r``.

    Plus ``family`` (``"hashing"`` / ``"product_quantization"`` / ``"metric"``), ``bits`` (hashing /
    PQ), ``queries`` and ``database`` (their counts). Each path hands the retrieval function the
    ranker's index (``build_index``), so databases above ``retrieval.index.FAISS_MIN_GALLERY`` are
    searched through faiss where the metric allows it (docs/evaluation.md, "Large galleries and GPU
    faiss"); the numbers are those of the torch path.

    Args:
        query_embeddings: ``model.embed`` of the queries.
        query_codes: ``model.encode`` of the queries (PQ / hashing rankers; ``None`` when
            ``encode`` is ``embed``).
        database_codes: ``model.encode`` of the database (what the retrieval index stores).
    """
    codes = query_codes if query_codes is not None else query_embeddings
    sizes = {"queries": int(query_labels.numel()), "database": int(database_labels.numel())}
    hash_bits = getattr(model, "hash_bits", None)
    codebooks = getattr(model, "codebooks", None)
    with torch.inference_mode(False), torch.no_grad():
        if isinstance(hash_bits, int) and not isinstance(hash_bits, bool):
            values = evaluate_hashing(codes, query_labels, database_codes, database_labels,
                                      topks=(QUERY_DATABASE_TOPK, None), radius=HAMMING_RADIUS)
            return {"family": "hashing", "bits": hash_bits, **sizes, **values}
        if codebooks is not None and hasattr(model, "adc_distance"):
            out: dict[str, Any] = {"family": "product_quantization", "bits": getattr(model, "num_bits", None),
                                   **sizes}
            for mode, queries, distance in (("sdc", codes, model.code_distance),
                                            ("adc", query_embeddings, model.adc_distance)):
                def index_factory(database: Tensor, use_gpu: bool | None = None, _mode: str = mode) -> Any:
                    return model.build_index(database, mode=_mode, use_gpu=use_gpu)

                values = evaluate_query_database(queries, query_labels, database_codes, database_labels, distance,
                                                 topks=(QUERY_DATABASE_TOPK, None), index_factory=index_factory)
                out.update({f"{mode}_{key}": value for key, value in values.items()})
            return out
        distance = getattr(model, "code_distance", model.distance)
        values = evaluate_retrieval(codes, query_labels, database_codes, database_labels, distance,
                                    exclude_self=False, recall_ks=(1,), nmi=False,
                                    index_factory=getattr(model, "build_index", None))
    return {"family": "metric", **sizes, **{k: float(v) for k, v in values.items()}}


def separate_codes(model: nn.Module) -> bool:
    """Whether ``model.encode`` differs from ``model.embed`` (PQ / hashing rankers): the clean
    metrics then rank by the codes."""
    return _overrides(model, "encode")


def _pad_to(batch: Tensor, size: int) -> Tensor:
    """``batch`` cycled up to ``size`` rows (the extra rows' outputs are dropped by the caller).

    Why: CPU / GPU kernels may pick a different algorithm for a different batch size, which
    changes results in the last float bits (LeNet on CPU: batches below 4 differ by ~2e-7),
    and PGD's sign steps can amplify that. With every call at the same shape, and outputs
    independent of a sample's position in the batch, a sample's result does not depend on
    which shard or batch it lands in, so DDP reproduces the single-process numbers exactly.
    Repeated samples are identical attack instances (targets are keyed by sample index).
    """
    b = batch.shape[0]
    if b >= size:
        return batch
    return batch[torch.arange(size, device=batch.device) % b]


def _nanmean(values: Tensor) -> float | None:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else None


def _overrides(model: nn.Module, name: str) -> bool:
    """Whether ``model`` overrides ``Ranker.<name>`` (``False`` for models without a Ranker base)."""
    try:
        from robust_ranking.lightning_modules.ranker import Ranker
    except ImportError:  # pragma: no cover - the package is part of the project
        return False
    if not isinstance(model, Ranker):
        return False
    return getattr(type(model), name) is not getattr(Ranker, name)
