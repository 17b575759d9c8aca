"""Slots, dispatch, replies and their order: the asynchronous event source.

The scheduler keeps up to ``concurrency`` tasks in flight and hands the
strategy one *outcome* at a time (a reply, or a task that got none within its
timeout). With a :class:`~afl_flwr.clock.VirtualClock` outcomes come in
simulated-finish order, failures included, so a run is reproducible however the
host schedules clients; without one they come in arrival order and time is wall
time.

Dispatch never throttles: while a slot is free and any node is idle, the slot
gets work. ``avoid`` (nodes whose update waits in the aggregator's buffer) and
back-off (nodes whose tasks keep failing) are preferences among idle nodes, and
a backed-off node still gets work when nothing else can run.

Dispatch costs ``O(concurrency + buffer + failing nodes)`` per task, not
``O(N)``: the selector is told which few nodes it may not pick
(:meth:`~afl_flwr.selection.NodeSelector.pick`), and the node list is only
rebuilt when nodes join or leave.
"""

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from afl_flwr.clock import TaskTiming, VirtualClock
from afl_flwr.constants import STEPS
from afl_flwr.selection import NodeSelector

# Seconds between node-list refreshes while tasks are in flight (each refresh is
# a SuperLink round trip in a deployment).
NODE_REFRESH_S = 1.0
# A failing node sits out 2^(f-1) outcomes after its f-th failure in a row, at
# most this many.
MAX_BACKOFF = 64
# Lazy profiles (``profile_query="first-dispatch"``): a dispatch that meets a node
# without a profile also asks the nodes the selector will offer next (the rest
# of a without-replacement pass), this many in all, so a pass over N nodes costs
# about N / PROFILE_BATCH round trips instead of one per task.
PROFILE_BATCH = 256


@dataclass
class Task:
    """A dispatched training task awaiting its outcome."""

    message_id: str
    node_id: int
    base_version: int
    seq: int
    sent_wall: float
    sim_start: float
    timing: TaskTiming | None = None

    @property
    def planned_finish(self) -> float:
        """Simulated finish of the full job."""
        return self.sim_start + (self.timing.duration if self.timing else 0.0)

    @property
    def earliest_finish(self) -> float:
        """Lower bound of the simulated finish (early stopping)."""
        return self.sim_start + (self.timing.min_duration if self.timing else 0.0)

    @property
    def planned_duration(self) -> float:
        """Simulated seconds of the full job."""
        return self.timing.duration if self.timing else 0.0


@dataclass(frozen=True)
class Outcome:
    """What became of a task: its reply, or ``None`` when none came in time."""

    task: Task
    reply: Message | None
    sim_time: float
    sim_duration: float


