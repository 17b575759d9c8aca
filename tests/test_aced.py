"""ACED: the latest update of every client, up to a delay bound, on mock updates.

Expected merges are computed here in float64 from the formula
``x + eta sum_{i in A} n_i h_i / sum_{i in A} n_i`` with ``h_i`` each client's
latest delta and ``A`` the clients whose cached update's base is at most
``tau_D`` versions old; with every client fresh in one buffer the merge is
checked against Flower's own FedAvg (``aggregate_arrayrecords``). Every
registered rule, this one included, also runs the BatchNorm and Flower-wrapper
tests (``test_model_state.py``, ``test_flower_wrappers.py``) and the async
loop's checkpoint test (``test_ca2fl_fadas.py``).
"""

import numpy as np
import pytest
from conftest import make_params, to_record
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from afl_flwr.aggregators import ACED, Update, make_aggregator
from afl_flwr.aggregators.aced import active_entries
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.strategy import StalenessAwareAsyncStrategy


def _update(client, params, base, base_version, version, n=10.0):
    return Update(
        client=client,
        params=params,
        base=base,
        base_version=base_version,
        staleness=version - base_version,
        num_examples=n,
    )


def _delta(update):
    return {
        k: update.params[k].astype(np.float64) - update.base[k].astype(np.float64)
        for k in update.params
    }


def _expected(x, entries, server_lr=1.0):
    """``x + eta`` times the example-weighted mean of ``entries`` (delta, n)."""
    total = sum(n for _, n in entries)
    return {
        k: x[k].astype(np.float64)
        + server_lr * sum(n / total * d[k] for d, n in entries)
        for k in x
    }


def _assert_merged(new, expected):
    assert sorted(new) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-6, atol=1e-6)


def _merge(rule, x, updates):
    due = [rule.add(u) for u in updates]
    assert due[-1] and not any(due[:-1])
    return rule.merge(x)


def test_active_entries_keep_bases_at_most_tau_d_old():
    bases = {0: 10, 1: 7, 2: 6, 3: 12}
    assert active_entries(bases, version=12, max_delay=5) == [0, 1, 3]
    assert active_entries(bases, version=12, max_delay=0) == [3]
    assert active_entries({}, version=3, max_delay=5) == []


def test_each_merge_steps_along_every_active_clients_latest_delta():
    # Prepare: tau_D = 3, K = 2. Merge 1 at version 0: clients 0 and 1.
    # Merge 2 at version 2: client 2 (base 2) and client 0 again (base 1);
    # client 1's entry (base 0) is 2 old and stays. Merge 3 at version 5:
    # client 3 (base 5), client 2 again (base 4); client 0 (base 1) and
    # client 1 (base 0) are now older than 3 versions and leave the mean.
    rule = ACED(buffer_size=2, server_lr=0.7, max_delay=3)
    x0, x2, x5 = make_params(0), make_params(1), make_params(2)
    first = [
        _update(0, make_params(10), make_params(0), 0, 0, n=10),
        _update(1, make_params(11), make_params(0), 0, 0, n=30),
    ]
    second = [
        _update(2, make_params(12), make_params(3), 2, 2, n=20),
        _update(0, make_params(13), make_params(4), 1, 2, n=10),
    ]
    third = [
        _update(3, make_params(14), make_params(5), 5, 5, n=40),
        _update(2, make_params(15), make_params(6), 4, 5, n=20),
    ]

    # Execute
    new1 = _merge(rule, x0, first)
    new2 = _merge(rule, x2, second)
    new3 = _merge(rule, x5, third)

    # Assert
    d = {(u.client, id(u)): _delta(u) for u in [*first, *second, *third]}
    h0a, h1 = d[(0, id(first[0]))], d[(1, id(first[1]))]
    h2a, h0b = d[(2, id(second[0]))], d[(0, id(second[1]))]
    h3, h2b = d[(3, id(third[0]))], d[(2, id(third[1]))]
    _assert_merged(new1, _expected(x0, [(h0a, 10), (h1, 30)], 0.7))
    _assert_merged(new2, _expected(x2, [(h0b, 10), (h1, 30), (h2a, 20)], 0.7))
    _assert_merged(new3, _expected(x5, [(h2b, 20), (h3, 40)], 0.7))
    # Expired entries are forgotten (they can never enter a merge again)
    assert rule.base_version(2) == 4 and rule.base_version(3) == 5
    assert rule.base_version(0) is None and rule.base_version(1) is None
    assert rule.state()[1]["clients"] == [2, 3]


