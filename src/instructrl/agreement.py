"""Inter-labeler agreement on comparisons (InstructGPT §3.4, App. B.1: training labelers agree 72.6 ± 1.5%).

One estimator for every :class:`~instructrl.world.World`: the labeling app's people (``instructrl label
stats``, ``/admin/agreement``) and the sandbox's simulated labelers (``instructrl sandbox make``,
the RM stage's sandbox data) report the same quantity with the same standard error.

Definition. Two labelers a and b who both ranked item x (a prompt and its responses) are compared on
every pair of responses (i, j) that *neither* of them tied; they agree on the pair when both put the
same one first:

    P_ab(x) = { i < j : rank_a(i) ≠ rank_a(j) and rank_b(i) ≠ rank_b(j) }
    agree_ab(x) = |{ (i, j) ∈ P_ab(x) : sign(rank_a(i) − rank_a(j)) = sign(rank_b(i) − rank_b(j)) }|

Pooling. For a set of labeler pairs S (all of them; those with labeler l; one pair) an item contributes

    a_x = Σ_{ab ∈ S} agree_ab(x),     n_x = Σ_{ab ∈ S} |P_ab(x)|,

and the agreement is the pooled fraction of compared response pairs

    p̂ = Σ_x a_x / Σ_x n_x

with the standard error of a ratio estimator over independent items (the cluster-robust, delta-method SE
with items as clusters):

    SE(p̂) = sqrt( X / (X − 1) · Σ_x (a_x − p̂ n_x)² ) / Σ_x n_x,     X = items with n_x > 0 (needs X ≥ 2).

Why the item is the unit. Items are drawn independently; nothing inside one is. The response pairs of one
ranking are correlated (one misjudged response flips up to K − 1 pairs), and so are the labeler pairs of one
item: they judge the same responses and labeler a's ranking enters every pair (a, ·). Treating pairs, or
(item, labeler pair) units, as independent understates the SE; the spread of agreement across labeler
pairs divided by √(number of pairs) is not a sampling error of p̂ at all (it measures how labelers differ,
and labeler pairs sharing a labeler are not independent either). Variation from *which* labelers were
hired is not in SE(p̂); the per-labeler and per-pair estimates show it. Chance level without ties is 50%.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence


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
    """Independent units with at least one compared pair: items, in :func:`agreement_report`."""

    def as_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if self.agreement is None:
            return "n/a (no overlapping comparisons)"
        text = f"{100 * self.agreement:.1f}%"
        if self.stderr is not None:
            text += f" ± {100 * self.stderr:.1f}%"
        return text + f" ({self.n_pairs} pairs, {self.n_units} items)"


def pooled_estimate(units: Sequence[tuple[int, int]]) -> AgreementEstimate:
    """p̂ and SE(p̂) of the module docstring from independent ``(a_u, n_u)`` units (those with n_u = 0 are ignored).

    The units must be independent samples, i.e. items: pass one ``(a_x, n_x)`` per item, summed over its
    labeler pairs, never one per labeler pair or per response pair."""
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


def _ordered(keys: Iterable[Hashable]) -> list[Hashable]:
    """Labeler ids (or pairs of them) in their natural order; ids of mixed types in the order of their text."""
    keys = list(keys)
    try:
        return sorted(keys)
    except TypeError:
        return sorted(keys, key=str)


def agreement_report(ranks_by_item: Mapping[Hashable, Mapping[Hashable, Sequence[int]]]) -> AgreementReport:
    """Agreement from ``{item: {labeler: ranks per response}}`` (items with one labeler are ignored).

    Every estimate (overall, per labeler, per labeler pair) has one unit per item: the item's agreements and
    compared pairs summed over the labeler pairs that estimate covers (see the module docstring).
    """
    all_units: list[tuple[int, int]] = []
    by_labeler: dict[Hashable, list[tuple[int, int]]] = defaultdict(list)
    by_pair: dict[tuple[Hashable, Hashable], list[tuple[int, int]]] = defaultdict(list)
    n_items = 0
    for per_labeler in ranks_by_item.values():
        if len(per_labeler) < 2:
            continue
        n_items += 1
        item_agree = item_compared = 0
        labeler_agree: dict[Hashable, int] = defaultdict(int)
        labeler_compared: dict[Hashable, int] = defaultdict(int)
        for a, b in itertools.combinations(_ordered(per_labeler), 2):
            agree, compared = pair_agreement(per_labeler[a], per_labeler[b])
            by_pair[(a, b)].append((agree, compared))
            item_agree, item_compared = item_agree + agree, item_compared + compared
            for labeler in (a, b):
                labeler_agree[labeler] += agree
                labeler_compared[labeler] += compared
        all_units.append((item_agree, item_compared))
        for labeler, compared in labeler_compared.items():
            by_labeler[labeler].append((labeler_agree[labeler], compared))
    return AgreementReport(
        overall=pooled_estimate(all_units),
        per_labeler={k: pooled_estimate(by_labeler[k]) for k in _ordered(by_labeler)},
        per_pair={k: pooled_estimate(by_pair[k]) for k in _ordered(by_pair)},
        n_items=n_items,
    )
