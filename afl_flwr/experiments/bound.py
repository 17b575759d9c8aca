"""The speed-only bound on asynchronous speedup (no training involved).

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

from afl_flwr.clock import NodeProfile, task_duration
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
