"""Tests for the client-sampling variance experiment (closed forms vs. selectors)."""

import itertools
import json
from collections import Counter
from math import comb

import numpy as np
import pytest

from afl_flwr.experiments.sampling import (
    closed_form_variances,
    draw_subsets,
    empirical_variance,
    main,
    run_sampling_variance,
    synthetic_population,
)

WITH = "with-replacement"
WITHOUT = "without-replacement"
N, D = 10, 3
MS_CHECKED = (2, 3, 5, 8)
TRIALS = 8000
Z_MAX = 4.0
# Chi-square critical value, 9 degrees of freedom, p = 0.001.
CHI2_CRIT_DF9_P001 = 27.877


@pytest.fixture(scope="module")
def updates() -> np.ndarray:
    """A small heterogeneous population: two well-separated groups plus noise."""
    rng = np.random.default_rng(1234)
    shift = np.where(np.arange(N) < 4, 5.0, -2.0)[:, None]
    return shift + rng.normal(size=(N, D)) * rng.uniform(0.5, 2.0, size=(N, 1))


def _exact_with(updates: np.ndarray, m: int) -> float:
    """E||mean - gbar||^2 over all N^m ordered draws with replacement."""
    gbar = updates.mean(axis=0)
    values = [
        np.sum((updates[list(draw)].mean(axis=0) - gbar) ** 2)
        for draw in itertools.product(range(len(updates)), repeat=m)
    ]
    return float(np.mean(values))


def _exact_without(updates: np.ndarray, m: int) -> float:
    """E||mean - gbar||^2 over all C(N, m) subsets (each equally likely)."""
    gbar = updates.mean(axis=0)
    values = [
        np.sum((updates[list(subset)].mean(axis=0) - gbar) ** 2)
        for subset in itertools.combinations(range(len(updates)), m)
    ]
    assert len(values) == comb(len(updates), m)
    return float(np.mean(values))


def _sigma2_over_m(updates: np.ndarray, m: int) -> float:
    """sigma^2 / m with the 1/N population variance summed over coordinates."""
    return float(np.var(updates, axis=0, ddof=0).sum() / m)


@pytest.fixture(scope="module")
def estimates(updates: np.ndarray) -> dict[tuple[str, int], tuple[float, float]]:
    """Monte-Carlo estimates for both selections and every m in MS_CHECKED."""
    return {
        (selection, m): empirical_variance(updates, m, selection, TRIALS, seed=m)
        for selection in (WITH, WITHOUT)
        for m in MS_CHECKED
    }


# --- closed forms against exact enumeration -------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3])
def test_closed_form_with_replacement_matches_enumeration(
    updates: np.ndarray, m: int
) -> None:
    # Prepare
    expected = _exact_with(updates, m)

    # Execute
    closed_with, _ = closed_form_variances(updates, m)

    # Assert
    assert closed_with == pytest.approx(expected, rel=1e-10)
    assert closed_with == pytest.approx(_sigma2_over_m(updates, m), rel=1e-10)


@pytest.mark.parametrize("m", range(1, N + 1))
def test_closed_form_without_replacement_matches_enumeration(
    updates: np.ndarray, m: int
) -> None:
    # Prepare
    expected = _exact_without(updates, m)

    # Execute
    _, closed_without = closed_form_variances(updates, m)

    # Assert
    assert closed_without == pytest.approx(expected, rel=1e-10, abs=1e-12)


# --- Monte-Carlo estimates through the real selectors ---------------------------


@pytest.mark.parametrize("selection", [WITH, WITHOUT])
@pytest.mark.parametrize("m", MS_CHECKED)
def test_empirical_matches_closed_form(
    updates: np.ndarray,
    estimates: dict[tuple[str, int], tuple[float, float]],
    selection: str,
    m: int,
) -> None:
    # Prepare
    if selection == WITH:
        expected = _sigma2_over_m(updates, m)
    else:
        expected = _exact_without(updates, m)

    # Execute
    mean, se = estimates[(selection, m)]

    # Assert
    assert se > 0
    assert abs(mean - expected) < Z_MAX * se


def test_without_replacement_strictly_smaller(
    updates: np.ndarray, estimates: dict[tuple[str, int], tuple[float, float]]
) -> None:
    # Prepare
    interior = range(2, N)

    # Execute
    closed = {m: closed_form_variances(updates, m) for m in interior}

    # Assert
    for m in interior:
        closed_with, closed_without = closed[m]
        assert closed_without < closed_with, m
    for m in MS_CHECKED:
        mean_with, se_with = estimates[(WITH, m)]
        mean_without, se_without = estimates[(WITHOUT, m)]
        assert mean_with - mean_without > Z_MAX * np.hypot(se_with, se_without), m


def test_every_client_selected_gives_zero_variance(updates: np.ndarray) -> None:
    # Prepare
    trials = 200

    # Execute
    _, closed_without = closed_form_variances(updates, N)
    mean_without, se_without = empirical_variance(updates, N, WITHOUT, trials, 5)
    mean_with, _ = empirical_variance(updates, N, WITH, trials, 5)

    # Assert
    assert closed_without == 0.0
    assert mean_without == pytest.approx(0.0, abs=1e-20)
    assert se_without == pytest.approx(0.0, abs=1e-20)
    # With replacement, some client is repeated and the mean is off.
    assert mean_with > 0.1 * _sigma2_over_m(updates, N)


def test_without_replacement_draws_are_uniform_subsets() -> None:
    # Prepare
    num_clients, m, trials = 5, 2, 5000
    expected = trials / comb(num_clients, m)

    # Execute
    subsets = draw_subsets(WITHOUT, num_clients, m, trials, seed=11)

    # Assert
    counts = Counter(tuple(sorted(row)) for row in subsets.tolist())
    assert len(counts) == comb(num_clients, m)
    chi2 = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi2 < CHI2_CRIT_DF9_P001


