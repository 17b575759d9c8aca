"""Tests for the staleness functions s(tau): hand values, shape, factory errors."""

import math
from itertools import pairwise

import pytest

from afl_flwr.staleness import STALENESS_FUNCTIONS, make_staleness_fn

TAUS = range(0, 60)
# Parameter sets (a, b) every registered function must behave well under.
PARAMS = [(0.0, 0.0), (0.5, 4.0), (1.0, 1.0), (2.0, 0.5), (10.0, 2.5)]


@pytest.mark.parametrize(
    ("name", "a", "b", "tau", "expected"),
    [
        ("constant", 0.0, 0.0, 0, 1.0),
        ("constant", 3.0, 7.0, 25, 1.0),
        ("polynomial", 0.5, 0.0, 0, 1.0),
        ("polynomial", 0.5, 0.0, 3, 0.5),  # 4^-0.5
        ("polynomial", 0.5, 0.0, 8, 1.0 / 3.0),  # 9^-0.5
        ("polynomial", 1.0, 0.0, 4, 0.2),  # 5^-1
        ("polynomial", 2.0, 9.0, 1, 0.25),  # 2^-2, b unused
        ("hinge", 10.0, 4.0, 0, 1.0),
        ("hinge", 10.0, 4.0, 4, 1.0),  # tau == b is still flat
        ("hinge", 10.0, 4.0, 5, 1.0 / 11.0),  # 1 / (10 * 1 + 1)
        ("hinge", 10.0, 4.0, 6, 1.0 / 21.0),
        ("hinge", 2.0, 2.5, 2, 1.0),
        ("hinge", 2.0, 2.5, 3, 0.5),  # 1 / (2 * 0.5 + 1)
        ("exponential", 0.0, 0.5, 0, 1.0),
        ("exponential", 0.0, 0.5, 2, math.e**-1),
        ("exponential", 0.0, 1.0, 3, math.e**-3),
        ("inverse", 0.0, 1.0, 0, 1.0),
        ("inverse", 0.0, 1.0, 3, 0.25),
        ("inverse", 0.0, 0.5, 6, 0.25),  # 1 / (1 + 3)
        ("inverse", 7.0, 2.0, 2, 0.2),  # a unused
    ],
)
def test_value_matches_hand_computation(
    name: str, a: float, b: float, tau: int, expected: float
) -> None:
    # Prepare
    fn = make_staleness_fn(name, a, b)

    # Execute
    value = fn(tau)

    # Assert
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("a", "b"), PARAMS)
@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_one_at_zero_and_non_increasing(name: str, a: float, b: float) -> None:
    # Prepare
    fn = make_staleness_fn(name, a, b)

    # Execute
    values = [fn(tau) for tau in TAUS]

    # Assert
    assert values[0] == 1.0
    assert all(0.0 < v <= 1.0 for v in values)
    assert all(later <= earlier for earlier, later in pairwise(values))


@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_default_parameters_start_at_one_and_decay(name: str) -> None:
    # Prepare
    fn = STALENESS_FUNCTIONS[name]

    # Execute
    values = [fn(tau) for tau in TAUS]

    # Assert
    assert values[0] == 1.0
    assert all(later <= earlier for earlier, later in pairwise(values))
    if name != "constant":
        assert values[-1] < 1.0


@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_returns_python_float(name: str) -> None:
    # Prepare
    fn = make_staleness_fn(name, 0.5, 1.0)

    # Execute
    value = fn(3)

    # Assert
    assert type(value) is float


def test_unknown_name_lists_allowed_functions() -> None:
    # Prepare
    name = "linear"

    # Execute
    with pytest.raises(ValueError) as excinfo:
        make_staleness_fn(name, 0.5, 1.0)

    # Assert
    message = str(excinfo.value)
    assert name in message
    for allowed in STALENESS_FUNCTIONS:
        assert allowed in message


@pytest.mark.parametrize(("a", "b"), [(-0.5, 1.0), (0.5, -1.0), (-1.0, -1.0)])
@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_negative_parameters_are_rejected(name: str, a: float, b: float) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=r">= 0"):
        make_staleness_fn(name, a, b)
