"""The asynchronous strategy driven by a scripted fake Grid (no Ray, no network)."""

import math
import re

import numpy as np
import pytest
from conftest import (
    FakeGrid,
    from_message,
    make_params,
    reply_content,
    shift_by,
    to_record,
)
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.clock import NodeProfile
from afl_flwr.history import DROPPED, MERGED, REJECTED, TIMEOUT
from afl_flwr.strategy import RunAbortedError


def run(strategy, grid, params, num_rounds, **kwargs):
    return strategy.start(
        grid=grid, initial_arrays=to_record(params), num_rounds=num_rounds, **kwargs
    )


def final(result):
    return {k: v.numpy() for k, v in result.arrays.items()}


# --------------------------------------------------------------- FedAvg parity
def test_zero_staleness_buffered_equals_fedavg_exactly():
    # Prepare: 3 nodes, same delay, K = concurrency = 3 -> one flush of fresh updates
    x0 = make_params(0)
    client_models = {n: make_params(10 + n) for n in (1, 2, 3)}
    examples = {1: 5.0, 2: 20.0, 3: 75.0}

    def reply(node, message, params):
        return reply_content(client_models[node], examples[node])

    grid = FakeGrid(replies={n: reply for n in (1, 2, 3)}, delays={1: 1, 2: 1, 3: 1})
    # K = concurrency (the default is half the slots): FedBuff's FedAvg case
    strategy = StalenessAwareAsyncStrategy(concurrency=3, buffer_size=3, seed=1)

    # Execute
    result = run(strategy, grid, x0, num_rounds=1)

    # Assert: bit-for-bit FedAvg on the same replies
    replies = [
        Message(reply_content(client_models[n], examples[n]), reply_to=m)
        for n, m in ((m.metadata.dst_node_id, m) for m in grid.train_messages()[:3])
    ]
    expected, _ = FedAvg().aggregate_train(1, replies)
    assert [e.staleness for e in strategy.history.events] == [0, 0, 0]
    for name, value in final(result).items():
        np.testing.assert_array_equal(value, expected[name].numpy())


def test_sync_interface_equals_fedavg():
    # Prepare
    x0 = make_params(0)
    models = {n: make_params(20 + n) for n in (1, 2)}
    grid = FakeGrid(replies={n: shift_by(0) for n in (1, 2)})
    strategy = StalenessAwareAsyncStrategy(concurrency=2, buffer_size=2)

    # Execute: Flower's round-loop interface
    messages = list(strategy.configure_train(1, to_record(x0), ConfigRecord(), grid))
    grid.push_messages(messages)
    replies = [
        Message(
            reply_content(
                models[m.metadata.dst_node_id], 10.0 * m.metadata.dst_node_id
            ),
            reply_to=m,
        )
        for m in messages
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert
    expected, _ = FedAvg().aggregate_train(1, replies)
    assert {m.metadata.dst_node_id for m in messages} == {1, 2}
    for name in x0:
        np.testing.assert_array_equal(arrays[name].numpy(), expected[name].numpy())
    assert metrics["train-loss"] == pytest.approx(1.0)


# ----------------------------------------------------- staleness and weighting
def test_immediate_mode_measures_staleness_and_weights():
    # Prepare: node 1 replies every tick, node 2 takes 3 ticks.
    x0 = make_params(0)
    grid = FakeGrid(replies={1: shift_by(1.0), 2: shift_by(-1.0)}, delays={1: 1, 2: 3})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2,
        aggregation="immediate",
        mixing_rate=0.5,
        staleness_fn="polynomial",
        staleness_a=1.0,
        poll_interval=0.0,
    )

    # Execute
    result = run(strategy, grid, x0, num_rounds=3)

    # Assert: node 1 fresh twice (v1, v2), then node 2's update from v0 at v2 -> tau 2
    events = [(e.node_id, e.staleness, e.status) for e in strategy.history.events]
    assert events == [(1, 0, MERGED), (1, 0, MERGED), (2, 2, MERGED)]
    weights = [e.weight for e in strategy.history.events]
    assert weights == pytest.approx([0.5, 0.5, 0.5 / 3])  # a * (1 + tau)^-1
    # Independent replay: x1 = x0 + .5, x2 = x1 + .5, x3 = (1-c) x2 + c (x0 - 1)
    c = 0.5 / 3
    for name, value in final(result).items():
        x2 = x0[name].astype(np.float64) + 1.0
        expected = (1 - c) * x2 + c * (x0[name] - 1.0)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)


