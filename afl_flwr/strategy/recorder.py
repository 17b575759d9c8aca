"""The run recorder: one event per task outcome, the final summary line.

Both the asynchronous strategy and the synchronous baseline
(:class:`~afl_flwr.sync_baseline.ClockedFedAvg`) record through it, so their
histories (and results folders) compare line by line.
"""

import io
from logging import INFO, WARNING

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Result

from afl_flwr.constants import TRAIN_LOSS
from afl_flwr.history import REJECTED, STATUSES, RunHistory, UpdateEvent
from afl_flwr.replies import TrainReply


class RunRecorder:
    """Append :class:`~afl_flwr.history.UpdateEvent` rows to a run history.

    Parameters
    ----------
    history : RunHistory
        Where events go (replaced at each run start).
    """

    def __init__(self, history: RunHistory | None = None) -> None:
        self.history = history or RunHistory()

    # pylint: disable=too-many-arguments
    def outcome(
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

    def unknown_reply(
        self,
        *,
        version: int,
        node_id: int,
        client: int,
        reply_to: str,
        wall: float,
        sim: float,
    ) -> None:
        """Record (and log) a reply to a message that is not, or no longer, ours."""
        reason = f"reply to unknown or already handled message '{reply_to}'"
        log(WARNING, "Rejected reply from node %s: %s", node_id, reason)
        self.outcome(
            version=version,
            node_id=node_id,
            client=client,
            status=REJECTED,
            base_version=None,
            wall_time=wall,
            sim_time=sim,
            reason=reason,
        )

    def log_final(self, version: int, sim: float, wall: float, result: Result) -> None:
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
        for line in io.StringIO(str(result)):
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
