"""One robustness number per checkpoint, in [0, 1] (1 = the attacks have no effect).

The ranking attacks of Zhou et al., "Adversarial Ranking Attack and Defense" (ECCV 2020,
Sec. 4) are measured by the normalized rank R in percent: "+" attacks (CA+, QA+) pull a
target's rank from its clean value R_clean (about 50% for random targets) towards 0, "-"
attacks (CA-, QA-) push it from R_clean (about 0.5-2% for top-1% targets) towards 100. Each
result (one attack at one epsilon and one w / m) becomes a term in [0, 1], the fraction of the
possible rank change the attack did NOT achieve::

    "+" attacks:  s = clip(R_adv / R_clean, 0, 1)
    "-" attacks:  s = clip(1 - (R_adv - R_clean) / (100 - R_clean), 0, 1)

The terms are averaged per attack type (over its epsilons and w / m values), and the score
is the mean over attack types, so each of CA+, CA-, QA+ and QA- weighs the same whatever the
number of its configurations. Results at eps = 0 (no attack, s = 1 by construction) and
attacks without a direction (ES: an embedding shift has no natural upper bound for
non-normalized Euclidean embeddings) are left out.

Trust: a result whose numbers are not finite (a NaN / inf embedding, loss or metric value; see
``ConfigResult.invalid``) never becomes a term. If any scored result is invalid the score is
``None`` and :attr:`RobustnessScore.invalid` says why: a model that produces NaNs must not look
robust because its ranks came out as 0 or were dropped.

Relation to RobRank's ERS (Zhou et al., "Adversarial Attack and Defense in Deep Ranking",
2021): ERS averages ten terms in [0, 100]; its CA+ / QA+ terms are ``2 R_adv`` and its CA- /
QA- terms ``100 - R_adv``, i.e. the formulas above with R_clean fixed to 50% and 0%. On the
``robrank_profile`` suite our score therefore approximates (mean of ERS's first four terms) /
100, with the measured clean ranks instead of the nominal ones; the other six ERS terms (ES:D,
ES:R, TMA, LTM, GTM, GTT) are not included, so the two numbers are not interchangeable. ERS itself
is :class:`ERS` below, computed beside the score from the same results when a suite runs all ten
attacks (``configs/suites/robrank_ers_28.yaml`` / ``robrank_ers_224.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["ERS", "ERS_ONLY_ATTACKS", "ERS_TERMS", "RobustnessScore", "ers_term"]


class _ScoredResult(Protocol):
    attack: str
    eps: float
    mean: float
    clean: float | None
    direction: str | None


@dataclass(frozen=True)
class RobustnessScore:
    """The robustness score and its per-attack components (see the module docstring).

    Attributes:
        value: the score in [0, 1], ``None`` when no result can be scored (e.g. an ES-only
            suite, or every scored attack skipped as not applicable).
        per_attack: mean term per attack type, e.g. ``{"CA+": 0.21, "CA-": 0.64, ...}``.
        num_terms: how many results entered the score.
        invalid: why there is no score although scored attacks ran (invalid results), else ``None``.
    """

    value: float | None
    per_attack: dict[str, float] = field(default_factory=dict)
    num_terms: int = 0
    invalid: str | None = None

    @staticmethod
    def term(direction: str, adversarial: float, clean: float) -> float:
        """One result's term in [0, 1] (ranks in percent)."""
        if direction == "+":
            if clean <= 0.0:  # nothing to raise: the attack cannot have an effect
                return 1.0
            return min(max(adversarial / clean, 0.0), 1.0)
        if direction == "-":
            if clean >= 100.0:
                return 1.0
            return min(max(1.0 - (adversarial - clean) / (100.0 - clean), 0.0), 1.0)
        raise ValueError(f"direction must be '+' or '-', got {direction!r}")

    @classmethod
    def from_results(cls, results: Iterable[_ScoredResult]) -> RobustnessScore:
        """Score reduced results (objects with ``attack``, ``eps``, ``mean``, ``clean``, ``direction``)."""
        terms: dict[str, list[float]] = {}
        invalid: list[str] = []
        for result in results:
            if result.direction not in ("+", "-") or result.eps == 0:
                continue
            reason = getattr(result, "invalid", None)
            if reason is None and not (_finite(result.mean) and _finite(result.clean)):
                reason = "its mean or clean rank is not a finite number"
            if reason is not None:
                label = getattr(result, "label", result.attack)
                invalid.append(f"{label}: {reason}")
                continue
            terms.setdefault(result.attack, []).append(cls.term(result.direction, result.mean, result.clean))
        if invalid:
            more = f" (and {len(invalid) - 1} more)" if len(invalid) > 1 else ""
            return cls(value=None, invalid=f"{len(invalid)} scored configuration(s) invalid: {invalid[0]}{more}")
        per_attack = {attack: sum(values) / len(values) for attack, values in terms.items()}
        value = sum(per_attack.values()) / len(per_attack) if per_attack else None
        return cls(value=value, per_attack=per_attack, num_terms=sum(len(v) for v in terms.values()))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- RobRank's ERS
