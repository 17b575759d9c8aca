"""Central evaluation: ``evaluate_fn`` on the server, off the loop's critical path."""

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from flwr.app import ArrayRecord, MetricRecord

from afl_flwr.callbacks.base import Callback, RunView, Stop
from afl_flwr.history import CENTRAL, EvalPoint, UpdateEvent
from afl_flwr.replies import without_header_parsing

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class _Pending:
    """An evaluation submitted at a version, with that version's numbers."""

    version: int
    wall_time: float
    sim_time: float
    client_updates: int
    future: "Future[tuple[MetricRecord | None, float]]"


class CentralEvaluation(Callback):
    """``evaluate_fn`` on the server, at version 0, every ``every`` and at the end.

    Off the critical path by default: the version's weights (immutable once
    installed) go to one background thread while the loop keeps dispatching,
    so client slots stay busy during an evaluation. Results are recorded in
    version order, each with the wall/simulated time and update count of the
    version it belongs to, so a run's records are those of an inline
    evaluation (only ``eval_seconds`` and the log line's position differ).
    Pending evaluations are collected at every poll, before a checkpoint and at
    the end; an exception raised by ``evaluate_fn`` is re-raised in the loop.

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
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.evaluate_fn = evaluate_fn
        self.every = every
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[_Pending] = deque()
        self._last_version = -1

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Evaluate the initial model (not on resume: it was evaluated)."""
        self._queue.clear()
        evals = run.history.evals
        self._last_version = evals[-1].version if resumed and evals else -1
        if self.background and self.evaluate_fn is not None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="central-eval")
        if not resumed:
            self.submit(run)

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """Evaluate on schedule."""
        version = run.version
        if version % self.every == 0 or version == run.num_rounds:
            self.submit(run)
        return None

    def on_poll(self, run: RunView) -> Stop | None:
        """Record the evaluations that finished, in version order."""
        self._collect(run, wait=False)
        return None

    def on_flush(self, run: RunView, final: bool) -> None:
        """Record every evaluation submitted (at the end: the final model's too)."""
        if final and self._last_version != run.version:
            self.submit(run)
        self._collect(run, wait=True)

    def on_stop(self, run: RunView) -> None:
        """Stop the background thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def submit(self, run: RunView) -> None:
        """Evaluate the current global model (in the background if enabled)."""
        version = run.version
        self._last_version = version
        future: Future[tuple[MetricRecord | None, float]]
        if self._executor is not None:
            # Arrays decoded without ast (thread-safe on CPython 3.11), see
            # afl_flwr.replies.ViewedArray.
            arrays = without_header_parsing(run.model.record())
            future = self._executor.submit(self._evaluate, version, arrays)
        else:
            future = Future()
            future.set_result(self._evaluate(version, run.model.record()))
        self._queue.append(
            _Pending(
                version=version,
                wall_time=run.clock.wall(),
                sim_time=run.clock.now(),
                client_updates=run.state.merged_updates,
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
            point = EvalPoint(
                version=pending.version,
                wall_time=pending.wall_time,
                sim_time=pending.sim_time,
                client_updates=pending.client_updates,
                metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
                eval_seconds=seconds,
            )
            run.state.record_evaluation(CENTRAL, point, metrics)
