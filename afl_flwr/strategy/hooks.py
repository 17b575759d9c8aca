"""Per-version hooks of the asynchronous loop (in the spirit of pfl's callbacks).

The loop in :mod:`afl_flwr.strategy.strategy` is written once; evaluation,
federated evaluation, checkpoints, the time budget and the progress log hook
into it. Each hook sees a :class:`RunView` and may implement any of
``on_start``, ``on_version``, ``on_poll``, ``on_end`` and ``stop_reason``.
"""

import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from afl_flwr.constants import SERVER_ROUND
from afl_flwr.history import EvalPoint, RunHistory, UpdateEvent
from afl_flwr.replies import without_header_parsing
from afl_flwr.strategy.model_store import ModelStore
from afl_flwr.strategy.scheduler import Scheduler

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]


@dataclass
class RunView:
    """What a hook may read (and, for ``result``/``history``, fill in)."""

    grid: Grid
    store: ModelStore
    scheduler: Scheduler
    history: RunHistory
    result: Result
    num_rounds: int


class Hook:
    """A no-op hook; subclasses override what they need."""

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Before the first dispatch."""

    def on_version(self, run: RunView, merged: list[UpdateEvent]) -> None:
        """After a new global version was installed."""

    def on_poll(self, run: RunView) -> None:
        """Once per loop iteration (collect asynchronous results)."""

    def on_end(self, run: RunView) -> None:
        """After the last version (or an early stop)."""

    def stop_reason(self, run: RunView) -> str | None:
        """A reason to stop the run now, or ``None``."""
        return None


def _metrics_line(metrics: MetricRecord | dict | None) -> str:
    return ", ".join(f"{k}={float(v):.4f}" for k, v in (metrics or {}).items())  # type: ignore[arg-type]


@dataclass
class _PendingEval:
    """A central evaluation submitted at a version, with that version's numbers."""

    version: int
    wall_time: float
    sim_time: float
    client_updates: int
    future: "Future[tuple[MetricRecord | None, float]]"


