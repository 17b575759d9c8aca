"""Scale: the strategy alone at N = 10 to 100,000 nodes, and end to end in Flower.

Part A, *strategy alone*: :class:`StalenessAwareAsyncStrategy` drives an
in-memory grid (:class:`InstantGrid`) whose N nodes answer at once with the
received weights plus a node-specific shift, so no training is involved. The
model is the 784-64-10 MLP of :mod:`_synthetic_app` (~51k parameters). Per
(rule, clock, N): start-up (``start()`` to the first dispatch; with the virtual
clock it includes the profile query of all N nodes), milliseconds per merged
update in the loop (all of it, and without the grid's own time), the peak of
the traced Python heap (``tracemalloc``, in a separate run) and the growth of the
resident set. ``ca2fl`` keeps one cached delta per client that has replied, so its
memory grows with the number of distinct clients that replied (at most N).

Part B, *end to end*: Flower's Ray simulation (``flwr.simulation.run_simulation``)
with N virtual SuperNodes running the synthetic-data ClientApp of
:mod:`_synthetic_app` (fixed real PyTorch work per task on random tensors: it
measures throughput, not learning), two client actors on the two cores. Per N:
updates per second in the strategy loop, start-up (Ray and the nodes, then the
strategy up to its first dispatch), total wall, peak memory (PSS of this process
and of every Ray process), and the wall time against the same number of train
tasks run in a plain loop in this process.

Usage::

    python benchmarks/scale.py                     # both parts, default sizes
    python benchmarks/scale.py --sim-clocks arrival virtual   # README tables
    python benchmarks/scale.py --part strategy --nodes 10 1000 100000
    python benchmarks/scale.py --part none         # scale.md from scale.json

A part that is not run keeps its rows from an earlier ``scale.json``.
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from _memory import TreeSampler, peak_rss_mib, reset_peak_rss, rss_mib
from _synthetic_app import (
    BATCH_SIZE,
    make_model,
    model_arrays,
    node_profile,
    train_task,
)
from _synthetic_app import app as synthetic_client_app
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.constants import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROFILE_KEY,
    QUERY_PROFILE,
)
from afl_flwr.experiments.local_grid import LocalGrid
from afl_flwr.experiments.runs import markdown_table
from afl_flwr.experiments.scripted_grid import server_identity

RULES = ("fedbuff", "ca2fl")
CLOCKS = ("arrival", "virtual", "virtual-lazy")
FIRST_NODE_ID = 1
NA = "n/a"


# ------------------------------------------------------------- the virtual clock
def make_clock(mode: str) -> VirtualClock | None:
    """The clock of a clock mode (``arrival``: none, wall order; ``virtual``:
    profiles asked on join; ``virtual-lazy``: asked at a node's first dispatch).
    """
    if mode not in CLOCKS:
        raise ValueError(f"clock mode {mode!r}; allowed: {', '.join(CLOCKS)}")
    if mode == "arrival":
        return None
    kwargs: dict[str, Any] = {
        "local_epochs": 1,
        "batch_size": BATCH_SIZE,
        "step_time_s": 0.01,
        "seed": 0,
    }
    if mode == "virtual-lazy":
        kwargs["profile_query"] = "first-dispatch"
    return VirtualClock(**kwargs)


# ------------------------------------------------------- part A: strategy alone
@contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's logger at WARNING (no per-version lines) for the block."""
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(WARNING)
    try:
        yield
    finally:
        FLOWER_LOGGER.setLevel(level)


class InstantGrid(LocalGrid):
    """N in-memory nodes that answer every message at once, without training.

    A train reply is the received weights plus ``1e-3 x (node mod 7)``; a
    profile query gets :func:`_synthetic_app.node_profile`. Time spent in the
    grid's own methods is added up, before and after the first train dispatch.

    Parameters
    ----------
    num_nodes : int
        Connected nodes (ids ``1..num_nodes``).
    """

    def __init__(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        self.first_push: float | None = None
        self.startup_seconds = 0.0
        self.loop_seconds = 0.0
        self.profile_queries = 0
        self._pending: dict[str, Message] = {}
        self._next_id = 0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            if self.first_push is None:
                self.startup_seconds += spent
            else:
                self.loop_seconds += spent

    def _assign_id(self, message: Message) -> str:
        message_id = str(self._next_id)
        self._next_id += 1
        message.metadata.__dict__["_message_id"] = message_id
        return message_id

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        with self._timed():
            return list(range(FIRST_NODE_ID, FIRST_NODE_ID + self.num_nodes))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Answer each message now; its reply waits for the next pull."""
        if self.first_push is None:
            self.first_push = time.perf_counter()
        with self._timed():
            ids = []
            for message in messages:
                message_id = self._assign_id(message)
                self._pending[message_id] = self._reply(message)
                ids.append(message_id)
            return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to the given messages (all are ready)."""
        with self._timed():
            return [
                reply
                for message_id in message_ids
                if (reply := self._pending.pop(message_id, None)) is not None
            ]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Answer profile queries; other messages get no reply."""
        with self._timed():
            out = []
            for message in messages:
                self._assign_id(message)
                if message.metadata.message_type != QUERY_PROFILE:
                    continue
                self.profile_queries += 1
                partition = message.metadata.dst_node_id - FIRST_NODE_ID
                record = node_profile(partition).to_record()
                out.append(Message(RecordDict({PROFILE_KEY: record}), reply_to=message))
            return out

    @staticmethod
    def _reply(message: Message) -> Message:
        node = message.metadata.dst_node_id
        shift = np.float32(1e-3 * (node % 7))
        received = message.content.array_records[ARRAYS_KEY]
        arrays = ArrayRecord(
            {name: Array(array.numpy() + shift) for name, array in received.items()}
        )
        metrics = MetricRecord({NUM_EXAMPLES: BATCH_SIZE})
        content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics})
        return Message(content, reply_to=message)


def run_strategy_alone(
    num_nodes: int,
    *,
    rule: str = "fedbuff",
    clock: str = "arrival",
    updates: int = 200,
    concurrency: int = 10,
    trace_memory: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """One strategy run on an :class:`InstantGrid` of ``num_nodes`` nodes.

    Runs ``ceil(updates / concurrency)`` versions with buffer size
    ``concurrency``, ``poll_interval=0``.

    Returns
    -------
    dict
        ``updates`` (merged), ``startup_s``, ``loop_s``, ``grid_loop_s``,
        ``ms_per_update``, ``strategy_ms_per_update`` (without grid time),
        ``rss_growth_mib`` (``None`` when unreadable), ``traced_peak_mib`` and
        ``traced_retained_mib`` (the traced heap's peak during ``start()`` and
        its size when it returns, both above the level before; with
        ``trace_memory``, else ``None``), ``distinct_clients``,
        ``profile_queries``.
    """
    grid = InstantGrid(num_nodes)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=concurrency,
        aggregation=rule,
        clock=make_clock(clock),
        seed=seed,
        poll_interval=0.0,
    )
    initial = ArrayRecord({k: Array(v) for k, v in model_arrays().items()})
    versions = math.ceil(updates / strategy.buffer_size)
    gc.collect()
    rss_before = rss_mib()
    rss_ok = reset_peak_rss()
    if trace_memory:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0] if trace_memory else 0
    started = time.perf_counter()
    with server_identity():
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=versions, timeout=3600
        )
    ended = time.perf_counter()
    traced_peak = traced_retained = None
    if trace_memory:
        current, peak_traced = tracemalloc.get_traced_memory()
        traced_peak = (peak_traced - traced_before) / 2**20
        traced_retained = (current - traced_before) / 2**20
        tracemalloc.stop()
    peak = peak_rss_mib()
    merged = [e for e in strategy.history.events if e.merged_into is not None]
    assert grid.first_push is not None
    loop_s = ended - grid.first_push
    return {
        "updates": len(merged),
        "versions": strategy.version,
        "startup_s": grid.first_push - started,
        "loop_s": loop_s,
        "grid_loop_s": grid.loop_seconds,
        "ms_per_update": 1e3 * loop_s / len(merged),
        "strategy_ms_per_update": 1e3 * (loop_s - grid.loop_seconds) / len(merged),
        "rss_growth_mib": (
            max(0.0, peak - rss_before) if rss_ok and peak and rss_before else None
        ),
        "traced_peak_mib": traced_peak,
        "traced_retained_mib": traced_retained,
        "distinct_clients": len({e.client for e in merged}),
        "profile_queries": grid.profile_queries,
    }


def strategy_rows(
    nodes: list[int],
    *,
    rules: Iterable[str] = RULES,
    clocks: Iterable[str] = CLOCKS,
    updates: int = 200,
    concurrency: int = 10,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Part A over every (rule, clock, N): timed repeats plus one traced run.

    Torch runs on one thread and Flower logs warnings only meanwhile (on a busy
    machine, waking a second intra-op thread costs milliseconds per merge).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_flower():
            return _strategy_rows(nodes, rules, clocks, updates, concurrency, repeats)
    finally:
        torch.set_num_threads(threads)


def _strategy_rows(  # pylint: disable=too-many-arguments,too-many-positional-arguments
    nodes: list[int],
    rules: Iterable[str],
    clocks: Iterable[str],
    updates: int,
    concurrency: int,
    repeats: int,
) -> list[dict[str, Any]]:
    rows = []
    for rule in rules:
        for clock in clocks:
            for num_nodes in nodes:
                row: dict[str, Any] = {"rule": rule, "clock": clock, "nodes": num_nodes}
                row_started = time.perf_counter()
                kwargs = {
                    "rule": rule,
                    "clock": clock,
                    "updates": updates,
                    "concurrency": concurrency,
                }
                timed = [
                    run_strategy_alone(num_nodes, **kwargs) for _ in range(repeats)
                ]
                traced = run_strategy_alone(num_nodes, trace_memory=True, **kwargs)
                row.update(_summarise(timed), repeats=timed)
                row["traced_peak_mib"] = traced["traced_peak_mib"]
                row["traced_retained_mib"] = traced["traced_retained_mib"]
                row["traced_run"] = traced
                row["elapsed_s"] = time.perf_counter() - row_started
                rows.append(row)
                print(
                    f"[strategy] {rule} {clock} N={num_nodes}: "
                    f"{row['ms_per_update']:.3f} ms/update, start-up "
                    f"{row['startup_s']:.3f} s, heap peak "
                    f"{row['traced_peak_mib']:.1f} MiB",
                    flush=True,
                )
    return rows


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of the timing and memory fields."""
    keys = ("startup_s", "ms_per_update", "strategy_ms_per_update")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    growth = [r["rss_growth_mib"] for r in runs if r["rss_growth_mib"] is not None]
    out["rss_growth_mib"] = max(growth) if growth else None
    out["updates"] = runs[0]["updates"]
    out["distinct_clients"] = runs[0]["distinct_clients"]
    return out


# ------------------------------------------------- part B: Flower's simulation
class TimingProbe(Grid):
    """A Grid that forwards to Flower's and notes when things first happen.

    Records the first train dispatch (``first_push``), the first reply pulled
    (``first_reply``) and the seconds spent in ``send_and_receive`` (the
    virtual clock's profile query), all ``time.perf_counter()`` values.

    Parameters
    ----------
    inner : Grid
        The Grid the ServerApp was given.
    """

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.first_push: float | None = None
        self.first_reply: float | None = None
        self.query_seconds = 0.0

    def set_run(self, run: Run) -> None:
        """Forward to the inner Grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The inner Grid's run."""
        return self.inner.run

    def create_message(  # pylint: disable=too-many-arguments,too-many-positional-arguments
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forward to the inner Grid."""
        return self.inner.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """Forward to the inner Grid."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward to the inner Grid, noting the first push."""
        if self.first_push is None:
            self.first_push = time.perf_counter()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward to the inner Grid, noting the first reply."""
        replies = list(self.inner.pull_messages(message_ids))
        if replies and self.first_reply is None:
            self.first_reply = time.perf_counter()
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward to the inner Grid, timing the call."""
        started = time.perf_counter()
        try:
            return self.inner.send_and_receive(messages, timeout=timeout)
        finally:
            self.query_seconds += time.perf_counter() - started


@contextmanager
def flower_polling_time() -> Iterator[dict[str, float]]:
    """Seconds spent in Flower's ``InMemoryLinkState.get_message_ins``.

    Flower's simulation engine asks the link state for every node's messages,
    node by node, every 0.1 s; this wraps that method for the block and adds up
    its time (``{"seconds": ..., "calls": ...}``); both stay 0 where this Flower
    version has no such method.
    """
    totals = {"seconds": 0.0, "calls": 0.0}
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import (
            InMemoryLinkState,
        )
    except ImportError:
        yield totals
        return
    original = InMemoryLinkState.get_message_ins

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            totals["seconds"] += time.perf_counter() - started
            totals["calls"] += 1

    InMemoryLinkState.get_message_ins = timed  # type: ignore[method-assign]
    try:
        yield totals
    finally:
        InMemoryLinkState.get_message_ins = original  # type: ignore[method-assign]


def bare_client_seconds(tasks: int) -> float:
    """Seconds to run ``tasks`` train tasks in a plain loop here, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for seed in range(tasks):
            train_task(make_model(), seed)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def run_in_simulation(
    num_nodes: int,
    *,
    clock: str = "arrival",
    updates: int = 200,
    concurrency: int = 10,
    client_cpus: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """One run of the strategy in Flower's Ray simulation with ``num_nodes`` nodes.

    Returns
    -------
    dict
        ``updates`` (merged), ``tasks`` (dispatched), ``startup_s`` (the call
        to the first train reply: Ray, the nodes, the profile query, one task),
        ``profile_query_s``, ``loop_s`` (first reply to the last merge),
        ``updates_per_s`` (in the loop), ``wall_s`` (the whole call, Ray's
        shutdown included), ``bare_s`` (the same number of tasks in a plain
        loop here, one thread), ``x_bare`` (wall over bare), ``loop_x_bare``,
        ``peak_pss_mib`` (this process and all Ray processes),
        ``peak_pss_server_mib`` (this process), ``processes``,
        ``flower_polling_s`` and ``flower_polls`` (see
        :func:`flower_polling_time`).
    """
    from flwr.simulation import run_simulation

    virtual_clock = make_clock(clock)  # fails here, not in the ServerApp thread
    marks: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        probe = TimingProbe(grid)
        strategy = StalenessAwareAsyncStrategy(
            concurrency=concurrency, clock=virtual_clock, seed=seed
        )
        strategy.start(
            grid=probe,
            initial_arrays=ArrayRecord(make_model().state_dict()),
            num_rounds=math.ceil(updates / strategy.buffer_size),
            timeout=600,
        )
        marks["end"] = time.perf_counter()
        marks["probe"] = probe
        events = strategy.history.events
        marks["updates"] = sum(e.merged_into is not None for e in events)
        marks["tasks"] = len(events) + strategy.history.abandoned

    with TreeSampler(os.getpid()) as memory, flower_polling_time() as polling:
        started = time.perf_counter()
        run_simulation(
            server_app=server_app,
            client_app=synthetic_client_app,
            num_supernodes=num_nodes,
            backend_config={
                "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False},
            },
        )
        ended = time.perf_counter()
    if "end" not in marks or marks["probe"].first_reply is None:
        raise RuntimeError(f"the ServerApp did not finish (N={num_nodes}); see log")
    probe = marks["probe"]
    loop_s = marks["end"] - probe.first_reply
    wall_s = ended - started
    bare_s = bare_client_seconds(marks["tasks"])
    return {
        "updates": marks["updates"],
        "tasks": marks["tasks"],
        "startup_s": probe.first_reply - started,
        "profile_query_s": probe.query_seconds,
        "loop_s": loop_s,
        "updates_per_s": marks["updates"] / loop_s,
        "wall_s": wall_s,
        "bare_s": bare_s,
        "x_bare": wall_s / bare_s,
        "loop_x_bare": loop_s / bare_s,
        "flower_polling_s": polling["seconds"],
        "flower_polls": int(polling["calls"]),
        "peak_pss_mib": memory.peak_total,
        "peak_pss_server_mib": memory.peak_root,
        "processes": memory.peak_processes,
    }


def simulation_rows(
    nodes: list[int],
    *,
    clocks: Iterable[str] = ("arrival",),
    updates: int = 200,
    concurrency: int = 10,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """Part B over every (clock, N), Flower logging warnings only."""
    with quiet_flower():
        return _simulation_rows(nodes, clocks, updates, concurrency, repeats)


def _simulation_rows(  # pylint: disable=too-many-arguments,too-many-positional-arguments
    nodes: list[int],
    clocks: Iterable[str],
    updates: int,
    concurrency: int,
    repeats: int,
) -> list[dict[str, Any]]:
    rows = []
    for clock in clocks:
        for num_nodes in nodes:
            row: dict[str, Any] = {"clock": clock, "nodes": num_nodes}
            row_started = time.perf_counter()
            print(f"[simulation] {clock} N={num_nodes}: running ...", flush=True)
            runs = [
                run_in_simulation(
                    num_nodes, clock=clock, updates=updates, concurrency=concurrency
                )
                for _ in range(repeats)
            ]
            keys = [k for k, v in runs[0].items() if isinstance(v, float)]
            row.update({k: statistics.median(r[k] for r in runs) for k in keys})
            row.update(
                updates=runs[0]["updates"],
                tasks=runs[0]["tasks"],
                processes=runs[0]["processes"],
                repeats=runs,
            )
            row["elapsed_s"] = time.perf_counter() - row_started
            rows.append(row)
            print(
                f"[simulation] {clock} N={num_nodes}: {row['updates_per_s']:.1f} "
                f"updates/s, start-up {row['startup_s']:.1f} s (profile query "
                f"{row['profile_query_s']:.1f} s), wall {row['wall_s']:.1f} s, "
                f"peak {row['peak_pss_mib']:.0f} MiB",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ the report
def machine() -> str:
    """A one-line description of this machine."""
    memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    return (
        f"{os.cpu_count()} cores ({platform.machine()}){memory}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _fmt(value: Any, digits: str = ".3g") -> str:
    return NA if value is None else format(value, digits)


def strategy_table(rows: list[dict[str, Any]]) -> str:
    """Part A's markdown table; ``x smallest N``: ms/update over the smallest N's."""
    smallest: dict[tuple[str, str], float] = {}
    out = []
    for row in rows:
        key = (row["rule"], row["clock"])
        base = smallest.setdefault(key, row["ms_per_update"])
        out.append(
            [
                *key,
                row["nodes"],
                _fmt(row["startup_s"]),
                _fmt(row["ms_per_update"]),
                _fmt(row["strategy_ms_per_update"]),
                _fmt(row["ms_per_update"] / base, ".2f"),
                _fmt(row["traced_peak_mib"]),
                _fmt(row.get("traced_retained_mib")),
                _fmt(row["rss_growth_mib"]),
                row["distinct_clients"],
            ]
        )
    header = [
        "rule",
        "clock",
        "N",
        "start-up s",
        "ms / update",
        "ms / update, grid excluded",
        "x smallest N",
        "heap peak MiB",
        "heap retained MiB",
        "RSS growth MiB",
        "clients replied",
    ]
    return markdown_table(header, out)


def simulation_table(rows: list[dict[str, Any]]) -> str:
    """Part B's markdown table; ``x smallest N``: updates/s over the smallest N's."""
    smallest: dict[str, float] = {}
    out = []
    for row in rows:
        base = smallest.setdefault(row["clock"], row["updates_per_s"])
        out.append(
            [
                row["clock"],
                row["nodes"],
                _fmt(row["startup_s"]),
                _fmt(row["profile_query_s"]),
                _fmt(row["updates_per_s"]),
                _fmt(row["updates_per_s"] / base, ".2f"),
                _fmt(row.get("flower_polling_s")),
                _fmt(row["wall_s"]),
                _fmt(row["x_bare"], ".2f"),
                _fmt(row["loop_x_bare"], ".2f"),
                _fmt(row["peak_pss_mib"], ".0f"),
                _fmt(row["peak_pss_server_mib"], ".0f"),
            ]
        )
    header = [
        "clock",
        "N",
        "start-up s",
        "profile query s",
        "updates / s",
        "x smallest N",
        "Flower polling s",
        "wall s",
        "wall x bare",
        "loop x bare",
        "peak MiB, all processes",
        "peak MiB, server process",
    ]
    return markdown_table(header, out)


def strategy_note(meta: dict[str, Any]) -> str:
    """What Part A's table measures."""
    return (
        f"\nThe strategy alone on an in-memory grid whose N nodes answer at once "
        f"(no training: a reply is the received weights plus a node-specific "
        f"shift); 784-64-10 MLP ({meta['parameters']:,} parameters), concurrency "
        f"{meta['concurrency']}, buffer K = {meta['concurrency']}, "
        f"{meta['updates']} merged updates per run, `poll_interval=0`, torch on "
        f"one thread; median of {meta['repeats']} timed run(s), heap peak from one "
        "more run under `tracemalloc`. *start-up*: `start()` to the first "
        "dispatch (with the virtual clock it includes the profile query of all N "
        "nodes); *ms / update*: the loop's wall time (first dispatch to the end) "
        "per merged update, also without the time spent inside the grid; *x "
        "smallest N*: ms / update over the same rule and clock at the smallest N "
        "(target: at most 2); *heap peak*: traced Python/NumPy allocations above "
        "the level before `start()`, the grid's replies and node list included; "
        "*heap retained*: the same when `start()` returns (what the strategy "
        "keeps: history, node list, profiles, caches); "
        "*RSS growth*: resident-set high-water mark above the level before "
        "`start()` (the allocator reuses memory freed by earlier runs, so it can "
        "read low). `ca2fl` caches one float16 delta per client that replied "
        "(*clients replied*), so its memory grows with that count (at most N), "
        "not with N itself. `virtual` asks every node for its profile on join "
        "(start-up), `virtual-lazy` at its first dispatch "
        f'(`profile-query = "first-dispatch"`). Machine: {meta["machine"]}.\n'
    )


def simulation_note(meta: dict[str, Any]) -> str:
    """What Part B's table measures."""
    return (
        "\nFlower's Ray simulation (`flwr.simulation.run_simulation`, in process) "
        "with N virtual SuperNodes running a synthetic-data ClientApp: every task "
        f"trains the 784-64-10 MLP for a fixed number of SGD steps on random "
        "tensors, so this measures throughput, not learning. Concurrency "
        f"{meta['concurrency']}, {meta['updates']} merged updates per run, "
        "default `poll_interval`, one CPU per client actor (two actors on the two "
        f"cores); median of {meta['repeats']} run(s). *start-up*: the "
        "`run_simulation` call to the first train reply (Ray, the N nodes, the "
        "profile query, one task); *profile query*: the virtual clock's "
        "`query.profile` round to all N nodes, part of start-up; *updates / s*: "
        "merged updates over the time from the first reply to the last merge; "
        "*x smallest N*: updates / s over the same clock at the smallest N "
        "(target at N = 1,000: at least 0.75); *Flower polling*: seconds inside "
        "Flower's `InMemoryLinkState.get_message_ins`, which the simulation "
        "engine calls for every node every 0.1 s, in this process (it holds the "
        "GIL the strategy needs); *wall*: the whole call, Ray's "
        "shutdown included; *wall x bare* and *loop x bare*: wall time, and loop "
        "time, over the same number of train tasks run one after another in a "
        "plain loop in this process on one thread (two actors in parallel could "
        "reach 0.5); *peak MiB*: peak proportional set size (shared pages split) "
        "summed over this process and every Ray process, sampled every 0.5 s, "
        f"and of this process alone. Machine: {meta['machine']}.\n"
    )


# (key in scale.json, heading, table, note) of each part, in report order.
REPORT = (
    ("strategy", "## Strategy alone", strategy_table, strategy_note),
    (
        "simulation",
        "## End to end in Flower's simulation (synthetic data)",
        simulation_table,
        simulation_note,
    ),
)


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for; write ``scale.md`` and ``scale.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=("strategy", "simulation", "both", "none"),
        default="both",
        help="what to measure; 'none' rewrites scale.md from scale.json",
    )
    parser.add_argument(
        "--nodes", type=int, nargs="+", default=[10, 100, 1_000, 10_000, 100_000]
    )
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--clocks", nargs="+", default=list(CLOCKS))
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--sim-nodes", type=int, nargs="+", default=[10, 100, 1_000, 5_000]
    )
    parser.add_argument(
        "--sim-clocks", nargs="+", default=["arrival", "virtual", "virtual-lazy"]
    )
    parser.add_argument("--sim-updates", type=int, default=200)
    parser.add_argument("--sim-repeats", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    for name in ("updates", "repeats", "sim_updates", "sim_repeats", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "scale.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    parameters = sum(v.size for v in model_arrays().values())
    common = {
        "machine": machine(),
        "parameters": parameters,
        "concurrency": args.concurrency,
    }
    started = time.perf_counter()
    if args.part in ("strategy", "both"):
        rows = strategy_rows(
            args.nodes,
            rules=args.rules,
            clocks=args.clocks,
            updates=args.updates,
            concurrency=args.concurrency,
            repeats=args.repeats,
        )
        meta = {"updates": args.updates, "repeats": args.repeats}
        raw["strategy"] = {"meta": {**common, **meta}, "rows": rows}
    if args.part in ("simulation", "both"):
        rows = simulation_rows(
            args.sim_nodes,
            clocks=args.sim_clocks,
            updates=args.sim_updates,
            concurrency=args.concurrency,
            repeats=args.sim_repeats,
        )
        meta = {"updates": args.sim_updates, "repeats": args.sim_repeats}
        raw["simulation"] = {"meta": {**common, **meta}, "rows": rows}
    raw_path.write_text(json.dumps(raw, indent=1))  # before the report can fail
    report = [
        f"{title}\n\n{table(raw[key]['rows'])}{note(raw[key]['meta'])}"
        for key, title, table, note in REPORT
        if key in raw
    ]
    (args.out / "scale.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
