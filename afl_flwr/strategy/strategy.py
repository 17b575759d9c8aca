"""The asynchronous, staleness-aware Flower strategy: the loop, written once.

``start()`` wires the parts: the :class:`~afl_flwr.strategy.scheduler.Scheduler`
yields one outcome at a time, :func:`~afl_flwr.strategy.admission.admit` turns it
into an update or a refusal, the aggregator (:mod:`afl_flwr.aggregators`) decides
when to merge and computes the merge, the
:class:`~afl_flwr.strategy.model_store.ModelStore` installs the new version, and
the hooks (:mod:`afl_flwr.strategy.hooks`) evaluate, checkpoint and log.
"""

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    log_strategy_start_info,
)

from afl_flwr.aggregation import Params, staleness
from afl_flwr.aggregators import ALIASES, Aggregator, Update, make_aggregator
from afl_flwr.checkpoint import load_checkpoint, save_checkpoint
from afl_flwr.clock import VirtualClock
from afl_flwr.constants import BASE_VERSION, CLIENT_DELAY, SERVER_ROUND, TASK_SEED
from afl_flwr.history import (
    MERGED,
    PENDING,
    RunHistory,
    UpdateEvent,
)
from afl_flwr.model_state import StateKeys, state_names
from afl_flwr.replies import (
    TrainReply,
    arrayrecord_to_params,
    model_spec,
)
from afl_flwr.selection import make_selector
from afl_flwr.strategy.admission import Refusal, admit
from afl_flwr.strategy.hooks import (
    CentralEvaluation,
    Checkpointing,
    EvaluateFn,
    FederatedEvaluation,
    Hook,
    MetricsAggrFn,
    ProgressLog,
    RunView,
    TimeBudget,
)
from afl_flwr.strategy.model_store import ModelStore
from afl_flwr.strategy.recorder import RunRecorder, metric_content
from afl_flwr.strategy.scheduler import Outcome, Scheduler
from afl_flwr.strategy.sync_api import SynchronousInterface


class RunAbortedError(RuntimeError):
    """The run cannot make progress: too many tasks failed in a row.

    The message names the failures' most recent reason and how they were
    counted; the strategy's ``history`` still records everything that happened.
    """


