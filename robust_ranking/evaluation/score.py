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
ES:R, TMA, LTM, GTM, GTT) are not included, so the two numbers are not interchangeable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["RobustnessScore"]


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
