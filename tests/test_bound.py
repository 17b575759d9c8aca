"""The speed-only bound on asynchronous speedup (pure clock simulation)."""

import pytest

from afl_flwr.clock import NodeProfile
from afl_flwr.experiments.bound import speed_bound

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