def test_buffered_mode_delta_formula_with_stale_base():
    # Prepare: K=2; node 1 fast (1 tick), node 2 slow (4 ticks).
    x0 = make_params(0)
    grid = FakeGrid(
        replies={1: shift_by(1.0, 10.0), 2: shift_by(2.0, 30.0)}, delays={1: 1, 2: 4}
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2,
        buffer_size=2,
        server_lr=0.5,
        staleness_fn="inverse",
        staleness_b=1.0,
        distinct_buffer=False,  # the fast node fills the buffer twice on purpose
        poll_interval=0.0,
    )

    # Execute
    result = run(strategy, grid, x0, num_rounds=2)

    # Assert: v1 = x0 + .5 * (1 + 1)/2 ... computed independently below
    ev = strategy.history.events
    assert [(e.node_id, e.staleness, e.merged_into) for e in ev] == [
        (1, 0, 1),
        (1, 0, 1),
        (1, 0, 2),
        (2, 1, 2),
    ]
    # v1: two fresh node-1 deltas of +1, equal weights -> x0 + 0.5 * 1
    # v2 (FedBuff): node 1 delta +1 (n = 10, s = 1), node 2 delta +2 from x0
    # (n = 30, tau = 1, s = 1/2): sum n_i s_i delta_i / sum n_i
    delta_v2 = (10 * 1.0 * 1.0 + 30 * 0.5 * 2.0) / (10 + 30)
    for name, value in final(result).items():
        expected = x0[name].astype(np.float64) + 0.5 * 1.0 + 0.5 * delta_v2
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
    assert [e.weight for e in ev] == pytest.approx([10, 10, 10, 15])


def test_bounded_staleness_drops_and_counts():
    # Prepare: node 2 is so slow its update is 3 versions old; tau_max = 1
    x0 = make_params(0)
    grid = FakeGrid(replies={1: shift_by(1.0), 2: shift_by(100.0)}, delays={1: 1, 2: 4})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2,
        aggregation="immediate",
        mixing_rate=1.0,
        staleness_fn="constant",
        max_staleness=1,
        poll_interval=0.0,
    )

    # Execute
    result = run(strategy, grid, x0, num_rounds=5)

    # Assert: node 2 never merged, each of its replies counted as dropped
    dropped = [e for e in strategy.history.events if e.status == DROPPED]
    assert dropped and all(e.node_id == 2 and e.staleness > 1 for e in dropped)
    merged = [e for e in strategy.history.events if e.status == MERGED]
    assert all(e.node_id == 1 for e in merged)
    for name, value in final(result).items():
        np.testing.assert_allclose(value, x0[name] + 5.0, rtol=1e-6)
    counts = strategy.history.client_counts()
    assert counts[2]["dropped"] == len(dropped) and counts[2]["merged"] == 0


def test_delay_sent_to_client_is_its_last_staleness():
    x0 = make_params(0)
    grid = FakeGrid(replies={1: shift_by(1.0), 2: shift_by(1.0)}, delays={1: 1, 2: 3})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="immediate", poll_interval=0.0
    )

    run(strategy, grid, x0, num_rounds=6)

    node2 = [m for m in grid.train_messages() if m.metadata.dst_node_id == 2]
    delays = [m.content["config"]["delay"] for m in node2]
    taus = [e.staleness for e in strategy.history.events if e.node_id == 2]
    assert delays[0] == 0
    assert delays[1 : len(taus) + 1] == taus[: len(delays) - 1]
    versions = [m.content["config"]["base-version"] for m in grid.train_messages()]
    assert versions == sorted(versions)


# ------------------------------------------------------------------ selection
def test_without_replacement_covers_every_node_before_repeating():
    nodes = list(range(1, 8))
    grid = FakeGrid(replies={n: shift_by(0.0) for n in nodes})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=1, aggregation="immediate", seed=3, poll_interval=0.0
    )

    run(strategy, grid, make_params(0), num_rounds=21)

    order = [m.metadata.dst_node_id for m in grid.train_messages()]
    for start in range(0, 21, 7):
        assert sorted(order[start : start + 7]) == nodes
    assert order[:7] != nodes  # shuffled, not id order


