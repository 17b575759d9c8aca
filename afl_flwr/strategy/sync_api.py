"""Flower's synchronous round interface, on the same aggregation rule.

For callers that drive the asynchronous strategy through Flower's round loop
(``Strategy.start`` of a wrapper such as Flower's differential-privacy wrappers,
or a custom workflow). Every update then starts from the round's model
(staleness 0), so the run is synchronous; it is logged once.
"""

from collections.abc import Iterable
from logging import WARNING

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
from flwr.serverapp.exception import AggregationError

from afl_flwr.aggregators import Aggregator, Update
from afl_flwr.clock import VirtualClock
from afl_flwr.constants import BASE_VERSION, CLIENT_DELAY, SERVER_ROUND
from afl_flwr.model_state import StateKeys, state_names
from afl_flwr.replies import TrainReply, arrayrecord_to_params, params_to_arrayrecord
from afl_flwr.selection import NodeSelector
from afl_flwr.strategy.admission import Refusal, admit
from afl_flwr.strategy.hooks import MetricsAggrFn
from afl_flwr.strategy.model_store import ModelStore
from afl_flwr.strategy.recorder import metric_content


class SynchronousInterface:
    """``configure_*`` / ``aggregate_*`` of Flower's ``Strategy``, for the mixin's host.

    The host (:class:`~afl_flwr.strategy.StalenessAwareAsyncStrategy`) provides
    the attributes annotated below.
    """

    aggregator: Aggregator
    aggregation: str
    store: ModelStore
    selector: NodeSelector
    clock: VirtualClock | None
    concurrency: int
    max_reply_bytes: int | None
    state_keys: StateKeys | None
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str
    train_metrics_aggr_fn: MetricsAggrFn
    evaluate_metrics_aggr_fn: MetricsAggrFn
    _last_staleness: dict[int, int]
    _sync_round: int | None
    _sync_population: int
    _warned_sync: bool

    @property
    def version(self) -> int:
        """The current global version."""
        return self.store.version

    def _warn_synchronous(self, caller: str) -> None:
        if not self._warned_sync:
            self._warned_sync = True
            log(
                WARNING,
                "%s: StalenessAwareAsyncStrategy is being driven by Flower's "
                "synchronous round loop (a strategy wrapper such as Flower's "
                "differential-privacy wrappers, or a custom workflow). Every round "
                "waits for its slowest node and every update has staleness 0, so "
                "this run is synchronous %s. Call start() on the strategy itself "
                "for asynchronous training; use client-side mods (e.g. "
                "fixedclipping_mod) to combine it with clipping or DP.",
                caller,
                self.aggregation,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select ``concurrency`` nodes and send them the global model.

        For callers that drive this strategy through Flower's round loop; the
        run is then synchronous (logged once).
        """
        self._warn_synchronous("configure_train")
        # Read-only views of the caller's arrays: no rule writes what it merges.
        self.store.reset(arrayrecord_to_params(arrays), server_round - 1)
        self.aggregator.bind_state(state_names(self.store.params, self.state_keys))
        self._sync_round = server_round
        self._sync_population = len(list(grid.get_node_ids()))
        chosen = self._sample(grid)
        config[SERVER_ROUND] = server_round
        config[BASE_VERSION] = self.version
        messages = []
        for node in chosen:
            node_config = ConfigRecord(dict(config))
            node_config[CLIENT_DELAY] = self._last_staleness.get(node, 0)
            record = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: node_config}
            )
            messages.append(
                Message(record, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        return messages

    def _sample(self, grid: Grid) -> list[int]:
        key = self.clock.sort_key if self.clock is not None else None
        nodes = sorted(grid.get_node_ids(), key=key)
        chosen: list[int] = []
        while len(chosen) < self.concurrency:
            node = self.selector.select(nodes, [n for n in nodes if n not in chosen])
            if node is None:
                break
            chosen.append(node)
        return chosen

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate one round's replies with the same aggregation rule.

        Every reply started from this round's model (staleness 0), so the
        staleness function has no effect here. Every update's base is that
        model, also for the replies merged after a first merge within the round
        (a buffer smaller than the round); what is left in the buffer is merged
        at the end of the round, whatever ``K``.

        Raises
        ------
        AggregationError
            When called without a matching :meth:`configure_train`.
        """
        if self._sync_round != server_round:
            raise AggregationError(
                f"aggregate_train(server_round={server_round}) needs "
                f"configure_train for that round first (last configured: "
                f"{self._sync_round})"
            )
        self._sync_round = None
        accepted: list[TrainReply] = []
        round_base = self.store.params
        current = round_base
        for reply in replies:
            admitted = admit(
                reply,
                staleness=0,
                spec=self.store.spec,
                timeout=0.0,
                weighted_by_key=self.weighted_by_key,
                max_bytes=self.max_reply_bytes,
            )
            node = reply.metadata.src_node_id
            if isinstance(admitted, Refusal):
                log(WARNING, "Node %s: %s (%s)", node, admitted.status, admitted.reason)
                continue
            self._last_staleness[node] = 0
            accepted.append(admitted)
            update = Update(
                client=node,
                params=admitted.params,
                base=round_base,
                base_version=server_round - 1,
                staleness=0,
                num_examples=admitted.num_examples,
                metrics=admitted.metrics,
            )
            if self.aggregator.add(update):
                self.aggregator.observe_population(self._sync_population)
                current = self.aggregator.merge(current)
        if not accepted:
            return None, None
        if self.aggregator.pending():
            self.aggregator.observe_population(self._sync_population)
            current = self.aggregator.merge(current)
        metrics = self.train_metrics_aggr_fn(
            [metric_content(r, self.weighted_by_key) for r in accepted],
            self.weighted_by_key,
        )
        return params_to_arrayrecord(current), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to ``concurrency`` nodes for federated evaluation."""
        config[SERVER_ROUND] = server_round
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        return [
            Message(record, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in self._sample(grid)
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted average of the evaluation metrics of valid replies."""
        contents = []
        for reply in replies:
            if reply.has_error() or len(reply.content.metric_records) != 1:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            weight = metrics.get(self.weighted_by_key)
            if isinstance(weight, int | float) and weight > 0:
                contents.append(reply.content)
        if not contents:
            return None
        return self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)
