"""Issue 11's paths: lazy node profiles, evaluation off the critical path, and a
dispatch whose cost does not grow with the number of nodes.

Driven by the scripted fake Grid (no Ray); nothing here asserts on time.
"""

import itertools
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pytest
from conftest import FakeGrid, make_params, shift_by, to_record
from flwr.app import MetricRecord

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.clock import NodeProfile, speed_factor, speed_factors
from afl_flwr.history import MERGED
from afl_flwr.selection import WithoutReplacement, WithReplacement
from afl_flwr.strategy import scheduler as scheduler_module


class QueryLog(FakeGrid):
    """FakeGrid that logs, in order, every profile query and training task."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.log += [
            ("train", m.metadata.dst_node_id)
            for m in messages
            if m.metadata.message_type == "train"
        ]
        return super().push_messages(messages)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.log += [("query", m.metadata.dst_node_id) for m in messages]
        return super().send_and_receive(messages, timeout=timeout)


def _grid(num_nodes: int, **kwargs) -> QueryLog:
    nodes = range(1, num_nodes + 1)
    return QueryLog(
        replies={n: shift_by(0.01) for n in nodes},
        delays={n: 1 + n % 3 for n in nodes},
        profiles={
            n: NodeProfile(n - 1, 64 * (1 + n % 4), 1.0 + n % 5, 0.5).to_record()
            for n in nodes
        },
        **kwargs,
    )


def _clock(profile_query: str) -> VirtualClock:
    return VirtualClock(
        local_epochs=1, batch_size=64, step_time_s=0.1, profile_query=profile_query
    )


def _start(strategy, grid, num_rounds, **kwargs):
    return strategy.start(
        grid=grid,
        initial_arrays=to_record(make_params(0)),
        num_rounds=num_rounds,
        **kwargs,
    )


# ------------------------------------------------------------- lazy profiles
def test_first_dispatch_profiles_are_asked_once_before_the_first_task(monkeypatch):
    # Prepare: 40 nodes, 4 slots, batches of 6, a run too short to reach every node
    monkeypatch.setattr(scheduler_module, "PROFILE_BATCH", 6)
    grid = _grid(40)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=4, clock=_clock("first-dispatch"), poll_interval=0.0
    )

    # Execute
    _start(strategy, grid, num_rounds=3)

    # Assert: each node asked at most once, always before its first task; the
    # first batch is the first dispatch's 4 nodes and 2 more, not all 40
    assert grid.log[0][0] == "query"
    queried = [n for kind, n in grid.log if kind == "query"]
    trained = [n for kind, n in grid.log if kind == "train"]
    assert len(queried) == len(set(queried))
    assert set(trained) <= set(queried)
    assert len(queried) < 40
    for node in set(trained):
        assert grid.log.index(("query", node)) < grid.log.index(("train", node))
    first_train = next(i for i, (kind, _) in enumerate(grid.log) if kind == "train")
    assert first_train == 6
    # queries come in batches of 6 (the last possibly shorter)
    runs = [len(list(g)) for k, g in itertools.groupby(grid.log, key=lambda e: e[0])]
    assert all(r <= 6 for r in runs[::2])


def test_on_join_profiles_ask_every_node_before_the_first_task():
    # Prepare
    grid = _grid(12)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=4, clock=_clock("on-join"), poll_interval=0.0
    )

    # Execute
    _start(strategy, grid, num_rounds=2)

    # Assert
    first_train = next(i for i, (kind, _) in enumerate(grid.log) if kind == "train")
    assert sorted(n for _, n in grid.log[:first_train]) == list(range(1, 13))


def test_lazy_profiles_charge_the_same_simulated_durations_as_eager_ones():
    # Prepare: the same nodes and run under both query modes
    runs = {}
    for mode in ("on-join", "first-dispatch"):
        strategy = StalenessAwareAsyncStrategy(
            concurrency=3, clock=_clock(mode), poll_interval=0.0
        )
        _start(strategy, _grid(6), num_rounds=6)
        runs[mode] = strategy.history.events

    # Assert: every client's tasks took the durations its profile implies
    # (selection order may differ: lazy nodes are ordered by node id)
    for events in runs.values():
        for event in events:
            profile_speed = 1.0 + (event.client + 1) % 5
            steps = 1 + (event.client + 1) % 4
            compute = steps * 0.1 * profile_speed
            assert compute <= event.sim_duration <= compute + 0.5 + 1e-9


def test_lazy_profile_query_is_validated():
    with pytest.raises(ValueError, match="profile_query"):
        VirtualClock(local_epochs=1, batch_size=1, step_time_s=1, profile_query="x")


# -------------------------------------------------- evaluation off the path
def _evaluate_fn(log: list[int]):
    def evaluate(version, arrays):
        params = {k: v.numpy() for k, v in arrays.items()}
        log.append(version)
        return MetricRecord(
            {"mean": float(np.mean([p.mean() for p in params.values()]))}
        )

    return evaluate


@pytest.mark.parametrize("aggregation", ["fedbuff", "fedasync"])
def test_background_evaluation_records_exactly_what_inline_evaluation_does(
    aggregation,
):
    # Prepare
    records = {}
    for background in (False, True):
        strategy = StalenessAwareAsyncStrategy(
            concurrency=3,
            aggregation=aggregation,
            clock=_clock("on-join"),
            eval_every=2,
            background_evaluation=background,
            poll_interval=0.0,
        )
        seen: list[int] = []
        result = _start(
            strategy, _grid(5), num_rounds=9, evaluate_fn=_evaluate_fn(seen)
        )
        evals = [asdict(p) for p in strategy.history.evals]
        for point in evals:
            point.pop("eval_seconds")
            point.pop("wall_time")
        events = [
            (e.client, e.status, e.staleness, e.sim_time, e.merged_into)
            for e in strategy.history.events
        ]
        records[background] = (evals, events, dict(result.evaluate_metrics_serverapp))

    # Assert: the same evaluations (versions 0, 2, 4, 6, 8, 9, in order, with
    # their version's simulated time and update count), the same run
    assert records[True] == records[False]
    assert [p["version"] for p in records[True][0]] == [0, 2, 4, 6, 8, 9]


def test_dispatch_goes_on_while_an_evaluation_runs():
    # Prepare: the evaluation of version 1 waits until the loop has pushed a
    # task built on version 1 or later, which an inline evaluation would block
    grid = _grid(4)
    pushed_after = threading.Event()
    original_push = grid.push_messages

    def push(messages):
        messages = list(messages)
        if any(int(m.metadata.group_id) >= 1 for m in messages):
            pushed_after.set()
        return original_push(messages)

    grid.push_messages = push  # type: ignore[method-assign]
    waited: dict[int, bool] = {}

    def evaluate(version, arrays):
        if version == 1:
            waited[version] = pushed_after.wait(timeout=30)
        return MetricRecord({"v": float(version)})

    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, aggregation="fedasync", poll_interval=0.0
    )

    # Execute
    _start(strategy, grid, num_rounds=4, evaluate_fn=evaluate)

    # Assert: the loop dispatched during the evaluation; results in order
    assert waited == {1: True}
    assert [p.version for p in strategy.history.evals] == [0, 1, 2, 3, 4]


def test_an_evaluation_error_is_raised_by_the_run():
    def evaluate(version, arrays):
        if version == 2:
            raise RuntimeError("test set missing")
        return MetricRecord({"v": 1.0})

    strategy = StalenessAwareAsyncStrategy(concurrency=2, poll_interval=0.0)
    with pytest.raises(RuntimeError, match="test set missing"):
        _start(strategy, _grid(3), num_rounds=5, evaluate_fn=evaluate)


def test_a_checkpoint_waits_for_pending_evaluations(tmp_path):
    # Prepare: checkpoint every version; evaluation of each version is slow
    release = threading.Event()

    def evaluate(version, arrays):
        release.wait(timeout=0.05)
        return MetricRecord({"v": float(version)})

    path = tmp_path / "ckpt.npz"
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2,
        checkpoint_every=1,
        checkpoint_path=path,
        poll_interval=0.0,
    )
    saved_evals = []
    save = strategy.save_checkpoint

    def spy(path=None):
        save(path)
        saved_evals.append([p.version for p in strategy.history.evals])

    strategy.save_checkpoint = spy  # type: ignore[method-assign]

    # Execute
    _start(strategy, _grid(3), num_rounds=3, evaluate_fn=evaluate)

    # Assert: each checkpoint's history holds its own version's evaluation
    assert saved_evals == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]


# ------------------------------------------------------ dispatch cost vs N
class CountingNodes(Sequence):
    """A node list that counts how many of its items are read."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.reads = 0

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index):
        self.reads += 1
        return self.nodes[index]

    def __iter__(self):
        raise AssertionError("a pick must not walk the whole node list")


