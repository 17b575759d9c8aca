"""Staleness functions ``s(tau)``: how much a ``tau``-versions-old update counts.

All are pure, equal 1 at ``tau = 0`` and are non-increasing in ``tau``. The names
and forms follow FedAsync (Xie et al. 2019, Sec. 5.2: constant, polynomial, hinge),
an exponential decay, and ``1 / (1 + b tau)`` from the paper's reference code.

Each function declares the parameters it uses, with its own defaults, in its
signature: :func:`make_staleness_fn` binds only the parameters it is given, so
``make_staleness_fn("inverse")`` is ``1 / (1 + 0.05 tau)``, the reference code's
value, and ``make_staleness_fn("polynomial")`` is ``1 / (1 + tau)`` (``a = 0.5``
is FedBuff's ``1 / sqrt(1 + tau)``).
"""

import inspect
import math
from collections.abc import Callable
from functools import partial

StalenessFn = Callable[[int], float]
PARAMETERS = ("a", "b")


def constant(tau: int) -> float:
    """``s(tau) = 1``: no penalty (plain asynchronous averaging)."""
    return 1.0


def polynomial(tau: int, a: float = 1.0) -> float:
    """``s(tau) = (1 + tau)^-a``; ``a = 0.5`` is FedBuff's ``1/sqrt(1+tau)``.

    The default ``a = 1`` was chosen by benchmark v2's default tuning (tuning
    seeds only; docs/benchmarks.md).
    """
    return float((1.0 + tau) ** -a)


def hinge(tau: int, a: float = 10.0, b: float = 4.0) -> float:
    """``s(tau) = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)``.

    Defaults ``a = 10, b = 4`` are FedAsync's experiments' values.
    """
    if tau <= b:
        return 1.0
    return 1.0 / (a * (tau - b) + 1.0)


def exponential(tau: int, b: float = 0.5) -> float:
    """``s(tau) = exp(-b tau)`` (default ``b = 0.5``)."""
    return math.exp(-b * tau)


def inverse(tau: int, b: float = 0.05) -> float:
    """``s(tau) = 1 / (1 + b tau)``; ``b = 0.05`` is the paper's code's value."""
    return 1.0 / (1.0 + b * tau)


STALENESS_FUNCTIONS: dict[str, Callable[..., float]] = {
    "constant": constant,
    "polynomial": polynomial,
    "hinge": hinge,
    "exponential": exponential,
    "inverse": inverse,
}


def parameter_defaults(name: str) -> dict[str, float]:
    """The parameters function ``name`` uses, with defaults (``{"a": 1.0}``)."""
    if name not in STALENESS_FUNCTIONS:
        allowed = ", ".join(sorted(STALENESS_FUNCTIONS))
        raise ValueError(f"Unknown staleness function '{name}'; allowed: {allowed}")
    signature = inspect.signature(STALENESS_FUNCTIONS[name])
    return {
        p: float(signature.parameters[p].default)
        for p in PARAMETERS
        if p in signature.parameters
    }


def make_staleness_fn(
    name: str, a: float | None = None, b: float | None = None
) -> StalenessFn:
    """Bind a registered staleness function to its parameters.

    Parameters
    ----------
    name : str
        One of :data:`STALENESS_FUNCTIONS`.
    a, b : float, optional (default: None)
        Shape parameters, ``>= 0``; ``None`` keeps the function's own default
        (:func:`parameter_defaults`). A parameter the function does not use must
        be ``None``.

    Returns
    -------
    StalenessFn
        ``tau -> s(tau)``.

    Raises
    ------
    ValueError
        On an unknown name, a negative parameter, or a parameter the function
        does not use; the message names it.
    """
    defaults = parameter_defaults(name)
    given = {k: v for k, v in (("a", a), ("b", b)) if v is not None}
    unused = sorted(set(given) - set(defaults))
    if unused:
        uses = ", ".join(defaults) or "no parameter"
        raise ValueError(
            f"staleness_{unused[0]} is not a parameter of staleness function "
            f"'{name}' (it uses {uses})"
        )
    for key, value in given.items():
        if not value >= 0:
            raise ValueError(
                f"staleness_{key}={value} must be >= 0 for staleness function '{name}'"
            )
    return partial(STALENESS_FUNCTIONS[name], **given)


def describe(name: str, a: float | None = None, b: float | None = None) -> str:
    """``name(a=..., b=...)`` with the values in effect, for logs and summaries."""
    values = {**parameter_defaults(name)}
    values.update(
        {k: v for k, v in (("a", a), ("b", b)) if v is not None and k in values}
    )
    inner = ", ".join(f"{k}={v:g}" for k, v in values.items())
    return f"{name}({inner})"
