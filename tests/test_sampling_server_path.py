"""The sampling study through the server's path: the real strategy, a scripted Grid.

Clients reply ``received model + g_i``; FedBuff with ``K = m``, ``s = 1`` and
server rate 1, so each merge moves the model by the mean of the merged ``g_i``.
Expected values are computed here from the population, not by the study's code.
"""

import itertools
import json

import numpy as np
import pytest

from afl_flwr.experiments.sampling import (
    relabelled_variance,
    run_server_path,
    server_path_measures,
    write_server_path_report,
)

WITH = "with-replacement"
WITHOUT = "without-replacement"
N, D, M = 10, 3, 5
SEEDS = range(8)
MERGES = 100
Z_MAX = 4.0


@pytest.fixture(scope="module")
def updates() -> np.ndarray:
    """Two well-separated groups plus client-specific noise (non-IID)."""
    rng = np.random.default_rng(1234)
    shift = np.where(np.arange(N) < 4, 5.0, -2.0)[:, None]
    return shift + rng.normal(size=(N, D)) * rng.uniform(0.5, 2.0, size=(N, 1))


def _sigma2(updates: np.ndarray) -> float:
    return float(np.mean(np.sum((updates - updates.mean(axis=0)) ** 2, axis=1)))


def _per_merge_error(
    updates: np.ndarray, selection: str, concurrency: int
) -> tuple[float, float, list]:
    """Mean per-merge ||delta - gbar||^2 over independent seeds, its se, the runs."""
    runs = [
        run_server_path(
            updates,
            m=M,
            selection=selection,
            delays=[1] * N,
            merges=MERGES,
            seed=seed,
            concurrency=concurrency,
        )
        for seed in SEEDS
    ]
    gbar = updates.mean(axis=0)
    # One value per seed: merges inside one run need not be independent.
    per_run = [np.mean(np.sum((r.deltas - gbar) ** 2, axis=1)) for r in runs]
    se = float(np.std(per_run, ddof=1) / np.sqrt(len(per_run)))
    return float(np.mean(per_run)), se, runs


@pytest.fixture(scope="module")
def equal_delays(updates) -> dict[tuple[str, int], tuple[float, float, list]]:
    """Both selections, concurrency m (all idle at each dispatch) and 1."""
    return {
        (selection, concurrency): _per_merge_error(updates, selection, concurrency)
        for selection in (WITH, WITHOUT)
        for concurrency in (M, 1)
    }


@pytest.mark.parametrize("multiplicities", [(1, 1, 1), (2, 1), (3,), (2, 2, 1)])
def test_relabelled_variance_matches_enumeration(updates, multiplicities):
    # Prepare: every assignment of distinct clients to the merge's members
    gbar = updates.mean(axis=0)
    m = sum(multiplicities)
    errors = [
        np.sum(
            (
                sum(c * updates[i] for c, i in zip(multiplicities, chosen, strict=True))
                / m
                - gbar
            )
            ** 2
        )
        for chosen in itertools.permutations(range(N), len(multiplicities))
    ]

    # Execute
    value = relabelled_variance(_sigma2(updates), N, multiplicities)

    # Assert
    assert value == pytest.approx(np.mean(errors), rel=1e-10)


def test_each_merge_moves_the_model_by_the_mean_of_its_updates(updates, equal_delays):
    # Prepare
    _, _, runs = equal_delays[(WITH, M)]
    run = runs[0]

    # Execute
    expected = np.stack(
        [updates[clients].mean(axis=0) for clients in run.merged_clients]
    )

    # Assert
    assert all(len(clients) == M for clients in run.merged_clients)
    np.testing.assert_allclose(run.deltas, expected, atol=1e-9)


@pytest.mark.parametrize("selection", [WITH, WITHOUT])
def test_concurrent_dispatch_draws_distinct_nodes_for_both_selections(
    updates, equal_delays, selection
):
    # Prepare: a node holds one task, so m concurrent picks are m distinct nodes,
    # a uniform m-subset for both selections: the finite-population form holds.
    expected = _sigma2(updates) / M * (N - M) / (N - 1)

    # Execute
    mean, se, runs = equal_delays[(selection, M)]

    # Assert
    assert all(len(set(clients)) == M for run in runs for clients in run.merged_clients)
    assert abs(mean - expected) < Z_MAX * se
    # ... and sigma^2 / m (with replacement's textbook form) would be rejected
    assert abs(mean - _sigma2(updates) / M) > Z_MAX * se


