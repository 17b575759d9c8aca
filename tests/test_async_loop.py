"""The asynchronous loop as users meet it: throughput, fairness, failures, clock.

Driven by the scripted fake Grid (no Ray): a reply to a task pushed at tick ``t``
to node ``n`` is available at tick ``t + delays[n]``; every poll is one tick.
"""

import math

import numpy as np
import pytest
from conftest import FakeGrid, make_params, reply_content, shift_by, to_record
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.clock import NodeProfile
from afl_flwr.history import MERGED, REJECTED, TIMEOUT
from afl_flwr.strategy import RunAbortedError

SLOW, FAST = 8, 1


def _run(strategy, grid, num_rounds, **kwargs):
    return strategy.start(
        grid=grid,
        initial_arrays=to_record(make_params(0)),
        num_rounds=num_rounds,
        **kwargs,
    )


def _merged_per_node(strategy):
    counts: dict[int, int] = {}
    for event in strategy.history.events:
        if event.status == MERGED:
            counts[event.node_id] = counts.get(event.node_id, 0) + 1
    return counts


def _sync_ticks_lower_bound(updates: int, per_round: int, nodes: int) -> int:
    """Ticks FedAvg needs for as many updates with the same cohort size.

    Each round waits for its slowest client; a without-replacement pass over
    the nodes puts the slow node into at least ``floor(rounds * m / N)`` rounds.
    """
    rounds = math.ceil(updates / per_round)
    slow_rounds = rounds if per_round >= nodes else (rounds * per_round) // nodes
    return slow_rounds * SLOW + (rounds - slow_rounds) * FAST


# ------------------------------------------------------- the scheduler matrix
@pytest.mark.parametrize("aggregation", ["fedbuff", "fedasync"])
@pytest.mark.parametrize("prefer_fresh", [True, False])
@pytest.mark.parametrize(("num_nodes", "concurrency"), [(4, 5), (4, 4), (8, 4)])
def test_one_slow_node_fast_nodes_merge_more_and_run_beats_sync(
    aggregation, prefer_fresh, num_nodes, concurrency
):
    # Prepare: node 1 is 8x slower than the others; the strategy's defaults else
    nodes = list(range(1, num_nodes + 1))
    grid = FakeGrid(
        replies={n: shift_by(0.01) for n in nodes},
        delays={n: SLOW if n == 1 else FAST for n in nodes},
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=concurrency,
        aggregation=aggregation,
        distinct_buffer=prefer_fresh,
        poll_interval=0.0,
    )
    per_round = min(concurrency, num_nodes)

    # Execute: 24 merges (FedBuff), or as many updates for FedAsync
    _run(strategy, grid, num_rounds=24 if aggregation == "fedbuff" else 24 * per_round)

    # Assert: every fast node merged strictly more than the slow one
    merged = _merged_per_node(strategy)
    assert merged.get(1, 0) >= 1
    assert all(merged[n] > merged[1] for n in nodes[1:]), merged
    # ... staleness was measured (non-zero) ...
    taus = [e.staleness for e in strategy.history.events if e.status == MERGED]
    assert np.mean(taus) > 0
    # ... and the same updates took fewer ticks than synchronous rounds would
    assert grid.tick < _sync_ticks_lower_bound(len(taus), per_round, num_nodes)


@pytest.mark.parametrize("aggregation", ["fedbuff", "fedasync"])
def test_every_node_stays_busy_when_nodes_do_not_exceed_concurrency(aggregation):
    # Prepare: 3 nodes, concurrency 3, K = 3; node 1 slow
    grid = FakeGrid(
        replies={n: shift_by(0.01) for n in (1, 2, 3)}, delays={1: SLOW, 2: 1, 3: 1}
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=3, aggregation=aggregation, poll_interval=0.0
    )
    busy_after_dispatch: list[int] = []
    push = grid.push_messages

    def recording_push(messages):
        messages = list(messages)
        ids = push(messages)
        trains = sum(1 for m in messages if m.metadata.message_type == "train")
        if trains:  # a train dispatch (federated evaluations ride alongside)
            busy_after_dispatch.append(strategy.scheduler.train_in_flight() + trains)
        return ids

    grid.push_messages = recording_push

    # Execute
    _run(strategy, grid, num_rounds=12)

    # Assert: every dispatch refilled all 3 slots (no node kept waiting)
    assert busy_after_dispatch and set(busy_after_dispatch) == {3}


def test_a_buffered_node_gets_work_at_once_when_no_other_node_is_idle():
    # Prepare: 2 nodes, K = 4; a node whose update waits must not idle
    grid = FakeGrid(replies={n: shift_by(0.01) for n in (1, 2)}, delays={1: 1, 2: 5})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, buffer_size=4, poll_interval=0.0
    )

    # Execute
    _run(strategy, grid, num_rounds=2)

    # Assert: the fast node filled the buffer with repeats while the slow one ran
    merged = _merged_per_node(strategy)
    assert merged[1] >= 3 * merged.get(2, 0) >= 3


