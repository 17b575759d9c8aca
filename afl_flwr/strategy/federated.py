"""Federated evaluation: the global model evaluated on the clients, asynchronously.

At every ``every``-th version (and the last) the global model goes to
``max(min_nodes, ceil(fraction * N))`` nodes as evaluate tasks of the
:class:`~afl_flwr.strategy.scheduler.Scheduler` (idle nodes first), beside
training. Their replies come back as outcomes; a version is closed once all its
replies are in, or ``timeout`` seconds after it was sent, and the valid replies
are aggregated with ``aggr_fn`` into ``Result.evaluate_metrics_clientapp``.
"""

import math
import time
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from afl_flwr.constants import SERVER_ROUND
from afl_flwr.history import FEDERATED, EvalPoint
from afl_flwr.strategy.model_store import ModelStore
from afl_flwr.strategy.run_state import MetricsAggrFn, RunState
from afl_flwr.strategy.scheduler import Outcome, Scheduler


class FederatedEvaluation:
    """Send, collect and aggregate federated evaluations of the global model.

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
        self._replies: dict[int, list[Message]] = {}
        self._asked: dict[int, tuple[int, float]] = {}  # version -> (count, wall)
        self._last_sent = -1

    @property
    def enabled(self) -> bool:
        """Whether any node is asked."""
        return self.fraction > 0

    @property
    def open_versions(self) -> int:
        """Versions whose replies are still awaited."""
        return len(self._asked)

    def due(self, version: int, num_rounds: int) -> bool:
        """Whether ``version`` is evaluated on schedule."""
        return version % self.every == 0 or version == num_rounds

    def send(self, grid: Grid, store: ModelStore, scheduler: Scheduler) -> None:
        """Ask a sample of nodes, idle ones first, to evaluate the current model."""
        version = store.version
        self._last_sent = version
        nodes = list(scheduler.nodes)
        if not self.enabled or not nodes:
            return
        count = min(
            len(nodes), max(self.min_nodes, math.ceil(self.fraction * len(nodes)))
        )
        busy = scheduler.busy_nodes()
        order = [nodes[i] for i in self.rng.permutation(len(nodes))]
        chosen = sorted(order, key=lambda n: n in busy)[:count]
        config = ConfigRecord(dict(self.config))
        config[SERVER_ROUND] = version
        content = RecordDict(
            {self.arrayrecord_key: store.record(), self.configrecord_key: config}
        )

        def message_for(node: int) -> tuple[Message, int]:
            message = Message(
                content,
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                ttl=self.timeout,
                group_id=str(version),
            )
            return message, version

        sent = scheduler.evaluate(grid, chosen, message_for)
        if sent:
            self._asked[version] = (len(sent), time.time())

    def add(self, outcome: Outcome, state: RunState, scheduler: Scheduler) -> None:
        """Take one evaluate outcome; close its version when complete."""
        version = outcome.task.version
        if outcome.reply is not None:
            self._replies.setdefault(version, []).append(outcome.reply)
        self.close_ready(state, scheduler)

    def close_ready(
        self, state: RunState, scheduler: Scheduler, *, force: bool = False
    ) -> None:
        """Close versions that are complete, timed out, or (``force``) all."""
        now = time.time()
        pending = {
            t.version for t in scheduler.in_flight.values() if t.kind == "evaluate"
        }
        for version, (_, sent) in sorted(self._asked.items()):
            if force or version not in pending or now - sent > self.timeout:
                self._close(version, state, scheduler)

    def final(self, grid: Grid, store: ModelStore, scheduler: Scheduler) -> None:
        """Evaluate the final version if the schedule did not."""
        if self.enabled and self._last_sent != store.version:
            self.send(grid, store, scheduler)

    def _close(self, version: int, state: RunState, scheduler: Scheduler) -> None:
        self._asked.pop(version, None)
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
        metrics: MetricRecord = self.aggr_fn(contents, self.weighted_by_key)
        point = EvalPoint(
            version=version,
            wall_time=scheduler.clock.wall(),
            sim_time=scheduler.clock.now(),
            client_updates=state.merged_updates,
            metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
        )
        state.record_evaluation(FEDERATED, point, metrics)


def _positive_weight(reply: Message, key: str) -> bool:
    metrics = next(iter(reply.content.metric_records.values()))
    weight = metrics.get(key)
    return (
        isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0
    )
