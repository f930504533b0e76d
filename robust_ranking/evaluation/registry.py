"""The attack registry: suite names ("CA+", "QA-", "ES", ...) -> attack factories.

A suite (:mod:`evaluation.suite`) names attacks; the registry says, for each name, how to build
the attack for one ``(eps, w-or-m)`` configuration, which per-attack suite keys it accepts,
which model capabilities it ``needs``, which per-instance metrics it reports and how the
robustness score reads them.

Every built-in attack is registered explicitly at the bottom of this module, family by family
(ranking, quantization, hashing, universal). Adding an attack = one module in ``attacks/`` +
one ``register`` line here + one suite YAML::

    ATTACKS.register("PQ-AG:APD", factory=lambda eps, size, seed, **o: ApdAttack(eps=eps, seed=seed, **o),
                     needs={"codebooks"}, metric="map", metrics=("map", "map_clean"))

A model that lacks a capability in ``needs`` is not an error: the evaluation engine skips the
entry and the report says "not applicable: needs codebooks".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from typing import Any

from robust_ranking.attacks.attack import Attack
from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.hashing.dhta_attack import DHTAAttack
from robust_ranking.attacks.hashing.hag_attack import HAGAttack
from robust_ranking.attacks.hashing.hashing_attack import scaled_tanh_scales
from robust_ranking.attacks.ranking.max_shift_attack import MaxShiftAttack
from robust_ranking.attacks.quantization.pq_ag_attack import PQAGAttack
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.ranking.es_recall_attack import EmbeddingShiftRecallAttack
from robust_ranking.attacks.ranking.gtm_attack import GreedyTop1MisrankAttack
from robust_ranking.attacks.ranking.gtt_attack import GreedyTop1TranslocationAttack
from robust_ranking.attacks.ranking.ltm_attack import LearningToMisrankAttack
from robust_ranking.attacks.ranking.tma_attack import TargetedMismatchAttack
from robust_ranking.attacks.hashing.sdha_attack import SDHAAttack
from robust_ranking.attacks.universal.uap_retrieval import UAPRetrieval
from robust_ranking.attacks.universal.universal_ranking_attack import UniversalRankingAttack

__all__ = ["ATTACKS", "AUTO_TANH_SCALE", "AttackEntry", "AttackRegistry", "COMMON_OPTIONS", "HASHING_METRICS", "PQ_AG_METRICS",
           "SDHA_METRICS", "UAP_METRICS", "UNIVERSAL_ATTACKS", "did_you_mean", "resolve_tanh_scale",
           "wants_auto_tanh_scale"]

#: PGD keys every attack accepts (see :class:`attacks.attack.Attack`).
COMMON_OPTIONS: frozenset[str] = frozenset({"alpha", "steps", "random_start"})

#: ``factory(eps=..., size=..., seed=..., **options) -> Attack``; ``size`` is w / m or None.
AttackFactory = Callable[..., Attack]


@dataclass(frozen=True)
class AttackEntry:
    """What the suite runner needs to know about one registered attack name.

    Attributes:
        name: the suite name ("CA+").
        factory: ``factory(eps=float, size=int | None, seed=int, **options) -> Attack``.
        size_key: the suite key of the per-instance target count ("w" for CA, "m" for QA) or
            ``None`` (ES, universal attacks, ...).
        options: optional suite keys the attack accepts besides ``attack``, ``epsilons`` and
            ``size_key`` (always including :data:`COMMON_OPTIONS`).
        needs: model capabilities (``Ranker.capabilities``) the attack requires.
        metric: the per-instance metric reported in the tables ("rank", "shift", ...).
        metrics: every per-instance metric key the attack returns (gathered and averaged).
        clean_metric: the metric's value on the clean input (the eps = 0 row), if any.
        direction: how the robustness score reads ``metric``: ``"+"`` (an effective attack
            lowers it towards 0, CA+ / QA+), ``"-"`` (raises it towards 100, CA- / QA-), or
            ``None`` (not part of the score, e.g. ES).
        description: one line for ``--help`` style listings.
        protocol: ``"gallery"`` (the ECCV protocol: attacked samples are members of X, the
            gallery holds ``embed`` outputs) or ``"query_database"`` (the hashing / PQ protocol:
            queries of ``datamodule.query_set`` are attacked, the gallery holds the database's
            ``encode`` outputs, and the attack receives ``query_labels=``).
        sanity_options: options the large-budget sanity check sets on top of the suite entry's
            (:class:`evaluation.suite.SanitySettings`), e.g. QA's ``G = 0``: the semantics-preserving
            term exists to hold the attack back, so an unbounded check runs without it.
    """

    name: str
    factory: AttackFactory
    size_key: Literal["w", "m"] | None = None
    options: frozenset[str] = field(default_factory=lambda: COMMON_OPTIONS)
    needs: frozenset[str] = frozenset()
    metric: str = "rank"
    metrics: tuple[str, ...] = ("rank", "rank_clean")
    clean_metric: str | None = "rank_clean"
    direction: Literal["+", "-"] | None = None
    description: str = ""
    protocol: Literal["gallery", "query_database"] = "gallery"
    sanity_options: Mapping[str, object] = field(default_factory=dict)

    @property
    def allowed_keys(self) -> frozenset[str]:
        """Every key a suite entry for this attack may have."""
        keys = {"attack", "epsilons", *self.options}
        if self.size_key is not None:
            keys.add(self.size_key)
        return frozenset(keys)

    def build(self, eps: float, size: int | None, seed: int, **options: object) -> Attack:
        """The attack for one configuration (raises ``ValueError`` on bad option values)."""
        return self.factory(eps=eps, size=size, seed=seed, **options)


def did_you_mean(word: str, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` (case-insensitive), else ``""``."""
    lowered = {c.lower(): c for c in choices}  # case slips ("W", "ca+") first
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