@pytest.mark.parametrize(
    ("selection", "other"), [(WITH, WITHOUT), (WITHOUT, WITH)], ids=["with", "without"]
)
def test_sequential_dispatch_gives_each_selection_its_closed_form(
    updates, equal_delays, selection, other
):
    # Prepare: concurrency 1 and K = m, every node idle at each of the m picks
    closed = {
        WITH: _sigma2(updates) / M,
        WITHOUT: _sigma2(updates) / M * (N - M) / (N - 1),
    }

    # Execute
    mean, se, _ = equal_delays[(selection, 1)]

    # Assert: its own closed form holds, the other selection's would be detected
    assert abs(mean - closed[selection]) < Z_MAX * se
    assert abs(mean - closed[other]) > Z_MAX * se


def test_only_without_replacement_makes_every_pass_exact(updates, equal_delays):
    # Prepare: m divides N, so N/m consecutive merges are one pass
    window = N // M

    # Execute
    measures = {
        selection: [
            server_path_measures(updates, run)
            for run in equal_delays[(selection, M)][2]
        ]
        for selection in (WITH, WITHOUT)
    }

    # Assert: a pass merges everyone once; with replacement it does not
    assert all(m["window_mse"] < 1e-18 for m in measures[WITHOUT])
    assert all(m["participation_cv"] == 0.0 for m in measures[WITHOUT])
    expected_with = _sigma2(updates) / M * (N - M) / (N - 1) / window
    window_with = [m["window_mse"] for m in measures[WITH]]
    se = np.std(window_with, ddof=1) / np.sqrt(len(window_with))
    assert abs(np.mean(window_with) - expected_with) < Z_MAX * se
    assert all(m["participation_cv"] > 0.0 for m in measures[WITH])


def test_busy_slow_nodes_skew_participation_towards_fast_nodes(updates):
    # Prepare: half the nodes reply 8x slower; concurrency m keeps some busy
    delays = [1] * (N // 2) + [8] * (N - N // 2)
    merges = 120

    # Execute
    runs = {
        selection: run_server_path(
            updates, m=M, selection=selection, delays=delays, merges=merges, seed=3
        )
        for selection in (WITH, WITHOUT)
    }

    # Assert: every merged update is counted ...
    for run in runs.values():
        assert run.counts.sum() == merges * M
        assert run.counts.shape == (N,)
    # ... with replacement, fast nodes are idle more often and merged more ...
    fast, slow = runs[WITH].counts[: N // 2], runs[WITH].counts[N // 2 :]
    assert fast.min() > slow.max()
    # ... without, the pass waits for the slow nodes' turn: near-equal counts
    cv = {
        s: server_path_measures(updates, r)["participation_cv"] for s, r in runs.items()
    }
    assert cv[WITHOUT] < 0.05 < cv[WITH]


def test_report_writes_per_seed_values(tmp_path, updates):
    # Prepare
    run = run_server_path(
        updates, m=M, selection=WITH, delays=[1] * N, merges=20, seed=0
    )
    measures = server_path_measures(updates, run)
    row = {
        "regime": "equal-delays",
        "selection": WITH,
        "concurrency": M,
        "closed_with": 1.0,
        "closed_without": 0.5,
        "per_seed": [{"seed": 0, **measures, "counts": run.counts.tolist()}],
        **{k: v for k, v in measures.items() if k != "mse_se"},
        **{f"{k}_ci": 0.0 for k in measures},
    }
    accuracy_runs = [
        {
            "selection": s,
            "seed": seed,
            "best_acc": acc,
            "final_acc": acc,
            "counts": [1, 2],
        }
        for s, accs in ((WITH, (0.8, 0.9)), (WITHOUT, (0.7, 0.7)))
        for seed, acc in enumerate(accs)
    ]

    # Execute
    result = write_server_path_report(tmp_path, [row], accuracy_runs, {"m": M})

    # Assert
    saved = json.loads((tmp_path / "sampling_server_path.json").read_text())
    assert saved == result
    assert saved["variance"][0]["per_seed"][0]["counts"] == run.counts.tolist()
    accuracy = {r["selection"]: r for r in saved["accuracy"]}
    assert accuracy[WITH]["best_acc"] == pytest.approx(0.85)
    assert accuracy[WITH]["best_acc_ci"] == pytest.approx(12.706 * 0.05, rel=1e-4)
    assert accuracy[WITHOUT]["final_acc_ci"] == pytest.approx(0.0)
    table = (tmp_path / "sampling_server_path.md").read_text()
    assert f"{measures['mse']:.3f}" in table
    assert "0.850 ± 0.635" in table
    assert (tmp_path / "sampling_server_path.png").read_bytes()[:4] == b"\x89PNG"