# ------------------------------------------------------------------ liveness
def test_all_clients_failing_ends_the_run_with_a_clear_error():
    # Prepare: every task fails; the defaults (no time budget, no max failures)
    def crash(node, message, params):
        return Error(code=1, reason="ValueError: dataset cannot be partitioned")

    grid = FakeGrid(replies={n: crash for n in (1, 2, 3)})
    strategy = StalenessAwareAsyncStrategy(poll_interval=0.0)

    # Execute / Assert: bounded work, an error naming the reason
    with pytest.raises(RunAbortedError, match="dataset cannot be partitioned"):
        _run(strategy, grid, num_rounds=5)
    limit = strategy.max_consecutive_failures
    assert limit == 30
    assert len(grid.train_messages()) <= limit + strategy.scheduler.slots
    assert strategy.history.stop_reason
    assert all(e.status == REJECTED for e in strategy.history.events)


def test_a_failing_node_is_backed_off_and_healthy_nodes_take_its_slots():
    # Prepare: node 1 always fails, nodes 2-4 are healthy
    def crash(node, message, params):
        return Error(code=1, reason="CUDA out of memory")

    replies = {1: crash, 2: shift_by(0.1), 3: shift_by(0.1), 4: shift_by(0.1)}
    grid = FakeGrid(replies=replies, delays=dict.fromkeys(replies, 1))
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="fedasync", poll_interval=0.0
    )

    # Execute
    _run(strategy, grid, num_rounds=60)

    # Assert: the run completed, node 1 got far fewer tasks than a healthy node
    tasks = {n: 0 for n in replies}
    for message in grid.train_messages():
        tasks[message.metadata.dst_node_id] += 1
    assert strategy.version == 60
    assert tasks[1] * 3 < min(tasks[n] for n in (2, 3, 4)), tasks
    failures = [e for e in strategy.history.events if e.node_id == 1]
    assert failures and all(e.status == REJECTED for e in failures)


def test_a_node_that_recovers_is_no_longer_backed_off():
    # Prepare: node 1 fails its first 3 tasks, then works
    calls = {"n": 0}

    def flaky(node, message, params):
        calls["n"] += 1
        if calls["n"] <= 3:
            return Error(code=1, reason="transient")
        return shift_by(0.1)(node, message, params)

    grid = FakeGrid(replies={1: flaky, 2: shift_by(0.1)}, delays={1: 1, 2: 1})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=1, aggregation="fedasync", poll_interval=0.0
    )

    # Execute
    _run(strategy, grid, num_rounds=40)

    # Assert: node 1 merged again after recovering
    assert _merged_per_node(strategy).get(1, 0) >= 5


# ------------------------------------------------- virtual clock and failures
def _clocked(dead_timeout: float, seed: int = 3):
    speeds = {1: 1.0, 2: 2.0, 3: 3.0, 4: 1.5}
    replies = {n: shift_by(float(n) / 10) for n in speeds}
    replies[3] = lambda *a: None  # a dead node: never replies
    grid = FakeGrid(
        replies=replies,
        delays=dict.fromkeys(speeds, 1),
        profiles={
            n: NodeProfile(n - 1, 64, speeds[n], 0.5).to_record() for n in speeds
        },
    )
    clock = VirtualClock(local_epochs=1, batch_size=64, step_time_s=1.0, seed=seed)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=3, clock=clock, seed=seed, poll_interval=0.0
    )
    result = _run(strategy, grid, num_rounds=8, timeout=dead_timeout)
    events = [
        (e.client, e.status, e.staleness, round(e.sim_time, 9))
        for e in strategy.history.events
    ]
    return events, result, strategy


def test_dead_node_run_is_reproducible_and_independent_of_the_wall_timeout():
    # Execute: same seed, timeouts differing 5x in wall time
    events_a, result_a, _strategy = _clocked(0.02)
    events_b, result_b, _ = _clocked(0.1)

    # Assert: identical timelines and weights
    assert any(status == TIMEOUT for _, status, _, _ in events_a)
    assert events_a == events_b
    for name, value in result_a.arrays.items():
        np.testing.assert_array_equal(value.numpy(), result_b.arrays[name].numpy())


def test_dead_node_timeout_sits_at_its_simulated_finish_without_a_jump():
    _, _, strategy = _clocked(0.02)
    events = strategy.history.events
    sim_times = [e.sim_time for e in events]
    assert sim_times == sorted(sim_times)
    for event in events:
        if event.status == TIMEOUT:
            # charged its planned duration: start + duration, not a wall value
            assert event.sim_duration == pytest.approx(1.0 * 3.0 + 0.0, abs=0.5)
    # no gap larger than the slowest task's duration (3 s + 0.5 s delay)
    gaps = np.diff([0.0, *sim_times])
    assert gaps.max() <= 3.5


