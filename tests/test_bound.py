"""The speed-only bound on asynchronous speedup (pure clock simulation)."""

import numpy as np
import pytest

from afl_flwr.clock import NodeProfile
from afl_flwr.experiments.bound import (
    async_rate_bound,
    completed_per_second,
    speed_bound,
)

KW = {"local_epochs": 1, "batch_size": 10, "step_time_s": 1.0, "seed": 0}


def test_identical_clients_give_no_speedup():
    # Prepare: 6 equal clients, no delay -> every task lasts 1 step x 1 s
    profiles = [NodeProfile(i, 10, 1.0, 0.0) for i in range(6)]

    bound = speed_bound(profiles, concurrency=3, updates=300, **KW)

    assert bound.sync_time_per_update == pytest.approx(1 / 3)
    assert bound.async_time_per_update == pytest.approx(1 / 3)
    assert bound.speedup == pytest.approx(1.0)
    assert bound.sync_utilisation == pytest.approx(1.0)
    assert bound.async_utilisation == pytest.approx(1.0)


def test_one_straggler_in_every_round_matches_hand_computation():
    # Prepare: 2 nodes, both used every round (concurrency 2); node 1 is 10x slower
    profiles = [NodeProfile(0, 10, 1.0, 0.0), NodeProfile(1, 10, 10.0, 0.0)]

    bound = speed_bound(profiles, concurrency=2, updates=2000, **KW)

    # Sync: each round lasts 10 s for 2 updates -> 5 s per update; busy 11 of 20.
    assert bound.sync_time_per_update == pytest.approx(5.0)
    assert bound.sync_utilisation == pytest.approx(11 / 20)
    # Async: both slots always busy -> 1 + 1/10 updates per second.
    assert bound.async_time_per_update == pytest.approx(1 / 1.1, rel=0.01)
    assert bound.async_utilisation == pytest.approx(1.0)
    assert bound.speedup == pytest.approx(5.5, rel=0.01)


def test_concurrency_must_fit_the_population():
    with pytest.raises(ValueError, match="concurrency"):
        speed_bound([NodeProfile(0, 10)], concurrency=2, updates=10, **KW)


# --- async_rate_bound: a bound on any asynchronous schedule ------------------


def test_rate_bound_sums_the_fastest_clients_rates():
    # Prepare: 1 step of 1 s per task at speeds 1, 2, 4, 8; two slots
    profiles = [NodeProfile(i, 10, s, 0.0) for i, s in enumerate([4.0, 1.0, 8.0, 2.0])]

    # Execute
    rate = async_rate_bound(
        profiles, concurrency=2, local_epochs=1, batch_size=10, step_time_s=1.0
    )

    # Assert: the two fastest complete 1/1 + 1/2 tasks per second
    assert rate == pytest.approx(1.5)


@pytest.mark.parametrize("seed", range(5))
def test_simulated_async_schedules_never_exceed_the_rate_bound(seed):
    # Prepare: random speeds, sizes and delays
    rng = np.random.default_rng(seed)
    profiles = [
        NodeProfile(i, int(rng.integers(5, 50)), float(rng.uniform(1, 20)), 2.0)
        for i in range(12)
    ]

    # Execute
    simulated = speed_bound(profiles, concurrency=5, updates=500, **KW)
    rate = async_rate_bound(
        profiles, concurrency=5, local_epochs=1, batch_size=10, step_time_s=1.0
    )

    # Assert
    assert 1.0 / simulated.async_time_per_update <= rate


def test_completed_per_second_counts_over_the_last_finish():
    assert completed_per_second([1.0, 2.0, 4.0, 4.0]) == pytest.approx(1.0)