class AttackRegistry:
    """A name -> :class:`AttackEntry` map with clear errors for unknown names."""

    def __init__(self, entries: Iterable[AttackEntry] = ()) -> None:
        self._entries: dict[str, AttackEntry] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: AttackEntry) -> AttackEntry:
        if entry.name in self._entries:
            raise ValueError(f"attack {entry.name!r} is already registered")
        if entry.metric not in entry.metrics:
            raise ValueError(
                f"attack {entry.name!r}: metric {entry.metric!r} is not among metrics {entry.metrics}")
        self._entries[entry.name] = entry
        return entry

    def register(
        self,
        name: str,
        factory: AttackFactory,
        *,
        size_key: Literal["w", "m"] | None = None,
        options: Iterable[str] = (),
        needs: Iterable[str] = (),
        metric: str = "rank",
        metrics: Iterable[str] | None = None,
        clean_metric: str | None = None,
        direction: Literal["+", "-"] | None = None,
        description: str = "",
        protocol: Literal["gallery", "query_database"] = "gallery",
        sanity_options: Mapping[str, object] | None = None,
    ) -> AttackEntry:
        """Register ``name``; ``options`` are added to :data:`COMMON_OPTIONS`."""
        if protocol not in ("gallery", "query_database"):
            raise ValueError(f"attack {name!r}: protocol must be 'gallery' or 'query_database', got {protocol!r}")
        return self.add(AttackEntry(
            name=name,
            factory=factory,
            size_key=size_key,
            options=COMMON_OPTIONS | frozenset(options),
            needs=frozenset(needs),
            metric=metric,
            metrics=tuple(metrics) if metrics is not None else (metric,),
            clean_metric=clean_metric,
            direction=direction,
            description=description,
            protocol=protocol,
            sanity_options=dict(sanity_options or {}),
        ))

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> AttackEntry:
        """The entry of ``name``; ``KeyError`` with the known names (and a suggestion) otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        hint = did_you_mean(str(name), self.names())
        return f"unknown attack {name!r}{hint}; known attacks: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[AttackEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


# ======================================================================= built-in attacks
# ----------------------------------------------------------------------- ranking (ECCV 2020)
def _candidate_attack(direction: Literal["+", "-"]) -> AttackFactory:
    def factory(eps: float, size: int | None, seed: int, **options: object) -> Attack:
        return CandidateAttack(direction, 1 if size is None else size, eps=eps, seed=seed, **options)

    return factory


def _query_attack(direction: Literal["+", "-"]) -> AttackFactory:
    def factory(eps: float, size: int | None, seed: int, **options: object) -> Attack:
        return QueryAttack(direction, 1 if size is None else size, eps=eps, seed=seed, **options)

    return factory


def _max_shift_attack(eps: float, size: int | None, seed: int, **options: object) -> Attack:
    return MaxShiftAttack(eps, seed=seed, **options)


_QA_METRICS = ("rank", "rank_clean", "sp_rank", "sp_rank_clean")

#: The default registry used by suites, the engine, ``eval.py`` and the callback.
ATTACKS = AttackRegistry()
ATTACKS.register("CA+", _candidate_attack("+"), size_key="w", options={"percent"},
                 metrics=("rank", "rank_clean"), clean_metric="rank_clean", direction="+",
                 description="candidate attack, raise c's rank w.r.t. w random queries (ECCV 2020 Eq. 4)")
ATTACKS.register("CA-", _candidate_attack("-"), size_key="w", options={"percent"},
                 metrics=("rank", "rank_clean"), clean_metric="rank_clean", direction="-",
                 description="candidate attack, lower c's rank w.r.t. w top-1% queries (ECCV 2020 Eq. 7)")
ATTACKS.register("QA+", _query_attack("+"), size_key="m", options={"xi", "G", "percent", "reduction"}, metrics=_QA_METRICS,
                 clean_metric="rank_clean", direction="+", sanity_options={"G": 0},
                 description="query attack with SP term, raise m random candidates (ECCV 2020 Eq. 11-12)")
ATTACKS.register("QA-", _query_attack("-"), size_key="m", options={"xi", "G", "percent", "reduction"}, metrics=_QA_METRICS,
                 clean_metric="rank_clean", direction="-", sanity_options={"G": 0},
                 description="query attack with SP term, lower m top-1% candidates (ECCV 2020 Eq. 9, 12)")
ATTACKS.register("ES", _max_shift_attack, metric="shift", metrics=("shift",),
                 description="maximum embedding shift d(f(x~), f(x)) (ECCV 2020 Sec. 3.3)")


# ----------------------------------------------------------------------- RobRank ERS (TPAMI, arXiv 2106.03614)
# The other attacks of RobRank's empirical robustness score (evaluation.score.ERS): no direction, so
# they stay out of the robustness score; ERS reads their metric (percent, cos for TMA) instead.
def _plain(cls: type[Attack]) -> AttackFactory:
    def factory(eps: float, size: int | None, seed: int, **options: object) -> Attack:
        return cls(eps, seed=seed, **options)

    return factory


_R1 = {"metric": "recall@1", "clean_metric": "recall@1_clean"}
ATTACKS.register("TMA", _plain(TargetedMismatchAttack), metric="cos", metrics=("cos", "cos_clean"),
                 clean_metric="cos_clean",
                 description="targeted mismatch: raise cos(f(q~), f(t)) to a random t (Tolias et al. ICCV 2019)")
ATTACKS.register("ES:R", _plain(EmbeddingShiftRecallAttack), metrics=("recall@1", "recall@1_clean", "shift"), **_R1,
                 description="R@1 (%) after the ES attack's perturbation (RobRank ERS term ES:R)")
ATTACKS.register("LTM", _plain(LearningToMisrankAttack), metrics=("recall@1", "recall@1_clean"), **_R1,
                 description="learning-to-mis-rank triplet on the query, R@1 (%) after (Wang et al. CVPR 2020)")
ATTACKS.register("GTM", _plain(GreedyTop1MisrankAttack), metrics=("recall@1", "recall@1_clean"), **_R1,
                 description="greedy top-1 misranking, R@1 (%) after (RobRank)")
ATTACKS.register("GTT", _plain(GreedyTop1TranslocationAttack), metric="retain@4",
                 metrics=("retain@4", "retain@4_clean", "retain@1", "retain@1_clean"), clean_metric="retain@4_clean",
                 description="greedy top-1 translocation, clean top-1 still in the top 4 (%) after (RobRank)")


# ----------------------------------------------------------------------- hashing (SDHA, ICMR 2021)
# The deep-hashing attacks in the evaluation engine's registry (this registry).
#
# Suite names (``configs/suites/sdha_*.yaml``): ``SDHA``, ``SDHA-UW``, ``HAG`` (untargeted) and
# ``SDHA-T``, ``SDHA-UW-T``, ``DHTA`` (targeted; the suite entry must give ``target_label``, an int
# or ``random``). All run under the query / database protocol (the engine attacks the first T of a
# seeded permutation of the query set against the database's sign codes and passes
# ``query_labels``) and need the ``hash_bits`` capability.
#
# Reported per query and averaged by the engine: ``ap`` (AP@topk after the attack, the table
# metric, so the mean is the mAP), ``ap_clean``, ``l2``, ``l2_at_target`` (mean over the queries
# that reached the AP bound), ``success`` (fraction that did) and ``iterations``; SDHA also
# ``lagrange`` (alpha * K, per query when ``search_steps`` > 1) and ``search_iterations`` (the
# iterations of all its binary-search runs). The workload-level
# "l2 at a preset mAP" of SDHA Tables 2-4 needs the per-iteration traces: a suite with ``traces: true``
# makes the engine gather them into each result row (``trace``), and ``scripts/sdha_tables.py`` prints
# the tables from those reports (docs/dch.md).
#
# Suite options: every constructor argument of the attack (``steps``, ``lr``, ``lagrange``,
# ``sigma``, ``z``, ``search_steps``, ``momentum``, ``threshold``, ``n_f``, ``topk``, ``check_every``,
# ``early_stop``, ``goal_ap``, ``target_label``); the common ``alpha`` is the step size (``lr``); ``random_start`` must be false
# (the attacks start at the clean query, as the paper). ``tanh_scale_factor`` (> 0) multiplies the
# paper's gamma schedule: a per-model constant for hash layers whose logits are far from the scale
# the schedule assumes (:func:`attacks.hashing.hashing_attack.logit_scale_factor`); ``auto`` lets the engine
# compute it per model and workload (:data:`AUTO_TANH_SCALE`).
HASHING_METRICS = ("ap", "ap_clean", "l2", "l2_at_target", "success", "iterations")
SDHA_METRICS = (*HASHING_METRICS, "lagrange", "search_iterations")
_COMMON = {"lr", "topk", "check_every", "early_stop", "goal_ap", "tanh_scale_factor"}
_SDHA_OPTIONS = _COMMON | {"lagrange", "sigma", "z", "search_steps"}


#: ``tanh_scale_factor: auto`` in a suite entry: the engine replaces it, per model and workload, by
#: :func:`attacks.hashing.hashing_attack.logit_scale_factor` of the attacked queries (one factor for every
#: attack of the suite that asks for it), and records the factor in the result's trace
#: (``evaluation.engine``); building such an entry outside the engine is an error.
AUTO_TANH_SCALE = "auto"


def wants_auto_tanh_scale(options: Mapping[str, Any]) -> bool:
    """Whether a suite entry's options ask for ``tanh_scale_factor: auto``."""
    return options.get("tanh_scale_factor") == AUTO_TANH_SCALE


