"""Staleness functions ``s(tau)``: how much a ``tau``-versions-old update counts.

All are pure, equal 1 at ``tau = 0`` and are non-increasing in ``tau``. The names
and forms follow FedAsync (Xie et al. 2019, Sec. 5.2: constant, polynomial, hinge),
an exponential decay, and ``1 / (1 + b tau)`` from the paper's reference code.
"""

import math
from collections.abc import Callable
from functools import partial

StalenessFn = Callable[[int], float]


def constant(tau: int, a: float = 0.0, b: float = 0.0) -> float:
    """``s(tau) = 1``: no penalty (plain asynchronous averaging)."""
    return 1.0


def polynomial(tau: int, a: float = 0.5, b: float = 0.0) -> float:
    """``s(tau) = (1 + tau)^-a``."""
    return float((1.0 + tau) ** -a)


def hinge(tau: int, a: float = 10.0, b: float = 4.0) -> float:
    """``s(tau) = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)``."""
    if tau <= b:
        return 1.0
    return 1.0 / (a * (tau - b) + 1.0)


def exponential(tau: int, a: float = 0.0, b: float = 0.5) -> float:
    """``s(tau) = exp(-b tau)``."""
    return math.exp(-b * tau)


def inverse(tau: int, a: float = 0.0, b: float = 1.0) -> float:
    """``s(tau) = 1 / (1 + b tau)``, the form written in the paper's reference code."""
    return 1.0 / (1.0 + b * tau)


STALENESS_FUNCTIONS: dict[str, Callable[..., float]] = {
    "constant": constant,
    "polynomial": polynomial,
    "hinge": hinge,
    "exponential": exponential,
    "inverse": inverse,
}


def make_staleness_fn(name: str, a: float, b: float) -> StalenessFn:
    """Bind a registered staleness function to its parameters.

    Parameters
    ----------
    name : str
        One of :data:`STALENESS_FUNCTIONS`.
    a, b : float
        Shape parameters, both ``>= 0`` (which one a function uses is in its
        docstring).

    Returns
    -------
    StalenessFn
        ``tau -> s(tau)``.

    Raises
    ------
    ValueError
        On an unknown name or a negative parameter.
    """
    if name not in STALENESS_FUNCTIONS:
        allowed = ", ".join(sorted(STALENESS_FUNCTIONS))
        raise ValueError(f"Unknown staleness function '{name}'; allowed: {allowed}")
    if a < 0 or b < 0:
        raise ValueError(
            f"Staleness parameters must be >= 0, got a={a}, b={b} for '{name}'"
        )
    return partial(STALENESS_FUNCTIONS[name], a=a, b=b)