def test_with_replacement_repeats_and_is_seeded():
    nodes = list(range(1, 6))

    def dispatch_order(seed):
        grid = FakeGrid(replies={n: shift_by(0.0) for n in nodes})
        strategy = StalenessAwareAsyncStrategy(
            concurrency=1,
            aggregation="immediate",
            selection="with-replacement",
            seed=seed,
            poll_interval=0.0,
        )
        run(strategy, grid, make_params(0), num_rounds=30)
        return [m.metadata.dst_node_id for m in grid.train_messages()]

    first, again, other = dispatch_order(5), dispatch_order(5), dispatch_order(6)
    assert first == again and first != other
    assert any(sorted(first[i : i + 5]) != nodes for i in range(0, 30, 5))


# ----------------------------------------------------------------- robustness
def _bad_replies():
    def error(node, message, params):
        return Error(code=2, reason="client crashed")

    def nan(node, message, params):
        broken = {k: v.copy() for k, v in params.items()}
        broken["w"][0, 0] = np.nan
        return reply_content(broken, 10.0)

    def inf(node, message, params):
        broken = {k: v.copy() for k, v in params.items()}
        broken["b"][0] = np.inf
        return reply_content(broken, 10.0)

    def wrong_shape(node, message, params):
        return reply_content(
            {"w": np.zeros((2, 3), np.float32), "b": params["b"]}, 10.0
        )

    def wrong_dtype(node, message, params):
        return reply_content(
            {"w": params["w"].astype(np.float64), "b": params["b"]}, 10.0
        )

    def wrong_names(node, message, params):
        return reply_content({"weight": params["w"], "b": params["b"]}, 10.0)

    def zero_examples(node, message, params):
        return reply_content(params, 0.0)

    def no_metrics(node, message, params):
        return RecordDict({"arrays": to_record(params)})

    return {
        "error": (error, "client crashed"),
        "nan": (nan, "NaN or Inf"),
        "inf": (inf, "NaN or Inf"),
        "shape": (wrong_shape, "array 'w'"),
        "dtype": (wrong_dtype, "array 'w'"),
        "names": (wrong_names, "array names differ"),
        "examples": (zero_examples, "num-examples"),
        "metrics": (no_metrics, "MetricRecord"),
    }


@pytest.mark.parametrize("kind", sorted(_bad_replies()))
def test_bad_reply_is_rejected_and_model_unchanged(kind):
    # Prepare: the only node misbehaves; no time budget
    reply_fn, reason = _bad_replies()[kind]
    x0 = make_params(0)
    grid = FakeGrid(replies={1: reply_fn})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=1,
        min_available_nodes=1,
        aggregation="immediate",
        max_consecutive_failures=5,
    )

    # Execute: the run ends by itself, with an error naming the reason
    with pytest.raises(RunAbortedError, match=re.escape(reason)):
        run(strategy, grid, x0, num_rounds=3)

    # Assert: every reply rejected with the reason, global model bit-for-bit x0
    events = strategy.history.events
    assert [e.status for e in events] == [REJECTED] * 5
    assert reason in events[0].reason
    assert strategy.version == 0
    assert reason in strategy.history.stop_reason
    for name, value in strategy.store.params.items():
        np.testing.assert_array_equal(value, x0[name])


def test_reply_to_unknown_message_is_rejected():
    x0 = make_params(0)
    grid = FakeGrid(replies={1: shift_by(1.0)}, delays={1: 2})
    stranger = Message(RecordDict(), dst_node_id=1, message_type="train")
    stranger.metadata.__dict__["_message_id"] = "never-sent"
    grid.extra_replies.append(
        Message(reply_content(make_params(9), 10.0), reply_to=stranger)
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=1,
        min_available_nodes=1,
        aggregation="immediate",
        mixing_rate=1.0,
        poll_interval=0.0,
        fraction_evaluate=0.0,
    )

    result = run(strategy, grid, x0, num_rounds=1)

    statuses = [e.status for e in strategy.history.events]
    assert statuses == [REJECTED, MERGED]
    assert "never-sent" in strategy.history.events[0].reason
    for name, value in final(result).items():
        np.testing.assert_allclose(value, x0[name] + 1.0, rtol=1e-6)


