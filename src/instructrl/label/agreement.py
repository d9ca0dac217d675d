"""Inter-labeler agreement on comparisons (InstructGPT §3.4, App. B.1: training labelers agree 72.6 ± 1.5%).

Definition used here. Two labelers a and b who both ranked item x are compared on every pair of
responses (i, j) that *neither* of them tied; they agree on the pair when both put the same one first:

    P_ab(x) = { i < j : rank_a(i) ≠ rank_a(j) and rank_b(i) ≠ rank_b(j) }
    agree_ab(x) = |{ (i, j) ∈ P_ab(x) : sign(rank_a(i) − rank_a(j)) = sign(rank_b(i) − rank_b(j)) }|

A *unit* u is one (item, labeler pair) with n_u = |P_ab(x)| > 0 compared pairs and a_u agreements. Any
set of units (all of them, those of one labeler, those of one labeler pair) has the pooled agreement

    p̂ = Σ_u a_u / Σ_u n_u

with the standard error of a ratio estimator over independent units (pairs within one unit are not
independent, so the unit, not the pair, is the sample):

    SE(p̂) = sqrt( U / (U − 1) · Σ_u (a_u − p̂ n_u)² ) / Σ_u n_u,     U = number of units (needs U ≥ 2).

A labeler's agreement pools their units with every other labeler. Chance level without ties is 50%.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence


def pair_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """``(agreements, compared)`` over the response pairs that neither ranking ties (ranks: lower is better)."""
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"rankings of different lengths: {len(ranks_a)} and {len(ranks_b)}")
    agree = compared = 0
    for i, j in itertools.combinations(range(len(ranks_a)), 2):
        da, db = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
        if da == 0 or db == 0:
            continue
        compared += 1
        agree += (da < 0) == (db < 0)
    return agree, compared


@dataclasses.dataclass(frozen=True)
class AgreementEstimate:
    agreement: float | None
    """Pooled fraction of compared response pairs ordered the same way (None without any)."""
    stderr: float | None
    """Standard error over units (None with fewer than two units)."""
    n_pairs: int
    """Response pairs compared, Σ n_u."""
    n_units: int
    """(item, labeler pair) units with at least one compared pair."""

    def as_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if self.agreement is None:
            return "n/a (no overlapping comparisons)"
        text = f"{100 * self.agreement:.1f}%"
        if self.stderr is not None:
            text += f" ± {100 * self.stderr:.1f}%"
        return text + f" ({self.n_pairs} pairs, {self.n_units} item-labeler pairs)"


def pooled_estimate(units: Sequence[tuple[int, int]]) -> AgreementEstimate:
    """p̂ and SE(p̂) of the module docstring from ``(a_u, n_u)`` units (units with n_u = 0 are ignored)."""
    units = [(a, n) for a, n in units if n > 0]
    total = sum(n for _, n in units)
    if total == 0:
        return AgreementEstimate(None, None, 0, 0)
    p = sum(a for a, _ in units) / total
    u = len(units)
    stderr = None
    if u >= 2:
        stderr = math.sqrt(u / (u - 1) * sum((a - p * n) ** 2 for a, n in units)) / total
    return AgreementEstimate(p, stderr, total, u)


@dataclasses.dataclass(frozen=True)
class AgreementReport:
    overall: AgreementEstimate
    per_labeler: dict[Hashable, AgreementEstimate]
    """Each labeler who shares at least one ranked item with someone else."""
    per_pair: dict[tuple[Hashable, Hashable], AgreementEstimate]
    """Each labeler pair (sorted) with at least one shared ranked item."""
    n_items: int
    """Items ranked by two or more labelers."""


def agreement_report(ranks_by_item: Mapping[Hashable, Mapping[Hashable, Sequence[int]]]) -> AgreementReport:
    """Agreement from ``{item: {labeler: ranks per response}}`` (items with one labeler are ignored)."""
    all_units: list[tuple[int, int]] = []
    by_labeler: dict[Hashable, list[tuple[int, int]]] = defaultdict(list)
    by_pair: dict[tuple[Hashable, Hashable], list[tuple[int, int]]] = defaultdict(list)
    n_items = 0
    for per_labeler in ranks_by_item.values():
        if len(per_labeler) < 2:
            continue
        n_items += 1
        for a, b in itertools.combinations(sorted(per_labeler, key=str), 2):
            unit = pair_agreement(per_labeler[a], per_labeler[b])
            all_units.append(unit)
            by_labeler[a].append(unit)
            by_labeler[b].append(unit)
            by_pair[(a, b)].append(unit)
    return AgreementReport(
        overall=pooled_estimate(all_units),
        per_labeler={k: pooled_estimate(v) for k, v in sorted(by_labeler.items(), key=lambda kv: str(kv[0]))},
        per_pair={k: pooled_estimate(v) for k, v in sorted(by_pair.items(), key=lambda kv: str(kv[0]))},
        n_items=n_items,
    )
