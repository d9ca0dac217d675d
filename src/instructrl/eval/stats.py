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
    # min/max: at p = 0 or 1 the bound equals p in exact arithmetic, but rounding can leave it just short of p
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


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


def outcome_win_rate(outcomes: Sequence[float]) -> WinRate:
    """Win rate from per-comparison outcomes o_i ∈ [0, 1] = how much A was preferred (1 win, ½ tie, 0 loss).

    rate = (1/n) Σ_i o_i, so a tie counts as half a win; a judge may also return a graded preference such
    as 0.7. The Wilson interval treats Σ_i o_i as the number of successes. ``wins`` / ``losses`` count
    outcomes above / below ½ and ``ties`` those equal to ½. Equals :func:`win_rate` on 1 / ½ / 0 outcomes.
    """
    values = [float(o) for o in outcomes]
    bad = [o for o in values if not 0.0 <= o <= 1.0]
    if bad:
        raise ValueError(f"outcomes must lie in [0, 1], got {bad[:3]}")
    n = len(values)
    wins = sum(1 for o in values if o > 0.5)
    losses = sum(1 for o in values if o < 0.5)
    successes = sum(values)
    low, high = wilson_interval(successes, n)
    return WinRate(successes / n if n else 0.0, low, high, n, wins, n - wins - losses, losses)


def bootstrap_interval(
    outcomes: Sequence[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean outcome: resample the n comparisons with replacement
    ``n_resamples`` times and take the (1 − level)/2 and (1 + level)/2 quantiles of the resampled means."""
    import numpy as np

    values = np.asarray(outcomes, dtype=np.float64)
    if values.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)  # (n_resamples,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
