"""Win rates with confidence intervals (ties count as half a win)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WinRate:
    """Win rate of A over B with a 95% Wilson score interval; ``n`` comparisons, ties counted as ½."""

    rate: float
    low: float
    high: float
    n: int
    wins: int
    ties: int
    losses: int

    def __str__(self) -> str:
        return f"{100 * self.rate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] (n={self.n})"


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``successes`` may be fractional for ties)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tie_tolerance: float = 1e-9) -> WinRate:
    """Fraction of items where A scores above B (ties = ½), with a Wilson 95% interval."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"score lists differ in length: {len(scores_a)} vs {len(scores_b)}")
    wins = sum(1 for a, b in zip(scores_a, scores_b) if a - b > tie_tolerance)
    losses = sum(1 for a, b in zip(scores_a, scores_b) if b - a > tie_tolerance)
    ties = len(scores_a) - wins - losses
    n = len(scores_a)
    rate = (wins + 0.5 * ties) / n if n else 0.0
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return WinRate(rate, low, high, n, wins, ties, losses)
