"""Tasks queued ahead per node, and replies pulled off the strategy's loop."""

import threading

import pytest
from conftest import FakeGrid, make_params, shift_by, to_record
from flwr.app import Message, RecordDict

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.callbacks.base import Callback
from afl_flwr.clock import NodeProfile
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.history import MERGED
from afl_flwr.selection import make_selector
from afl_flwr.strategy.scheduler import TRAIN, Scheduler
from afl_flwr.strategy.transport import (
    ReplyPuller,
    check_queue_depth,
    is_simulation_grid,
    is_superlink_grid,
)

TTL = 30.0


class Factory:
    """A TaskFactory whose messages carry a TTL and version 7."""

    def train_message(self, node_id: int, seq: int) -> tuple[Message, int]:
        content = RecordDict({"arrays": to_record(make_params(0))})
        message = Message(content, dst_node_id=node_id, message_type=TRAIN, ttl=TTL)
        return message, 7

    def started(self, task) -> None:
        pass


def _dispatched(nodes: int, concurrency: int, depth: int) -> tuple[Scheduler, list]:
    grid = FakeGrid(replies={n: shift_by(0.0) for n in range(1, nodes + 1)})
    scheduler = Scheduler(
        selector=make_selector("without-replacement", 0),
        concurrency=concurrency,
        queue_depth=depth,
    )
    scheduler.refresh(grid, force=True)
    return scheduler, scheduler.dispatch(grid, Factory())


def test_depth_two_gives_every_busy_node_one_waiting_task_when_none_is_idle():
    # Execute: 3 nodes, 3 slots, depth 2
    scheduler, started = _dispatched(nodes=3, concurrency=3, depth=2)

    # Assert: each node holds a running and a waiting task; slots count running
    per_node = {n: [t for t in started if t.node_id == n] for n in (1, 2, 3)}
    assert all(len(tasks) == 2 for tasks in per_node.values())
    assert all(
        [t.waiting for t in tasks] == [False, True] for tasks in per_node.values()
    )
    assert scheduler.train_in_flight() == 3
    assert len(scheduler.in_flight) == 6
    assert {t.version for t in started} == {7}  # the version at dispatch


def test_waiting_task_ttl_covers_the_task_ahead(monkeypatch):
    pushed: list[Message] = []
    original = FakeGrid.push_messages

    def record(self, messages):
        messages = list(messages)
        pushed.extend(messages)
        return original(self, messages)

    monkeypatch.setattr(FakeGrid, "push_messages", record)
    _dispatched(nodes=2, concurrency=2, depth=3)
    by_node: dict[int, list[float]] = {}
    for message in pushed:
        by_node.setdefault(message.metadata.dst_node_id, []).append(
            message.metadata.ttl
        )
    assert by_node == {1: [TTL, 2 * TTL, 3 * TTL], 2: [TTL, 2 * TTL, 3 * TTL]}


def test_depth_changes_nothing_while_an_idle_node_exists():
    # 4 nodes, 3 slots: a fourth node is idle, so nothing is queued ahead
    scheduler, started = _dispatched(nodes=4, concurrency=3, depth=2)
    assert len(started) == 3
    assert not any(t.waiting for t in started)
    assert scheduler.train_in_flight() == 3


def _virtual_run(depth: int) -> list:
    speeds = {1: 1.0, 2: 2.5, 3: 4.0}
    grid = FakeGrid(
        replies={n: shift_by(float(n) / 10) for n in speeds},
        delays=dict.fromkeys(speeds, 1),
        profiles={
            n: NodeProfile(n - 1, 64, speeds[n], 0.5).to_record() for n in speeds
        },
    )
    clock = VirtualClock(local_epochs=1, batch_size=64, step_time_s=1.0, seed=5)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=3,
        buffer_size=1,
        clock=clock,
        seed=5,
        poll_interval=0.0,
        node_queue_depth=depth,
    )
    strategy.start(grid=grid, initial_arrays=to_record(make_params(0)), num_rounds=12)
    return [e for e in strategy.history.events if e.status == MERGED]


def test_virtual_clock_stays_exact_and_waiting_tasks_count_staleness_from_dispatch():
    # Execute: the same federation at depth 1 and depth 2 (every node kept busy,
    # so depth 1 also restarts each node at its own finish)
    shallow, deep = _virtual_run(1), _virtual_run(2)

    # Assert: the same simulated timeline, task by task ...
    def timeline(events):
        return [
            (e.client, round(e.sim_time, 9), round(e.sim_duration, 9)) for e in events
        ]

    assert timeline(deep) == timeline(shallow)
    # ... in which every task starts exactly when its node's previous one ended
    last_finish: dict[int, float] = {}
    for event in deep:
        start = event.sim_time - event.sim_duration
        assert start == pytest.approx(last_finish.get(event.client, 0.0), abs=1e-9)
        last_finish[event.client] = event.sim_time
    # staleness is measured from each task's own base, which for a waiting task
    # is the version at its dispatch: never fresher than at depth 1, staler often
    for event in deep:
        assert event.staleness == event.version - event.base_version
    pairs = list(zip(shallow, deep, strict=True))
    assert all(d.staleness >= s.staleness for s, d in pairs)
    assert sum(d.staleness for _, d in pairs) > sum(s.staleness for s, _ in pairs)


