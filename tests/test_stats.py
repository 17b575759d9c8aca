"""The t-interval helper against hand-computed values and its coverage."""

import math

import numpy as np
import pytest

from afl_flwr.experiments.stats import t_critical_975, t_interval


def test_interval_of_one_to_five_matches_hand_computation():
    # Prepare: mean 3, s = sqrt(2.5), se = s / sqrt(5), t_{0.975,4} = 2.7764
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)

    # Execute
    interval = t_interval(values)

    # Assert
    assert interval.mean == pytest.approx(3.0)
    # (the table's 4 decimals: relative precision 2e-5 on the half-width)
    assert interval.high - interval.mean == pytest.approx(half, rel=2e-5)
    assert interval.mean - interval.low == pytest.approx(half, rel=2e-5)
    assert interval.excludes_zero


def test_interval_agrees_with_numpy_standard_error():
    # Prepare
    values = [0.12, -0.03, 0.08, 0.31, 0.05, 0.11, -0.07]

    # Execute
    interval = t_interval(values)

    # Assert: independent computation with numpy (ddof=1), t_{0.975,6} = 2.4469
    se = np.std(values, ddof=1) / np.sqrt(len(values))
    assert interval.high - interval.mean == pytest.approx(2.4469 * se, rel=2e-5)
    assert interval.mean - interval.low == pytest.approx(2.4469 * se, rel=2e-5)


@pytest.mark.parametrize(
    ("df", "expected"),
    # Published table values of t_{0.975, df}.
    [(1, 12.706), (2, 4.303), (9, 2.262), (30, 2.042), (60, 2.000), (120, 1.980)],
)
def test_critical_values_match_published_tables(df, expected):
    assert t_critical_975(df) == pytest.approx(expected, abs=1.5e-3)


def test_intervals_cover_the_true_mean_95_percent_of_the_time():
    # Prepare: 4000 samples of size 5 from N(1, 2^2)
    rng = np.random.default_rng(0)
    samples = rng.normal(1.0, 2.0, size=(4000, 5))

    # Execute
    covered = [
        t_interval(list(s)).low <= 1.0 <= t_interval(list(s)).high for s in samples
    ]

    # Assert: binomial sd of the coverage is ~0.0035
    assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


def test_single_value_has_no_interval_and_empty_input_fails():
    interval = t_interval([0.7])
    assert interval.mean == 0.7 and math.isnan(interval.low)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])
