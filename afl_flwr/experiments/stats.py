"""Summary statistics over seeds: mean and a two-sided 95% Student-t interval."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% critical values t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z975 = 1.959964


def t_critical_975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (two-sided 95%).

    Exact table values up to 30; above, the Cornish-Fisher expansion around the
    normal quantile (error below 1e-4).
    """
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


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
