"""Flower's synchronous round interface, on the same aggregation rule.

For callers that drive the asynchronous strategy through Flower's round loop
(``Strategy.start`` of a wrapper such as Flower's differential-privacy wrappers,
or a custom workflow). Every update then starts from the round's model
(staleness 0), so the run is synchronous; it is logged once.
:class:`SynchronousRounds` is a separate object built from the strategy's
parts, and calls only their public methods.
"""

from collections.abc import Callable, Iterable
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
from afl_flwr.clock import Clock
from afl_flwr.constants import BASE_VERSION, CLIENT_DELAY, SERVER_ROUND
from afl_flwr.model_state import StateKeys, state_names
from afl_flwr.replies import (
    TrainReply,
    arrayrecord_to_params,
    model_spec,
    params_to_arrayrecord,
)
from afl_flwr.selection import NodeSelector
from afl_flwr.strategy.admission import Refusal, admit
from afl_flwr.strategy.run_state import MetricsAggrFn, metric_content


class SynchronousRounds:
    """``configure_*`` / ``aggregate_*`` of Flower's ``Strategy`` over one rule.

    Parameters
    ----------
    aggregator : Aggregator
        The rule; every reply of a round is an update of staleness 0 against
        the round's model.
    selector : NodeSelector
        Picks each round's nodes.
    clock : Clock
        Orders the nodes (``sort_key``) before they are picked.
    round_size : callable
        ``num_connected_nodes -> nodes per round``.
    state_keys : StateKeys, optional
        Which arrays are state (see :mod:`afl_flwr.model_state`).
    max_reply_bytes : int, optional
        Reject replies whose arrays exceed this size.
    weighted_by_key, arrayrecord_key, configrecord_key : str
        Record keys, as Flower's FedAvg.
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : MetricsAggrFn
        Metric aggregation of train and evaluate replies.
    name : str
        The rule's name, for the log line.
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        *,
        aggregator: Aggregator,
        selector: NodeSelector,
        clock: Clock,
        round_size: Callable[[int], int],
        state_keys: StateKeys | None,
        max_reply_bytes: int | None,
        weighted_by_key: str,
        arrayrecord_key: str,
        configrecord_key: str,
        train_metrics_aggr_fn: MetricsAggrFn,
        evaluate_metrics_aggr_fn: MetricsAggrFn,
        name: str,
    ) -> None:
        self.aggregator = aggregator
        self.selector = selector
        self.clock = clock
        self.round_size = round_size
        self.state_keys = state_keys
        self.max_reply_bytes = max_reply_bytes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn
        self.name = name
        self.last_staleness: dict[int, int] = {}
        self._round: int | None = None
        self._base: dict | None = None
        self._population = 0
        self._warned = False

    def _warn_synchronous(self, caller: str) -> None:
        if not self._warned:
            self._warned = True
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
                self.name,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select a round's nodes and send them the global model."""
        self._warn_synchronous("configure_train")
        # Read-only views of the caller's arrays: no rule writes what it merges.
        self._base = arrayrecord_to_params(arrays)
        self.aggregator.bind_state(state_names(self._base, self.state_keys))
        self._round = server_round
        nodes = list(grid.get_node_ids())
        self._population = len(nodes)
        chosen = self._sample(nodes)
        config[SERVER_ROUND] = server_round
        config[BASE_VERSION] = server_round - 1
        messages = []
        for node in chosen:
            node_config = ConfigRecord(dict(config))
            node_config[CLIENT_DELAY] = self.last_staleness.get(node, 0)
            record = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: node_config}
            )
            messages.append(
                Message(record, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        return messages

    def _sample(self, node_ids: list[int]) -> list[int]:
        nodes = sorted(node_ids, key=self.clock.sort_key)
        chosen: list[int] = []
        while len(chosen) < self.round_size(len(nodes)):
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
        if self._round != server_round or self._base is None:
            raise AggregationError(
                f"aggregate_train(server_round={server_round}) needs "
                f"configure_train for that round first (last configured: "
                f"{self._round})"
            )
        self._round = None
        round_base, self._base = self._base, None
        spec = model_spec(round_base)
        accepted: list[TrainReply] = []
        current = round_base
        for reply in replies:
            admitted = admit(
                reply,
                staleness=0,
                spec=spec,
                timeout=0.0,
                weighted_by_key=self.weighted_by_key,
                max_bytes=self.max_reply_bytes,
            )
            node = reply.metadata.src_node_id
            if isinstance(admitted, Refusal):
                log(WARNING, "Node %s: %s (%s)", node, admitted.status, admitted.reason)
                continue
            self.last_staleness[node] = 0
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
                self.aggregator.observe_population(self._population)
                current = self.aggregator.merge(current)
        if not accepted:
            return None, None
        if self.aggregator.pending():
            self.aggregator.observe_population(self._population)
            current = self.aggregator.merge(current)
        metrics = self.train_metrics_aggr_fn(
            [metric_content(r, self.weighted_by_key) for r in accepted],
            self.weighted_by_key,
        )
        return params_to_arrayrecord(current), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to a round's nodes for federated evaluation."""
        config[SERVER_ROUND] = server_round
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        return [
            Message(record, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in self._sample(list(grid.get_node_ids()))
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