class CentralEvaluation(Hook):
    """``evaluate_fn`` on the server, at version 0, every ``every`` and at the end.

    Off the critical path by default: the version's weights (immutable once
    installed) go to one background thread while the loop keeps dispatching,
    so client slots stay busy during an evaluation. Results are recorded in
    version order, each with the wall/simulated time and update count of the
    version it belongs to, so a run's records are those of an inline
    evaluation (only ``eval_seconds`` and the log line's position differ).
    Pending evaluations are collected at every poll, before a checkpoint
    (:meth:`flush`) and at the end; an exception raised by ``evaluate_fn`` is
    re-raised in the loop.

    Parameters
    ----------
    evaluate_fn : EvaluateFn or None
        ``(version, arrays) -> MetricRecord``; ``None`` records time points only.
    every : int
        Evaluate every this many versions.
    background : bool (default: True)
        Evaluate in a background thread; ``False`` evaluates inline (the loop
        waits), for an ``evaluate_fn`` that is not thread-safe.
    """

    def __init__(
        self, evaluate_fn: EvaluateFn | None, every: int, *, background: bool = True
    ) -> None:
        self.evaluate_fn = evaluate_fn
        self.every = every
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[_PendingEval] = deque()
        self._run: RunView | None = None
        self._updates = 0
        self._last_version = -1

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Evaluate the initial model (not on resume: it was evaluated)."""
        self._run = run
        self._queue.clear()
        self._updates = len(run.history.merged())
        evals = run.history.evals
        self._last_version = evals[-1].version if resumed and evals else -1
        if self.background and self.evaluate_fn is not None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="central-eval")
        if not resumed:
            self.submit(run)

    def on_version(self, run: RunView, merged: list[UpdateEvent]) -> None:
        """Evaluate on schedule."""
        self._updates += len(merged)
        version = run.store.version
        if version % self.every == 0 or version == run.num_rounds:
            self.submit(run)

    def on_poll(self, run: RunView) -> None:
        """Record the evaluations that finished, in version order."""
        self._collect(run, wait=False)

    def on_end(self, run: RunView) -> None:
        """Evaluate the final model if the schedule missed it; wait for all."""
        try:
            if self._last_version != run.store.version:
                self.submit(run)
            self._collect(run, wait=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None

    def flush(self) -> None:
        """Wait for and record every pending evaluation (before a checkpoint)."""
        if self._run is not None:
            self._collect(self._run, wait=True)

    def submit(self, run: RunView) -> None:
        """Evaluate the current global model (in the background if enabled)."""
        version = run.store.version
        self._last_version = version
        future: Future[tuple[MetricRecord | None, float]]
        if self._executor is not None:
            # Arrays decoded without ast (thread-safe on CPython 3.11), see
            # afl_flwr.replies.ViewedArray.
            arrays = without_header_parsing(run.store.record())
            future = self._executor.submit(self._evaluate, version, arrays)
        else:
            future = Future()
            future.set_result(self._evaluate(version, run.store.record()))
        self._queue.append(
            _PendingEval(
                version=version,
                wall_time=run.scheduler.wall(),
                sim_time=run.scheduler.now(),
                client_updates=self._updates,
                future=future,
            )
        )
        self._collect(run, wait=False)

    def _evaluate(
        self, version: int, arrays: ArrayRecord
    ) -> tuple[MetricRecord | None, float]:
        started = time.time()
        metrics = self.evaluate_fn(version, arrays) if self.evaluate_fn else None
        return metrics, time.time() - started

    def _collect(self, run: RunView, *, wait: bool) -> None:
        while self._queue and (wait or self._queue[0].future.done()):
            pending = self._queue.popleft()
            metrics, seconds = pending.future.result()
            self._record(run, pending, metrics, seconds)

    @staticmethod
    def _record(
        run: RunView,
        pending: _PendingEval,
        metrics: MetricRecord | None,
        seconds: float,
    ) -> None:
        if metrics is not None:
            run.result.evaluate_metrics_serverapp[pending.version] = metrics
        run.history.evals.append(
            EvalPoint(
                version=pending.version,
                wall_time=pending.wall_time,
                sim_time=pending.sim_time,
                client_updates=pending.client_updates,
                metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
                eval_seconds=seconds,
            )
        )
        if metrics is not None:
            log(
                INFO,
                "[version %d] %s | updates %d | sim %.1fs | wall %.1fs",
                pending.version,
                _metrics_line(metrics),
                pending.client_updates,
                pending.sim_time,
                pending.wall_time,
            )


class FederatedEvaluation(Hook):
    """Evaluation on the clients, without blocking training.

    At every ``every``-th version (and the last) the global model is sent in
    ``evaluate`` messages to ``max(min_nodes, ceil(fraction * N))`` nodes, idle
    ones first. Replies are collected while training goes on and aggregated with
    ``aggr_fn`` into ``Result.evaluate_metrics_clientapp[version]``; a version
    whose replies are not all in after ``timeout`` seconds is aggregated from
    those that are. The end of the run waits (at most ``timeout``) for them.

    Parameters
    ----------
    fraction : float
        Fraction of connected nodes asked, in ``[0, 1]``; 0 disables it.
    min_nodes : int
        At least this many nodes (capped at the number connected).
    every : int
        Evaluate every this many versions.
    config : ConfigRecord
        Sent with each message (plus ``server-round`` = version).
    arrayrecord_key, configrecord_key, weighted_by_key : str
        Record keys, as Flower's FedAvg.
    aggr_fn : MetricsAggrFn
        ``(list[RecordDict], weighted_by_key) -> MetricRecord``.
    timeout : float
        Seconds to wait for a version's replies.
    seed : int
        Seed of the node sampling.
    """

    def __init__(
        self,
        *,
        fraction: float,
        min_nodes: int,
        every: int,
        config: ConfigRecord,
        arrayrecord_key: str,
        configrecord_key: str,
        weighted_by_key: str,
        aggr_fn: MetricsAggrFn,
        timeout: float,
        seed: int,
    ) -> None:
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.every = every
        self.config = config
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.weighted_by_key = weighted_by_key
        self.aggr_fn = aggr_fn
        self.timeout = timeout
        self.rng = np.random.default_rng([seed, 7])
        self._pending: dict[str, int] = {}  # message id -> version
        self._replies: dict[int, list[Message]] = {}
        self._asked: dict[int, tuple[int, float]] = {}  # version -> (count, wall)
        self._last_sent = -1

    def on_version(self, run: RunView, merged: list[UpdateEvent]) -> None:
        """Send evaluation messages on schedule."""
        version = run.store.version
        if version % self.every == 0 or version == run.num_rounds:
            self.send(run)

    def on_poll(self, run: RunView) -> None:
        """Collect replies; close versions that are complete or timed out."""
        if not self._pending:
            return
        for reply in run.grid.pull_messages(list(self._pending)):
            version = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if version is not None:
                self._replies.setdefault(version, []).append(reply)
        now = time.time()
        for version, (count, sent) in sorted(self._asked.items()):
            got = len(self._replies.get(version, []))
            if got >= count or now - sent > self.timeout:
                self._close(run, version)

    def on_end(self, run: RunView) -> None:
        """Evaluate the final version (if not yet) and wait for what is out."""
        if self._last_sent != run.store.version:
            self.send(run)
        deadline = time.time() + self.timeout
        while self._asked and time.time() < deadline:
            self.on_poll(run)
            if self._asked:
                time.sleep(0.05)
        for version in sorted(self._asked):
            self._close(run, version)

    def send(self, run: RunView) -> None:
        """Ask a sample of nodes, idle ones first, to evaluate the current model."""
        self._last_sent = run.store.version
        nodes = list(run.scheduler.nodes)
        if self.fraction <= 0 or not nodes:
            return
        count = min(
            len(nodes), max(self.min_nodes, math.ceil(self.fraction * len(nodes)))
        )
        busy = run.scheduler.busy_nodes()
        order = [nodes[i] for i in self.rng.permutation(len(nodes))]
        chosen = sorted(order, key=lambda n: n in busy)[:count]
        config = ConfigRecord(dict(self.config))
        config[SERVER_ROUND] = run.store.version
        content = RecordDict(
            {self.arrayrecord_key: run.store.record(), self.configrecord_key: config}
        )
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in chosen
        ]
        ids = [m for m in run.grid.push_messages(messages) if m]
        for message_id in ids:
            self._pending[message_id] = run.store.version
        if ids:
            self._asked[run.store.version] = (len(ids), time.time())

    def _close(self, run: RunView, version: int) -> None:
        self._asked.pop(version, None)
        for message_id in [m for m, v in self._pending.items() if v == version]:
            del self._pending[message_id]
        replies = self._replies.pop(version, [])
        contents = [
            r.content
            for r in replies
            if not r.has_error()
            and len(r.content.metric_records) == 1
            and _positive_weight(r, self.weighted_by_key)
        ]
        if not contents:
            log(
                WARNING,
                "[version %d] federated evaluation: no valid reply (%d received)",
                version,
                len(replies),
            )
            return
        metrics = self.aggr_fn(contents, self.weighted_by_key)
        run.result.evaluate_metrics_clientapp[version] = metrics
        run.history.federated.append(
            EvalPoint(
                version=version,
                wall_time=run.scheduler.wall(),
                sim_time=run.scheduler.now(),
                client_updates=len(run.history.merged()),
                metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
            )
        )
        log(
            INFO,
            "[version %d] federated evaluation on %d node(s): %s",
            version,
            len(contents),
            _metrics_line(metrics),
        )


def _positive_weight(reply: Message, key: str) -> bool:
    metrics = next(iter(reply.content.metric_records.values()))
    weight = metrics.get(key)
    return (
        isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0
    )


class Checkpointing(Hook):
    """Call ``save`` every ``every`` versions (right after a merge)."""

    def __init__(self, every: int, save: Callable[[], None]) -> None:
        self.every = every
        self.save = save

    def on_version(self, run: RunView, merged: list[UpdateEvent]) -> None:
        """Checkpoint on schedule."""
        if self.every and run.store.version % self.every == 0:
            self.save()


class TimeBudget(Hook):
    """Stop once ``max_time`` seconds (simulated with a clock, else wall) passed."""

    def __init__(self, max_time: float) -> None:
        self.max_time = max_time

    def stop_reason(self, run: RunView) -> str | None:
        """The budget is spent."""
        if run.scheduler.now() >= self.max_time:
            return f"time budget of {self.max_time:.1f}s reached"
        return None


class ProgressLog(Hook):
    """One log line per version: updates merged, their staleness, times, slots."""

    def on_version(self, run: RunView, merged: list[UpdateEvent]) -> None:
        """Log the version's progress."""
        taus = [e.staleness for e in merged if e.staleness is not None]
        log(
            INFO,
            "[version %d/%d] merged %d update(s), staleness mean %.2f max %d | "
            "sim %.1fs | wall %.1fs",
            run.store.version,
            run.num_rounds,
            len(merged),
            float(np.mean(taus)) if taus else 0.0,
            max(taus, default=0),
            run.scheduler.now(),
            run.scheduler.wall(),
        )