def test_missing_reply_times_out_and_slot_goes_elsewhere():
    # Prepare: node 1 never answers; node 2 answers every tick
    grid = FakeGrid(
        replies={1: lambda *a: None, 2: shift_by(1.0), 3: shift_by(1.0)},
        delays={2: 3, 3: 3},
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="immediate", poll_interval=0.01
    )

    # Execute
    run(strategy, grid, make_params(0), num_rounds=40, timeout=0.2)

    # Assert: a timeout recorded for node 1, the run finished with node 2's updates
    events = strategy.history.events
    assert any(e.status == TIMEOUT and e.node_id == 1 for e in events)
    assert strategy.version == 40
    assert all(e.node_id != 1 for e in events if e.status == MERGED)


def test_nodes_joining_and_leaving_are_picked_up():
    # Prepare: node 3 joins at tick 5; node 1 leaves at tick 10
    def nodes_at(tick):
        nodes = [1, 2]
        if tick >= 5:
            nodes.append(3)
        if tick >= 10:
            nodes.remove(1)
        return nodes

    grid = FakeGrid(replies={n: shift_by(0.0) for n in (1, 2, 3)}, nodes_at=nodes_at)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="immediate", poll_interval=0.0
    )

    run(strategy, grid, make_params(0), num_rounds=30)

    sent = [(m.metadata.dst_node_id, i) for i, m in enumerate(grid.train_messages())]
    assert any(node == 3 for node, _ in sent)
    last_to_1 = max(i for node, i in sent if node == 1)
    assert last_to_1 < len(sent) - 4  # node 1 gets no work after it left


def test_concurrency_above_node_count_keeps_all_busy():
    grid = FakeGrid(replies={1: shift_by(0.0), 2: shift_by(0.0)})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=10, aggregation="immediate", poll_interval=0.0
    )

    run(strategy, grid, make_params(0), num_rounds=4)

    first_two = {m.metadata.dst_node_id for m in grid.train_messages()[:2]}
    assert first_two == {1, 2}
    assert strategy.version == 4


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"staleness_fn": "linear"}, "staleness_fn='linear' is not allowed"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"staleness_a": -1.0}, "must be >= 0"),
        ({"server_lr": 0.0}, "server_lr"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"aggregation": "fancy"}, "aggregation"),
        ({"selection": "round-robin"}, "Unknown selection"),
        ({"mixing_rate": 1.5}, "mixing_rate"),
    ],
)
def test_invalid_parameters_raise_at_construction(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        StalenessAwareAsyncStrategy(**kwargs)


def test_defaults_work_like_fedavg_usage():
    grid = FakeGrid(replies={n: shift_by(1.0) for n in range(1, 6)})
    strategy = StalenessAwareAsyncStrategy()

    result = strategy.start(
        grid=grid, initial_arrays=to_record(make_params(0)), num_rounds=2
    )

    assert strategy.version == 2
    assert set(result.train_metrics_clientapp) == {1, 2}


# ------------------------------------------------------------- virtual clock
def _profiled_grid(speeds, arrival_delays):
    nodes = list(speeds)
    grid = FakeGrid(
        replies={n: shift_by(float(n)) for n in nodes},
        delays=arrival_delays,
        profiles={n: NodeProfile(n - 1, 64, speeds[n], 0.5).to_record() for n in nodes},
    )
    return grid


def _clocked_run(seed, arrival_delays):
    speeds = {1: 1.0, 2: 4.0, 3: 10.0}
    grid = _profiled_grid(speeds, arrival_delays)
    clock = VirtualClock(local_epochs=1, batch_size=64, step_time_s=1.0, seed=seed)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2,
        aggregation="immediate",
        clock=clock,
        seed=seed,
        poll_interval=0.0,
    )
    result = run(strategy, grid, make_params(0), num_rounds=12)
    pairs = [(e.client, e.staleness) for e in strategy.history.events]
    return pairs, final(result), strategy