def test_without_replacement_trials_are_independent() -> None:
    # Prepare
    num_clients, m, trials = 5, 2, 5000
    # Two independent uniform 2-subsets of 5 clients are disjoint with
    # probability C(3, 2) / C(5, 2) = 0.3; one selector reused across trials
    # would make consecutive draws inside a pass disjoint.
    expected_overlap = 1 - comb(num_clients - m, m) / comb(num_clients, m)

    # Execute
    subsets = draw_subsets(WITHOUT, num_clients, m, trials, seed=13).tolist()

    # Assert
    overlaps = [
        bool(set(first) & set(second))
        for first, second in zip(subsets[::2], subsets[1::2], strict=True)
    ]
    assert np.mean(overlaps) == pytest.approx(expected_overlap, abs=0.06)


@pytest.mark.parametrize("selection", [WITH, WITHOUT])
def test_draws_repeat_only_with_replacement(selection: str) -> None:
    # Prepare
    num_clients, m, trials = 10, 5, 300

    # Execute
    subsets = draw_subsets(selection, num_clients, m, trials, seed=2)

    # Assert
    assert subsets.shape == (trials, m)
    assert subsets.min() >= 0 and subsets.max() < num_clients
    has_repeat = [len(set(row)) < m for row in subsets.tolist()]
    if selection == WITHOUT:
        assert not any(has_repeat)
    else:
        # P(no repeat in one draw) = 10*9*8*7*6 / 10^5 = 0.3024.
        assert 0.2 < 1 - np.mean(has_repeat) < 0.4


def test_same_seed_gives_same_estimate(updates: np.ndarray) -> None:
    # Prepare
    args = (updates, 4, WITHOUT, 300)

    # Execute
    first, second = empirical_variance(*args, seed=9), empirical_variance(*args, seed=9)
    other = empirical_variance(*args, seed=10)

    # Assert
    assert first == second
    assert other != first


@pytest.mark.parametrize(
    ("m", "selection", "trials", "shape"),
    [
        (0, WITH, 10, (N, D)),
        (N + 1, WITHOUT, 10, (N, D)),
        (2, "round-robin", 10, (N, D)),
        (2, WITH, 0, (N, D)),
        (2, WITH, 10, (N,)),
    ],
)
def test_invalid_arguments_raise(
    m: int, selection: str, trials: int, shape: tuple[int, ...]
) -> None:
    # Prepare
    updates = np.zeros(shape)

    # Execute / Assert
    with pytest.raises(ValueError):
        empirical_variance(updates, m, selection, trials, 0)


# --- the experiment driver ------------------------------------------------------


def _parse_markdown(text: str) -> list[list[str]]:
    """Cells of the data rows of a markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_run_writes_consistent_files(tmp_path) -> None:
    # Prepare
    num_clients, dim, ms, seed = 8, 3, (2, 4, 7), 3
    population = synthetic_population(num_clients, dim, seed=seed)
    sigma2 = float(np.var(population, axis=0).sum())

    # Execute
    result = run_sampling_variance(
        tmp_path, num_clients=num_clients, dim=dim, ms=ms, trials=400, seed=seed
    )

    # Assert
    saved = json.loads((tmp_path / "sampling_variance.json").read_text())
    assert saved == result
    assert saved["sigma2"] == pytest.approx(sigma2)
    rows = saved["rows"]
    assert [row["m"] for row in rows] == list(ms)
    for row in rows:
        m = row["m"]
        correction = (num_clients - m) / (num_clients - 1)
        assert row["closed_with"] == pytest.approx(sigma2 / m)
        assert row["closed_without"] == pytest.approx(sigma2 / m * correction)
        assert row["ratio_closed"] == pytest.approx(correction)
        assert abs(row["empirical_with"] - sigma2 / m) < Z_MAX * row["se_with"]
        assert (
            abs(row["empirical_without"] - sigma2 / m * correction)
            < Z_MAX * row["se_without"]
        )
    cells = _parse_markdown((tmp_path / "sampling_variance.md").read_text())
    assert len(cells) == len(ms)
    for row, cell in zip(rows, cells, strict=True):
        assert int(cell[0]) == row["m"]
        assert float(cell[1]) == pytest.approx(row["closed_with"], abs=1e-4)
        emp_with, se_with = (float(x) for x in cell[2].split("±"))
        assert emp_with == pytest.approx(row["empirical_with"], abs=1e-4)
        assert se_with == pytest.approx(row["se_with"], abs=1e-4)
        assert float(cell[3]) == pytest.approx(row["closed_without"], abs=1e-4)
        emp_without, _ = (float(x) for x in cell[4].split("±"))
        assert emp_without == pytest.approx(row["empirical_without"], abs=1e-4)
    png = (tmp_path / "sampling_variance.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000


def test_main_runs_from_command_line(tmp_path, capsys) -> None:
    # Prepare
    argv = ["--out", str(tmp_path), "--trials", "50", "--num-clients", "6"]

    # Execute
    code = main(argv)

    # Assert
    assert code == 0
    saved = json.loads((tmp_path / "sampling_variance.json").read_text())
    assert saved["config"]["num_clients"] == 6
    assert saved["config"]["trials"] == 50
    assert [row["m"] for row in saved["rows"]] == [2, 4]
    printed = _parse_markdown(capsys.readouterr().out)
    assert [int(cell[0]) for cell in printed] == [2, 4]


def test_main_rejects_too_small_population(tmp_path) -> None:
    # Prepare
    argv = ["--out", str(tmp_path), "--num-clients", "2"]

    # Execute / Assert
    with pytest.raises(SystemExit):
        main(argv)
