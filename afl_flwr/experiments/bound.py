"""Speed-only comparisons of the two protocols (no training involved).

:func:`async_rate_bound` is a proven upper bound on the updates per simulated
second of *any* asynchronous protocol on given clients; divided by FedAvg's
measured rate it bounds the measured async/sync throughput ratio.

:func:`speed_bound` is not a bound (the name is historical): it simulates one
ideal schedule of each protocol, and a real run can beat it (different node
draws, delays); it estimates what speed alone would give.

Given the node profiles, simulate the client slots of both protocols on the
virtual clock and measure simulated time per accepted update:

* synchronous (FedAvg): each round samples ``concurrency`` nodes without
  replacement and lasts as long as its slowest one;
* asynchronous: ``concurrency`` slots stay busy; a freed slot immediately gets
  a new task on a node chosen by the project's selector.

``sync / async`` time per update is what a perfect asynchronous method would
gain if stale updates were worth as much as fresh ones.
"""

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from afl_flwr.clock import NodeProfile, planned_steps, task_duration
from afl_flwr.selection import make_selector


@dataclass(frozen=True)
class SpeedBound:
    """Simulated time per update of both protocols and the resulting bound."""

    sync_time_per_update: float
    async_time_per_update: float
    sync_utilisation: float
    async_utilisation: float

    @property
    def speedup(self) -> float:
        """Bound on the asynchronous speedup (sync / async time per update)."""
        return self.sync_time_per_update / self.async_time_per_update


def speed_bound(
    profiles: Sequence[NodeProfile],
    *,
    concurrency: int,
    updates: int,
    local_epochs: int,
    batch_size: int,
    step_time_s: float,
    seed: int = 0,
    selection: str = "without-replacement",
) -> SpeedBound:
    """Simulate ``updates`` client updates of each protocol on the virtual clock.

    Parameters
    ----------
    profiles : Sequence[NodeProfile]
        One profile per node.
    concurrency : int
        Clients per round (sync) / busy slots (async).
    updates : int
        Client updates to simulate per protocol.
    local_epochs, batch_size, step_time_s : int, int, float
        Planned local work, as in :class:`~afl_flwr.clock.VirtualClock`.
    seed : int (default: 0)
        Seed of node sampling and delay draws.
    selection : str (default: "without-replacement")
        Asynchronous client selection.

    Returns
    -------
    SpeedBound
        Time per update and slot utilisation of both protocols.
    """
    if not 1 <= concurrency <= len(profiles):
        raise ValueError(f"concurrency={concurrency} must be in 1..{len(profiles)}")
    duration_of = partial(
        task_duration,
        local_epochs=local_epochs,
        batch_size=batch_size,
        step_time_s=step_time_s,
        seed=seed,
    )
    nodes = list(range(len(profiles)))

    # Synchronous rounds.
    rng = np.random.default_rng(seed)
    tasks = [0] * len(profiles)
    sync_time = sync_busy = 0.0
    done = 0
    while done < updates:
        chosen = rng.choice(len(profiles), size=concurrency, replace=False)
        durations = []
        for node in chosen:
            durations.append(duration_of(profiles[node], tasks[node]))
            tasks[node] += 1
        sync_time += max(durations)
        sync_busy += sum(durations)
        done += concurrency

    # Asynchronous slots (event simulation).
    selector = make_selector(selection, seed)
    tasks = [0] * len(profiles)
    running: list[tuple[float, int]] = []
    now = async_busy = 0.0
    finished = 0

    def dispatch() -> None:
        nonlocal async_busy
        busy = {node for _, node in running}
        node = selector.select(nodes, [n for n in nodes if n not in busy])
        if node is None:
            return
        duration = duration_of(profiles[node], tasks[node])
        tasks[node] += 1
        async_busy += duration
        heapq.heappush(running, (now + duration, node))

    for _ in range(concurrency):
        dispatch()
    while finished < updates:
        now, _ = heapq.heappop(running)
        finished += 1
        dispatch()
    async_busy -= sum(end - now for end, _ in running)  # work past the end

    return SpeedBound(
        sync_time_per_update=sync_time / done,
        async_time_per_update=now / finished,
        sync_utilisation=sync_busy / (concurrency * sync_time),
        async_utilisation=async_busy / (concurrency * now),
    )


def async_rate_bound(
    profiles: Sequence[NodeProfile],
    *,
    concurrency: int,
    local_epochs: int,
    batch_size: int,
    step_time_s: float,
) -> float:
    """Updates per simulated second no asynchronous protocol can exceed.

    Client ``i``'s task lasts at least ``d_i = steps_i x step_time_s x speed_i``
    on the virtual clock (the network delay is ``>= 0``; ``steps_i`` is the
    fewest the clock charges, so pass the *minimum* local epochs when early
    stopping may end jobs early). A node runs one task at a time and at most
    ``C = concurrency`` tasks run at once. If node ``i`` is busy ``b_i`` seconds
    of ``[0, T]``, it completes at most ``b_i / d_i`` tasks there, with
    ``b_i <= T`` and ``sum_i b_i <= C T``. The maximum of ``sum_i b_i / d_i``
    under these constraints fills the ``C`` smallest ``d_i`` completely, so the
    tasks completed by any time ``T`` number at most
    ``T x sum over the C fastest nodes of 1 / d_i``; this is that rate.

    Parameters
    ----------
    profiles : Sequence[NodeProfile]
        One profile per node.
    concurrency : int
        Tasks in flight at most (``C``).
    local_epochs, batch_size, step_time_s : int, int, float
        Fewest local epochs charged, batch size and seconds per step.
    """
    if not concurrency >= 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    shortest = sorted(
        planned_steps(p.num_examples, local_epochs, batch_size)
        * step_time_s
        * p.speed_factor
        for p in profiles
    )
    return float(sum(1.0 / d for d in shortest[:concurrency]))


def completed_per_second(finish_times: Sequence[float]) -> float:
    """Tasks completed per simulated second: count / the last finish time."""
    if not finish_times or max(finish_times) <= 0:
        raise ValueError("completed_per_second needs a positive finish time")
    return len(finish_times) / max(finish_times)