def test_virtual_clock_order_is_independent_of_arrival_order():
    # Same seed, opposite real arrival orders -> identical merge sequence and model
    pairs_a, model_a, strategy = _clocked_run(7, {1: 5, 2: 1, 3: 1})
    pairs_b, model_b, _ = _clocked_run(7, {1: 1, 2: 3, 3: 6})

    assert pairs_a == pairs_b
    for name in model_a:
        np.testing.assert_array_equal(model_a[name], model_b[name])
    sim_times = [e.sim_time for e in strategy.history.events]
    assert sim_times == sorted(sim_times) and sim_times[-1] > 0


def test_virtual_clock_slow_client_is_staler_and_merges_less():
    pairs, _, _ = _clocked_run(7, {1: 1, 2: 1, 3: 1})
    by_client = {c: [t for cc, t in pairs if cc == c] for c, _ in pairs}
    fast, slow = by_client[0], by_client[2]  # partition 0 speed 1, partition 2 speed 10
    assert len(fast) > len(slow) >= 1
    assert np.mean(slow) > np.mean(fast)


def test_virtual_clock_different_seed_differs():
    pairs_a, _, _ = _clocked_run(7, {1: 1, 2: 1, 3: 1})
    pairs_b, _, _ = _clocked_run(8, {1: 1, 2: 1, 3: 1})
    assert pairs_a != pairs_b


def test_profile_durations_match_formula():
    clock = VirtualClock(local_epochs=2, batch_size=10, step_time_s=0.5, seed=0)
    clock.profiles[1] = NodeProfile(0, 25, speed_factor=3.0, max_delay_s=0.0)

    assert clock.next_duration(1) == pytest.approx(2 * math.ceil(25 / 10) * 0.5 * 3.0)


def test_train_config_is_forwarded():
    grid = FakeGrid(replies={1: shift_by(0.0)})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=1, min_available_nodes=1, poll_interval=0.0
    )

    run(
        strategy,
        grid,
        make_params(0),
        num_rounds=1,
        train_config=ConfigRecord({"lr": 0.1}),
    )

    config = grid.train_messages()[0].content["config"]
    assert config["lr"] == 0.1 and config["base-version"] == 0
    assert from_message(grid.train_messages()[0])["w"].dtype == np.float32


def test_real_sized_node_ids_are_selected():
    # Flower node ids are random uint64 values (above 2**63 half the time)
    nodes = [2**64 - 17, 2**63 + 5, 12345, 2**62 + 1]
    grid = FakeGrid(replies={n: shift_by(1.0) for n in nodes})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="immediate", poll_interval=0.0
    )

    run(strategy, grid, make_params(0), num_rounds=8)

    assert strategy.version == 8
    assert {m.metadata.dst_node_id for m in grid.train_messages()} == set(nodes)


def test_superlink_unavailable_reply_counts_as_timeout():
    # The SuperLink replies with NODE_UNAVAILABLE for a task whose node went away
    def gone(node, message, params):
        return Error(code=5, reason="Node unavailable")

    grid = FakeGrid(replies={1: gone, 2: shift_by(1.0)}, delays={2: 2})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="immediate", poll_interval=0.0
    )

    run(strategy, grid, make_params(0), num_rounds=3)

    statuses = {e.status for e in strategy.history.events if e.node_id == 1}
    assert statuses == {TIMEOUT}


def test_distinct_buffer_holds_each_client_once_per_merge():
    # Prepare: node 1 is fast; with K=2 it would fill a buffer on its own
    grid = FakeGrid(
        replies={n: shift_by(1.0) for n in (1, 2, 3)}, delays={1: 1, 2: 3, 3: 3}
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, buffer_size=2, poll_interval=0.0
    )

    # Execute
    run(strategy, grid, make_params(0), num_rounds=6)

    # Assert: every merged version holds two different clients
    by_version: dict[int, list[int]] = {}
    for event in strategy.history.events:
        if event.merged_into is not None:
            by_version.setdefault(event.merged_into, []).append(event.node_id)
    assert len(by_version) == 6
    assert all(len(set(nodes)) == len(nodes) == 2 for nodes in by_version.values())


def test_distinct_buffer_never_stalls_with_fewer_nodes_than_k():
    grid = FakeGrid(replies={1: shift_by(1.0), 2: shift_by(1.0)})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, buffer_size=3, max_time=10.0, poll_interval=0.0
    )

    run(strategy, grid, make_params(0), num_rounds=4)

    assert strategy.version == 4