# pylint: disable=too-many-instance-attributes
class StalenessAwareAsyncStrategy(SynchronousInterface, Strategy):
    """Asynchronous federated learning with staleness-aware aggregation.

    Keeps ``concurrency`` nodes busy; every reply is admitted as it arrives and
    handed to the aggregation rule, and the freed slot gets fresh work at once.
    An update's staleness ``tau`` is the number of global versions merged since
    the version its task started from, measured on the server from the reply's
    ``reply_to_message_id``, so any ClientApp works unchanged. Updates with
    ``tau > max_staleness`` are dropped (the paper's bounded-staleness
    assumption); the rule weighs the rest by ``s(tau)``.

    Rules (``aggregation``), see :mod:`afl_flwr.aggregators`:

    * ``"fedbuff"`` (alias ``"buffered"``): every ``K`` updates,
      ``x <- x + eta_g sum_i n_i s(tau_i) (x_i - x_base_i) / sum_i n_i``
      (FedBuff, Nguyen et al. 2022, Algorithm 1). The penalty is absolute: with
      ``K = 1`` a stale update moves the model by ``eta_g s(tau)`` times its
      delta; at zero staleness with ``eta_g = 1`` this is Flower's FedAvg,
      bit for bit.
    * ``"fedasync"`` (alias ``"immediate"``): ``x <- (1 - a s(tau)) x + a s(tau)
      x_i`` per update (FedAsync, Xie et al. 2019).
    * ``"ca2fl"`` (cached update calibration) and ``"fadas"`` (AMSGrad with a
      delay-adaptive rate), or any registered name, or an
      :class:`~afl_flwr.aggregators.Aggregator` instance.

    State arrays (BatchNorm statistics, integer counters; see ``state_keys``)
    are never stepped: every rule sets them to the example-weighted average of
    the merged clients' values (FedAsync: its own mixing).

    Parameters
    ----------
    concurrency : int (default: 5)
        Nodes kept busy at once (the paper's "clients per round"). Above the
        number of connected nodes, every node is kept busy.
    aggregation : str or Aggregator (default: "fedbuff")
        The aggregation rule, by registered name or as an instance (whose own
        settings then apply: passing rule settings too is an error).
    buffer_size : int, optional (default: None)
        Updates per buffered merge ``K``; ``None`` means ``concurrency``.
    server_lr : float, optional (default: None)
        Server learning rate of buffered rules; ``None`` means the rule's own
        default (1.0 for fedbuff and ca2fl, 1e-3 for fadas).
    mixing_rate : float, optional (default: None)
        ``a`` of FedAsync, in ``(0, 1]``; ``None`` means 0.5.
    staleness_fn : str, optional (default: None)
        One of ``constant``, ``polynomial``, ``hinge``, ``exponential``,
        ``inverse`` (see :mod:`afl_flwr.staleness`), for the rules that apply
        one (fedbuff, fedasync); ``None`` means ``polynomial``.
    staleness_a, staleness_b : float, optional (default: None)
        Parameters of the staleness function; ``None`` means the function's own
        default (polynomial ``a = 0.5``; hinge ``a = 10, b = 4``; exponential
        ``b = 0.5``; inverse ``b = 0.05``).
    **rule_settings
        Settings of the chosen rule that only it has, prefixed by its name:
        ``fadas_beta1``, ``fadas_beta2``, ``fadas_eps``, ``fadas_tau_c``,
        ``fadas_delay_rule``, ``fadas_bias_correction``, ``fadas_weighted``,
        ``ca2fl_cache_dtype`` (see each rule's ``Settings``).
    state_keys : Collection[str] or callable, optional (default: None)
        Which arrays are state, not weights: a collection of names, or a
        predicate ``(name, array) -> bool``. ``None`` detects them
        (:func:`~afl_flwr.model_state.default_is_state`: non-floating arrays
        and ``*.running_mean``/``*.running_var``/``*.num_batches_tracked``);
        :func:`~afl_flwr.model_state.torch_buffer_names` lists a torch model's
        buffers exactly.
    max_staleness : int, optional (default: None)
        ``tau_max``; staler updates are dropped. ``None`` means unbounded.
    selection : str (default: "without-replacement")
        ``"with-replacement"`` or ``"without-replacement"`` client selection.
    seed : int (default: 0)
        Seed of client selection and of the per-task seeds sent to clients.
    clock : VirtualClock, optional (default: None)
        With a clock, outcomes (failures included) are processed in
        simulated-finish order, each task charged the steps it reports
        (reproducible); without, in arrival order and time is wall time.
    eval_every : int (default: 1)
        Evaluate (``evaluate_fn`` and/or on clients) every this many versions
        and at the end.
    background_evaluation : bool (default: True)
        Run ``evaluate_fn`` in a background thread on the version's weights
        while dispatch goes on; results are recorded in version order with the
        numbers of their version. ``False`` evaluates inline (the loop waits),
        for an ``evaluate_fn`` that is not thread-safe.
    fraction_evaluate : float (default: 0.0)
        Federated evaluation: fraction of nodes sent ``evaluate`` messages at
        each evaluation (idle nodes first); results go to
        ``Result.evaluate_metrics_clientapp``. Off by default because evaluation
        competes with training for client time (Flower's FedAvg uses 1.0).
    min_evaluate_nodes : int (default: 2)
        At least this many nodes per federated evaluation.
    max_time : float, optional (default: None)
        Time budget in seconds (simulated with a clock, else wall).
    max_reply_bytes : int, optional (default: None)
        Reject replies whose arrays exceed this size.
    checkpoint_every : int (default: 0)
        Write a checkpoint (weights, version, component states, history) to
        ``checkpoint_path`` every this many versions; 0 disables it.
    checkpoint_path : str or Path, optional (default: None)
        Checkpoint file, written atomically (see :mod:`afl_flwr.checkpoint`).
    distinct_buffer : bool (default: True)
        Buffered rules: prefer idle nodes whose update is not waiting in the
        buffer. Only a preference: with no other idle node such a node gets work
        at once, so concurrency is never throttled.
    max_consecutive_failures : int, optional (default: None)
        Stop the run with :class:`RunAbortedError` after this many failed tasks
        (errors, invalid replies, timeouts) in a row with no update admitted in
        between; ``None`` means ``max(30, 3 * concurrency)``.
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
        Seconds between polls of the Grid when nothing is ready.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
        concurrency: int = 5,
        aggregation: str | Aggregator = "fedbuff",
        buffer_size: int | None = None,
        server_lr: float | None = None,
        mixing_rate: float | None = None,
        staleness_fn: str | None = None,
        staleness_a: float | None = None,
        staleness_b: float | None = None,
        state_keys: StateKeys | None = None,
        max_staleness: int | None = None,
        selection: str = "without-replacement",
        seed: int = 0,
        clock: VirtualClock | None = None,
        eval_every: int = 1,
        background_evaluation: bool = True,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 2,
        max_time: float | None = None,
        max_reply_bytes: int | None = None,
        checkpoint_every: int = 0,
        checkpoint_path: str | Path | None = None,
        distinct_buffer: bool = True,
        max_consecutive_failures: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        poll_interval: float = 0.02,
        **rule_settings: Any,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness} must be >= 0 (tau_max)")
        if eval_every < 1:
            raise ValueError(f"eval_every={eval_every} must be >= 1")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate={fraction_evaluate} must be in [0, 1]")
        if min_evaluate_nodes < 0:
            raise ValueError(f"min_evaluate_nodes={min_evaluate_nodes} must be >= 0")
        if max_time is not None and not max_time > 0:
            raise ValueError(f"max_time={max_time} must be > 0")
        if checkpoint_every < 0 or (checkpoint_every and checkpoint_path is None):
            raise ValueError(
                f"checkpoint_every={checkpoint_every} must be >= 0, and > 0 needs a "
                "checkpoint_path"
            )
        if max_consecutive_failures is not None and max_consecutive_failures < 1:
            raise ValueError(
                f"max_consecutive_failures={max_consecutive_failures} must be >= 1"
            )
        self.concurrency = concurrency
        shared = {
            "buffer_size": buffer_size,
            "server_lr": server_lr,
            "mixing_rate": mixing_rate,
            "staleness_fn": staleness_fn,
            "staleness_a": staleness_a,
            "staleness_b": staleness_b,
        }
        keywords = {k: v for k, v in shared.items() if v is not None} | rule_settings
        if isinstance(aggregation, Aggregator):
            if keywords:
                raise ValueError(
                    f"aggregation is an {type(aggregation).__name__} instance, whose "
                    f"own settings apply; do not also pass {sorted(keywords)} (set "
                    "them on the instance)"
                )
            self.aggregator = aggregation
        else:
            self.aggregator = make_aggregator(
                aggregation, keywords, default_buffer_size=concurrency
            )
        self.aggregation = self.aggregator.name or type(self.aggregator).__name__
        self.state_keys = state_keys
        self.max_staleness = max_staleness
        self.selection = selection
        self.selector = make_selector(selection, seed)
        self.seed = seed
        self.clock = clock
        self.eval_every = eval_every
        self.background_evaluation = background_evaluation
        self._central: CentralEvaluation | None = None
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.max_time = max_time
        self.max_reply_bytes = max_reply_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.distinct_buffer = distinct_buffer
        self.max_consecutive_failures = max_consecutive_failures or max(
            30, 3 * concurrency
        )
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_metricrecords
        self.evaluate_metrics_aggr_fn = (
            evaluate_metrics_aggr_fn or aggregate_metricrecords
        )
        self.poll_interval = poll_interval
        self.recorder = RunRecorder()
        self.store = ModelStore(keep_bases=self.aggregator.needs_base)
        self.scheduler = Scheduler(
            concurrency=concurrency, selector=self.selector, clock=clock
        )
        self._resume: tuple[Params, dict[str, Any]] | None = None
        self._last_staleness: dict[int, int] = {}
        self._failures_in_row = 0
        self._last_failure = ""
        self._sync_round: int | None = None
        self._sync_population = 0
        self._warned_sync = False
        self._events_pending: list[tuple[UpdateEvent, TrainReply]] = []

    @property
    def buffer_size(self) -> int:
        """Updates per version: ``K`` of a buffered rule, 1 for FedAsync."""
        return self.aggregator.updates_per_merge

    @property
    def history(self) -> RunHistory:
        """Everything the current (or last) run recorded."""
        return self.recorder.history

    @history.setter
    def history(self, value: RunHistory) -> None:
        self.recorder.history = value

    # ------------------------------------------------------------ checkpoints
    def resume_from(self, path: str | Path) -> int:
        """Load a checkpoint; the next :meth:`start` continues from it.

        Returns the checkpoint's version. ``initial_arrays`` passed to ``start``
        are then ignored in favour of the checkpoint's weights.
        """
        params, state = load_checkpoint(Path(path))
        saved = ALIASES.get(state.get("aggregation", ""), state.get("aggregation"))
        if saved != self.aggregation:
            raise ValueError(
                f"checkpoint uses aggregation={state.get('aggregation')!r}, this "
                f"strategy {self.aggregation!r}"
            )
        self._resume = (params, state)
        return int(state["version"])

    def save_checkpoint(self) -> None:
        """Write the global model and every component's state atomically."""
        assert self.checkpoint_path is not None
        if self._central is not None:
            self._central.flush()  # the checkpoint's history has every evaluation
        agg_arrays, agg_meta = self.aggregator.state()
        state = {
            "version": self.version,
            "aggregation": self.aggregation,
            "param_order": list(self.store.params),
            "scheduler": self.scheduler.get_state(),
            "aggregator": agg_meta,
            "last_staleness": {str(k): v for k, v in self._last_staleness.items()},
            "history": self.history.to_dict(),
        }
        save_checkpoint(self.checkpoint_path, self.store.params, state, agg_arrays)
        log(
            INFO,
            "Checkpoint of version %d written to %s",
            self.version,
            self.checkpoint_path,
        )

    def _apply_resume(self) -> None:
        assert self._resume is not None
        (params, state), self._resume = self._resume, None
        if model_spec(params) != self.store.spec:
            raise ValueError(
                "checkpoint weights do not match the initial model's arrays"
            )
        self.store.reset(
            {k: np.array(v) for k, v in params.items()}, int(state["version"])
        )
        # First-release checkpoints kept the scheduler's fields at the top level.
        self.scheduler.set_state(state.get("scheduler") or state)
        self.aggregator.load_state(
            state.get("extra_arrays", {}), state.get("aggregator", {})
        )
        self._last_staleness = {
            int(k): int(v) for k, v in state["last_staleness"].items()
        }
        self.history = RunHistory.from_dict(state["history"])
        log(INFO, "Resumed from version %d", self.version)

    # ---------------------------------------------------------------- summary
    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Asynchronous aggregation: %s", self.aggregator.summary())
        log(INFO, "\t├──> Max staleness: %s", self.max_staleness)
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
        evaluate_fn: EvaluateFn | None = None,
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
            Seconds one dispatched task (or a federated evaluation) may take
            before it counts as failed.
        train_config : ConfigRecord, optional
            Sent to clients with every task; the strategy adds ``server-round``
            (= current version), ``base-version``, ``delay`` (the staleness the
            node's previous update had, for the delay-aware client learning rate)
            and ``task-seed``.
        evaluate_config : ConfigRecord, optional
            Sent with federated evaluation messages.
        evaluate_fn : callable, optional
            Central evaluation ``(version, arrays) -> MetricRecord``; run at
            version 0, every ``eval_every`` versions and at the end.

        Returns
        -------
        Result
            Final arrays; train metrics and evaluations keyed by version.

        Raises
        ------
        RunAbortedError
            When ``max_consecutive_failures`` tasks failed in a row.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds} must be >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0")
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(
            num_rounds, initial_arrays, train_config, evaluate_config
        )
        self.summary()
        log(INFO, "")
        if evaluate_fn is None and self.fraction_evaluate == 0:
            log(
                INFO,
                "No evaluate_fn and fraction_evaluate=0: this run reports no "
                "evaluation (pass evaluate_fn, or fraction_evaluate > 0 to evaluate "
                "on the clients)",
            )
        self.history = RunHistory()
        self.scheduler.reset()
        self.aggregator.discard_pending()
        self._last_staleness = {}
        self._failures_in_row = 0
        self._events_pending = []
        self._sync_round = None
        self.store.reset(arrayrecord_to_params(initial_arrays, writable=True))
        self.aggregator.bind_state(state_names(self.store.params, self.state_keys))
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result(arrays=initial_arrays)
        resumed = self._resume is not None
        if resumed:
            self._apply_resume()
        run = RunView(
            grid, self.store, self.scheduler, self.history, result, num_rounds
        )
        hooks = self._hooks(evaluate_fn, evaluate_config, timeout)
        for hook in hooks:
            hook.on_start(run, resumed)

        try:
            self._loop(run, hooks, train_config, timeout)
        finally:
            self._finish(run, hooks)
        return result

    def _hooks(
        self,
        evaluate_fn: EvaluateFn | None,
        evaluate_config: ConfigRecord | None,
        timeout: float,
    ) -> list[Hook]:
        self._central = CentralEvaluation(
            evaluate_fn, self.eval_every, background=self.background_evaluation
        )
        hooks: list[Hook] = [ProgressLog(), self._central]
        if self.fraction_evaluate > 0:
            hooks.append(
                FederatedEvaluation(
                    fraction=self.fraction_evaluate,
                    min_nodes=self.min_evaluate_nodes,
                    every=self.eval_every,
                    config=evaluate_config or ConfigRecord(),
                    arrayrecord_key=self.arrayrecord_key,
                    configrecord_key=self.configrecord_key,
                    weighted_by_key=self.weighted_by_key,
                    aggr_fn=self.evaluate_metrics_aggr_fn,
                    timeout=timeout,
                    seed=self.seed,
                )
            )
        if self.checkpoint_every:
            hooks.append(Checkpointing(self.checkpoint_every, self.save_checkpoint))
        if self.max_time is not None:
            hooks.append(TimeBudget(self.max_time))
        return hooks

    def _loop(
        self,
        run: RunView,
        hooks: list[Hook],
        train_config: ConfigRecord,
        timeout: float,
    ) -> None:
        scheduler = self.scheduler
        while self.version < run.num_rounds:
            reason = next((r for h in hooks if (r := h.stop_reason(run))), None)
            if reason:
                log(INFO, "Stopping: %s", reason)
                self.history.stop_reason = reason
                return
            scheduler.refresh(run.grid)
            avoid = self._waiting_nodes() if self.distinct_buffer else set()
            started = scheduler.dispatch(
                run.grid,
                lambda node, seq: self._train_message(node, seq, train_config, timeout),
                self.store.version,
                avoid,
            )
            if started and not self.history.first_dispatch_wall:
                self.history.first_dispatch_wall = scheduler.wall()
            if not scheduler.in_flight:
                log(INFO, "Waiting for nodes to connect...")
                self._sleep(max(self.poll_interval, 1.0))
                continue
            for reply in scheduler.pull(run.grid):
                self.recorder.unknown_reply(
                    version=self.version,
                    node_id=reply.metadata.src_node_id,
                    client=scheduler.label(reply.metadata.src_node_id),
                    reply_to=reply.metadata.reply_to_message_id,
                    wall=scheduler.wall(),
                    sim=scheduler.now(),
                )
            scheduler.expire(timeout)
            for hook in hooks:
                hook.on_poll(run)
            processed = False
            while self.version < run.num_rounds and (
                outcome := scheduler.next_outcome()
            ):
                processed = True
                self._handle(outcome, run, hooks, timeout)
                if self.clock is not None:
                    break  # refill the freed slot at this simulated instant first
            if not processed:
                self._sleep(self.poll_interval)

    @staticmethod
    def _sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _waiting_nodes(self) -> set[int]:
        """Nodes whose update waits in the aggregator's buffer."""
        return self.scheduler.nodes_of({u.client for u in self.aggregator.pending()})

    def _train_message(
        self, node: int, seq: int, train_config: ConfigRecord, timeout: float
    ) -> Message:
        version = self.store.checkout()
        config = ConfigRecord(dict(train_config))
        config[SERVER_ROUND] = version
        config[BASE_VERSION] = version
        config[CLIENT_DELAY] = self._last_staleness.get(node, 0)
        config[TASK_SEED] = int(
            np.random.default_rng([self.seed, seq]).integers(2**31 - 1)
        )
        content = RecordDict(
            {self.arrayrecord_key: self.store.record(), self.configrecord_key: config}
        )
        return Message(
            content,
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            ttl=timeout,
            group_id=str(version),
        )

    def _handle(
        self, outcome: Outcome, run: RunView, hooks: list[Hook], timeout: float
    ) -> None:
        task = outcome.task
        tau = staleness(self.version, task.base_version)
        admitted = admit(
            outcome.reply,
            staleness=tau,
            spec=self.store.spec,
            timeout=timeout,
            weighted_by_key=self.weighted_by_key,
            max_bytes=self.max_reply_bytes,
            max_staleness=self.max_staleness,
        )
        base = self.store.base(task.base_version)
        self.store.release(task.base_version)
        if isinstance(admitted, Refusal):
            self._refuse(outcome, admitted, tau)
            return
        self._failures_in_row = 0
        self.scheduler.record_success(task.node_id)
        self._last_staleness[task.node_id] = tau
        update = Update(
            client=self.scheduler.label(task.node_id),
            params=admitted.params,
            base=base,
            base_version=task.base_version,
            staleness=tau,
            num_examples=admitted.num_examples,
            metrics=admitted.metrics,
        )
        event = self._record(
            outcome,
            MERGED,
            staleness_=tau,
            weight=self.aggregator.weight(update),
            reply=admitted,
        )
        self._events_pending.append((event, admitted))
        if not self.aggregator.add(update):
            return
        self.aggregator.observe_population(len(self.scheduler.nodes))
        new = self.aggregator.merge(self.store.params)
        self.store.advance(new)
        merged, self._events_pending = self._events_pending, []
        for item, _ in merged:
            item.merged_into = self.version
        run.result.train_metrics_clientapp[self.version] = self.train_metrics_aggr_fn(
            [metric_content(r, self.weighted_by_key) for _, r in merged],
            self.weighted_by_key,
        )
        for hook in hooks:
            hook.on_version(run, [e for e, _ in merged])

    def _refuse(self, outcome: Outcome, refusal: Refusal, tau: int) -> None:
        task = outcome.task
        log(WARNING, "Node %s: %s (%s)", task.node_id, refusal.status, refusal.reason)
        parsed = refusal.reply
        self._record(
            outcome,
            refusal.status,
            staleness_=tau if refusal.status != "timeout" else None,
            reason=refusal.reason,
            reply=parsed,
        )
        if parsed is not None:
            self._last_staleness[task.node_id] = tau
        if not refusal.failure:
            return
        self.scheduler.record_failure(task.node_id, refusal.reason)
        self._failures_in_row += 1
        self._last_failure = f"node {task.node_id}: {refusal.reason}"
        if self._failures_in_row >= self.max_consecutive_failures:
            counts: dict[str, int] = {}
            for event in self.history.events[-self._failures_in_row :]:
                counts[event.status] = counts.get(event.status, 0) + 1
            message = (
                f"{self._failures_in_row} tasks failed in a row with no update "
                f"admitted ({counts}); last failure: {self._last_failure}. "
                "Check the ClientApp's logs; max_consecutive_failures="
                f"{self.max_consecutive_failures} ends such runs"
            )
            self.history.stop_reason = message
            raise RunAbortedError(message)

    def _record(
        self,
        outcome: Outcome,
        status: str,
        *,
        staleness_: int | None = None,
        weight: float = 0.0,
        reason: str = "",
        reply: TrainReply | None = None,
    ) -> UpdateEvent:
        task = outcome.task
        return self.recorder.outcome(
            version=self.version,
            node_id=task.node_id,
            client=self.scheduler.label(task.node_id),
            status=status,
            base_version=task.base_version,
            wall_time=self.scheduler.wall(),
            sim_time=outcome.sim_time,
            sim_duration=outcome.sim_duration,
            staleness=staleness_,
            weight=weight,
            reason=reason,
            reply=reply,
        )

    def _finish(self, run: RunView, hooks: list[Hook]) -> None:
        abandoned = self.scheduler.abandon()
        if abandoned:
            log(INFO, "%d task(s) still in flight are abandoned", abandoned)
        self.history.abandoned = abandoned
        waiting = self.aggregator.discard_pending()
        if waiting:
            log(INFO, "%d buffered update(s) not merged at stop", len(waiting))
        for event, _ in self._events_pending:
            event.status = PENDING
            event.reason = "run ended before the buffer was merged"
        self._events_pending = []
        for hook in hooks:
            hook.on_end(run)
        run.result.arrays = self.store.record()
        self.recorder.log_final(
            self.version, self.scheduler.now(), self.scheduler.wall(), run.result
        )