#: The ten ERS terms in RobRank's order: (term, suite attack name, metric the term reads).
#: Zhou et al., "Adversarial Attack and Defense in Deep Ranking" (IEEE TPAMI, arXiv 2106.03614),
#: ``tools/pjswipe.py`` (``Scores`` / ``ersnormalize``).
ERS_TERMS: tuple[tuple[str, str, str], ...] = (
    ("CA+", "CA+", "rank"),
    ("CA-", "CA-", "rank"),
    ("QA+", "QA+", "rank"),
    ("QA-", "QA-", "rank"),
    ("TMA", "TMA", "cos"),
    ("ES:D", "ES", "shift"),
    ("ES:R", "ES:R", "recall@1"),
    ("LTM", "LTM", "recall@1"),
    ("GTM", "GTM", "recall@1"),
    ("GTT", "GTT", "retain@4"),
)

#: The suite attacks that exist for ERS only (reports mention ERS when a suite runs one of them).
ERS_ONLY_ATTACKS: frozenset[str] = frozenset({"TMA", "ES:R", "LTM", "GTM", "GTT"})


def ers_term(term: str, value: float) -> float:
    """One ERS term in RobRank's normalization (``ersnormalize``; 100 = the attack had no effect).

    ``value`` is the attack's mean metric: normalized rank in percent (CA / QA), cosine similarity
    (TMA), embedding shift (ES:D), Recall@1 or retain@4 in percent (ES:R, LTM, GTM, GTT).
    """
    if term in ("CA+", "QA+"):
        return 2.0 * value
    if term in ("CA-", "QA-"):
        return 100.0 - value
    if term == "TMA":
        return 100.0 * (1.0 - value)
    if term == "ES:D":
        return 100.0 * (2.0 - value) / 2.0
    if term in ("ES:R", "LTM", "GTM", "GTT"):
        return float(value)
    raise ValueError(f"unknown ERS term {term!r}; known: {', '.join(t for t, _, _ in ERS_TERMS)}")


@dataclass(frozen=True)
class ERS:
    """RobRank's empirical robustness score: the mean of the ten :data:`ERS_TERMS`, each in
    RobRank's normalization (:func:`ers_term`), in [0, 100] for normalized embeddings.

    Each term reads the one configuration (eps > 0) of its attack in the results; ERS is ``None``
    and ``reason`` says why when a term's attack did not run (``missing``), ran at more than one
    configuration (ERS is defined on one profile, RobRank's ``rob28`` / ``rob224``) or is invalid
    (non-finite numbers).

    Attributes:
        value: ERS, or ``None``.
        terms: the normalized terms that could be computed, in :data:`ERS_TERMS` order.
        missing: the terms whose attack is not among the results.
        reason: why ``value`` is ``None`` (``None`` when there is a value).
    """

    value: float | None
    terms: dict[str, float] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    reason: str | None = None

    @classmethod
    def from_results(cls, results: Iterable[_ScoredResult]) -> ERS:
        """ERS of reduced results (objects with ``attack``, ``eps``, ``mean``; ``invalid`` / ``label`` if any)."""
        by_attack: dict[str, list] = {}
        for result in results:
            if result.eps != 0:
                by_attack.setdefault(result.attack, []).append(result)
        terms: dict[str, float] = {}
        missing: list[str] = []
        problems: list[str] = []
        for term, attack, metric in ERS_TERMS:
            found = by_attack.get(attack, [])
            if not found:
                missing.append(term)
                continue
            if len(found) > 1:
                labels = ", ".join(getattr(r, "label", r.attack) for r in found)
                problems.append(f"{term} has {len(found)} configurations ({labels}); ERS takes one per term")
                continue
            result = found[0]
            found_metric = getattr(result, "metric", metric)
            if found_metric != metric:
                problems.append(f"{term} needs {attack}'s metric {metric!r}, got {found_metric!r}")
                continue
            invalid = getattr(result, "invalid", None)
            if invalid is None and not _finite(result.mean):
                invalid = "its mean is not a finite number"
            if invalid is not None:
                problems.append(f"{term} ({getattr(result, 'label', attack)}) is invalid: {invalid}")
                continue
            terms[term] = ers_term(term, float(result.mean))
        reason = None
        if missing:
            reason = f"missing ERS term(s): {', '.join(missing)}"
        if problems:
            reason = "; ".join(([reason] if reason else []) + problems)
        value = sum(terms.values()) / len(terms) if reason is None else None
        return cls(value=value, terms=terms, missing=tuple(missing), reason=reason)

    def to_dict(self) -> dict:
        """The report's ``ers`` section."""
        return {"value": self.value, "terms": dict(self.terms), "missing": list(self.missing), "reason": self.reason}