@pytest.mark.parametrize("selector_cls", [WithReplacement, WithoutReplacement])
def test_a_pick_reads_a_bounded_number_of_nodes_however_many_there_are(selector_cls):
    # Prepare: 100,000 nodes, 10 of them busy at any time
    nodes = CountingNodes(list(range(10**6, 10**6 + 100_000)))
    alive = set(nodes.nodes)
    selector = selector_cls(3)
    busy: list[int] = []
    picks = 20_000

    # Execute: each pick frees the oldest busy node (a steady async run)
    for _ in range(picks):
        node = selector.pick(nodes, set(busy), alive)
        busy.append(node)
        if len(busy) > 10:
            busy.pop(0)

    # Assert: without replacement pays one permutation per pass (N reads per
    # N picks); both read O(1) nodes per pick on average, not O(N)
    assert nodes.reads / picks < 8


def test_without_replacement_pick_makes_the_choices_select_makes():
    # Prepare: the same seed, the same random busy sets, both entry points
    rng = np.random.default_rng(0)
    all_nodes = [int(n) for n in rng.choice(10**9, size=30, replace=False)]
    by_select, by_pick = WithoutReplacement(11), WithoutReplacement(11)
    choices_select, choices_pick = [], []

    # Execute
    for _ in range(300):
        excluded = {n for n in all_nodes if rng.random() < 0.4}
        idle = [n for n in all_nodes if n not in excluded]
        choices_select.append(by_select.select(all_nodes, idle))
        choices_pick.append(by_pick.pick(all_nodes, excluded))

    # Assert
    assert choices_pick == choices_select
    assert by_pick.get_state() == by_select.get_state()


