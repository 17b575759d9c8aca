"""Summary statistics over seeds: mean and a two-sided 95% Student-t interval."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


def t_critical_975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (two-sided 95%), from scipy."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    return float(stats.t.ppf(0.975, df))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided 95% t-interval ``[low, high]``.

    With one value the interval is undefined (``nan`` ends).
    """

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0."""
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 3) -> str:
        """``mean [low, high]`` with ``digits`` significant digits."""
        if self.n < 2:
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval ``mean +- t_{0.975,n-1} s / sqrt(n)``.

    Raises
    ------
    ValueError
        When ``values`` is empty.
    """
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_critical_975(n - 1) * math.sqrt(variance / n)
    return Interval(mean, mean - half, mean + half, n)
