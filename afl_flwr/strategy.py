"""The asynchronous, staleness-aware Flower strategy."""

import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    log_strategy_start_info,
)

from afl_flwr.aggregation import Params, buffered_update, mix_immediate, staleness
from afl_flwr.checkpoint import load_checkpoint, save_checkpoint
from afl_flwr.clock import VirtualClock
from afl_flwr.constants import BASE_VERSION, CLIENT_DELAY, SERVER_ROUND, TASK_SEED
from afl_flwr.history import (
    DROPPED,
    MERGED,
    PENDING,
    REJECTED,
    STATUSES,
    TIMEOUT,
    EvalPoint,
    RunHistory,
    UpdateEvent,
)
from afl_flwr.replies import (
    RejectedReply,
    TrainReply,
    arrayrecord_to_params,
    model_spec,
    params_to_arrayrecord,
    parse_train_reply,
)
from afl_flwr.selection import make_selector
from afl_flwr.staleness import make_staleness_fn

AGGREGATIONS = ("buffered", "immediate")
# Error codes the SuperLink puts in replies it makes up for tasks that expired
# (TTL) or whose node is offline.
UNAVAILABLE_CODES = (
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
)
# Seconds between node-list refreshes while tasks are in flight (each refresh is
# a SuperLink round trip in a deployment).
NODE_REFRESH_S = 1.0


@dataclass
class _Task:
    """A dispatched training task awaiting its reply."""

    node_id: int
    base_version: int
    sent_wall: float
    sim_finish: float
    seq: int
    sim_duration: float = 0.0


@dataclass
class _Buffered:
    """A validated update waiting in the buffer for the next flush."""

    reply: TrainReply
    base_version: int
    weight: float
    event: UpdateEvent | None = None