def test_clock_charges_the_steps_a_reply_reports():
    # Prepare: node 1 reports it stopped after 20 of 50 planned steps (2 of 5
    # epochs of 10 steps)
    def early(node, message, params):
        content = reply_content(params, 640.0)
        content["metrics"]["steps"] = 20
        return content

    grid = FakeGrid(
        replies={1: early},
        profiles={1: NodeProfile(0, 640, 1.0, 0.0).to_record()},
    )
    clock = VirtualClock(local_epochs=5, batch_size=64, step_time_s=0.5, min_epochs=1)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=1,
        min_available_nodes=1,
        clock=clock,
        aggregation="fedasync",
        poll_interval=0.0,
    )

    # Execute
    _run(strategy, grid, num_rounds=3)

    # Assert: each task charged 20 steps * 0.5 s, not the planned 50 steps
    durations = [e.sim_duration for e in strategy.history.events]
    assert durations == pytest.approx([10.0, 10.0, 10.0])
    assert strategy.history.events[-1].sim_time == pytest.approx(30.0)


# ------------------------------------------------------ federated evaluation
def test_federated_evaluation_without_evaluate_fn():
    # Prepare: clients answer evaluate messages with their own metrics
    def client(node, message, params):
        if message.metadata.message_type == "evaluate":
            return RecordDict(
                {
                    "metrics": MetricRecord(
                        {"eval-acc": 0.5 + node / 10, "num-examples": 10 * node}
                    )
                }
            )
        return shift_by(0.1)(node, message, params)

    grid = FakeGrid(replies={n: client for n in (1, 2, 3)})
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2,
        eval_every=2,
        fraction_evaluate=1.0,
        poll_interval=0.0,
    )

    # Execute
    result = _run(strategy, grid, num_rounds=4)

    # Assert: versions 2 and 4 evaluated on all 3 nodes, example-weighted
    assert sorted(result.evaluate_metrics_clientapp) == [2, 4]
    expected = np.average([0.6, 0.7, 0.8], weights=[10, 20, 30])
    for metrics in result.evaluate_metrics_clientapp.values():
        assert metrics["eval-acc"] == pytest.approx(expected)
    assert [p.version for p in strategy.history.federated] == [2, 4]


# ------------------------------------------------ Flower's synchronous loop
def test_aggregate_train_before_configure_train_raises_a_typed_error():
    strategy = StalenessAwareAsyncStrategy()
    with pytest.raises(AggregationError, match="configure_train"):
        strategy.aggregate_train(1, [])


def test_synchronous_driving_warns_once(caplog):
    # Prepare
    grid = FakeGrid(replies={n: shift_by(0.0) for n in (1, 2)})
    strategy = StalenessAwareAsyncStrategy(concurrency=2)
    arrays = to_record(make_params(0))

    # Execute: two rounds through Flower's interface
    with caplog.at_level("WARNING"):
        for server_round in (1, 2):
            messages = list(
                strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            )
            replies = [
                Message(reply_content(make_params(5), 10.0), reply_to=m)
                for m in grid.push_messages(messages) and messages
            ]
            strategy.aggregate_train(server_round, replies)

    # Assert
    warnings = [r for r in caplog.records if "synchronous round loop" in r.message]
    assert len(warnings) == 1


def test_stale_update_in_a_k1_buffer_moves_the_model_by_s_tau_times_its_delta():
    # Prepare: K = 1; node 2 is slow, so its update arrives several versions late.
    # Each client returns the model it received plus its own shift (its delta).
    shifts = {1: 0.01, 2: 1.0}
    grid = FakeGrid(
        replies={n: shift_by(d) for n, d in shifts.items()}, delays={1: 1, 2: 6}
    )
    snapshots: dict[int, dict[str, np.ndarray]] = {}

    def record(version, arrays):
        snapshots[version] = {k: v.numpy() for k, v in arrays.items()}
        return MetricRecord({"seen": float(version)})

    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, buffer_size=1, poll_interval=0.0
    )

    # Execute
    _run(strategy, grid, num_rounds=8, evaluate_fn=record)

    # Assert: at the version node 2 merged, x moved by s(tau) * 1.0 exactly
    (event,) = [
        e for e in strategy.history.events if e.node_id == 2 and e.status == MERGED
    ][:1]
    assert event.staleness >= 3
    scale = 1.0 / (1.0 + event.staleness)  # the default polynomial, a = 1
    after, before = snapshots[event.merged_into], snapshots[event.merged_into - 1]
    for name in after:
        np.testing.assert_allclose(
            after[name] - before[name], scale * 1.0, rtol=1e-5, atol=1e-6
        )