def test_with_replacement_pick_is_uniform_over_the_eligible_nodes():
    # Prepare: 10 nodes, 3 always excluded (chi-square, 6 dof, p = 0.001)
    nodes = list(range(10))
    excluded = {0, 4, 9}
    selector = WithReplacement(5)
    draws = 7000

    # Execute
    counts = Counter(selector.pick(nodes, excluded) for _ in range(draws))

    # Assert
    assert set(counts) == set(nodes) - excluded
    expected = draws / 7
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 22.458


def test_without_replacement_state_round_trips_mid_pass():
    # Prepare
    nodes = list(range(20))
    first = WithoutReplacement(4)
    taken = [first.pick(nodes, set()) for _ in range(7)]
    second = WithoutReplacement(0)
    second.set_state(first.get_state())

    # Execute
    rest_first = [first.pick(nodes, set()) for _ in range(30)]
    rest_second = [second.pick(nodes, set()) for _ in range(30)]

    # Assert: the pass continues where it was; each node once per pass
    assert rest_first == rest_second
    assert sorted(rest_first[:13]) == sorted(set(nodes) - set(taken))


def test_large_federation_run_merges_and_dispatches_through_the_strategy():
    # Prepare: 2,000 nodes, FedBuff with K = concurrency, lazy profiles
    grid = _grid(2000)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=8,
        buffer_size=8,
        clock=_clock("first-dispatch"),
        poll_interval=0.0,
    )

    # Execute
    _start(strategy, grid, num_rounds=10)

    # Assert: 80 merged updates from distinct nodes (one pass is 2,000 long)
    merged = [e.node_id for e in strategy.history.events if e.status == MERGED]
    assert len(merged) == 80
    assert len(set(merged)) == 80
    # ... and profiles came in batches of at most PROFILE_BATCH nodes, each node
    # once: at most ceil(2000 / 256) = 8 round trips, none of 2,000 messages
    batch = scheduler_module.PROFILE_BATCH
    queried = [n for kind, n in grid.log if kind == "query"]
    sizes = [
        len(list(g)) for kind, g in itertools.groupby(grid.log, key=lambda e: e[0])
    ][::2]
    assert len(queried) == len(set(queried))
    assert max(sizes) <= batch
    assert len(sizes) <= -(-2000 // batch)


def test_one_partitions_speed_factor_equals_its_entry_of_the_full_draw():
    # Prepare
    kwargs = {"spread": 10.0, "straggler_fraction": 0.2, "seed": 3}
    full = speed_factors(50, **kwargs)

    # Execute
    one = [speed_factor(pid, 50, **kwargs) for pid in range(50)]

    # Assert
    assert one == full.tolist()


def test_the_evaluation_thread_never_parses_array_headers(monkeypatch):
    # Prepare: record which threads call ast.literal_eval (np.load's header
    # parser, unsafe in two threads at once on CPython 3.11), and what the
    # evaluation sees
    import ast

    callers: list[str] = []
    original = ast.literal_eval

    def spy(node_or_string):
        callers.append(threading.current_thread().name)
        return original(node_or_string)

    monkeypatch.setattr(ast, "literal_eval", spy)
    seen: dict[int, dict] = {}

    def evaluate(version, arrays):
        seen[version] = {k: v for k, v in arrays.to_torch_state_dict().items()}
        return MetricRecord({"v": float(version)})

    strategy = StalenessAwareAsyncStrategy(concurrency=2, poll_interval=0.0)

    # Execute
    result = _start(strategy, _grid(3), num_rounds=3, evaluate_fn=evaluate)

    # Assert: no parsing in the evaluation thread; the final model arrived intact
    assert not [name for name in callers if name.startswith("central-eval")]
    final = {k: v.numpy() for k, v in result.arrays.items()}
    assert set(seen[3]) == set(final)
    for key, value in final.items():
        np.testing.assert_array_equal(seen[3][key].numpy(), value)
        assert seen[3][key].numpy().flags.writeable
