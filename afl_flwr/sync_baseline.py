"""The synchronous baseline: Flower's own FedAvg, charged on the same clock.

:class:`ClockedFedAvg` extends ``flwr.serverapp.strategy.FedAvg`` without changing
its aggregation: it only records each round's replies in a :class:`RunHistory`
(the same format as the asynchronous strategy) and, with a
:class:`~afl_flwr.clock.VirtualClock`, charges every round the simulated duration
of its slowest selected client, so AFL and SFL are compared on one clock.
With ``selection`` set it samples each round's nodes with the project's seeded
selector (:mod:`afl_flwr.selection`) instead of Flower's ``random.sample``, so
both protocols pick clients by the same policy.
"""

import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

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
from flwr.serverapp.strategy import FedAvg, Result

from afl_flwr.clock import TaskTiming, VirtualClock
from afl_flwr.constants import NUM_EXAMPLES, TASK_SEED
from afl_flwr.history import MERGED, REJECTED, EvalPoint, RunHistory
from afl_flwr.replies import TrainReply
from afl_flwr.selection import NodeSelector, make_selector
from afl_flwr.strategy.recorder import RunRecorder
from afl_flwr.strategy.scheduler import reported_steps


class ClockedFedAvg(FedAvg):
    """Flower's FedAvg with a run history and an optional simulated clock.

    Parameters
    ----------
    clock : VirtualClock, optional (default: None)
        Charges each round the slowest selected client's simulated duration;
        without it, time is wall time.
    eval_every : int (default: 1)
        Run the central evaluation every this many rounds (and at the last).
    seed : int (default: 0)
        Base of the per-round ``task-seed`` sent to clients, and seed of the
        selector.
    selection : str, optional (default: None)
        ``"without-replacement"`` or ``"with-replacement"``: draw each round's
        nodes one by one with :func:`~afl_flwr.selection.make_selector` over the
        nodes in a stable order (the clock's ``sort_key``, else node id), as the
        asynchronous strategy does. ``None`` keeps Flower's sampler
        (``random.sample`` over the grid's node ids).
    **kwargs
        Passed to ``FedAvg``.
    """

    def __init__(
        self,
        *,
        clock: VirtualClock | None = None,
        eval_every: int = 1,
        seed: int = 0,
        selection: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.selection = selection
        self.selector: NodeSelector | None = (
            make_selector(selection, seed) if selection is not None else None
        )
        self.clock = clock
        self.eval_every = eval_every
        self.seed = seed
        self.recorder = RunRecorder()
        self.sim_time = 0.0
        self._t0 = time.time()
        self._timings: dict[int, TaskTiming] = {}
        self._durations: dict[int, float] = {}

    @property
    def history(self) -> RunHistory:
        """Everything the current (or last) run recorded."""
        return self.recorder.history

    @history.setter
    def history(self, value: RunHistory) -> None:
        self.recorder.history = value

    def _now(self) -> float:
        return self.sim_time if self.clock is not None else time.time() - self._t0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling (or the selector's), plus the round's duration."""
        config[TASK_SEED] = self.seed * 100_003 + server_round
        if self.selector is None:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            messages = self._selected_messages(server_round, arrays, config, grid)
        if self.clock is not None:
            self.clock.register(grid, grid.get_node_ids())
            self._timings = {
                m.metadata.dst_node_id: self.clock.plan(m.metadata.dst_node_id)
                for m in messages
            }
        return messages

    def select_nodes(self, grid: Grid) -> list[int]:
        """Nodes of the next round, drawn by the selector (FedAvg's sample size)."""
        assert self.selector is not None
        node_ids = list(grid.get_node_ids())
        if self.clock is not None:
            self.clock.register(grid, node_ids)
        nodes = sorted(node_ids, key=self.clock.sort_key if self.clock else None)
        size = min(
            max(int(len(nodes) * self.fraction_train), self.min_train_nodes),
            len(nodes),
        )
        chosen: list[int] = []
        while len(chosen) < size:
            node = self.selector.select(nodes, [n for n in nodes if n not in chosen])
            if node is None:  # pragma: no cover - an idle node is always left
                break
            chosen.append(node)
        return chosen

    def _selected_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        if self.fraction_train == 0.0:
            return []
        node_ids = self.select_nodes(grid)
        log(INFO, "configure_train: selected nodes %s", node_ids)
        config["server-round"] = server_round
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        return list(self._construct_messages(record, node_ids, MessageType.TRAIN))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregation, recording every reply in the history."""
        replies = list(replies)
        # A round lasts as long as its slowest client, each charged the steps it
        # reports (early stopping), as the asynchronous strategy charges them.
        self._durations = {
            reply.metadata.src_node_id: self._timings[
                reply.metadata.src_node_id
            ].charged(reported_steps(reply))
            for reply in replies
            if reply.metadata.src_node_id in self._timings
        }
        self.sim_time += max(self._durations.values(), default=0.0)
        self._timings = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self.clock.label(node) if self.clock is not None else node
            common: dict[str, Any] = {
                "version": server_round - 1,
                "node_id": node,
                "client": client,
                "base_version": server_round - 1,
                "staleness": 0,
                "wall_time": time.time() - self._t0,
                "sim_time": self._now(),
                "sim_duration": self._durations.get(node, 0.0),
            }
            if reply.has_error():
                self.recorder.outcome(
                    status=REJECTED, reason=reply.error.reason or "", **common
                )
                continue
            metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
            examples = float(metrics.get(NUM_EXAMPLES, 0.0))  # type: ignore[arg-type]
            self.recorder.outcome(
                status=MERGED,
                merged_into=server_round,
                weight=examples,
                reply=TrainReply(params={}, num_examples=examples, metrics=metrics),
                **common,
            )
        return super().aggregate_train(server_round, replies)

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run Flower's round loop, recording evaluations with their times."""
        self.history = RunHistory()
        self.sim_time = 0.0
        self._t0 = time.time()

        def recorded_evaluate(
            server_round: int, arrays: ArrayRecord
        ) -> MetricRecord | None:
            if server_round % self.eval_every and server_round != num_rounds:
                return None
            started = time.time()
            metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            self.history.evals.append(
                EvalPoint(
                    version=server_round,
                    wall_time=time.time() - self._t0,
                    sim_time=self._now(),
                    client_updates=len(self.history.merged()),
                    metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
                    eval_seconds=time.time() - started,
                )
            )
            return metrics

        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=recorded_evaluate,
        )
