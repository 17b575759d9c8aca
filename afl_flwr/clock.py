"""Heterogeneous client profiles, and the clocks that order a run's outcomes.

Each node has a compute-speed factor (1 = fastest; a factor of 10 takes ten times as
long for the same work) and a network delay drawn uniformly from
``[0, max-delay-s]`` per task, as in the paper's code. In simulation both come from
the run config, seeded per partition; a deployed SuperNode may declare its own in
``--node-config``.

A :class:`Clock` is the one object that differs between the two ways a run
tells time: :class:`WallClock` (wall time, outcomes in arrival order) and
:class:`VirtualClock`, which gives every dispatched task a simulated duration
``planned steps x step-time-s x speed factor + delay`` so the asynchronous
strategy merges replies in simulated-finish order: the same seed then gives the
same run however fast the host is and however Ray schedules the clients.
"""

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from logging import DEBUG, INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from afl_flwr.constants import (
    MAX_DELAY_S,
    NUM_EXAMPLES,
    PARTITION_ID,
    PROFILE_KEY,
    QUERY_PROFILE,
    SPEED_FACTOR,
    STEPS,
)


@dataclass(frozen=True)
class NodeProfile:
    """How fast a node computes and how long its network takes.

    Parameters
    ----------
    partition_id : int
        The node's data partition (its stable client id); -1 when unknown.
    num_examples : int
        Local training examples.
    speed_factor : float
        Compute slowdown relative to the fastest node (``>= 1``).
    max_delay_s : float
        Upper bound of the per-task network delay, drawn from ``U(0, max)``.
    """

    partition_id: int
    num_examples: int
    speed_factor: float = 1.0
    max_delay_s: float = 0.0

    def to_record(self) -> ConfigRecord:
        """Serialise for a ``query.profile`` reply."""
        return ConfigRecord(
            {
                PARTITION_ID: self.partition_id,
                NUM_EXAMPLES: self.num_examples,
                SPEED_FACTOR: self.speed_factor,
                MAX_DELAY_S: self.max_delay_s,
            }
        )

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> "NodeProfile":
        """Parse a ``query.profile`` reply."""
        return cls(
            partition_id=int(record[PARTITION_ID]),  # type: ignore[call-overload]
            num_examples=int(record[NUM_EXAMPLES]),  # type: ignore[call-overload]
            speed_factor=float(record[SPEED_FACTOR]),  # type: ignore[arg-type]
            max_delay_s=float(record[MAX_DELAY_S]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class TaskTiming:
    """Simulated timing of one dispatched task.

    Parameters
    ----------
    planned_steps : int
        Optimizer steps of the full local job.
    min_steps : int
        Fewest steps the job can run (early stopping at its earliest).
    step_s : float
        Simulated seconds per step on this node (step time x speed factor).
    delay : float
        The task's network delay in seconds.
    """

    planned_steps: int
    min_steps: int
    step_s: float
    delay: float

    @property
    def duration(self) -> float:
        """Simulated seconds of the full job."""
        return self.planned_steps * self.step_s + self.delay

    @property
    def min_duration(self) -> float:
        """Lower bound of the simulated seconds (the job may stop early)."""
        return self.min_steps * self.step_s + self.delay

    def charged(self, steps: int | None) -> float:
        """Seconds charged for a job that reported ``steps`` (None: planned).

        The count is clamped to ``[min_steps, planned_steps]`` so a client that
        reports something else under the same key cannot reorder the timeline.
        """
        if steps is None:
            return self.duration
        steps = min(max(steps, self.min_steps), self.planned_steps)
        return steps * self.step_s + self.delay


def speed_factors(
    num_clients: int,
    *,
    spread: float,
    straggler_fraction: float = 0.0,
    straggler_slowdown: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """Per-partition speed factors: log-uniform over ``[1, spread]``, then stragglers.

    Each partition's factor is drawn from its own generator seeded by
    ``(seed, partition)``, so a client's speed does not depend on ``num_clients``.
    ``round(straggler_fraction * num_clients)`` partitions, chosen by a seeded
    permutation, are additionally ``straggler_slowdown`` times slower.
    """
    factors = np.array(
        [
            math.exp(np.random.default_rng([seed, 1, pid]).uniform(0, math.log(spread)))
            for pid in range(num_clients)
        ]
    )
    num_stragglers = round(straggler_fraction * num_clients)
    stragglers = np.random.default_rng([seed, 2]).permutation(num_clients)[
        :num_stragglers
    ]
    factors[stragglers] *= straggler_slowdown
    return factors


@lru_cache(maxsize=8)
def _cached_factors(
    num_clients: int,
    spread: float,
    straggler_fraction: float,
    straggler_slowdown: float,
    seed: int,
) -> tuple[float, ...]:
    return tuple(
        speed_factors(
            num_clients,
            spread=spread,
            straggler_fraction=straggler_fraction,
            straggler_slowdown=straggler_slowdown,
            seed=seed,
        ).tolist()
    )


def speed_factor(
    partition_id: int,
    num_clients: int,
    *,
    spread: float,
    straggler_fraction: float = 0.0,
    straggler_slowdown: float = 10.0,
    seed: int = 0,
) -> float:
    """One partition's entry of :func:`speed_factors`, computed once per process.

    A process serving many nodes (a Ray worker, the in-process engine) answers
    each node's profile query from one cached draw instead of ``num_clients``
    draws per query.
    """
    factors = _cached_factors(
        num_clients, spread, straggler_fraction, straggler_slowdown, seed
    )
    return factors[partition_id]


def planned_steps(num_examples: int, local_epochs: int, batch_size: int) -> int:
    """Optimizer steps of a full local job (early stopping may do fewer)."""
    return local_epochs * max(1, math.ceil(num_examples / batch_size))


def network_delay(profile: NodeProfile, task_index: int, seed: int) -> float:
    """Seeded delay draw ``U(0, max_delay_s)`` for a node's ``task_index``-th task."""
    if profile.max_delay_s <= 0:
        return 0.0
    rng = np.random.default_rng([seed, 3, profile.partition_id + 1, task_index])
    return float(rng.uniform(0.0, profile.max_delay_s))


def task_duration(
    profile: NodeProfile,
    task_index: int,
    *,
    local_epochs: int,
    batch_size: int,
    step_time_s: float,
    seed: int,
) -> float:
    """Simulated seconds of one task: compute x speed factor + network delay."""
    steps = planned_steps(profile.num_examples, local_epochs, batch_size)
    compute = steps * step_time_s * profile.speed_factor
    return compute + network_delay(profile, task_index, seed)


# When the clock asks nodes for their profiles (``VirtualClock(profile_query=...)``).
PROFILE_QUERIES = ("on-join", "first-dispatch")


def reported_steps(reply: Message | None) -> int | None:
    """The ``steps`` metric of a successful reply, if it reports one."""
    if reply is None or reply.has_error():
        return None
    for record in reply.content.metric_records.values():
        value = record.get(STEPS)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return None


class TimedTask(Protocol):
    """What a clock reads of a dispatched task."""

    seq: int
    sim_start: float
    timing: "TaskTiming | None"


class Clock(ABC):
    """How a run tells time and in which order it takes what comes back.

    The scheduler and the strategy ask their clock instead of branching on the
    mode: :class:`WallClock` processes outcomes as they arrive and reports wall
    time; :class:`VirtualClock` plans a simulated duration per task and hands
    out outcomes in simulated-finish order.
    """

    # Whether the scheduler refills a freed slot after every outcome (at that
    # outcome's simulated instant) rather than after all that have arrived.
    refill_each_outcome: bool = False

    def __init__(self) -> None:
        self._t0 = time.time()

    def start(self) -> None:
        """A run starts: time 0."""
        self._t0 = time.time()

    def wall(self) -> float:
        """Wall seconds since the run started."""
        return time.time() - self._t0

    @abstractmethod
    def now(self) -> float:
        """The run's time: wall seconds, or simulated seconds."""

    def label(self, node_id: int) -> int:
        """Human-facing client id of a node (the node id by default)."""
        return node_id

    def sort_key(self, node_id: int) -> tuple[int, ...]:
        """Stable order of nodes (node id by default)."""
        return (node_id,)

    def on_join(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Nodes joined (a virtual clock may ask their profiles)."""
        return None

    def unprofiled(self, node_ids: Iterable[int]) -> list[int]:
        """Nodes to ask for a profile before their first task (none by default)."""
        return []

    def register(self, grid: Grid, node_ids: Iterable[int]) -> int:
        """Ask nodes for their profiles; return how many were asked (none here)."""
        return 0

    def plan(self, node_id: int) -> "TaskTiming | None":
        """Timing of the next task sent to ``node_id`` (none without simulation)."""
        return None

    @abstractmethod
    def next_ready(
        self,
        ready: Sequence[tuple[TimedTask, Message | None]],
        running: Iterable[TimedTask],
    ) -> tuple[int, float] | None:
        """Which ready outcome to process now, and its finish time, or ``None``.

        ``ready`` lists the tasks with an outcome (reply or expiry) in arrival
        order; ``running`` the tasks still without one.
        """

    def settle(self, finish: float) -> None:
        """An outcome that finished at ``finish`` was processed."""
        return None

    def duration(self, task: TimedTask, finish: float) -> float:
        """Simulated seconds of a processed task (0 without simulation)."""
        return 0.0

    def get_state(self) -> dict[str, Any] | None:
        """JSON-ready state for checkpoints (none by default)."""
        return None

    def set_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`get_state`."""
        return None

    def resume(self, now: float, wall: float) -> None:
        """Continue a checkpointed run at simulated ``now`` and ``wall`` seconds."""
        self._t0 = time.time() - wall

    def describe(self) -> str:
        """One word for logs."""
        return type(self).__name__


class WallClock(Clock):
    """Wall time; outcomes are processed in the order they arrive."""

    def now(self) -> float:
        """Wall seconds since the run started."""
        return self.wall()

    def next_ready(
        self,
        ready: Sequence[tuple[TimedTask, Message | None]],
        running: Iterable[TimedTask],
    ) -> tuple[int, float] | None:
        """The oldest arrival, finishing now."""
        return (0, self.wall()) if ready else None

    def describe(self) -> str:
        """``wall (arrival)``."""
        return "wall (arrival)"


class VirtualClock(Clock):
    """Simulated durations for tasks, from node profiles asked once per node.

    Outcomes, failures included, are processed in simulated-finish order, each
    task charged the steps it reports, and only once no task still running
    could finish before it; the slot an outcome frees is refilled at its
    simulated instant, before the next outcome.

    Parameters
    ----------
    local_epochs : int
        Planned local epochs per task.
    batch_size : int
        Local batch size (steps per epoch = ceil(examples / batch)).
    step_time_s : float
        Simulated seconds of one optimizer step on the fastest node.
    seed : int (default: 0)
        Seed of the delay draws.
    query_timeout : float (default: 120.0)
        Seconds to wait for nodes to answer the profile query.
    min_epochs : int, optional (default: None)
        Fewest local epochs a job can run before early stopping ends it
        (``patience + 1`` for the ClientApp's rule); ``None`` means every job runs
        all ``local_epochs``. Replies are charged the steps they report, and this
        lower bound lets the strategy merge them in simulated-finish order.
    profile_query : str (default: "on-join")
        When nodes are asked for their profile. ``"on-join"``: every node as it
        joins, in one batched query, before it can be selected; node order then
        follows partition ids, so a seeded run in Flower's simulation (which
        draws node ids at random) is reproducible. ``"first-dispatch"``: a node
        is asked at the latest just before its first task, in batches (the
        dispatch's nodes and those the selector offers next, 256 in all: one
        round trip per 256 nodes of a without-replacement pass, one per new
        node with replacement); no start-up barrier, but nodes are ordered by
        node id, so the selection depends on the ids Flower drew (reproducible
        only where they are fixed).
    """

    def __init__(
        self,
        *,
        local_epochs: int,
        batch_size: int,
        step_time_s: float,
        seed: int = 0,
        query_timeout: float = 120.0,
        min_epochs: int | None = None,
        profile_query: str = "on-join",
    ) -> None:
        if min_epochs is not None and not min_epochs >= 1:
            raise ValueError(f"min_epochs={min_epochs} must be >= 1")
        if profile_query not in PROFILE_QUERIES:
            raise ValueError(
                f"profile_query={profile_query!r}; allowed: "
                f"{', '.join(PROFILE_QUERIES)}"
            )
        super().__init__()
        self.refill_each_outcome = True
        self._now = 0.0
        self.profile_query = profile_query
        self.local_epochs = local_epochs
        self.min_epochs = min(min_epochs or local_epochs, local_epochs)
        self.batch_size = batch_size
        self.step_time_s = step_time_s
        self.seed = seed
        self.query_timeout = query_timeout
        self.profiles: dict[int, NodeProfile] = {}
        self._tasks: dict[int, int] = {}

    def start(self) -> None:
        """A run starts: wall and simulated time 0 (profiles are kept)."""
        super().start()
        self._now = 0.0

    def now(self) -> float:
        """Simulated seconds since the run started."""
        return self._now

    def describe(self) -> str:
        """``virtual``."""
        return "virtual"

    def get_state(self) -> dict[str, Any]:
        """Tasks dispatched per client, JSON-ready (for checkpoints)."""
        return {str(k): v for k, v in self._tasks.items()}

    def set_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`get_state`."""
        if state is not None:
            self._tasks = {int(k): int(v) for k, v in state.items()}

    def resume(self, now: float, wall: float) -> None:
        """Continue at simulated ``now``."""
        super().resume(now, wall)
        self._now = now

    def on_join(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """With ``profile_query="on-join"``, ask the joined nodes' profiles."""
        if self.profile_query == "on-join":
            self.register(grid, node_ids)

    def unprofiled(self, node_ids: Iterable[int]) -> list[int]:
        """Nodes without a profile yet (only asked lazily, ``first-dispatch``)."""
        if self.profile_query != "first-dispatch":
            return []
        return [n for n in node_ids if n not in self.profiles]

    def finish_of(self, task: TimedTask, reply: Message | None) -> float:
        """Simulated finish of a task, charged the steps its reply reports."""
        if task.timing is None:
            return task.sim_start
        return task.sim_start + task.timing.charged(reported_steps(reply))

    def next_ready(
        self,
        ready: Sequence[tuple[TimedTask, Message | None]],
        running: Iterable[TimedTask],
    ) -> tuple[int, float] | None:
        """The earliest simulated finish, once no running task can precede it."""
        if not ready:
            return None
        finishes = [self.finish_of(task, reply) for task, reply in ready]
        index = min(range(len(ready)), key=lambda i: (finishes[i], ready[i][0].seq))
        first = (finishes[index], ready[index][0].seq)
        for task in running:
            earliest = task.sim_start + (task.timing.min_duration if task.timing else 0)
            if (earliest, task.seq) < first:
                return None  # a running task may still finish first
        return index, finishes[index]

    def settle(self, finish: float) -> None:
        """Simulated time moves to ``finish`` (never back)."""
        self._now = max(self._now, finish)

    def duration(self, task: TimedTask, finish: float) -> float:
        """``finish`` minus the task's simulated start."""
        return finish - task.sim_start

    def register(self, grid: Grid, node_ids: Iterable[int]) -> int:
        """Ask nodes without a known profile for it (``query.profile`` messages).

        A node that does not answer (e.g. a ClientApp without the query handler)
        gets a default profile: speed 1, no delay, one batch per epoch.

        Returns
        -------
        int
            How many nodes were asked (0 when all profiles were known).
        """
        unknown = sorted(n for n in node_ids if n not in self.profiles)
        if not unknown:
            return 0
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type=QUERY_PROFILE)
            for node in unknown
        ]
        replies = grid.send_and_receive(messages, timeout=self.query_timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or PROFILE_KEY not in reply.content.config_records:
                continue
            self.profiles[node] = NodeProfile.from_record(
                reply.content.config_records[PROFILE_KEY]
            )
        silent = [n for n in unknown if n not in self.profiles]
        for node in silent:
            self.profiles[node] = NodeProfile(-1, self.batch_size)
        if silent:
            log(
                WARNING,
                "%d node(s) sent no profile (e.g. node %s); assuming speed 1, no "
                "delay, one batch per epoch",
                len(silent),
                silent[0],
            )
        level = INFO if self.profile_query == "on-join" else DEBUG
        log(level, "Profiles of %d node(s) registered", len(unknown))
        return len(unknown)

    def sort_key(self, node_id: int) -> tuple[int, ...]:
        """Stable ordering of nodes across runs (partition id, then node id)."""
        profile = self.profiles.get(node_id)
        return (profile.partition_id if profile else 1 << 62, node_id)

    def label(self, node_id: int) -> int:
        """Human-facing client id: the partition id when known, else the node id."""
        profile = self.profiles.get(node_id)
        return (
            profile.partition_id if profile and profile.partition_id >= 0 else node_id
        )

    def plan(self, node_id: int) -> "TaskTiming":
        """Timing of the next task sent to ``node_id``.

        Tasks are counted per client (partition id when known), so a resumed run
        whose nodes have new ids continues the same delay sequence.
        """
        key = self.label(node_id)
        index = self._tasks.get(key, 0)
        self._tasks[key] = index + 1
        profile = self.profiles.get(node_id) or NodeProfile(-1, self.batch_size)
        per_epoch = planned_steps(profile.num_examples, 1, self.batch_size)
        return TaskTiming(
            planned_steps=per_epoch * self.local_epochs,
            min_steps=per_epoch * self.min_epochs,
            step_s=self.step_time_s * profile.speed_factor,
            delay=network_delay(profile, index, self.seed),
        )

    def next_duration(self, node_id: int) -> float:
        """Simulated duration of the next (full) task sent to ``node_id``."""
        return self.plan(node_id).duration