class Scheduler:
    """Keep ``concurrency`` nodes busy and order what comes back.

    Parameters
    ----------
    concurrency : int
        Tasks in flight at most.
    selector : NodeSelector
        Picks the next node among the eligible idle ones.
    clock : VirtualClock, optional (default: None)
        Simulated durations and finish order; ``None`` uses wall time.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        selector: NodeSelector,
        clock: VirtualClock | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        self.concurrency = concurrency
        self.selector = selector
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget every node and task (a new run)."""
        self.nodes: list[int] = []
        self._node_set: set[int] = set()
        self._by_label: dict[int, int] = {}
        self._busy: set[int] = set()
        self.in_flight: dict[str, Task] = {}
        self._arrived: dict[str, Message] = {}
        self._expired: set[str] = set()
        self.seq = 0
        self.sim_now = 0.0
        self.outcomes = 0
        self._failures: dict[int, int] = {}
        self._backoff_until: dict[int, int] = {}
        self._t0 = time.time()
        self._last_refresh = -1e18
        self._logged_capacity = False

    # ------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        """JSON-ready state for checkpoints."""
        return {
            "seq": self.seq,
            "sim_now": self.sim_now,
            "wall": time.time() - self._t0,
            "selector": self.selector.get_state(),
            "clock": self.clock.get_state() if self.clock is not None else None,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`."""
        self.seq = int(state["seq"])
        self.sim_now = float(state["sim_now"])
        self._t0 = time.time() - float(state["wall"])
        self.selector.set_state(state["selector"])
        if self.clock is not None and state.get("clock") is not None:
            self.clock.set_state(state["clock"])

    # ------------------------------------------------------------- time
    def now(self) -> float:
        """Simulated seconds with a clock, else wall seconds since the start."""
        return self.sim_now if self.clock is not None else self.wall()

    def wall(self) -> float:
        """Wall seconds since the run started."""
        return time.time() - self._t0

    def label(self, node_id: int) -> int:
        """Stable client id of a node (partition id when the clock knows it)."""
        return self.clock.label(node_id) if self.clock is not None else node_id

    # ------------------------------------------------------------ nodes
    def refresh(self, grid: Grid) -> None:
        """Pick up joined/left nodes (at most every ``NODE_REFRESH_S`` when busy)."""
        now = time.time()
        if self.in_flight and now - self._last_refresh < NODE_REFRESH_S:
            return
        self._last_refresh = now
        current = set(grid.get_node_ids())
        if current == self._node_set:
            return
        known = self._node_set
        joined, left = current - known, known - current
        if joined and known:
            log(INFO, "%d node(s) joined: %s", len(joined), _some(joined))
        if left:
            log(INFO, "%d node(s) left: %s", len(left), _some(left))
        if joined and self.clock is not None and self.clock.profile_query == "on-join":
            self.clock.register(grid, joined)
        key = self.clock.sort_key if self.clock is not None else None
        self.nodes = sorted(current, key=key)
        self._node_set = current
        self._by_label = {self.label(n): n for n in self.nodes}

    def nodes_of(self, labels: Collection[int]) -> set[int]:
        """Connected nodes whose :meth:`label` is in ``labels``."""
        return {self._by_label[c] for c in labels if c in self._by_label}

    def busy_nodes(self) -> set[int]:
        """Nodes with a task in flight."""
        return set(self._busy)

    def backed_off(self, node_id: int) -> bool:
        """Whether a failing node is sitting out."""
        return self._backoff_until.get(node_id, 0) > self.outcomes

    def backed_off_nodes(self) -> set[int]:
        """Failing nodes sitting out now (expired back-offs are forgotten)."""
        expired = [n for n, t in self._backoff_until.items() if t <= self.outcomes]
        for node in expired:
            del self._backoff_until[node]
        return set(self._backoff_until)

    def record_failure(self, node_id: int, reason: str) -> None:
        """A task of ``node_id`` failed: back it off, longer each time in a row."""
        failures = self._failures.get(node_id, 0) + 1
        self._failures[node_id] = failures
        wait = min(2 ** (failures - 1), MAX_BACKOFF)
        self._backoff_until[node_id] = self.outcomes + wait
        if failures >= 2 and failures & (failures - 1) == 0:  # 2, 4, 8, ...
            log(
                WARNING,
                "Node %s failed %d task(s) in a row (%s); backed off for %d outcome(s)",
                node_id,
                failures,
                reason,
                wait,
            )

    def record_success(self, node_id: int) -> None:
        """A task of ``node_id`` succeeded: clear its back-off."""
        self._failures.pop(node_id, None)
        self._backoff_until.pop(node_id, None)

    # --------------------------------------------------------- dispatch
    def dispatch(
        self,
        grid: Grid,
        build: Callable[[int, int], Message],
        base_version: int,
        avoid: Collection[int] = (),
    ) -> list[Task]:
        """Fill every free slot with a task for an idle node.

        Parameters
        ----------
        grid : Grid
            Where messages are pushed.
        build : Callable[[int, int], Message]
            ``(node_id, seq) -> Message`` for one task.
        base_version : int
            Global version the new tasks start from.
        avoid : Collection[int] (default: ())
            Nodes to pass over while another idle node is eligible.

        Returns
        -------
        list[Task]
            The tasks now in flight that were not before.
        """
        free = self.concurrency - len(self.in_flight)
        if free <= 0 or not self.nodes:
            return []
        if len(self.nodes) < self.concurrency and not self._logged_capacity:
            log(
                INFO,
                "concurrency=%d exceeds the %d connected node(s): keeping all busy",
                self.concurrency,
                len(self.nodes),
            )
            self._logged_capacity = True
        busy = set(self._busy)
        unhealthy = self.backed_off_nodes()
        avoided = set(avoid)
        chosen: list[int] = []
        while len(chosen) < free:
            # Preferred: idle, healthy, not avoided; then idle and healthy; then,
            # when nothing runs, any idle node (all failing: try one, never stall).
            layers = [busy | unhealthy | avoided, busy | unhealthy]
            if not self.in_flight and not chosen:
                layers.append(busy)
            node = None
            for excluded in layers:
                node = self.selector.pick(self.nodes, excluded, self._node_set)
                if node is not None:
                    break
            if node is None:
                break
            busy.add(node)
            chosen.append(node)
        if not chosen:
            return []
        if self.clock is not None:
            self._learn_profiles(grid, chosen)
        messages, tasks = [], []
        for node in chosen:
            timing = self.clock.plan(node) if self.clock is not None else None
            messages.append(build(node, self.seq))
            tasks.append(
                Task("", node, base_version, self.seq, time.time(), self.now(), timing)
            )
            self.seq += 1
        started = []
        for message_id, task in zip(grid.push_messages(messages), tasks, strict=False):
            if message_id:
                task.message_id = message_id
                self.in_flight[message_id] = task
                self._busy.add(task.node_id)
                started.append(task)
            else:
                log(WARNING, "Could not push a task to node %s", task.node_id)
        return started

    # ---------------------------------------------------------- replies
    def pull(self, grid: Grid) -> list[Message]:
        """Collect available replies; return those that answer no task of ours."""
        waiting = [
            m
            for m in self.in_flight
            if m not in self._arrived and m not in self._expired
        ]
        if not waiting:
            return []
        unknown = []
        for reply in grid.pull_messages(waiting):
            reply_to = reply.metadata.reply_to_message_id
            if (
                reply_to in self.in_flight
                and reply_to not in self._arrived
                and reply_to not in self._expired
            ):
                self._arrived[reply_to] = reply
            else:
                unknown.append(reply)
        return unknown

    def expire(self, timeout: float) -> None:
        """Mark tasks without a reply after ``timeout`` wall seconds as failed.

        They become outcomes without a reply, ordered like any other.
        """
        now = time.time()
        for message_id, task in self.in_flight.items():
            if (
                message_id not in self._arrived
                and message_id not in self._expired
                and now - task.sent_wall > timeout
            ):
                self._expired.add(message_id)

    def next_outcome(self) -> Outcome | None:
        """The next outcome that may be processed now, or ``None``.

        With a clock, that is the ready task with the earliest simulated finish
        (the steps it reports are charged), and only once no task still running
        could finish before it. Without, the oldest arrival or expiry.
        """
        # Arrival order: replies as pulled, then expiries.
        ready = [*self._arrived, *(m for m in self.in_flight if m in self._expired)]
        if not ready:
            return None
        if self.clock is None:
            message_id = ready[0]
            finish = self.wall()
        else:
            finishes = {m: self._finish(m) for m in ready}
            message_id = min(ready, key=lambda m: (finishes[m], self.in_flight[m].seq))
            finish = finishes[message_id]
            seq = self.in_flight[message_id].seq
            for other, task in self.in_flight.items():
                if other in finishes:
                    continue
                if (task.earliest_finish, task.seq) < (finish, seq):
                    return None  # a running task may still finish first
        task = self.in_flight.pop(message_id)
        self._busy.discard(task.node_id)
        reply = self._arrived.pop(message_id, None)
        self._expired.discard(message_id)
        self.sim_now = max(self.sim_now, finish) if self.clock else self.sim_now
        self.outcomes += 1
        duration = finish - task.sim_start if self.clock is not None else 0.0
        return Outcome(task, reply, self.now(), duration)

    def _learn_profiles(self, grid: Grid, chosen: list[int]) -> None:
        """Ask ``chosen`` nodes without a profile for it, with those due next.

        One round trip asks up to :data:`PROFILE_BATCH` nodes: the chosen ones,
        then the selector's :meth:`~afl_flwr.selection.NodeSelector.upcoming`
        nodes without a profile (which profiles are known never changes a
        selection: lazy profiles leave nodes in node-id order).
        """
        assert self.clock is not None
        known = self.clock.profiles
        nodes = [n for n in chosen if n not in known]
        if not nodes:
            return
        asked = set(nodes)
        for node in self.selector.upcoming(PROFILE_BATCH):
            if len(nodes) >= PROFILE_BATCH:
                break
            if node not in known and node not in asked and node in self._node_set:
                nodes.append(node)
                asked.add(node)
        before = {n: self.label(n) for n in nodes}
        if not self.clock.register(grid, nodes):
            return
        for node, old in before.items():
            if self._by_label.get(old) == node:
                del self._by_label[old]
            self._by_label[self.label(node)] = node

    def _finish(self, message_id: str) -> float:
        task = self.in_flight[message_id]
        if task.timing is None:
            return task.sim_start
        reply = self._arrived.get(message_id)
        return task.sim_start + task.timing.charged(reported_steps(reply))

    def abandon(self) -> int:
        """Forget every task in flight (end of run); return how many there were."""
        count = len(self.in_flight)
        self.in_flight.clear()
        self._busy.clear()
        self._arrived.clear()
        self._expired.clear()
        return count


def reported_steps(reply: Message | None) -> int | None:
    """The ``steps`` metric of a successful reply, if it reports one."""
    if reply is None or reply.has_error():
        return None
    for record in reply.content.metric_records.values():
        value = record.get(STEPS)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return None


def _some(nodes: Collection[int], limit: int = 10) -> str:
    """The first ``limit`` node ids (sorted) for a log line, then a count."""
    shown = sorted(nodes)[:limit]
    more = len(nodes) - len(shown)
    return f"{shown}" + (f" and {more} more" if more > 0 else "")
