"""Tests for the staleness functions s(tau): hand values, shape, defaults, errors."""

import math
from itertools import pairwise

import pytest

from afl_flwr.staleness import (
    STALENESS_FUNCTIONS,
    describe,
    make_staleness_fn,
    parameter_defaults,
)

TAUS = range(0, 60)
# Parameter values every function must behave well under (for those it uses).
VALUES = [0.0, 0.5, 1.0, 2.5, 10.0]


def _bind(name: str, value: float) -> dict[str, float]:
    return dict.fromkeys(parameter_defaults(name), value)


@pytest.mark.parametrize(
    ("name", "params", "tau", "expected"),
    [
        ("constant", {}, 0, 1.0),
        ("constant", {}, 25, 1.0),
        ("polynomial", {"a": 0.5}, 0, 1.0),
        ("polynomial", {"a": 0.5}, 3, 0.5),  # 4^-0.5
        ("polynomial", {"a": 0.5}, 8, 1.0 / 3.0),  # 9^-0.5
        ("polynomial", {"a": 1.0}, 4, 0.2),  # 5^-1
        ("polynomial", {"a": 2.0}, 1, 0.25),  # 2^-2
        ("hinge", {"a": 10.0, "b": 4.0}, 0, 1.0),
        ("hinge", {"a": 10.0, "b": 4.0}, 4, 1.0),  # tau == b is still flat
        ("hinge", {"a": 10.0, "b": 4.0}, 5, 1.0 / 11.0),  # 1 / (10 * 1 + 1)
        ("hinge", {"a": 10.0, "b": 4.0}, 6, 1.0 / 21.0),
        ("hinge", {"a": 2.0, "b": 2.5}, 2, 1.0),
        ("hinge", {"a": 2.0, "b": 2.5}, 3, 0.5),  # 1 / (2 * 0.5 + 1)
        ("exponential", {"b": 0.5}, 0, 1.0),
        ("exponential", {"b": 0.5}, 2, math.e**-1),
        ("exponential", {"b": 1.0}, 3, math.e**-3),
        ("inverse", {"b": 1.0}, 0, 1.0),
        ("inverse", {"b": 1.0}, 3, 0.25),
        ("inverse", {"b": 0.5}, 6, 0.25),  # 1 / (1 + 3)
    ],
)
def test_value_matches_hand_computation(
    name: str, params: dict[str, float], tau: int, expected: float
) -> None:
    # Prepare
    fn = make_staleness_fn(name, **params)

    # Execute
    value = fn(tau)

    # Assert
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "tau", "expected"),
    [
        ("polynomial", 3, 0.25),  # 1 / (1 + tau), chosen by the default tuning
        ("hinge", 5, 1.0 / 11.0),  # FedAsync's a = 10, b = 4
        ("exponential", 2, math.e**-1),  # b = 0.5
        ("inverse", 20, 0.5),  # the paper's code: 1 / (1 + 0.05 * 20)
        ("inverse", 4, 1.0 / 1.2),
    ],
)
def test_each_function_has_its_own_default_parameters(
    name: str, tau: int, expected: float
) -> None:
    # Prepare / Execute: no parameter given
    value = make_staleness_fn(name)(tau)

    # Assert
    assert value == pytest.approx(expected, rel=1e-12)


def test_defaults_are_declared_per_function() -> None:
    assert parameter_defaults("constant") == {}
    assert parameter_defaults("polynomial") == {"a": 1.0}
    assert parameter_defaults("hinge") == {"a": 10.0, "b": 4.0}
    assert parameter_defaults("exponential") == {"b": 0.5}
    assert parameter_defaults("inverse") == {"b": 0.05}
    assert describe("inverse") == "inverse(b=0.05)"
    assert describe("hinge", a=2.0) == "hinge(a=2, b=4)"


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_one_at_zero_and_non_increasing(name: str, value: float) -> None:
    # Prepare
    fn = make_staleness_fn(name, **_bind(name, value))

    # Execute
    values = [fn(tau) for tau in TAUS]

    # Assert
    assert values[0] == 1.0
    assert all(0.0 < v <= 1.0 for v in values)
    assert all(later <= earlier for earlier, later in pairwise(values))


@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_default_parameters_start_at_one_and_decay(name: str) -> None:
    # Prepare
    fn = make_staleness_fn(name)

    # Execute
    values = [fn(tau) for tau in TAUS]

    # Assert
    assert values[0] == 1.0
    assert all(later <= earlier for earlier, later in pairwise(values))
    if name != "constant":
        assert values[-1] < 1.0


@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_returns_python_float(name: str) -> None:
    assert type(make_staleness_fn(name, **_bind(name, 0.5))(3)) is float


def test_unknown_name_lists_allowed_functions() -> None:
    # Execute
    with pytest.raises(ValueError) as excinfo:
        make_staleness_fn("linear")

    # Assert
    message = str(excinfo.value)
    assert "linear" in message
    for allowed in STALENESS_FUNCTIONS:
        assert allowed in message


@pytest.mark.parametrize(
    ("name", "params", "named"),
    [
        ("constant", {"a": 0.5}, "staleness_a"),
        ("polynomial", {"b": 1.0}, "staleness_b"),
        ("inverse", {"a": 1.0}, "staleness_a"),
        ("exponential", {"a": 1.0}, "staleness_a"),
    ],
)
def test_a_parameter_the_function_does_not_use_is_refused(
    name: str, params: dict[str, float], named: str
) -> None:
    with pytest.raises(ValueError, match=rf"{named}.*not a parameter of.*'{name}'"):
        make_staleness_fn(name, **params)


@pytest.mark.parametrize("name", ["polynomial", "hinge", "exponential", "inverse"])
def test_negative_parameters_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r">= 0"):
        make_staleness_fn(name, **_bind(name, -0.5))
