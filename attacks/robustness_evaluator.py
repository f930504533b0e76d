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
is a :class:`attacks.suite.SuiteError` before the first attack runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from attacks.attack import NotApplicableError, frozen_eval
from attacks.attack_registry import ATTACKS, AttackEntry, AttackRegistry
from attacks.gallery import Gallery
from attacks.robustness_score import RobustnessScore
from attacks.suite import AttackConfig, Suite
from data.retrieval_batch import collate_retrieval_batch
from retrieval.metrics import deduplicate_by_index, evaluate_retrieval

__all__ = [
    "AttackExample",
    "Collectives",
    "ConfigResult",
    "RobustnessEvaluator",
    "RobustnessResults",
    "SkippedAttack",
    "StrategyCollectives",
]


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

    @property
    def label(self) -> str:
        size = f" {self.size_key}={self.size}" if self.size_key else ""
        return f"{self.attack} eps={self.eps:g}{size}"


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


@dataclass
class RobustnessResults:
    """Everything one evaluation produced (identical on every rank, except ``clean`` and
    ``examples``, which only rank 0 computes)."""

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
    examples: dict[str, AttackExample] = field(default_factory=dict)
    gallery: Gallery | None = None

    def find(self, attack: str, eps: float, size: int | None = None) -> ConfigResult:
        """The result of one configuration (``KeyError`` if it was not run)."""
        for result in self.results:
            if result.attack == attack and result.eps == eps and result.size == size:
                return result
        raise KeyError(f"no result for {attack} eps={eps} size={size}")