def test_depth_above_one_is_refused_on_flowers_simulation_grid():
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    simulation = InMemoryGrid.__new__(InMemoryGrid)
    superlink = HttpGrid.__new__(HttpGrid)
    assert is_simulation_grid(simulation) and not is_superlink_grid(simulation)
    assert is_superlink_grid(superlink) and not is_simulation_grid(superlink)
    assert not is_superlink_grid(FakeGrid(replies={}))
    assert check_queue_depth(3, superlink) == 3
    assert check_queue_depth(2, FakeGrid(replies={})) == 2
    assert check_queue_depth(1, simulation) == 1
    with pytest.raises(ValueError, match="different actors"):
        check_queue_depth(2, simulation)
    with pytest.raises(ValueError, match="node_queue_depth=0"):
        StalenessAwareAsyncStrategy(node_queue_depth=0)


def test_run_config_node_queue_depth_is_validated_and_reaches_the_strategy():
    from afl_flwr.server_app import make_async_strategy

    with pytest.raises(ConfigError, match="node-queue-depth"):
        AppConfig.from_run_config({"node-queue-depth": 0})
    default = make_async_strategy(AppConfig.from_run_config({}), None)
    fixed = make_async_strategy(
        AppConfig.from_run_config({"node-queue-depth": 3}), None
    )
    assert default.node_queue_depth == 1
    assert fixed.node_queue_depth == 3


class BlockingPullGrid(FakeGrid):
    """A grid whose third pull blocks until ``release`` is set (a slow upload)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.pulls = 0
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def push_messages(self, messages):
        with self.lock:
            return super().push_messages(messages)

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls == 3:
            self.blocked.set()
            self.released_in_time = self.release.wait(timeout=30)
        with self.lock:
            return super().pull_messages(message_ids)


def test_reply_puller_never_makes_its_caller_wait_on_a_pull():
    grid = BlockingPullGrid(replies={1: shift_by(0.0)})
    puller = ReplyPuller(grid, interval=0.001)
    try:
        puller.want(["a", "b"])
        assert grid.blocked.wait(timeout=30)
        assert puller.take() == []  # returns while the pull is blocked
        grid.release.set()
    finally:
        puller.close()
    assert grid.released_in_time


class ReleaseWhileBlocked(Callback):
    """Polls the loop makes while a pull is blocked; releases it after 5."""

    def __init__(self, grid: BlockingPullGrid) -> None:
        self.grid = grid
        self.polls_while_blocked = 0

    def on_poll(self, run):
        if self.grid.blocked.is_set() and not self.grid.release.is_set():
            self.polls_while_blocked += 1
            if self.polls_while_blocked >= 5:
                self.grid.release.set()
        return None


def test_strategy_loop_keeps_running_while_a_pull_blocks_on_a_superlink_grid(
    monkeypatch,
):
    # Prepare: the strategy treats the grid as a SuperLink's (pulls off-loop)
    monkeypatch.setattr(
        "afl_flwr.strategy.strategy.is_superlink_grid", lambda grid: True
    )
    grid = BlockingPullGrid(replies={n: shift_by(0.0) for n in (1, 2)})
    watcher = ReleaseWhileBlocked(grid)
    strategy = StalenessAwareAsyncStrategy(concurrency=2, poll_interval=0.001)

    # Execute
    strategy.start(
        grid=grid,
        initial_arrays=to_record(make_params(0)),
        num_rounds=20,  # more than two pulls' worth: the block comes mid-run
        callbacks=[watcher],
    )

    # Assert: the loop went on polling during the blocked pull (with pulls on
    # its own thread it could not have, and the pull would have timed out)
    assert grid.released_in_time is True
    assert watcher.polls_while_blocked >= 5
    assert strategy.version == 20
    assert strategy.scheduler.puller is None  # closed at the end of the run


class EchoGrid:
    """Answers every pull that lists ``x`` with a reply to it (as a SuperLink
    answers a re-pull of a delivered reply with an error message)."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.pulls = threading.Semaphore(0)

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        self.asked.append(ids)
        self.pulls.release()
        if "x" not in ids:
            return []
        reply = Message(RecordDict(), dst_node_id=1, message_type=TRAIN)
        reply.metadata.__dict__["_reply_to_message_id"] = "x"
        return [reply]


def test_reply_puller_pulls_a_reply_once_while_the_caller_still_lists_it():
    grid = EchoGrid()
    puller = ReplyPuller(grid, interval=0.001)
    try:
        puller.want(["x", "never"])
        replies: list[Message] = []
        for _ in range(10_000):
            replies += puller.take()
            if replies:
                break
            grid.pulls.acquire(timeout=1)
        puller.want(["x", "never"])  # not processed yet: still listed
        seen = len(grid.asked)
        for _ in range(5):  # five more pulls happen (for "never")
            assert grid.pulls.acquire(timeout=30)
        late = puller.take()
    finally:
        puller.close()
    assert [r.metadata.reply_to_message_id for r in replies] == ["x"]
    assert late == []
    assert all("x" not in ids for ids in grid.asked[seen:])
