"""Slots, dispatch, replies and their order: the asynchronous event source.

The scheduler owns every task in flight, of two kinds: *train* tasks, which
fill the training slots, and *evaluate* tasks (federated evaluation), which
ride alongside them. It asks a :class:`TaskFactory` for the messages, pushes
them, pulls the replies and hands the strategy one :class:`Outcome` at a time
(a reply, or a task that got none within its timeout). The order is the
:class:`~afl_flwr.clock.Clock`'s: arrival order with a
:class:`~afl_flwr.clock.WallClock`, simulated-finish order (failures included)
with a :class:`~afl_flwr.clock.VirtualClock`. Evaluation outcomes come as they
arrive: they do not change the model.

Dispatch never throttles: while a slot is free and any node is idle, the slot
gets work. ``avoid`` (nodes whose update waits in the aggregator's buffer) and
back-off (nodes whose tasks keep failing) are preferences among idle nodes, and
a backed-off node still gets work when nothing else can run.

**Queue depth** ``D`` (``queue_depth``): once no idle node is left to give
work to, every busy node is also given up to ``D - 1`` further train tasks,
which wait at the SuperLink and start when the node's previous task ends (a
deployment's SuperNode then never sleeps on an empty pull). A waiting task
carries the version current at its dispatch; its staleness is measured from
that base as always. Its timeout, and with a virtual clock its simulated
start, count from the end of the node's previous task. ``D = 1`` keeps one
task per node. Slots count running tasks: train tasks in flight are at most
``slots * D``.

Dispatch costs ``O(slots + buffer + failing nodes)`` per task, not ``O(N)``:
the selector is told which few nodes it may not pick
(:meth:`~afl_flwr.selection.NodeSelector.pick`), and the node list is only
rebuilt when nodes join or leave.
"""

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from afl_flwr.clock import Clock, TaskTiming, WallClock
from afl_flwr.selection import NodeSelector
from afl_flwr.strategy.transport import ReplyPuller

# node -> (the evaluate message for it, the version it evaluates)
MessageBuilder = Callable[[int], tuple[Message, int]]
TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
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


def train_slots(num_nodes: int, fraction_train: float, min_train_nodes: int) -> int:
    """FedAvg's sample size as the number of training slots, capped at the nodes.

    ``max(int(num_nodes * fraction_train), min_train_nodes)``, as Flower's
    ``FedAvg.configure_train`` sizes a round, but never more than the nodes
    connected (every node is then kept busy).
    """
    return min(num_nodes, max(int(num_nodes * fraction_train), min_train_nodes))


@dataclass
class Task:
    """A dispatched task awaiting its outcome.

    ``version`` is the global version a train task started from (its base), or
    the version an evaluate task evaluates. ``waiting`` marks a train task
    queued behind an earlier task of its node (``sim_start`` and ``sent_wall``
    are set when that one ends).
    """

    kind: str
    message_id: str
    node_id: int
    version: int
    seq: int
    sent_wall: float
    sim_start: float
    timing: TaskTiming | None = None
    waiting: bool = False

    @property
    def base_version(self) -> int:
        """The version a train task started from."""
        return self.version


@dataclass(frozen=True)
class Outcome:
    """What became of a task: its reply, or ``None`` when none came in time."""

    task: Task
    reply: Message | None
    sim_time: float
    sim_duration: float


class TaskFactory(Protocol):
    """Builds the messages of train tasks; told when a push succeeded."""

    def train_message(self, node_id: int, seq: int) -> tuple[Message, int]:
        """The train message for ``node_id`` and the version it carries."""

    def started(self, task: Task) -> None:
        """The task's push succeeded (check out its base)."""