# --------------------------------------------------------------------------- the engine
class RobustnessEvaluator:
    """Run a :class:`attacks.suite.Suite` against a ranker (see the module docstring).

    Args:
        suite: the validated suite.
        registry: attack name -> factory (default: :data:`attacks.attack_registry.ATTACKS`).
        num_samples: overrides the suite's T (-1: whole gallery).
        batch_size: overrides the suite's attack batch size.
        keep_examples: keep this many clean / adversarial examples per attack (rank 0, at the
            largest epsilon and smallest w / m) for image logging.
        clean_metrics: compute clean Recall@1 / mAP / MAP@R of the gallery (rank 0), ranked by
            ``encode`` / ``code_distance`` as the retrieval index does, for the reports.
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
        """Raise :class:`attacks.suite.SuiteError` if the suite cannot run on this gallery."""
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
                                    **spec.options)
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
        """
        dist = collectives or Collectives()
        n = len(dataset)  # type: ignore[arg-type]
        self.check(n)
        has_split = query_set is not None and database_set is not None
        configs, skipped = self.plan(model, query_database=has_split)
        split_configs = [c for c in configs if self.registry.get(c.attack).protocol == "query_database"]
        configs = [c for c in configs if self.registry.get(c.attack).protocol != "query_database"]
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        device = torch.device(device)
        started = time.perf_counter()
        # Ordinary tensors even inside Lightning's inference-mode test loop: the attacks
        # differentiate through images and gallery embeddings created here.
        with torch.inference_mode(False), torch.no_grad(), frozen_eval(model):
            gallery, codes = self._embed_gallery(model, dataset, dist, embed_batch_size, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            embed_wall = time.perf_counter() - started
            clean = None
            if self.clean_metrics and dist.is_main:
                clean = self._clean_metrics(model, gallery, codes)
            attacked = self.attacked_indices(n)
            results, examples = self._run_attacks(
                model, dataset, gallery, attacked, configs, dist, device, on_result)
            if split_configs:
                # The database as the retrieval index stores it (hard PQ codes, sign codes ...).
                database, _ = self._embed_gallery(
                    model, database_set, dist, embed_batch_size, device, represent=model.encode)
                split_results, split_examples = self._run_attacks(
                    model, query_set, database, self.attacked_indices(len(query_set)), split_configs, dist,
                    device, on_result, pass_labels=True)
                results += split_results
                examples.update(split_examples)
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
        )

    def _embed_gallery(
        self,
        model: nn.Module,
        dataset: Dataset,
        dist: Collectives,
        batch_size: int,
        device: torch.device,
        represent: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Gallery, Tensor | None]:
        """Embed X once: each rank its padded shard, gathered, de-duplicated, sorted by index.

        ``represent`` replaces ``model.embed`` (e.g. ``model.encode`` for a database); the
        second, ``encode`` pass for the clean metrics is then skipped.
        """
        n = len(dataset)  # type: ignore[arg-type]
        sampler = None
        if dist.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=False,
                                         drop_last=False)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                            collate_fn=collate_retrieval_batch)
        # encode() differs from embed() only for PQ / hashing rankers: skip the second pass otherwise.
        separate_codes = represent is None and self.clean_metrics and _overrides(model, "encode")
        represent = represent or model.embed
        embeddings, codes, labels, indices = [], [], [], []
        width = min(batch_size, n)
        for images, batch_labels, batch_indices in loader:
            b = images.shape[0]
            images = _pad_to(images.to(device), width)  # fixed shapes: see _pad_to
            embeddings.append(represent(images)[:b])
            if separate_codes:
                codes.append(model.encode(images)[:b])
            labels.append(batch_labels.to(device))
            indices.append(batch_indices.to(device))
        gathered_idx = dist.all_gather(torch.cat(indices)).reshape(-1)
        gathered_emb = dist.all_gather(torch.cat(embeddings))
        gathered_emb = gathered_emb.reshape(-1, *gathered_emb.shape[2:])
        gathered_lab = dist.all_gather(torch.cat(labels)).reshape(-1)
        values = [gathered_emb, gathered_lab]
        if separate_codes:
            gathered_codes = dist.all_gather(torch.cat(codes))
            values.append(gathered_codes.reshape(-1, *gathered_codes.shape[2:]))
        unique_idx, *values = deduplicate_by_index(gathered_idx, *values)
        if unique_idx.numel() != n or not torch.equal(unique_idx.cpu(), torch.arange(n)):
            raise ValueError(
                f"the gallery dataset must yield each index 0..{n - 1} once (items carry their index)")
        return Gallery(values[0], values[1]), (values[2] if separate_codes else None)

    def clean_metrics_of(self, model: nn.Module, gallery: Gallery) -> dict[str, float]:
        """Clean Recall@1 / mAP / MAP@R of a gathered gallery (ranked by its embeddings)."""
        with torch.inference_mode(False), torch.no_grad():
            return self._clean_metrics(model, gallery, None)

    def _clean_metrics(self, model: nn.Module, gallery: Gallery, codes: Tensor | None) -> dict[str, float]:
        """Clean Recall@1 / mAP / MAP@R of X against itself (self excluded), as retrieval ranks."""
        distance = getattr(model, "code_distance", model.distance)
        return evaluate_retrieval(
            codes if codes is not None else gallery.embeddings, gallery.labels,
            codes if codes is not None else gallery.embeddings, gallery.labels,
            distance, exclude_self=True, recall_ks=(1,), nmi=False,
        )

    def _run_attacks(
        self,
        model: nn.Module,
        dataset: Dataset,
        gallery: Gallery,
        attacked: Tensor,
        configs: list[AttackConfig],
        dist: Collectives,
        device: torch.device,
        on_result: Callable[[ConfigResult], None] | None,
        pass_labels: bool = False,
    ) -> tuple[list[ConfigResult], dict[str, AttackExample]]:
        local = attacked[dist.rank :: dist.world_size]  # rank r: every W-th attacked sample
        width = math.ceil(attacked.numel() / dist.world_size)  # equal shapes for all_gather
        padded_idx = torch.full((width,), -1, dtype=torch.long)
        padded_idx[: local.numel()] = local
        gathered_idx = dist.all_gather(padded_idx.to(device)).reshape(-1).cpu()
        valid = gathered_idx >= 0
        order = torch.argsort(gathered_idx[valid])  # reduce in sample-index order, whatever W
        batch_size = self.suite.batch_size
        width_b = min(batch_size, attacked.numel())  # every attack call has this many instances
        num_batches = math.ceil(local.numel() / batch_size)
        example_positions = self._example_positions(configs)

        results: list[ConfigResult] = []
        examples: dict[str, AttackExample] = {}
        bar = tqdm(total=len(configs) * max(num_batches, 1), desc="robustness", unit="batch", leave=False,
                   disable=not (self.progress and dist.is_main), dynamic_ncols=True)
        try:
            for position, config in enumerate(configs):
                entry = self.registry.get(config.attack)
                attack = entry.build(config.eps, config.size, self.suite.seed, **config.options)
                bar.set_postfix_str(config.label)
                keep = self.keep_examples if (dist.is_main and position in example_positions) else 0
                start = time.perf_counter()
                values = {key: [] for key in entry.metrics}
                for images, labels, indices in self._batches(dataset, local, batch_size):
                    b = images.shape[0]
                    kwargs = {"query_labels": _pad_to(labels.to(device), width_b)} if pass_labels else {}
                    out = attack(model, gallery, _pad_to(images.to(device), width_b),
                                 _pad_to(indices.to(device), width_b), **kwargs)
                    for key in entry.metrics:
                        # A metric the attack does not produce on this model (e.g. SDC AP on a
                        # ranker without codebooks) is reported as missing (NaN), not a crash.
                        value = out.metrics.get(key)
                        value = torch.full((b,), math.nan, device=device) if value is None else value[:b]
                        values[key].append(value.detach().to(torch.float64))
                    if keep and config.attack not in examples:
                        examples[config.attack] = AttackExample(
                            config.attack, config.eps, config.size_key, config.size, indices[:keep].cpu(),
                            images[:keep].cpu(), out.adversarial[:keep].detach().cpu(),
                            None if out.targets is None else out.targets[:keep].cpu(),
                        )
                    bar.update(1)
                if num_batches == 0:
                    bar.update(1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall = time.perf_counter() - start
                result = self._reduce(
                    entry, config, attack.hparams, values, width, dist, device, valid, order, wall)
                results.append(result)
                if on_result is not None and dist.is_main:
                    on_result(result)
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
        """Per attack, the configuration whose examples are logged: largest eps, smallest w / m."""
        if self.keep_examples <= 0:
            return set()
        best: dict[str, tuple[tuple[float, int], int]] = {}
        for position, config in enumerate(configs):
            key = (config.eps, -(config.size or 0))
            if config.attack not in best or key > best[config.attack][0]:
                best[config.attack] = (key, position)
        return {position for _, position in best.values()}

    def _reduce(
        self,
        entry: AttackEntry,
        config: AttackConfig,
        hparams: Mapping[str, Any],
        values: dict[str, list[Tensor]],
        width: int,
        dist: Collectives,
        device: torch.device,
        valid: Tensor,
        order: Tensor,
        wall: float,
    ) -> ConfigResult:
        """Gather one configuration's per-sample values from every rank and reduce them."""
        keys = list(entry.metrics)
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
        extra = {key: _nanmean(stats[key]) for key in keys if key not in (entry.metric, entry.clean_metric)}
        resolved = {k: v for k, v in hparams.items() if k not in ("attack", "eps", "w", "m")}
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
        )


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
        from lightning_modules.ranker import Ranker
    except ImportError:  # pragma: no cover - the package is part of the project
        return False
    if not isinstance(model, Ranker):
        return False
    return getattr(type(model), name) is not getattr(Ranker, name)
