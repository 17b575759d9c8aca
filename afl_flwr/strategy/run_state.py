"""The state of one run, and its only writer.

:class:`RunState` owns the run's :class:`~afl_flwr.history.RunHistory` (one
event per task outcome, one point per evaluation), the Flower ``Result`` being
filled, the failure streak, the updates admitted but not yet merged, the
staleness each node's last update had, and the stop reason. The loop and the
callbacks ask it to record; callbacks read it.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Result

from afl_flwr.constants import TRAIN_LOSS
from afl_flwr.history import (
    CENTRAL,
    FEDERATED,
    MERGED,
    PENDING,
    REJECTED,
    STATUSES,
    EvalPoint,
    Evaluation,
    RunHistory,
    UpdateEvent,
)
from afl_flwr.replies import TrainReply

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]


class RunAbortedError(RuntimeError):
    """The run cannot make progress: too many tasks failed in a row.

    The message names the failures' most recent reason and how they were
    counted; the strategy's ``history`` still records everything that happened.
    """


@dataclass
class RunState:
    """The run's history, counters and result; every write goes through here.

    Parameters
    ----------
    num_rounds : int
        Versions the run is to reach.
    result : Result
        Flower's ``Result``, filled as FedAvg fills it.
    max_consecutive_failures : int
        Failed tasks in a row (no update admitted in between) that end the run
        with :class:`RunAbortedError`.
    weighted_by_key : str (default: "num-examples")
        The metric holding a client's example count.
    """

    num_rounds: int
    result: Result
    max_consecutive_failures: int
    weighted_by_key: str = "num-examples"
    history: RunHistory = field(default_factory=RunHistory)
    last_staleness: dict[int, int] = field(default_factory=dict)
    failures_in_row: int = 0
    last_failure: str = ""
    failed: bool = False
    _waiting: list[tuple[UpdateEvent, TrainReply]] = field(default_factory=list)
    _unannounced: list[Evaluation] = field(default_factory=list)

    # -------------------------------------------------------------- reads
    @property
    def stop_reason(self) -> str:
        """Why the run stopped early ("" while running or when it completed)."""
        return self.history.stop_reason

    @property
    def merged_updates(self) -> int:
        """Client updates merged into the global model so far."""
        return sum(1 for e in self.history.events if e.merged_into is not None)

    def waiting(self) -> list[UpdateEvent]:
        """Events of admitted updates not merged yet (in the buffer)."""
        return [event for event, _ in self._waiting]

    # ------------------------------------------------------------- writes
    # pylint: disable=too-many-arguments
    def record(
        self,
        *,
        version: int,
        node_id: int,
        client: int,
        status: str,
        base_version: int | None,
        wall_time: float,
        sim_time: float,
        sim_duration: float = 0.0,
        staleness: int | None = None,
        weight: float = 0.0,
        reason: str = "",
        reply: TrainReply | None = None,
        merged_into: int | None = None,
    ) -> UpdateEvent:
        """Record what became of one task and return the event."""
        event = UpdateEvent(
            version=version,
            node_id=node_id,
            client=client,
            status=status,
            base_version=base_version,
            staleness=staleness,
            weight=weight,
            num_examples=reply.num_examples if reply else 0.0,
            train_loss=train_loss(reply.metrics) if reply else None,
            wall_time=wall_time,
            sim_time=sim_time,
            reason=reason,
            merged_into=merged_into,
            sim_duration=sim_duration,
        )
        self.history.events.append(event)
        return event

    def record_unknown_reply(
        self,
        *,
        version: int,
        node_id: int,
        client: int,
        reply_to: str,
        wall: float,
        sim: float,
    ) -> None:
        """A reply to a message that is not, or no longer, ours (logged)."""
        reason = f"reply to unknown or already handled message '{reply_to}'"
        log(WARNING, "Rejected reply from node %s: %s", node_id, reason)
        self.record(
            version=version,
            node_id=node_id,
            client=client,
            status=REJECTED,
            base_version=None,
            wall_time=wall,
            sim_time=sim,
            reason=reason,
        )

    def dispatched(self, wall: float) -> None:
        """Tasks were sent; the first time, note the wall time to it."""
        if not self.history.first_dispatch_wall:
            self.history.first_dispatch_wall = wall

    def admitted(self, event: UpdateEvent, reply: TrainReply, node_id: int) -> None:
        """An update was admitted (it waits for its merge); the streak ends."""
        self.failures_in_row = 0
        self.last_staleness[node_id] = event.staleness or 0
        self._waiting.append((event, reply))

    def task_failed(self, node_id: int, reason: str) -> None:
        """A task failed; raise :class:`RunAbortedError` once the streak is too long."""
        self.failures_in_row += 1
        self.last_failure = f"node {node_id}: {reason}"
        if self.failures_in_row < self.max_consecutive_failures:
            return
        counts: dict[str, int] = {}
        for event in self.history.events[-self.failures_in_row :]:
            counts[event.status] = counts.get(event.status, 0) + 1
        message = (
            f"{self.failures_in_row} tasks failed in a row with no update admitted "
            f"({counts}); last failure: {self.last_failure}. Check the ClientApp's "
            f"logs; max_consecutive_failures={self.max_consecutive_failures} ends "
            "such runs"
        )
        self.history.stop_reason = message
        self.failed = True
        raise RunAbortedError(message)

    def merged(self, version: int, aggr_fn: MetricsAggrFn) -> list[UpdateEvent]:
        """The waiting updates entered ``version``; aggregate their train metrics."""
        merged, self._waiting = self._waiting, []
        for event, _ in merged:
            event.merged_into = version
        self.result.train_metrics_clientapp[version] = aggr_fn(
            [metric_content(r, self.weighted_by_key) for _, r in merged],
            self.weighted_by_key,
        )
        return [event for event, _ in merged]

    def record_evaluation(
        self, kind: str, point: EvalPoint, metrics: MetricRecord | None
    ) -> None:
        """Record an evaluation (central or federated) and queue it for callbacks."""
        if kind == CENTRAL:
            if metrics is not None:
                self.result.evaluate_metrics_serverapp[point.version] = metrics
            self.history.evals.append(point)
        else:
            if metrics is not None:
                self.result.evaluate_metrics_clientapp[point.version] = metrics
            self.history.federated.append(point)
        if metrics is not None:
            self._unannounced.append(Evaluation(kind, point))

    def record_privacy(self, version: int, epsilon: float) -> None:
        """Epsilon spent after ``version``'s release (DP runs)."""
        self.history.privacy.append((version, epsilon))

    def take_evaluations(self) -> list[Evaluation]:
        """Evaluations recorded since the last call (for callbacks)."""
        taken, self._unannounced = self._unannounced, []
        return taken

    def stop(self, reason: str, *, failed: bool = False) -> None:
        """End the run early for ``reason`` (logged); ``failed``: it cannot go on."""
        log(INFO, "Stopping: %s", reason)
        self.history.stop_reason = reason
        self.failed = failed

    def finish(self, abandoned: int) -> None:
        """The run ended: tasks in flight are abandoned, waiting updates pending."""
        self.history.abandoned = abandoned
        if abandoned:
            log(INFO, "%d task(s) still in flight are abandoned", abandoned)
        if self._waiting:
            log(INFO, "%d buffered update(s) not merged at stop", len(self._waiting))
        for event, _ in self._waiting:
            event.status = PENDING
            event.reason = "run ended before the buffer was merged"
        self._waiting = []

    # ---------------------------------------------------------- checkpoints
    def get_state(self) -> dict[str, Any]:
        """JSON-ready state for checkpoints."""
        return {
            "last_staleness": {str(k): v for k, v in self.last_staleness.items()},
            "history": self.history.to_dict(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`."""
        self.last_staleness = {
            int(k): int(v) for k, v in state["last_staleness"].items()
        }
        self.history = RunHistory.from_dict(state["history"])

    def log_final(self, version: int, sim: float, wall: float) -> None:
        """One summary line (status counts, staleness, times), then the Result."""
        counts = dict.fromkeys(STATUSES, 0)
        for event in self.history.events:
            counts[event.status] += 1
        taus = self.history.staleness_values()
        log(
            INFO,
            "Finished: %d versions, updates %s, mean staleness %.2f (max %d), "
            "sim %.1fs, wall %.1fs",
            version,
            counts,
            float(np.mean(taus)) if taus else 0.0,
            max(taus) if taus else 0,
            sim,
            wall,
        )
        for line in io.StringIO(str(self.result)):
            log(INFO, "\t%s", line.strip("\n"))


def metric_content(reply: TrainReply, weighted_by_key: str) -> RecordDict:
    """A RecordDict with just the reply's metrics, for Flower's metric aggregation."""
    metrics = MetricRecord(
        {
            k: v
            for k, v in reply.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    metrics[weighted_by_key] = reply.num_examples
    return RecordDict({"metrics": metrics})


def train_loss(metrics: MetricRecord) -> float | None:
    """The ``train-loss`` metric, if a number."""
    value = metrics.get(TRAIN_LOSS)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


__all__ = [
    "CENTRAL",
    "FEDERATED",
    "MERGED",
    "Evaluation",
    "RunAbortedError",
    "RunState",
    "metric_content",
    "train_loss",
]