def test_a_client_twice_in_one_buffer_enters_once_with_its_newest_delta():
    rule = ACED(buffer_size=3, max_delay=10)  # eta: the default 0.25
    x = make_params(0)
    updates = [
        _update(0, make_params(1), make_params(2), 0, 1, n=10),
        _update(1, make_params(3), make_params(4), 1, 1, n=10),
        _update(0, make_params(5), make_params(6), 1, 1, n=10),
    ]

    new = _merge(rule, x, updates)

    expected = _expected(
        x, [(_delta(updates[1]), 10), (_delta(updates[2]), 10)], server_lr=0.25
    )
    _assert_merged(new, expected)


def test_with_every_client_fresh_in_one_buffer_the_merge_is_flowers_fedavg():
    # Prepare: 3 clients, all trained from the current model (version 0)
    x = make_params(0)
    counts = [10.0, 30.0, 60.0]
    replies = [make_params(s) for s in (1, 2, 3)]
    rule = ACED(buffer_size=3, server_lr=1.0, max_delay=0)

    # Execute
    new = _merge(
        rule,
        x,
        [
            _update(c, p, x, 0, 0, n=n)
            for c, (p, n) in enumerate(zip(replies, counts, strict=True))
        ],
    )

    # Assert: Flower's FedAvg of the same replies
    records = [
        RecordDict({"arrays": to_record(p), "metrics": MetricRecord({"n": n})})
        for p, n in zip(replies, counts, strict=True)
    ]
    fedavg = aggregate_arrayrecords(records, "n")
    for name, value in fedavg.items():
        np.testing.assert_allclose(new[name], value.numpy(), rtol=1e-5, atol=1e-6)


def test_no_active_entry_leaves_the_weights_where_they_are():
    rule = ACED(buffer_size=1, max_delay=2)
    x = make_params(0)

    new = _merge(rule, x, [_update(0, make_params(1), make_params(2), 0, 3)])

    for name in x:
        np.testing.assert_array_equal(new[name], x[name])
        assert new[name] is not x[name]


def test_inputs_are_not_written_and_dtypes_are_kept():
    x = {**make_params(0), "count": np.array(4, np.int64)}
    base = {**make_params(1), "count": np.array(3, np.int64)}
    reply = {**make_params(2), "count": np.array(6, np.int64)}
    for params in (x, base, reply):
        for value in params.values():
            value.flags.writeable = False
    rule = ACED(buffer_size=1, server_lr=1.0)
    rule.bind_state([])  # "count" declared a weight: stepped, rounded

    new = _merge(rule, x, [_update(0, reply, base, 0, 0)])

    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in x.items()}
    assert int(new["count"]) == 4 + 3


def test_the_cache_survives_a_checkpoint_round_trip():
    # Prepare: one merge, then the rule's state into a fresh rule
    first = ACED(buffer_size=2, max_delay=5, server_lr=0.5)
    x = make_params(0)
    _merge(
        first,
        x,
        [
            _update(0, make_params(1), make_params(2), 0, 0, n=10),
            _update(1, make_params(3), make_params(4), 0, 0, n=20),
        ],
    )
    arrays, meta = first.state()
    second = ACED(buffer_size=2, max_delay=5, server_lr=0.5)
    second.load_state(arrays, meta)
    following = [
        _update(2, make_params(5), make_params(6), 1, 1, n=30),
        _update(0, make_params(7), make_params(8), 1, 1, n=10),
    ]

    # Execute: the same next merge on both
    a = _merge(first, make_params(9), following)
    b = _merge(second, make_params(9), following)

    # Assert
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert second.base_version(1) == 0
    np.testing.assert_array_equal(second.cached(1)["w"], first.cached(1)["w"])


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"max_delay": -1}, "max_delay"),
        ({"max_delay": 2.5}, "max_delay"),
        ({"max_delay": True}, "max_delay"),
        ({"server_lr": 0}, "server_lr"),
        ({"buffer_size": 0}, "buffer_size"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        ACED(**settings)


def test_reachable_from_the_strategy_and_the_run_config():
    strategy = StalenessAwareAsyncStrategy(
        aggregation="aced", buffer_size=2, aced_max_delay=3
    )
    assert isinstance(strategy.aggregator, ACED)
    assert strategy.aggregator.settings.max_delay == 3
    cfg = AppConfig.from_run_config({"aggregation": "aced", "aced-max-delay": 7})
    assert cfg.strategy_keywords()["aced_max_delay"] == 7
    assert make_aggregator("aced", cfg.strategy_keywords()).settings.max_delay == 7
    with pytest.raises(ConfigError, match="aced-max-delay"):
        AppConfig.from_run_config({"aggregation": "aced", "aced-max-delay": -1})
    with pytest.raises(ConfigError, match="aced"):
        AppConfig.from_run_config({"aggregation": "fedbuff", "aced-max-delay": 3})
    with pytest.raises(ConfigError, match="staleness-fn"):
        AppConfig.from_run_config({"aggregation": "aced", "staleness-fn": "constant"})