def resolve_tanh_scale(options: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``options`` with ``tanh_scale_factor: auto`` replaced by ``factor`` (other options unchanged)."""
    options = dict(options)
    if wants_auto_tanh_scale(options):
        options["tanh_scale_factor"] = factor
    return options


def _options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    if wants_auto_tanh_scale(options):
        raise ValueError("tanh_scale_factor 'auto' is computed by the evaluation engine per model and workload; "
                         "outside it pass a number (attacks.hashing.hashing_attack.logit_scale_factor)")
    if options.pop("random_start", False):
        raise ValueError("the hashing attacks start at the clean query; random_start must be false")
    if "alpha" in options:  # the engine's common step-size key
        options["lr"] = options.pop("alpha")
    if "tanh_scale_factor" in options:
        options["tanh_scales"] = scaled_tanh_scales(options.pop("tanh_scale_factor"))
    return options


def _sdha(targeted: bool, unweighted: bool) -> Callable[..., Attack]:
    def factory(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
        options = _options(options)
        target = options.pop("target_label", None)
        if unweighted:
            options["z"] = 0.0
        return SDHAAttack(targeted, target, eps=eps, seed=seed, **options)

    return factory


def _hag(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
    return HAGAttack(eps=eps, seed=seed, **_options(options))


def _dhta(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
    options = _options(options)
    return DHTAAttack(options.pop("target_label", None), eps=eps, seed=seed, **options)


_HASHING = {"needs": {"hash_bits"}, "metric": "ap", "metrics": HASHING_METRICS, "clean_metric": "ap_clean",
            "protocol": "query_database"}
_SDHA = {**_HASHING, "metrics": SDHA_METRICS}
# Untargeted attacks lower the AP towards 0: the score's "+" term ap / ap_clean applies.
# Targeted ones are left out of the score (its "-" term assumes ranks in percent).
ATTACKS.register("SDHA", _sdha(False, False), options=_SDHA_OPTIONS, direction="+", **_SDHA,
                 description="SDHA untargeted: l2 + alpha * weighted surrogate Hamming (ICMR 2021 Eq. 1, 6)")
ATTACKS.register("SDHA-UW", _sdha(False, True), options=_SDHA_OPTIONS - {"z"}, direction="+", **_SDHA,
                 description="SDHA untargeted without the AP-oriented weights (ICMR 2021 Sec. 5.1)")
ATTACKS.register("HAG", _hag, options=_COMMON | {"momentum", "threshold"}, direction="+", **_HASHING,
                 description="HAG: push the code away from the query's own code (Yang et al. 2020)")
ATTACKS.register("SDHA-T", _sdha(True, False), options=_SDHA_OPTIONS | {"target_label"}, **_SDHA,
                 description="SDHA targeted (ICMR 2021 Eq. 1, 7); target_label: int or random")
ATTACKS.register("SDHA-UW-T", _sdha(True, True), options=(_SDHA_OPTIONS - {"z"}) | {"target_label"},
                 **_SDHA, description="SDHA targeted without the AP-oriented weights")
ATTACKS.register("DHTA", _dhta, options=_COMMON | {"n_f", "target_label"}, **_HASHING,
                 description="DHTA: move the code to the target class's anchor code (Bai et al. 2020)")


# ----------------------------------------------------------------------- quantization (PQ-AG, AAAI 2020)
# The PQ-AG attacks in the evaluation engine's registry (this registry).
#
# Suite names (``configs/suites/pqag_table.yaml``): ``PQ-AG:Basic``, ``PQ-AG:APD``, ``PQ-AG:AOD``
# (Feng et al., AAAI 2020, Eqs. 3, 8, 9; :class:`attacks.quantization.pq_ag_attack.PQAGAttack`). They run under
# the query / database protocol: the engine attacks the first T of a seeded permutation of the
# query set against the database's hard PQ codes (``model.encode``) and passes ``query_labels``.
#
# All three entries need the ``codebooks`` capability: the PQ-AG table measures mAP under SDC and
# ADC, which only PQ rankers define (the :class:`PQAGAttack` class itself runs Basic on any
# ranker). Reported per query and averaged by the engine: ``ap_sdc`` (the table metric),
# ``ap_sdc_clean``, ``ap_adc``, ``ap_adc_clean``, ``code_change``, ``feature_shift`` and the clean soft
# assignment's ``peak_probability_clean`` / ``entropy_clean``. They lower AP towards 0, so
# the robustness score's ``"+"`` term (``ap_sdc / ap_sdc_clean``) applies.
#
# Suite options: the common ``alpha`` (PGD step; paper 0.01), ``steps`` (paper 5) and
# ``random_start`` (default true), plus ``temperature`` and ``topk``.
PQ_AG_METRICS = ("ap_sdc", "ap_sdc_clean", "ap_adc", "ap_adc_clean", "code_change", "feature_shift",
                 "peak_probability_clean", "entropy_clean")

_DESCRIPTIONS = {
    "basic": "PQ-AG Basic: push the query's deep feature away (AAAI 2020 Eq. 3)",
    "apd": "PQ-AG APD, type I: cross-entropy against the clean peak codewords (AAAI 2020 Eq. 8)",
    "aod": "PQ-AG AOD, type II: against the whole clean codeword distribution (AAAI 2020 Eq. 9)",
}


def _pq_ag(variant: str) -> Callable[..., Attack]:
    def factory(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
        # The paper's step (0.01) and iterations (5) unless the suite says otherwise.
        options.setdefault("alpha", 0.01)
        options.setdefault("steps", 5)
        return PQAGAttack(variant, eps=eps, seed=seed, **options)  # type: ignore[arg-type]

    return factory


for _variant, _label in (("basic", "Basic"), ("apd", "APD"), ("aod", "AOD")):
    ATTACKS.register(
        f"PQ-AG:{_label}", _pq_ag(_variant), options={"temperature", "topk"}, needs={"codebooks"},
        metric="ap_sdc", metrics=PQ_AG_METRICS, clean_metric="ap_sdc_clean", direction="+",
        protocol="query_database", description=_DESCRIPTIONS[_variant],
    )


# ----------------------------------------------------------------------- universal perturbations
# A separate registry: a universal attack fits ONE perturbation on a fit set and measures it on
# the fit and an unseen set (ECCV 2020 Table 6, UAP-IR), which is not the per-batch protocol of
# the robustness engine. Suites with ``kind: universal`` validate against it (evaluation.suite)
# and run through the universal runner. ``COMMON_OPTIONS`` (PGD keys) do not apply.

#: Schedule keys every universal attack accepts (the suite's ``batch_size`` is the fit batch).
UNIVERSAL_SCHEDULE_OPTIONS: frozenset[str] = frozenset({"epochs", "step", "momentum"})
#: UAP-IR: per-query metrics reported, in table order.
UAP_METRICS: tuple[str, ...] = ("mAP_clean", "mAP", "mP@10_clean", "mP@10", "mDR")


def _universal_ranking(kind: Literal["CA", "QA"], direction: Literal["+", "-"]) -> Callable[..., UniversalRankingAttack]:
    def factory(eps: float, size: int | None, seed: int, batch_size: int = 64, **options: object) -> UniversalRankingAttack:
        return UniversalRankingAttack(kind, direction, 1 if size is None else size, eps=eps, seed=seed,
                                      batch_size=batch_size, **options)  # type: ignore[arg-type]

    return factory


def _check_scales(value: object) -> tuple[float, ...]:
    scales = value if isinstance(value, list) else [value]
    ok = bool(scales) and all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 100 for s in scales)
    if not ok:
        raise ValueError(f"eval_scales must be a non-empty list of positive scale factors, got {value!r}")
    return tuple(float(s) for s in scales)


def _uap_retrieval(objective: Literal["label", "pair", "list"]) -> Callable[..., UAPRetrieval]:
    def factory(eps: float, size: int | None, seed: int, batch_size: int = 64, **options: object) -> UAPRetrieval:
        # eval_scales is a measurement option (input sizes the frozen r is tested at), not a fit one.
        scales = _check_scales(options.pop("eval_scales", [1.0]))
        resize = options.pop("resize_range", None)
        if resize is not None and (not isinstance(resize, (list, tuple)) or len(resize) != 2):
            raise ValueError(f"resize_range must be [lo, hi] or null, got {resize!r}")
        attack = UAPRetrieval(objective, eps=eps, seed=seed, batch_size=batch_size,
                              resize_range=None if resize is None else (resize[0], resize[1]),
                              **options)  # type: ignore[arg-type]
        attack.eval_scales = scales  # type: ignore[attr-defined]
        return attack

    return factory


def _add_universal(registry: AttackRegistry, name: str, factory: Callable[..., object], options: set[str], *,
                   size_key: Literal["w", "m"] | None, metric: str, metrics: tuple[str, ...],
                   clean_metric: str | None, direction: Literal["+", "-"] | None, description: str) -> None:
    registry.add(AttackEntry(name=name, factory=factory, size_key=size_key,  # type: ignore[arg-type]
                             options=UNIVERSAL_SCHEDULE_OPTIONS | frozenset(options), metric=metric, metrics=metrics,
                             clean_metric=clean_metric, direction=direction, description=description))


#: Universal attacks: I-CA+/- and I-QA+/- (ECCV 2020 Eq. 14, Table 6) and UAP-IR (label / pair / list-wise).
UNIVERSAL_ATTACKS = AttackRegistry()
for _d in ("+", "-"):
    _add_universal(UNIVERSAL_ATTACKS, f"I-CA{_d}", _universal_ranking("CA", _d),
                   {"percent", *(("shared_targets",) if _d == "+" else ())}, size_key="w",
                   metric="rank", metrics=("rank", "rank_clean"), clean_metric="rank_clean", direction=_d,
                   description=f"universal CA{_d}: one r for every candidate (ECCV 2020 Eq. 14)")
for _d in ("+", "-"):
    _add_universal(UNIVERSAL_ATTACKS, f"I-QA{_d}", _universal_ranking("QA", _d),
                   {"percent", "xi", "G", *(("shared_targets",) if _d == "+" else ())},
                   size_key="m", metric="rank", metrics=("rank", "rank_clean"), clean_metric="rank_clean",
                   direction=_d, description=f"universal QA{_d}: one r for every query (ECCV 2020 Table 6)")
for _objective in ("label", "pair", "list"):
    _add_universal(UNIVERSAL_ATTACKS, f"UAP-IR:{_objective}", _uap_retrieval(_objective),
                   {"resize_range", "eval_scales", "input_size", "num_clusters", "kmeans_iters", "margin", "negative", "ndcg_k",
                    "tau", "probe_steps"},
                   size_key=None, metric="mDR", metrics=UAP_METRICS, clean_metric=None, direction=None,
                   description=f"UAP-IR, {_objective}-wise objective (Li et al. 2019)")
