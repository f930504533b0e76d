"""Per-query AP / l2 trajectories of an iterative hashing attack, and the dataset-level metrics of SDHA Sec. 5.

SDHA (Lu et al., ICMR 2021) reports, besides the final mAP, "the image perturbation when the
algorithm achieves a preset MAP" (Tables 2-3) and "the MAPs when different attacks achieve
preset l2 perturbation budgets" (Table 4), with "the MAP calculated every 10 iterations during
the generation process". Both are properties of the *workload* (its 100 queries) as the
optimization runs, not of single queries. Our reading, made precise:

- every query is attacked on the same iteration grid; at each check iteration ``t`` (every
  ``check_every`` iterations and after the last one) the trace holds each query's AP and the
  l2 norm of its perturbation; a query that terminated early keeps its final values;
- the workload's curves are the means over queries: ``mAP(t)`` and ``l2(t)``;
- "l2 at a preset mAP" (:meth:`AttackTrace.l2_at_map`): ``l2(t*)`` at the first check ``t*``
  where ``mAP(t*) <= bound`` (untargeted) or ``>= bound`` (targeted); if the bound is never
  reached, the final ``l2`` flagged as not reached (the paper's underlined entries). SDHA keeps
  shrinking the perturbation after the crossing (Eq. 1 minimizes l2 under the AP constraint),
  so :meth:`AttackTrace.min_l2_at_map` also gives the smallest ``l2(t)`` over the checks past
  the bound;
- "mAP at an l2 budget" (:meth:`AttackTrace.map_at_l2`): ``mAP(t*)`` at the first check where
  ``l2(t*) >= budget``; if the attack never spends the budget, its best mAP over the run (the
  paper: "we fill the form with its best MAPs").

Traces of batches attacked separately concatenate (:meth:`AttackTrace.cat`) into the trace of
the whole workload, since the grid does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AttackTrace"]


@dataclass(frozen=True)
class AttackTrace:
    """AP and l2 of ``B`` queries at ``C`` check iterations.

    Attributes:
        iterations: ``[C]`` the iteration of each check (``0`` = clean query).
        ap: ``[B, C]`` AP@topk of each query at each check.
        l2: ``[B, C]`` l2 norm of each query's perturbation at each check.
        targeted: whether a higher AP is the attacker's goal.
    """

    iterations: Tensor
    ap: Tensor
    l2: Tensor
    targeted: bool

    def __post_init__(self) -> None:
        c = self.iterations.shape[0]
        if self.iterations.dim() != 1 or self.ap.dim() != 2 or self.ap.shape[1] != c or self.l2.shape != self.ap.shape:
            raise ValueError(f"AttackTrace needs iterations [C], ap [B, C] and l2 [B, C], got "
                             f"{tuple(self.iterations.shape)}, {tuple(self.ap.shape)}, {tuple(self.l2.shape)}")

    @classmethod
    def cat(cls, traces: Sequence[AttackTrace]) -> AttackTrace:
        """The trace of the union of the queries of ``traces`` (same grid, same direction)."""
        if not traces:
            raise ValueError("AttackTrace.cat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if t.targeted != first.targeted or not torch.equal(t.iterations.cpu(), first.iterations.cpu()):
                raise ValueError("AttackTrace.cat needs traces of the same attack direction and iteration grid")
        return cls(first.iterations.cpu(), torch.cat([t.ap.cpu() for t in traces]),
                   torch.cat([t.l2.cpu() for t in traces]), first.targeted)

    def map_curve(self) -> Tensor:
        """``[C]`` mean AP over queries at each check."""
        return self.ap.float().mean(0)

    def l2_curve(self) -> Tensor:
        """``[C]`` mean perturbation l2 over queries at each check."""
        return self.l2.float().mean(0)

    def _crossed(self, curve: Tensor, bound: float) -> Tensor:
        return curve >= bound - 1e-9 if self.targeted else curve <= bound + 1e-9

    def l2_at_map(self, bound: float) -> tuple[float, bool]:
        """``(l2, reached)``: mean l2 when the workload's mAP first reaches ``bound``; the final
        mean l2 and ``False`` if it never does."""
        hit = torch.nonzero(self._crossed(self.map_curve(), bound)).flatten()
        l2 = self.l2_curve()
        if hit.numel() == 0:
            return float(l2[-1]), False
        return float(l2[hit[0]]), True

    def min_l2_at_map(self, bound: float) -> tuple[float, bool]:
        """``(l2, reached)``: the smallest mean l2 over the checks where the workload's mAP is past
        ``bound`` -- the best feasible point of Eq. (1) along the run, for attacks that keep
        shrinking the perturbation after crossing; the final l2 and ``False`` if never past."""
        hit = self._crossed(self.map_curve(), bound)
        l2 = self.l2_curve()
        if not bool(hit.any()):
            return float(l2[-1]), False
        return float(l2[hit].min()), True

    def map_at_l2(self, budget: float) -> float:
        """mAP when the workload's mean l2 first reaches ``budget``; the best mAP of the run if never."""
        curve = self.map_curve()
        hit = torch.nonzero(self.l2_curve() >= budget).flatten()
        if hit.numel() == 0:
            return float(curve.max() if self.targeted else curve.min())
        return float(curve[hit[0]])

    def final(self) -> tuple[float, float]:
        """``(mAP, mean l2)`` at the end of the run."""
        return float(self.map_curve()[-1]), float(self.l2_curve()[-1])
