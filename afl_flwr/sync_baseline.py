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
from collections.abc import Callable, Iterable, Sequence
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
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from afl_flwr.clock import Clock, TaskTiming, WallClock, reported_steps
from afl_flwr.constants import NUM_EXAMPLES, TASK_SEED
from afl_flwr.history import CENTRAL, MERGED, REJECTED, EvalPoint, RunHistory
from afl_flwr.replies import TrainReply
from afl_flwr.selection import NodeSelector, make_selector
from afl_flwr.strategy.run_state import RunState

try:
    from flwr.serverapp.exception import PrivacyBudgetExhausted
except ImportError:  # pragma: no cover - Flower 1.40/1.41 have no accounted DP

    class PrivacyBudgetExhausted(Exception):  # type: ignore[no-redef]
        """Never raised: this Flower has no privacy accountant."""


class ClockedFedAvg(FedAvg):
    """Flower's FedAvg with a run history and an optional simulated clock.

    Parameters
    ----------
    clock : Clock, optional (default: None)
        A :class:`~afl_flwr.clock.VirtualClock` charges each round the slowest
        selected client's simulated duration; ``None`` (a ``WallClock``) uses
        wall time.
    eval_every : int (default: 1)
        Run the central evaluation every this many rounds (and at the last).
    seed : int (default: 0)
        Base of the per-round ``task-seed`` sent to clients, and seed of the
        selector.
    selection : str, optional (default: None)
        ``"without-replacement"`` or ``"with-replacement"``: draw each round's
        nodes one by one with :func:`~afl_flwr.selection.make_selector` over the
        nodes in a stable order (the clock's ``sort_key``), as the
        asynchronous strategy does. ``None`` keeps Flower's sampler
        (``random.sample`` over the grid's node ids).
    **kwargs
        Passed to ``FedAvg``.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
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
        self.clock: Clock = clock if clock is not None else WallClock()
        self.eval_every = eval_every
        self.seed = seed
        self.state = _round_state(0)
        self._round = 0
        self.latest_arrays: ArrayRecord | None = None
        self._timings: dict[int, TaskTiming] = {}
        self._durations: dict[int, float] = {}

    @property
    def history(self) -> RunHistory:
        """Everything the current (or last) run recorded."""
        return self.state.history

    @property
    def sim_time(self) -> float:
        """The run's time: the rounds' charged durations, or wall time."""
        return self.clock.now()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling (or the selector's), plus the round's duration."""
        self._round = server_round
        self.latest_arrays = arrays
        config[TASK_SEED] = self.seed * 100_003 + server_round
        if self.selector is None:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            messages = self._selected_messages(server_round, arrays, config, grid)
        self.clock.register(grid, grid.get_node_ids())
        self._timings = {}
        for message in messages:
            node = message.metadata.dst_node_id
            timing = self.clock.plan(node)
            if timing is not None:
                self._timings[node] = timing
        return messages

    def select_nodes(self, grid: Grid) -> list[int]:
        """Nodes of the next round, drawn by the selector (FedAvg's sample size)."""
        assert self.selector is not None
        node_ids = list(grid.get_node_ids())
        self.clock.register(grid, node_ids)
        nodes = sorted(node_ids, key=self.clock.sort_key)
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

    def record_round(self, replies: Sequence[Message]) -> None:
        """Charge the round on the clock and record each of its replies.

        Called by the grid :meth:`start` runs on, as the round's replies
        arrive and before any aggregation (``aggregate_train`` stays
        FedAvg's own, as Flower's accounted DP wrappers require).
        """
        server_round = self._round
        # A round lasts as long as its slowest client, each charged the steps it
        # reports (early stopping), as the asynchronous strategy charges them.
        self._durations = {
            reply.metadata.src_node_id: self._timings[
                reply.metadata.src_node_id
            ].charged(reported_steps(reply))
            for reply in replies
            if reply.metadata.src_node_id in self._timings
        }
        self.clock.settle(self.clock.now() + max(self._durations.values(), default=0.0))
        self._timings = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self.clock.label(node)
            common: dict[str, Any] = {
                "version": server_round - 1,
                "node_id": node,
                "client": client,
                "base_version": server_round - 1,
                "staleness": 0,
                "wall_time": self.clock.wall(),
                "sim_time": self.clock.now(),
                "sim_duration": self._durations.get(node, 0.0),
            }
            if reply.has_error():
                self.state.record(
                    status=REJECTED, reason=reply.error.reason or "", **common
                )
                continue
            metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
            examples = float(metrics.get(NUM_EXAMPLES, 0.0))  # type: ignore[arg-type]
            self.state.record(
                status=MERGED,
                merged_into=server_round,
                weight=examples,
                reply=TrainReply(params={}, num_examples=examples, metrics=metrics),
                **common,
            )

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
        *,
        runner: Strategy | None = None,
    ) -> Result:
        """Run Flower's round loop, recording rounds and evaluations with times.

        Parameters
        ----------
        grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, \
evaluate_fn
            As for ``FedAvg.start``.
        runner : Strategy, optional (default: None)
            A Flower wrapper whose ``strategy`` is this one (for example
            ``DifferentialPrivacyServerSideFixedClipping``): its round loop runs
            instead of FedAvg's, on a grid that records each round here. With
            an accountant, epsilon after every round goes into the history, and
            when the next release would pass ``max_epsilon`` the run ends
            cleanly: the result holds the model of the last release and the
            stop reason says "privacy budget exhausted".
        """
        if runner is not None and getattr(runner, "strategy", None) is not self:
            raise ValueError("runner must wrap this strategy (runner.strategy)")
        loop: Callable[..., Result] = (
            runner.start if runner is not None else super().start
        )
        self.state = _round_state(num_rounds)
        self.latest_arrays = initial_arrays
        self.clock.start()
        evaluated: list[int] = []

        def recorded_evaluate(
            server_round: int, arrays: ArrayRecord
        ) -> MetricRecord | None:
            self._record_privacy(runner, server_round)
            if server_round % self.eval_every and server_round != num_rounds:
                return None
            evaluated.append(server_round)
            return self._evaluate(evaluate_fn, server_round, arrays)

        try:
            return loop(
                _RecordingGrid(grid, self),  # type: ignore[arg-type]
                initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=recorded_evaluate,
            )
        except PrivacyBudgetExhausted as exhausted:
            released = self._round - 1
            self.state.stop(f"privacy budget exhausted: {exhausted}")
            result = self.state.result
            result.arrays = self.latest_arrays
            if released > 0 and (not evaluated or evaluated[-1] != released):
                self._evaluate(evaluate_fn, released, result.arrays)
            return result

    def _evaluate(
        self,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        server_round: int,
        arrays: ArrayRecord,
    ) -> MetricRecord | None:
        started = time.time()
        metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
        point = EvalPoint(
            version=server_round,
            wall_time=self.clock.wall(),
            sim_time=self.clock.now(),
            client_updates=self.state.merged_updates,
            metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
            eval_seconds=time.time() - started,
        )
        self.state.record_evaluation(CENTRAL, point, metrics)
        return metrics

    def _record_privacy(self, runner: Strategy | None, server_round: int) -> None:
        spent = getattr(runner, "privacy_spent", lambda: None)()
        if spent is not None and server_round > 0:
            self.state.record_privacy(server_round, float(spent.epsilon))


class _RecordingGrid:
    """A grid that hands each training round's replies to the strategy.

    Everything else is the wrapped grid's own.
    """

    def __init__(self, grid: Grid, strategy: ClockedFedAvg) -> None:
        self._grid = grid
        self._strategy = strategy

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The grid's ``send_and_receive``; a training round is recorded."""
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self._strategy.record_round(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _round_state(num_rounds: int) -> RunState:
    """A run state that records the rounds (FedAvg has no failure streak to end)."""
    return RunState(
        num_rounds=num_rounds, result=Result(), max_consecutive_failures=1 << 62
    )
