"""FedStaleWeight: clients reweighted by their average staleness, on mock updates.

Expected merges are computed here in float64 from the formula
``x + eta_g sum_i n_i a_i (x_i - b_i) / sum_i n_i a_i`` with ``a_i`` the mean of
``tau + 1`` over client ``i``'s last ``W`` updates; zero staleness is checked
against Flower's own FedAvg (``aggregate_arrayrecords``). Every registered rule,
this one included, also runs the BatchNorm and Flower-wrapper tests
(``test_model_state.py``, ``test_flower_wrappers.py``).
"""

import numpy as np
import pytest
from conftest import make_params, to_record
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from afl_flwr.aggregators import FedStaleWeight, Update, make_aggregator
from afl_flwr.aggregators.fedstaleweight import average_staleness
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.strategy import StalenessAwareAsyncStrategy


def _update(client, params, base, tau, n=10.0):
    return Update(
        client=client,
        params=params,
        base=base,
        base_version=0,
        staleness=tau,
        num_examples=n,
    )


def _expected(x, updates, averages, server_lr=1.0):
    pairs = zip(updates, averages, strict=True)
    weights = np.array([u.num_examples * a for u, a in pairs])
    weights = weights / weights.sum()
    out = {}
    for name, value in x.items():
        delta = sum(
            w * (u.params[name].astype(np.float64) - u.base[name].astype(np.float64))
            for w, u in zip(weights, updates, strict=True)
        )
        out[name] = value.astype(np.float64) + server_lr * delta
    return out


def _assert_merged(new, expected):
    assert sorted(new) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-6, atol=1e-6)


def test_average_staleness_counts_from_one():
    assert average_staleness([0]) == 1.0
    assert average_staleness([0, 2, 7]) == pytest.approx((1 + 3 + 8) / 3)
    with pytest.raises(ValueError, match="empty"):
        average_staleness([])


def test_stale_clients_weigh_more_by_their_average_staleness():
    # Prepare: client 0 fast (tau 0, 1), client 1 slow (tau 9); W = 5.
    x, old, older = make_params(0), make_params(1), make_params(2)
    rule = FedStaleWeight(buffer_size=3, server_lr=0.8)
    updates = [
        _update(0, make_params(3), old, 0, n=10),
        _update(1, make_params(4), older, 9, n=30),
        _update(0, make_params(5), old, 1, n=10),
    ]

    # Execute
    due = [rule.add(u) for u in updates]
    new = rule.merge(x)

    # Assert: a = 1 for client 0's first, 10 for client 1, (1 + 2) / 2 for the third
    assert due == [False, False, True]
    expected = _expected(x, updates, [1.0, 10.0, 1.5], server_lr=0.8)
    _assert_merged(new, expected)
    assert rule.average(0) == 1.5 and rule.average(1) == 10.0
    assert rule.average(2) is None


def test_the_window_keeps_a_clients_last_w_stalenesses():
    x = make_params(0)
    rule = FedStaleWeight(buffer_size=1, window=2)
    for tau in (8, 0, 2):
        rule.add(_update(0, make_params(1), x, tau))
        rule.merge(x)
    assert rule.average(0) == pytest.approx((1 + 3) / 2)  # tau 8 fell out
    # weight() counts the update being weighed in the window, without recording it
    assert rule.weight(_update(0, x, x, 5, n=4)) == pytest.approx(4 * (3 + 6) / 2)
    assert rule.average(0) == pytest.approx(2.0)


@pytest.mark.parametrize("num_examples", [[10, 30, 5], [1, 1], [7]])
def test_zero_staleness_is_flowers_fedavg_bit_for_bit(num_examples):
    x = make_params(0)
    clients = [make_params(s) for s in range(1, len(num_examples) + 1)]
    rule = FedStaleWeight(buffer_size=len(num_examples))
    for i, (params, n) in enumerate(zip(clients, num_examples, strict=True)):
        rule.add(_update(i, params, x, 0, n=n))
    new = rule.merge(x)
    records = []
    for params, n in zip(clients, num_examples, strict=True):
        metrics = MetricRecord({"num-examples": n})
        records.append(RecordDict({"arrays": to_record(params), "metrics": metrics}))
    flower = aggregate_arrayrecords(records, "num-examples")
    for name, value in new.items():
        assert value.dtype == flower[name].numpy().dtype
        np.testing.assert_array_equal(value, flower[name].numpy())


def test_equal_average_staleness_gives_example_weights():
    # Every client equally stale: the merge is FedBuff's n_i / sum n mean delta.
    x, base = make_params(0), make_params(1)
    updates = [
        _update(i, make_params(i + 2), base, 4, n=n) for i, n in enumerate((5, 15))
    ]
    rule = FedStaleWeight(buffer_size=2)
    for u in updates:
        rule.add(u)
    new = rule.merge(x)
    expected = _expected(x, updates, [1.0, 1.0])
    _assert_merged(new, expected)


def test_windows_survive_a_checkpoint():
    x = make_params(0)
    rule = FedStaleWeight(buffer_size=1, window=3)
    for client, tau in ((0, 4), (1, 0), (0, 2)):
        rule.add(_update(client, make_params(1), x, tau))
        rule.merge(x)
    arrays, meta = rule.state()
    restored = FedStaleWeight(buffer_size=1, window=3)
    restored.load_state(arrays, meta)
    assert restored.average(0) == rule.average(0) == 4.0
    assert restored.average(1) == 1.0
    assert restored.state() == rule.state()


def test_pending_updates_discarded_at_the_end_leave_no_weights_behind():
    x = make_params(0)
    rule = FedStaleWeight(buffer_size=2)
    rule.add(_update(0, make_params(1), x, 3))
    assert len(rule.discard_pending()) == 1
    fresh = [_update(1, make_params(2), x, 0), _update(2, make_params(3), x, 0)]
    for u in fresh:
        rule.add(u)
    new = rule.merge(x)
    expected = _expected(x, fresh, [1.0, 1.0])
    _assert_merged(new, expected)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"server_lr": 0}, "server_lr"),
        ({"buffer_size": 0}, "buffer_size"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        FedStaleWeight(**settings)


def test_reachable_from_the_strategy_and_the_run_config():
    strategy = StalenessAwareAsyncStrategy(
        aggregation="fedstaleweight", buffer_size=2, fedstaleweight_window=3
    )
    assert isinstance(strategy.aggregator, FedStaleWeight)
    assert strategy.aggregator.settings.window == 3
    cfg = AppConfig.from_run_config(
        {"aggregation": "fedstaleweight", "fedstaleweight-window": 7}
    )
    assert cfg.strategy_keywords()["fedstaleweight_window"] == 7
    rule = make_aggregator("fedstaleweight", cfg.strategy_keywords())
    assert rule.settings.window == 7
    with pytest.raises(ConfigError, match="fedstaleweight-window"):
        AppConfig.from_run_config(
            {"aggregation": "fedstaleweight", "fedstaleweight-window": 0}
        )
    with pytest.raises(ConfigError, match="fedstaleweight"):
        AppConfig.from_run_config(
            {"aggregation": "fedbuff", "fedstaleweight-window": 3}
        )
    with pytest.raises(ConfigError, match="staleness-fn"):
        AppConfig.from_run_config(
            {"aggregation": "fedstaleweight", "staleness-fn": "constant"}
        )