# pylint: disable=too-many-instance-attributes
class StalenessAwareAsyncStrategy(Strategy):
    """Asynchronous federated learning with staleness-aware aggregation.

    Keeps ``concurrency`` nodes busy; whenever a reply arrives it is merged into
    the global model at once (``aggregation="immediate"``, FedAsync, Xie et al.
    2019) or buffered until ``buffer_size`` updates are in (``"buffered"``,
    FedBuff, Nguyen et al. 2022; the paper's weighted average), and the freed node
    slot immediately receives fresh work. An update's staleness ``tau`` is the
    number of global versions merged since the version it started from, measured
    on the server from the reply's ``reply_to_message_id``, so any ClientApp works
    unchanged. Updates are weighted by ``s(tau)``; those with ``tau > max_staleness``
    are dropped (the paper's bounded-staleness Assumption 3).

    Immediate: ``x <- (1 - a s(tau)) x + a s(tau) x_i``.
    Buffered: ``x <- x + eta_g sum_i w_i (x_i - x_base_i) / sum_i w_i`` with
    ``w_i = n_i s(tau_i)``; with ``buffer_size = concurrency``, ``eta_g = 1`` and
    zero staleness this equals FedAvg.

    Parameters
    ----------
    concurrency : int (default: 5)
        Nodes kept busy at once (the paper's "clients per round"). Above the
        number of connected nodes, every node is kept busy.
    aggregation : str (default: "buffered")
        ``"buffered"`` or ``"immediate"``.
    buffer_size : int, optional (default: None)
        Updates per buffered merge ``K``; ``None`` means ``concurrency``.
    server_lr : float (default: 1.0)
        Server learning rate ``eta_g`` of the buffered merge.
    mixing_rate : float (default: 0.5)
        ``a`` of the immediate merge, in ``(0, 1]``.
    staleness_fn : str (default: "polynomial")
        One of ``constant``, ``polynomial``, ``hinge``, ``exponential``,
        ``inverse`` (see :mod:`afl_flwr.staleness`).
    staleness_a : float (default: 0.5)
        Parameter ``a`` of the staleness function.
    staleness_b : float (default: 4.0)
        Parameter ``b`` of the staleness function.
    max_staleness : int, optional (default: None)
        ``tau_max``; staler updates are dropped. ``None`` means unbounded.
    selection : str (default: "without-replacement")
        ``"with-replacement"`` or ``"without-replacement"`` client selection.
    seed : int (default: 0)
        Seed of client selection and of the per-task seeds sent to clients.
    clock : VirtualClock, optional (default: None)
        With a clock, replies are merged in simulated-finish order (reproducible);
        without, in arrival order and time is wall time.
    eval_every : int (default: 1)
        Run ``evaluate_fn`` every this many global versions (and at the end).
    max_time : float, optional (default: None)
        Time budget in seconds (simulated with a clock, else wall); stops the run
        when exceeded, even before ``num_rounds`` versions.
    max_reply_bytes : int, optional (default: None)
        Reject replies whose arrays exceed this size.
    checkpoint_every : int (default: 0)
        Write a checkpoint (weights, version, RNG state, history) to
        ``checkpoint_path`` every this many versions; 0 disables it.
    checkpoint_path : str or Path, optional (default: None)
        Checkpoint file, written atomically (see :mod:`afl_flwr.checkpoint`).
    distinct_buffer : bool (default: True)
        Buffered mode: a node whose update waits in the buffer gets no new task
        until the buffer is merged, so every merge holds K distinct clients, as a
        FedAvg round does. False keeps every idle node eligible.
    weighted_by_key : str (default: "num-examples")
        Metric holding a client's example count ``n_i``.
    arrayrecord_key : str (default: "arrays")
        Key of the ArrayRecord in messages.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages.
    train_metrics_aggr_fn : callable, optional (default: None)
        ``(list[RecordDict], str) -> MetricRecord`` for client train metrics;
        defaults to Flower's weighted ``aggregate_metricrecords``.
    evaluate_metrics_aggr_fn : callable, optional (default: None)
        Same for federated evaluation replies.
    poll_interval : float (default: 0.02)
        Seconds between polls of the Grid when no reply is ready.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
        concurrency: int = 5,
        aggregation: str = "buffered",
        buffer_size: int | None = None,
        server_lr: float = 1.0,
        mixing_rate: float = 0.5,
        staleness_fn: str = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        max_staleness: int | None = None,
        selection: str = "without-replacement",
        seed: int = 0,
        clock: VirtualClock | None = None,
        eval_every: int = 1,
        max_time: float | None = None,
        max_reply_bytes: int | None = None,
        checkpoint_every: int = 0,
        checkpoint_path: str | Path | None = None,
        distinct_buffer: bool = True,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: (
            Callable[[list[RecordDict], str], MetricRecord] | None
        ) = None,
        evaluate_metrics_aggr_fn: (
            Callable[[list[RecordDict], str], MetricRecord] | None
        ) = None,
        poll_interval: float = 0.02,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation='{aggregation}' is unknown; allowed: "
                f"{', '.join(AGGREGATIONS)}"
            )
        if buffer_size is not None and buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be >= 1 (K)")
        if not server_lr > 0:
            raise ValueError(f"server_lr={server_lr} must be > 0 (eta_g)")
        if not 0 < mixing_rate <= 1:
            raise ValueError(f"mixing_rate={mixing_rate} must be in (0, 1]")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness} must be >= 0 (tau_max)")
        if eval_every < 1:
            raise ValueError(f"eval_every={eval_every} must be >= 1")
        if max_time is not None and not max_time > 0:
            raise ValueError(f"max_time={max_time} must be > 0")
        if checkpoint_every < 0 or (checkpoint_every and checkpoint_path is None):
            raise ValueError(
                f"checkpoint_every={checkpoint_every} must be >= 0, and > 0 needs a "
                "checkpoint_path"
            )
        self.concurrency = concurrency
        self.aggregation = aggregation
        self.buffer_size = buffer_size or concurrency
        self.server_lr = server_lr
        self.mixing_rate = mixing_rate
        self.staleness_name = staleness_fn
        self.staleness_fn = make_staleness_fn(staleness_fn, staleness_a, staleness_b)
        self.staleness_a = staleness_a
        self.staleness_b = staleness_b
        self.max_staleness = max_staleness
        self.selection = selection
        self.selector = make_selector(selection, seed)
        self.seed = seed
        self.clock = clock
        self.eval_every = eval_every
        self.max_time = max_time
        self.max_reply_bytes = max_reply_bytes
        self.checkpoint_every = checkpoint_every
        self.distinct_buffer = distinct_buffer
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self._resume: tuple[Params, dict[str, Any]] | None = None
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_metricrecords
        self.evaluate_metrics_aggr_fn = (
            evaluate_metrics_aggr_fn or aggregate_metricrecords
        )
        self.poll_interval = poll_interval
        self.history = RunHistory()
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.version = 0
        self._params: Params = {}
        self._spec: dict = {}
        self._record: ArrayRecord | None = None
        self._record_version = -1
        self._bases: dict[int, Params] = {}
        self._in_flight: dict[str, _Task] = {}
        self._arrived: dict[str, Message] = {}
        self._buffer: list[_Buffered] = []
        self._last_staleness: dict[int, int] = {}
        self._known_nodes: set[int] = set()
        self._seq = 0
        self._sim_now = 0.0
        self._t0 = time.time()
        self._sync_tasks: dict[int, tuple[Message, int]] = {}
        self._logged_capacity = False
        self._last_refresh = 0.0

    def _set_global(self, params: Params) -> None:
        self._params = params
        self._spec = model_spec(params)

    def _global_record(self) -> ArrayRecord:
        """The global model as an ArrayRecord, serialised once per version."""
        if self._record_version != self.version or self._record is None:
            self._record = params_to_arrayrecord(self._params)
            self._record_version = self.version
        return self._record

    def _now_sim(self) -> float:
        return self._sim_now if self.clock is not None else time.time() - self._t0

    def _label(self, node_id: int) -> int:
        return self.clock.label(node_id) if self.clock is not None else node_id

    def _sort_key(self, node_id: int) -> tuple[int, int]:
        return self.clock.sort_key(node_id) if self.clock is not None else (0, node_id)

    # ------------------------------------------------------------ checkpoints
    def resume_from(self, path: str | Path) -> int:
        """Load a checkpoint; the next :meth:`start` continues from it.

        Returns the checkpoint's version. ``initial_arrays`` passed to ``start``
        are then ignored in favour of the checkpoint's weights.
        """
        params, state = load_checkpoint(Path(path))
        if state.get("aggregation") != self.aggregation:
            raise ValueError(
                f"checkpoint uses aggregation={state.get('aggregation')!r}, this "
                f"strategy {self.aggregation!r}"
            )
        self._resume = (params, state)
        return int(state["version"])

    def _save_checkpoint(self) -> None:
        assert self.checkpoint_path is not None
        state = {
            "version": self.version,
            "aggregation": self.aggregation,
            "param_order": list(self._params),
            "selector": self.selector.get_state(),
            "clock": self.clock.get_state() if self.clock is not None else None,
            "last_staleness": {str(k): v for k, v in self._last_staleness.items()},
            "seq": self._seq,
            "sim_now": self._sim_now,
            "wall": time.time() - self._t0,
            "history": self.history.to_dict(),
        }
        save_checkpoint(self.checkpoint_path, self._params, state)
        log(
            INFO,
            "Checkpoint of version %d written to %s",
            self.version,
            self.checkpoint_path,
        )

    def _apply_resume(self) -> None:
        assert self._resume is not None
        params, state = self._resume
        self._resume = None
        if model_spec(params) != self._spec:
            raise ValueError(
                "checkpoint weights do not match the initial model's arrays"
            )
        self._set_global({k: np.array(v) for k, v in params.items()})
        self.version = int(state["version"])
        self.selector.set_state(state["selector"])
        if self.clock is not None and state.get("clock") is not None:
            self.clock.set_state(state["clock"])
        self._last_staleness = {
            int(k): int(v) for k, v in state["last_staleness"].items()
        }
        self._seq = int(state["seq"])
        self._sim_now = float(state["sim_now"])
        self._t0 = time.time() - float(state["wall"])
        self.history = RunHistory.from_dict(state["history"])
        log(INFO, "Resumed from version %d", self.version)

    # ---------------------------------------------------------------- summary
    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Asynchronous aggregation: %s", self.aggregation)
        if self.aggregation == "buffered":
            log(INFO, "\t│\t├── Buffer size K: %d", self.buffer_size)
            log(INFO, "\t│\t└── Server learning rate: %s", self.server_lr)
        else:
            log(INFO, "\t│\t└── Mixing rate a: %s", self.mixing_rate)
        log(
            INFO,
            "\t├──> Staleness: %s(a=%s, b=%s), max staleness %s",
            self.staleness_name,
            self.staleness_a,
            self.staleness_b,
            self.max_staleness,
        )
        log(
            INFO,
            "\t├──> Concurrency: %d, selection: %s",
            self.concurrency,
            self.selection,
        )
        log(INFO, "\t└──> Clock: %s", "virtual" if self.clock else "wall (arrival)")

    # ------------------------------------------------------------ async loop
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
        """Run asynchronous federated learning until ``num_rounds`` versions.

        Parameters
        ----------
        grid : Grid
            The Grid used to send/receive Messages.
        initial_arrays : ArrayRecord
            Initial global model.
        num_rounds : int (default: 3)
            Number of global model updates (versions) to perform.
        timeout : float (default: 3600)
            Seconds one dispatched task may take before its slot is freed.
        train_config : ConfigRecord, optional
            Sent to clients with every task; the strategy adds ``server-round``
            (= current version), ``base-version``, ``delay`` (the staleness the
            node's previous update had, for the delay-aware client learning rate)
            and ``task-seed``.
        evaluate_config : ConfigRecord, optional
            Unused by the asynchronous loop (evaluation is central).
        evaluate_fn : callable, optional
            Central evaluation ``(version, arrays) -> MetricRecord``; run at
            version 0, every ``eval_every`` versions and at the end.

        Returns
        -------
        Result
            Final arrays; train metrics and central evaluation keyed by version.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds} must be >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0")
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, None)
        self.summary()
        log(INFO, "")
        self._reset_state()
        self.history = RunHistory()
        self._set_global(arrayrecord_to_params(initial_arrays, writable=True))
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result(arrays=initial_arrays)
        if self._resume is not None:
            self._apply_resume()
            result.arrays = self._global_record()
        else:
            self._evaluate(evaluate_fn, result)

        while self.version < num_rounds:
            if self.max_time is not None and self._now_sim() >= self.max_time:
                log(INFO, "Time budget of %.1fs reached", self.max_time)
                break
            self._refresh_nodes(grid)
            self._dispatch(grid, train_config, timeout)
            if not self._in_flight:
                log(INFO, "Waiting for nodes to connect...")
                time.sleep(max(self.poll_interval, 1.0))
                continue
            self._pull(grid)
            processed = self._process_ready(timeout, result, evaluate_fn, num_rounds)
            if not processed:
                time.sleep(self.poll_interval)

        if self._in_flight:
            log(INFO, "%d task(s) still in flight are abandoned", len(self._in_flight))
            self.history.abandoned = len(self._in_flight)
        if self._buffer:
            log(INFO, "%d buffered update(s) not merged at stop", len(self._buffer))
            for item in self._buffer:
                if item.event is not None:
                    item.event.status = PENDING
                    item.event.reason = "run ended before the buffer was flushed"
        if self.history.evals and self.history.evals[-1].version != self.version:
            self._evaluate(evaluate_fn, result)
        result.arrays = self._global_record()
        self._log_final(result)
        return result

    def _refresh_nodes(self, grid: Grid) -> None:
        """Pick up joined/left nodes (at most every ``NODE_REFRESH_S`` when busy)."""
        now = time.time()
        if self._in_flight and now - self._last_refresh < NODE_REFRESH_S:
            return
        self._last_refresh = now
        nodes = set(grid.get_node_ids())
        joined, left = nodes - self._known_nodes, self._known_nodes - nodes
        if joined and self._known_nodes:
            log(INFO, "Node(s) joined: %s", sorted(joined))
        if left:
            log(INFO, "Node(s) left: %s", sorted(left))
        if joined and self.clock is not None:
            self.clock.register(grid, joined)
        self._known_nodes = nodes

    def _dispatch(self, grid: Grid, train_config: ConfigRecord, timeout: float) -> None:
        """Fill free slots with fresh work for idle nodes."""
        all_nodes = sorted(self._known_nodes, key=self._sort_key)
        busy = {task.node_id for task in self._in_flight.values()}
        waiting: set[int] = set()
        if self.distinct_buffer:
            # A node whose update waits in the buffer would train again from the
            # same base on the same data: a near-duplicate update that doubles its
            # label skew in the merge. It gets new work after the flush.
            waiting = {b.event.node_id for b in self._buffer if b.event is not None}
        if len(all_nodes) < self.concurrency and not self._logged_capacity:
            log(
                INFO,
                "concurrency=%d exceeds the %d connected node(s): keeping all busy",
                self.concurrency,
                len(all_nodes),
            )
            self._logged_capacity = True
        messages: list[Message] = []
        tasks: list[_Task] = []
        while len(self._in_flight) + len(messages) < self.concurrency:
            idle = [n for n in all_nodes if n not in busy and n not in waiting]
            if not idle and not self._in_flight and not messages:
                # Fewer nodes than the buffer needs: allow repeats, never stall.
                idle = [n for n in all_nodes if n not in busy]
            node = self.selector.select(all_nodes, idle)
            if node is None:
                break
            busy.add(node)
            messages.append(self._train_message(node, train_config, timeout))
            duration = self.clock.next_duration(node) if self.clock else 0.0
            tasks.append(
                _Task(
                    node,
                    self.version,
                    time.time(),
                    self._sim_now + duration,
                    self._seq,
                    duration,
                )
            )
            self._seq += 1
        if not messages:
            return
        if self.aggregation == "buffered":
            self._bases[self.version] = self._params
        message_ids = list(grid.push_messages(messages))
        for message_id, task in zip(message_ids, tasks, strict=False):
            if message_id:
                self._in_flight[message_id] = task
            else:
                log(WARNING, "Could not push a task to node %s", task.node_id)

    def _train_message(
        self, node: int, train_config: ConfigRecord, timeout: float
    ) -> Message:
        config = ConfigRecord(dict(train_config))
        config[SERVER_ROUND] = self.version
        config[BASE_VERSION] = self.version
        config[CLIENT_DELAY] = self._last_staleness.get(node, 0)
        config[TASK_SEED] = int(
            np.random.default_rng([self.seed, self._seq]).integers(2**31 - 1)
        )
        content = RecordDict(
            {self.arrayrecord_key: self._global_record(), self.configrecord_key: config}
        )
        return Message(
            content,
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            ttl=timeout,
            group_id=str(self.version),
        )

    def _pull(self, grid: Grid) -> None:
        pending = [m for m in self._in_flight if m not in self._arrived]
        if not pending:
            return
        for reply in grid.pull_messages(pending):
            reply_to = reply.metadata.reply_to_message_id
            if reply_to in self._in_flight and reply_to not in self._arrived:
                self._arrived[reply_to] = reply
            else:
                self._reject_unknown(reply)

    def _process_ready(
        self,
        timeout: float,
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        num_rounds: int,
    ) -> bool:
        """Handle replies (and timeouts) that may be processed now.

        With a clock only the in-flight task with the earliest simulated finish
        may be processed, so the merge order is the simulated one; without, every
        arrived reply is processed in arrival order.

        Returns
        -------
        bool
            Whether anything was processed.
        """
        handled = False
        while self._in_flight and self.version < num_rounds:
            if self.clock is not None:
                message_id = min(
                    self._in_flight,
                    key=lambda m: (
                        self._in_flight[m].sim_finish,
                        self._in_flight[m].seq,
                    ),
                )
            elif self._arrived:
                message_id = next(iter(self._arrived))
            else:
                break
            task = self._in_flight[message_id]
            if message_id not in self._arrived:
                break  # the earliest simulated task has not replied yet
            reply = self._arrived.pop(message_id)
            del self._in_flight[message_id]
            self._sim_now = max(self._sim_now, task.sim_finish)
            self._handle_reply(task, reply, result, evaluate_fn, num_rounds)
            handled = True
            if self.clock is not None:
                # Refill the freed slot at this simulated instant before merging
                # anything that finishes later: the new task may finish first.
                break
        return self._expire(timeout) or handled

    def _expire(self, timeout: float) -> bool:
        """Free the slots of tasks without a reply after ``timeout`` seconds."""
        now = time.time()
        expired = [
            m
            for m, task in self._in_flight.items()
            if m not in self._arrived and now - task.sent_wall > timeout
        ]
        for message_id in expired:
            task = self._in_flight.pop(message_id)
            self._sim_now = max(self._sim_now, task.sim_finish)
            self._record_event(task, TIMEOUT, reason=f"no reply within {timeout}s")
            log(
                WARNING,
                "Node %s: no reply within %.1fs, slot freed",
                task.node_id,
                timeout,
            )
        return bool(expired)

    def _handle_reply(
        self,
        task: _Task,
        reply: Message,
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        num_rounds: int,
    ) -> None:
        tau = staleness(self.version, task.base_version)
        if reply.has_error() and reply.error.code in UNAVAILABLE_CODES:
            # The SuperLink answers for a task whose TTL expired or whose node
            # went offline: that is a timeout, not a bad reply.
            log(WARNING, "Node %s: %s, slot freed", task.node_id, reply.error.reason)
            self._record_event(task, TIMEOUT, reason=reply.error.reason or "")
            self._release_base(task.base_version)
            return
        try:
            parsed = parse_train_reply(
                reply, self._spec, self.weighted_by_key, self.max_reply_bytes
            )
        except RejectedReply as err:
            log(WARNING, "Rejected reply from node %s: %s", task.node_id, err)
            self._record_event(task, REJECTED, staleness_=tau, reason=str(err))
            self._release_base(task.base_version)
            return
        self._last_staleness[task.node_id] = tau
        loss = _train_loss(parsed)
        if self.max_staleness is not None and tau > self.max_staleness:
            log(
                INFO,
                "Dropped update of node %s: staleness %d > %d",
                task.node_id,
                tau,
                self.max_staleness,
            )
            self._record_event(
                task,
                DROPPED,
                staleness_=tau,
                num_examples=parsed.num_examples,
                train_loss=loss,
                reason=f"staleness {tau} > {self.max_staleness}",
            )
            self._release_base(task.base_version)
            return
        s_tau = self.staleness_fn(tau)
        if self.aggregation == "immediate":
            weight = self.mixing_rate * s_tau
        else:
            weight = parsed.num_examples * s_tau
        event = self._record_event(
            task,
            MERGED,
            staleness_=tau,
            weight=weight,
            num_examples=parsed.num_examples,
            train_loss=loss,
        )
        item = _Buffered(parsed, task.base_version, weight, event)
        if self.aggregation == "immediate":
            mix_immediate(self._params, parsed.params, weight)
            self.version += 1
            event.merged_into = self.version
            merged = [item]
        else:
            self._buffer.append(item)
            merged = self._flush() if len(self._buffer) >= self.buffer_size else []
        if merged:
            self._after_version(merged, result, evaluate_fn, num_rounds)

    def _flush(self) -> list[_Buffered]:
        """Merge the buffer into a new global version (buffered aggregation)."""
        buffer, self._buffer = self._buffer, []
        if sum(b.weight for b in buffer) <= 0:
            log(WARNING, "All buffered updates have zero weight; skipping the merge")
            for item in buffer:
                self._release_base(item.base_version)
            return []
        new = buffered_update(
            self._params,
            [b.reply.params for b in buffer],
            [self._bases[b.base_version] for b in buffer],
            [b.weight for b in buffer],
            self.server_lr,
        )
        self._set_global(new)
        self.version += 1
        for item in buffer:
            if item.event is not None:
                item.event.merged_into = self.version
            self._release_base(item.base_version)
        return buffer

    def _release_base(self, base_version: int) -> None:
        """Forget base models no in-flight task or buffered update refers to."""
        if self.aggregation != "buffered":
            return
        used = {t.base_version for t in self._in_flight.values()}
        used |= {b.base_version for b in self._buffer}
        used.add(self.version)
        for version in list(self._bases):
            if version not in used:
                del self._bases[version]

    def _after_version(
        self,
        merged: list[_Buffered],
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        num_rounds: int,
    ) -> None:
        contents = [_metric_content(b.reply, self.weighted_by_key) for b in merged]
        result.train_metrics_clientapp[self.version] = self.train_metrics_aggr_fn(
            contents, self.weighted_by_key
        )
        if self.version % self.eval_every == 0 or self.version == num_rounds:
            self._evaluate(evaluate_fn, result)
        else:
            log(
                INFO,
                "[version %d/%d] sim %.1fs | wall %.1fs",
                self.version,
                num_rounds,
                self._now_sim(),
                time.time() - self._t0,
            )
        if self.checkpoint_every and self.version % self.checkpoint_every == 0:
            self._save_checkpoint()

    def _evaluate(
        self,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        result: Result,
    ) -> None:
        started = time.time()
        metrics = (
            evaluate_fn(self.version, self._global_record()) if evaluate_fn else None
        )
        eval_seconds = time.time() - started
        wall = time.time() - self._t0
        updates = len(self.history.merged())
        if metrics is not None:
            result.evaluate_metrics_serverapp[self.version] = metrics
        self.history.evals.append(
            EvalPoint(
                version=self.version,
                wall_time=wall,
                sim_time=self._now_sim(),
                client_updates=updates,
                metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
                eval_seconds=eval_seconds,
            )
        )
        log(
            INFO,
            "[version %d] %s | updates %d | sim %.1fs | wall %.1fs",
            self.version,
            ", ".join(f"{k}={float(v):.4f}" for k, v in (metrics or {}).items()),  # type: ignore[arg-type]
            updates,
            self._now_sim(),
            wall,
        )

    def _record_event(
        self,
        task: _Task,
        status: str,
        *,
        staleness_: int | None = None,
        weight: float = 0.0,
        num_examples: float = 0.0,
        train_loss: float | None = None,
        reason: str = "",
    ) -> UpdateEvent:
        event = UpdateEvent(
            version=self.version,
            node_id=task.node_id,
            client=self._label(task.node_id),
            status=status,
            base_version=task.base_version,
            staleness=staleness_,
            weight=weight,
            num_examples=num_examples,
            train_loss=train_loss,
            wall_time=time.time() - self._t0,
            sim_time=self._now_sim(),
            reason=reason,
            sim_duration=task.sim_duration,
        )
        self.history.events.append(event)
        return event

    def _reject_unknown(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        reason = (
            f"reply to unknown or already handled message "
            f"'{reply.metadata.reply_to_message_id}'"
        )
        log(WARNING, "Rejected reply from node %s: %s", node, reason)
        self.history.events.append(
            UpdateEvent(
                version=self.version,
                node_id=node,
                client=self._label(node),
                status=REJECTED,
                wall_time=time.time() - self._t0,
                sim_time=self._now_sim(),
                reason=reason,
            )
        )

    def _log_final(self, result: Result) -> None:
        counts = dict.fromkeys(STATUSES, 0)
        for event in self.history.events:
            counts[event.status] += 1
        taus = self.history.staleness_values()
        log(
            INFO,
            "Finished: %d versions, updates %s, mean staleness %.2f (max %d), "
            "sim %.1fs, wall %.1fs",
            self.version,
            counts,
            float(np.mean(taus)) if taus else 0.0,
            max(taus) if taus else 0,
            self._now_sim(),
            time.time() - self._t0,
        )
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))

    # ------------------------------------------- Flower's synchronous interface
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select ``concurrency`` nodes and send them the global model.

        Used when a caller drives this strategy through Flower's round loop
        (``Strategy.start`` of a subclass, or custom workflows); the base version
        of round ``r`` is ``r - 1``.
        """
        self._set_global(arrayrecord_to_params(arrays))
        self.version = server_round - 1
        self._sync_base = self._params
        nodes = sorted(grid.get_node_ids(), key=self._sort_key)
        chosen: list[int] = []
        while len(chosen) < self.concurrency:
            node = self.selector.select(nodes, [n for n in nodes if n not in chosen])
            if node is None:
                break
            chosen.append(node)
        config[SERVER_ROUND] = server_round
        config[BASE_VERSION] = self.version
        messages = []
        for node in chosen:
            node_config = ConfigRecord(dict(config))
            node_config[CLIENT_DELAY] = self._last_staleness.get(node, 0)
            record = RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: node_config}
            )
            message = Message(record, dst_node_id=node, message_type=MessageType.TRAIN)
            self._sync_tasks[id(message)] = (message, self.version)
            messages.append(message)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Staleness-weighted buffered merge of one round's replies."""
        base_of = {
            msg.metadata.message_id: base for msg, base in self._sync_tasks.values()
        }
        self._sync_tasks = {}
        current = server_round - 1
        updates: list[_Buffered] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            base = base_of.get(reply.metadata.reply_to_message_id, current)
            tau = staleness(current, base)
            try:
                parsed = parse_train_reply(
                    reply, model_spec(self._sync_base), self.weighted_by_key
                )
            except RejectedReply as err:
                log(WARNING, "Rejected reply from node %s: %s", node, err)
                continue
            if self.max_staleness is not None and tau > self.max_staleness:
                continue
            self._last_staleness[node] = tau
            weight = parsed.num_examples * self.staleness_fn(tau)
            updates.append(_Buffered(parsed, base, weight))
        if not updates or sum(u.weight for u in updates) <= 0:
            return None, None
        new = buffered_update(
            self._sync_base,
            [u.reply.params for u in updates],
            [self._sync_base] * len(updates),
            [u.weight for u in updates],
            self.server_lr,
        )
        metrics = self.train_metrics_aggr_fn(
            [_metric_content(u.reply, self.weighted_by_key) for u in updates],
            self.weighted_by_key,
        )
        return params_to_arrayrecord(new), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to ``concurrency`` nodes for federated evaluation."""
        nodes = sorted(grid.get_node_ids(), key=self._sort_key)
        chosen: list[int] = []
        while len(chosen) < self.concurrency:
            node = self.selector.select(nodes, [n for n in nodes if n not in chosen])
            if node is None:
                break
            chosen.append(node)
        config[SERVER_ROUND] = server_round
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        return [
            Message(record, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in chosen
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


def _metric_content(reply: TrainReply, weighted_by_key: str) -> RecordDict:
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


def _train_loss(reply: TrainReply) -> float | None:
    value = reply.metrics.get("train-loss")
    return float(value) if isinstance(value, int | float) else None