class Scheduler:
    """Keep the training slots busy and order what comes back.

    Parameters
    ----------
    selector : NodeSelector
        Picks the next node among the eligible idle ones.
    concurrency : int, optional (default: None)
        Train tasks in flight at most; ``None`` sizes the slots from the
        connected nodes with :func:`train_slots`.
    fraction_train : float (default: 1.0)
        Without ``concurrency``: the share of connected nodes kept busy.
    min_train_nodes : int (default: 2)
        Without ``concurrency``: at least this many slots (when the nodes exist).
    clock : Clock, optional (default: None)
        Time and outcome order; ``None`` means a :class:`~afl_flwr.clock.WallClock`.
    queue_depth : int (default: 1)
        Train tasks per busy node (see the module docstring); 1 means one.
    """

    def __init__(
        self,
        *,
        selector: NodeSelector,
        concurrency: int | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        clock: Clock | None = None,
        queue_depth: int = 1,
    ) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        if queue_depth < 1:
            raise ValueError(f"queue_depth={queue_depth} must be >= 1")
        self.queue_depth = queue_depth
        self.puller: ReplyPuller | None = None
        self.selector = selector
        self.concurrency = concurrency
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.clock: Clock = clock if clock is not None else WallClock()
        self.reset()

    def reset(self) -> None:
        """Forget every node and task (a new run)."""
        self.nodes: list[int] = []
        self._node_set: set[int] = set()
        self._by_label: dict[int, int] = {}
        # node -> its train tasks in flight, in order (the first one runs)
        self._queues: dict[int, list[Task]] = {}
        self.in_flight: dict[str, Task] = {}
        self._arrived: dict[str, Message] = {}
        self._expired: set[str] = set()
        self.seq = 0
        self.outcomes = 0
        self._failures: dict[int, int] = {}
        self._backoff_until: dict[int, int] = {}
        self._last_refresh = -1e18
        self._logged_capacity = False
        self.clock.start()

    # ------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        """JSON-ready state for checkpoints."""
        return {
            "seq": self.seq,
            "sim_now": self.clock.now(),
            "wall": self.clock.wall(),
            "selector": self.selector.get_state(),
            "clock": self.clock.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`."""
        self.seq = int(state["seq"])
        self.selector.set_state(state["selector"])
        self.clock.set_state(state.get("clock"))
        self.clock.resume(float(state["sim_now"]), float(state["wall"]))

    # ------------------------------------------------------------ nodes
    @property
    def slots(self) -> int:
        """Training slots now (``concurrency``, or sized from the nodes)."""
        if self.concurrency is not None:
            return self.concurrency
        return train_slots(len(self.nodes), self.fraction_train, self.min_train_nodes)

    def label(self, node_id: int) -> int:
        """Stable client id of a node (partition id when the clock knows it)."""
        return self.clock.label(node_id)

    def refresh(self, grid: Grid, *, force: bool = False) -> None:
        """Pick up joined/left nodes (at most every ``NODE_REFRESH_S`` when busy)."""
        now = time.time()
        if not force and self._queues and now - self._last_refresh < NODE_REFRESH_S:
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
        if joined:
            self.clock.on_join(grid, joined)
        self.nodes = sorted(current, key=self.clock.sort_key)
        self._node_set = current
        self._by_label = {self.label(n): n for n in self.nodes}

    def nodes_of(self, labels: Collection[int]) -> set[int]:
        """Connected nodes whose :meth:`label` is in ``labels``."""
        return {self._by_label[c] for c in labels if c in self._by_label}

    def busy_nodes(self) -> set[int]:
        """Nodes with a train task in flight."""
        return set(self._queues)

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
    def train_in_flight(self) -> int:
        """Nodes running a train task (the slots in use)."""
        return len(self._queues)

    def dispatch(
        self,
        grid: Grid,
        factory: TaskFactory,
        avoid: Collection[int] = (),
        exclude: Collection[int] = (),
    ) -> list[Task]:
        """Fill every free training slot with a task for an idle node.

        Parameters
        ----------
        grid : Grid
            Where messages are pushed.
        factory : TaskFactory
            Builds each task's message; told of each successful push.
        avoid : Collection[int] (default: ())
            Nodes to pass over while another idle node is eligible.
        exclude : Collection[int] (default: ())
            Nodes that get no task now, whatever else is idle (a rule, e.g.
            one update per client per DP release).

        Returns
        -------
        list[Task]
            The tasks now in flight that were not before.
        """
        slots = self.slots
        free = slots - self.train_in_flight()
        if not self.nodes or (free <= 0 and self.queue_depth == 1):
            return []
        if len(self.nodes) < slots and not self._logged_capacity:
            log(
                INFO,
                "concurrency=%d exceeds the %d connected node(s): keeping all busy",
                slots,
                len(self.nodes),
            )
            self._logged_capacity = True
        chosen = self._choose(free, avoid, exclude) if free > 0 else []
        self._learn_profiles(grid, chosen)
        queued = self._queue_ahead(chosen, exclude)
        if not chosen and not queued:
            return []
        messages, tasks = [], []
        for node, position in [*((n, 0) for n in chosen), *queued]:
            timing = self.clock.plan(node)
            message, version = factory.train_message(node, self.seq)
            if position:  # it waits behind `position` tasks, each up to its TTL
                message.metadata.ttl = message.metadata.ttl * (1 + position)
            messages.append(message)
            tasks.append(
                Task(
                    TRAIN,
                    "",
                    node,
                    version,
                    self.seq,
                    time.time(),
                    self.clock.now(),
                    timing,
                    waiting=position > 0,
                )
            )
            self.seq += 1
        started = self._push(grid, messages, tasks)
        for task in started:
            self._queues.setdefault(task.node_id, []).append(task)
            factory.started(task)
        return started

    def _queue_ahead(
        self, chosen: list[int], exclude: Collection[int]
    ) -> list[tuple[int, int]]:
        """``(node, position)`` of the waiting tasks to add, busy nodes in order.

        Only when no idle node is left that could take the work instead, so a
        federation with spare nodes trains exactly as with depth 1; never for
        excluded or backed-off nodes.
        """
        if self.queue_depth == 1:
            return []
        busy = set(self._queues) | set(chosen)
        idle_excluded = sum(
            1 for n in set(exclude) if n in self._node_set and n not in busy
        )
        if len(self.nodes) - len(busy) - idle_excluded > 0:
            return []
        skip = set(exclude) | self.backed_off_nodes()
        queued = []
        for node in [*self._queues, *chosen]:
            if node in skip or node not in self._node_set:
                continue
            have = len(self._queues.get(node, ())) + (node in chosen)
            queued += [(node, position) for position in range(have, self.queue_depth)]
        return queued

    def _choose(
        self, free: int, avoid: Collection[int], exclude: Collection[int] = ()
    ) -> list[int]:
        busy = set(self._queues) | set(exclude)
        unhealthy = self.backed_off_nodes()
        avoided = set(avoid)
        chosen: list[int] = []
        while len(chosen) < free:
            # Preferred: idle, healthy, not avoided; then idle and healthy; then,
            # when nothing runs, any idle node (all failing: try one, never stall).
            layers = [busy | unhealthy | avoided, busy | unhealthy]
            if not self._queues and not chosen:
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
        return chosen

    def evaluate(
        self, grid: Grid, nodes: Iterable[int], message_for: MessageBuilder
    ) -> list[Task]:
        """Send evaluate tasks to ``nodes`` (``message_for(node)`` builds each)."""
        messages, tasks = [], []
        for node in nodes:
            message, version = message_for(node)
            messages.append(message)
            # seq -1: evaluate tasks take no train sequence number (task seeds).
            tasks.append(
                Task(EVALUATE, "", node, version, -1, time.time(), self.clock.now())
            )
        return self._push(grid, messages, tasks)

    def _push(
        self, grid: Grid, messages: list[Message], tasks: list[Task]
    ) -> list[Task]:
        started = []
        for message_id, task in zip(grid.push_messages(messages), tasks, strict=False):
            if message_id:
                task.message_id = message_id
                self.in_flight[message_id] = task
                started.append(task)
            else:
                log(
                    WARNING,
                    "Could not push a %s task to node %s",
                    task.kind,
                    task.node_id,
                )
        return started

    # ---------------------------------------------------------- replies
    def poll(self, grid: Grid, timeout: float) -> list[Message]:
        """Pull available replies and expire overdue tasks.

        Returns the replies that answer no task of ours. A task without a reply
        after ``timeout`` wall seconds becomes an outcome without one, ordered
        like any other.
        """
        waiting = [
            m
            for m in self.in_flight
            if m not in self._arrived and m not in self._expired
        ]
        unknown = []
        if self.puller is not None:
            pulled: Iterable[Message] = self.puller.take()
        else:
            pulled = grid.pull_messages(waiting) if waiting else []
        if pulled:
            for reply in pulled:
                reply_to = reply.metadata.reply_to_message_id
                if (
                    reply_to in self.in_flight
                    and reply_to not in self._arrived
                    and reply_to not in self._expired
                ):
                    self._arrived[reply_to] = reply
                else:
                    unknown.append(reply)
        now = time.time()
        for message_id, task in self.in_flight.items():
            if (
                message_id not in self._arrived
                and message_id not in self._expired
                and not task.waiting
                and now - task.sent_wall > timeout
            ):
                self._expired.add(message_id)
        if self.puller is not None:  # what the next pulls on its thread ask for
            self.puller.want(
                m
                for m in self.in_flight
                if m not in self._arrived and m not in self._expired
            )
        return unknown

    def next_outcome(self) -> Outcome | None:
        """The next outcome that may be processed now, or ``None``.

        Evaluate outcomes first, as they arrived; then the train outcome the
        clock picks (with a virtual clock: the earliest simulated finish, once
        no running task could finish before it).
        """
        done = [*self._arrived, *(m for m in self.in_flight if m in self._expired)]
        for message_id in done:
            if self.in_flight[message_id].kind == EVALUATE:
                return self._take(message_id, self.clock.now())
        # A waiting task is neither: its node's earlier task finishes first.
        ready = [
            (self.in_flight[m], self._arrived.get(m))
            for m in done
            if not self.in_flight[m].waiting
        ]
        running = [
            t
            for m, t in self.in_flight.items()
            if t.kind == TRAIN
            and not t.waiting
            and m not in self._arrived
            and m not in self._expired
        ]
        choice = self.clock.next_ready(ready, running)
        if choice is None:
            return None
        index, finish = choice
        task = ready[index][0]
        self.clock.settle(finish)
        self._release(task)
        self.outcomes += 1
        outcome = self._take(task.message_id, self.clock.now())
        return Outcome(
            task, outcome.reply, outcome.sim_time, self.clock.duration(task, finish)
        )

    def _release(self, task: Task) -> None:
        """``task`` ended: its node's next waiting task, if any, starts now."""
        queue = self._queues.get(task.node_id, [])
        if task in queue:
            queue.remove(task)
        if not queue:
            self._queues.pop(task.node_id, None)
            return
        successor = queue[0]
        if successor.waiting:
            successor.waiting = False
            successor.sim_start = self.clock.now()
            successor.sent_wall = time.time()

    def _take(self, message_id: str, sim_time: float) -> Outcome:
        task = self.in_flight.pop(message_id)
        reply = self._arrived.pop(message_id, None)
        self._expired.discard(message_id)
        return Outcome(task, reply, sim_time, 0.0)

    def _learn_profiles(self, grid: Grid, chosen: list[int]) -> None:
        """Ask ``chosen`` nodes without a profile for it, with those due next.

        One round trip asks up to :data:`PROFILE_BATCH` nodes: the chosen ones,
        then the selector's :meth:`~afl_flwr.selection.NodeSelector.upcoming`
        nodes without a profile (which profiles are known never changes a
        selection: lazy profiles leave nodes in node-id order).
        """
        nodes = self.clock.unprofiled(chosen)
        if not nodes:
            return
        asked = set(nodes)
        upcoming = [
            n
            for n in self.clock.unprofiled(self.selector.upcoming(PROFILE_BATCH))
            if n not in asked and n in self._node_set
        ]
        nodes += upcoming[: max(0, PROFILE_BATCH - len(nodes))]
        before = {n: self.label(n) for n in nodes}
        if not self.clock.register(grid, nodes):
            return
        for node, old in before.items():
            if self._by_label.get(old) == node:
                del self._by_label[old]
            self._by_label[self.label(node)] = node

    def abandon(self) -> int:
        """Forget every train task in flight (end of run); return how many there were.

        Evaluate tasks stay: the end of a run waits for them (bounded).
        """
        trains = [m for m, t in self.in_flight.items() if t.kind == TRAIN]
        for message_id in trains:
            del self.in_flight[message_id]
            self._arrived.pop(message_id, None)
            self._expired.discard(message_id)
        self._queues.clear()
        return len(trains)

    def evaluations_in_flight(self) -> int:
        """Evaluate tasks still in flight."""
        return sum(1 for t in self.in_flight.values() if t.kind == EVALUATE)


def _some(nodes: Collection[int], limit: int = 10) -> str:
    """The first ``limit`` node ids (sorted) for a log line, then a count."""
    shown = sorted(nodes)[:limit]
    more = len(nodes) - len(shown)
    return f"{shown}" + (f" and {more} more" if more > 0 else "")


__all__ = [
    "EVALUATE",
    "TRAIN",
    "Outcome",
    "Scheduler",
    "Task",
    "TaskFactory",
    "train_slots",
]
