"""The asynchronous, staleness-aware Flower strategy: the loop, written once.

``start()`` wires the parts, then takes one outcome at a time from the
:class:`~afl_flwr.strategy.scheduler.Scheduler`. A train outcome reads top to
bottom: :func:`~afl_flwr.strategy.admission.admit` turns it into an update or a
refusal, the aggregator (:mod:`afl_flwr.aggregators`) takes it and, when due,
merges, the :class:`~afl_flwr.strategy.model_store.ModelStore` installs the new
version, the :class:`~afl_flwr.strategy.run_state.RunState` records it, and the
callbacks (:mod:`afl_flwr.callbacks`) are told. An evaluate outcome goes to
:class:`~afl_flwr.strategy.federated.FederatedEvaluation`.
"""

import time
from collections.abc import Iterable, Sequence
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
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    log_strategy_start_info,
)

from afl_flwr.aggregation import Params, staleness
from afl_flwr.aggregators import (
    ALIASES,
    Aggregator,
    MergeRefused,
    Update,
    buffer_for_slots,
    make_aggregator,
)
from afl_flwr.callbacks.base import Callback, CallbackList, RunView, Stop
from afl_flwr.callbacks.checkpoint import Checkpoint
from afl_flwr.callbacks.evaluation import CentralEvaluation, EvaluateFn
from afl_flwr.callbacks.limits import TimeBudget
from afl_flwr.callbacks.progress import ProgressLog
from afl_flwr.checkpoint import load_checkpoint, save_checkpoint
from afl_flwr.clock import Clock, WallClock
from afl_flwr.constants import BASE_VERSION, CLIENT_DELAY, SERVER_ROUND, TASK_SEED
from afl_flwr.history import MERGED, RunHistory
from afl_flwr.model_state import StateKeys, state_names
from afl_flwr.replies import arrayrecord_to_params, model_spec
from afl_flwr.selection import make_selector
from afl_flwr.strategy.admission import Refusal, admit
from afl_flwr.strategy.federated import FederatedEvaluation
from afl_flwr.strategy.model_store import ModelStore
from afl_flwr.strategy.run_state import MetricsAggrFn, RunAbortedError, RunState
from afl_flwr.strategy.scheduler import EVALUATE, Outcome, Scheduler, Task, train_slots
from afl_flwr.strategy.sync_adapter import SynchronousRounds
from afl_flwr.strategy.transport import (
    ReplyPuller,
    check_queue_depth,
    is_superlink_grid,
)


class TrainTasks:
    """Builds train messages from the current global model (a TaskFactory).

    A task's base is checked out of the store only once its push succeeded
    (:meth:`started`); the message carries ``server-round`` (= version),
    ``base-version``, ``delay`` (the staleness the node's previous update had)
    and ``task-seed``, on top of the caller's train config.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        state: RunState,
        config: ConfigRecord,
        seed: int,
        timeout: float,
        arrayrecord_key: str,
        configrecord_key: str,
    ) -> None:
        self.store = store
        self.state = state
        self.config = config
        self.seed = seed
        self.timeout = timeout
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key

    def train_message(self, node_id: int, seq: int) -> tuple[Message, int]:
        """The train message for ``node_id`` on the current version."""
        version = self.store.version
        config = ConfigRecord(dict(self.config))
        config[SERVER_ROUND] = version
        config[BASE_VERSION] = version
        config[CLIENT_DELAY] = self.state.last_staleness.get(node_id, 0)
        config[TASK_SEED] = int(
            np.random.default_rng([self.seed, seq]).integers(2**31 - 1)
        )
        content = RecordDict(
            {self.arrayrecord_key: self.store.record(), self.configrecord_key: config}
        )
        message = Message(
            content,
            dst_node_id=node_id,
            message_type=MessageType.TRAIN,
            ttl=self.timeout,
            group_id=str(version),
        )
        return message, version

    def started(self, task: Task) -> None:
        """Keep the task's base model until its outcome is handled."""
        self.store.checkout(task.version)


# pylint: disable=too-many-instance-attributes
class StalenessAwareAsyncStrategy(Strategy):
    """Asynchronous federated learning with staleness-aware aggregation.

    A drop-in for Flower's ``FedAvg``: it takes FedAvg's keywords (with the
    asynchronous meanings below) and ``start()`` fills the same ``Result``.
    It keeps training slots busy; every reply is admitted as it arrives and
    handed to the aggregation rule, and the freed slot gets fresh work at once.
    An update's staleness ``tau`` is the number of global versions merged since
    the version its task started from, measured on the server from the reply's
    ``reply_to_message_id``, so any ClientApp works unchanged. Updates with
    ``tau > max_staleness`` are dropped (the paper's bounded-staleness
    assumption); the rule weighs the rest.

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
    fraction_train : float (default: 1.0)
        FedAvg's keyword: the share of connected nodes kept busy training
        (``max(int(N * fraction_train), min_train_nodes)`` slots, at most N).
        Ignored when ``concurrency`` is given.
    fraction_evaluate : float (default: 1.0)
        FedAvg's keyword: the share of connected nodes asked to evaluate the
        global model at each evaluation (idle nodes first), beside training;
        results go to ``Result.evaluate_metrics_clientapp``. 0 disables it.
    min_train_nodes : int (default: 2)
        FedAvg's keyword: a floor on the training slots (without ``concurrency``).
    min_evaluate_nodes : int (default: 2)
        FedAvg's keyword: at least this many nodes per federated evaluation.
    min_available_nodes : int (default: 2)
        FedAvg's keyword: the first task is sent once this many nodes are
        connected (waiting at most ``timeout`` seconds).
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
    concurrency : int, optional (default: None)
        Training slots, fixed (the paper's "clients per round"); above the
        number of connected nodes every node is kept busy. ``None`` sizes them
        with ``fraction_train`` as the nodes come and go.
    aggregation : str or Aggregator (default: "fedbuff")
        The aggregation rule, by registered name or as an instance (whose own
        settings then apply: passing rule settings too is an error).
    buffer_size : int, optional (default: None)
        Updates per buffered merge ``K``; ``None`` means half the training
        slots, at least 1 (``concurrency``, or the slots sized when the first
        task is sent; :func:`~afl_flwr.aggregators.buffer_for_slots`).
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
        default (polynomial ``a = 1``; hinge ``a = 10, b = 4``; exponential
        ``b = 0.5``; inverse ``b = 0.05``).
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
    clock : Clock, optional (default: None)
        A :class:`~afl_flwr.clock.VirtualClock` processes outcomes (failures
        included) in simulated-finish order, each task charged the steps it
        reports (reproducible); ``None`` (a ``WallClock``) takes them in arrival
        order, and time is wall time.
    eval_every : int (default: 1)
        Evaluate (``evaluate_fn`` and on clients) every this many versions and
        at the end.
    background_evaluation : bool (default: True)
        Run ``evaluate_fn`` in a background thread on the version's weights
        while dispatch goes on; results are recorded in version order with the
        numbers of their version. ``False`` evaluates inline (the loop waits),
        for an ``evaluate_fn`` that is not thread-safe, or clients trained in
        this process (an in-process grid), whose training would share torch's
        global RNG with the evaluation thread (a seeded run would not repeat).
    max_time : float, optional (default: None)
        Time budget in seconds (simulated with a virtual clock, else wall).
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
        between; ``None`` means ``max(30, 3 * slots)``.
    poll_interval : float (default: 0.02)
        Seconds between polls of the Grid when nothing is ready.
    node_queue_depth : int (default: 1)
        Train tasks kept per busy node: one running and ``D - 1`` waiting at
        the SuperLink, given only once no idle node is left (see
        :mod:`afl_flwr.strategy.scheduler`). A waiting task carries the version
        current at its dispatch (more staleness) and starts when the node's
        previous task ends, so a SuperNode never sleeps on an empty pull. Above
        1 in Flower's simulation is refused (its engine would run a node's
        waiting tasks at the same time). On a SuperLink's grid replies are
        pulled on a background thread
        (:class:`~afl_flwr.strategy.transport.ReplyPuller`) whatever the depth,
        so a slow upload never stalls dispatch.
    **rule_settings
        Settings of the chosen rule that only it has, prefixed by its name:
        ``fadas_beta1``, ``fadas_beta2``, ``fadas_eps``, ``fadas_tau_c``,
        ``fadas_delay_rule``, ``fadas_bias_correction``, ``fadas_weighted``,
        ``ca2fl_cache_dtype`` (see each rule's ``Settings``).
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        concurrency: int | None = None,
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
        clock: Clock | None = None,
        eval_every: int = 1,
        background_evaluation: bool = True,
        max_time: float | None = None,
        max_reply_bytes: int | None = None,
        checkpoint_every: int = 0,
        checkpoint_path: str | Path | None = None,
        distinct_buffer: bool = True,
        max_consecutive_failures: int | None = None,
        poll_interval: float = 0.02,
        node_queue_depth: int = 1,
        **rule_settings: Any,
    ) -> None:
        _check_arguments(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            concurrency=concurrency,
            max_staleness=max_staleness,
            eval_every=eval_every,
            max_time=max_time,
            checkpoint_every=checkpoint_every,
            checkpoint_path=checkpoint_path,
            max_consecutive_failures=max_consecutive_failures,
            node_queue_depth=node_queue_depth,
        )
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_metricrecords
        self.evaluate_metrics_aggr_fn = (
            evaluate_metrics_aggr_fn or aggregate_metricrecords
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
        self._rule_keywords = {
            k: v for k, v in shared.items() if v is not None
        } | rule_settings
        if isinstance(aggregation, Aggregator):
            if self._rule_keywords:
                raise ValueError(
                    f"aggregation is an {type(aggregation).__name__} instance, whose "
                    f"own settings apply; do not also pass "
                    f"{sorted(self._rule_keywords)} (set them on the instance)"
                )
            self._rule_name: str | None = None
            self.aggregator = aggregation
        else:
            self._rule_name = aggregation
            # K defaults to the slots; without concurrency it is sized at start.
            self.aggregator = make_aggregator(
                aggregation,
                self._rule_keywords,
                default_buffer_size=buffer_for_slots(
                    concurrency or max(min_train_nodes, 1)
                ),
            )
        self.aggregation = self.aggregator.name or type(self.aggregator).__name__
        self.state_keys = state_keys
        self.max_staleness = max_staleness
        self.selection = selection
        self.selector = make_selector(selection, seed)
        self.seed = seed
        self.clock: Clock = clock if clock is not None else WallClock()
        self.eval_every = eval_every
        self.background_evaluation = background_evaluation
        self.max_time = max_time
        self.max_reply_bytes = max_reply_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.distinct_buffer = distinct_buffer
        self._max_failures = max_consecutive_failures
        self.poll_interval = poll_interval
        self.node_queue_depth = node_queue_depth
        self.store = ModelStore(keep_bases=self.aggregator.needs_base)
        self.scheduler = Scheduler(
            selector=self.selector,
            concurrency=concurrency,
            fraction_train=fraction_train,
            min_train_nodes=min_train_nodes,
            clock=self.clock,
        )
        self.state = RunState(
            num_rounds=0,
            result=Result(),
            max_consecutive_failures=self._failure_limit(concurrency or 1),
            weighted_by_key=weighted_by_key,
        )
        self.sync = SynchronousRounds(
            aggregator=self.aggregator,
            selector=self.selector,
            clock=self.clock,
            round_size=self._round_size,
            state_keys=state_keys,
            max_reply_bytes=max_reply_bytes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=self.train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=self.evaluate_metrics_aggr_fn,
            name=self.aggregation,
        )
        self._resume: tuple[Params, dict[str, Any]] | None = None

    # ----------------------------------------------------------- reading
    @property
    def version(self) -> int:
        """The current global version."""
        return self.store.version

    @property
    def history(self) -> RunHistory:
        """Everything the current (or last) run recorded."""
        return self.state.history

    @property
    def buffer_size(self) -> int:
        """Updates per version: ``K`` of a buffered rule, 1 for FedAsync."""
        return self.aggregator.updates_per_merge

    def _round_size(self, num_nodes: int) -> int:
        if self.concurrency is not None:
            return self.concurrency
        return train_slots(num_nodes, self.fraction_train, self.min_train_nodes)

    def _failure_limit(self, slots: int) -> int:
        return self._max_failures or max(30, 3 * slots)

    @property
    def max_consecutive_failures(self) -> int:
        """Failed tasks in a row that end the run (as given, or sized from slots)."""
        return self.state.max_consecutive_failures

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

    def save_checkpoint(self, path: str | Path | None = None) -> None:
        """Write the global model and every component's state atomically.

        ``path`` defaults to ``checkpoint_path``.
        """
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("save_checkpoint needs a path (or checkpoint_path)")
        agg_arrays, agg_meta = self.aggregator.state()
        state = {
            "version": self.version,
            "aggregation": self.aggregation,
            "param_order": list(self.store.params),
            "scheduler": self.scheduler.get_state(),
            "aggregator": agg_meta,
            **self.state.get_state(),
        }
        save_checkpoint(target, self.store.params, state, agg_arrays)
        log(INFO, "Checkpoint of version %d written to %s", self.version, target)

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
        self.state.set_state(state)
        log(INFO, "Resumed from version %d", self.version)

    # ---------------------------------------------------------------- summary
    def settings(self) -> dict[str, Any]:
        """The strategy's settings, flat (for trackers and logs)."""
        rule = {
            f"rule.{k}": getattr(self.aggregator.settings, k)
            for k in vars(self.aggregator.settings)
        }
        return {
            "aggregation": self.aggregation,
            **rule,
            "concurrency": self.concurrency,
            "fraction_train": self.fraction_train,
            "min_train_nodes": self.min_train_nodes,
            "fraction_evaluate": self.fraction_evaluate,
            "max_staleness": self.max_staleness,
            "selection": self.selection,
            "distinct_buffer": self.distinct_buffer,
            "node_queue_depth": self.scheduler.queue_depth,
            "seed": self.seed,
            "clock": self.clock.describe(),
            "eval_every": self.eval_every,
        }

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Asynchronous aggregation: %s", self.aggregator.summary())
        log(INFO, "\t├──> Max staleness: %s", self.max_staleness)
        slots = (
            str(self.concurrency)
            if self.concurrency is not None
            else f"fraction_train={self.fraction_train} of connected nodes "
            f"(at least {self.min_train_nodes})"
        )
        log(INFO, "\t├──> Training slots: %s, selection: %s", slots, self.selection)
        log(INFO, "\t└──> Clock: %s", self.clock.describe())

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
        callbacks: Sequence[Callback] | None = None,
    ) -> Result:
        """Run asynchronous federated learning until ``num_rounds`` versions.

        Parameters
        ----------
        grid : Grid
            The Grid used to send/receive Messages.
        initial_arrays : ArrayRecord
            Initial global model (not modified).
        num_rounds : int (default: 3)
            Number of global model updates (versions) to perform.
        timeout : float (default: 3600)
            Seconds one dispatched task (or a federated evaluation) may take
            before it counts as failed; also the longest wait for
            ``min_available_nodes``.
        train_config : ConfigRecord, optional
            Sent to clients with every task; the strategy adds ``server-round``
            (= current version), ``base-version``, ``delay`` (the staleness the
            node's previous update had, for the delay-aware client learning
            rate) and ``task-seed``.
        evaluate_config : ConfigRecord, optional
            Sent with federated evaluation messages.
        evaluate_fn : callable, optional
            Central evaluation ``(version, arrays) -> MetricRecord``; run at
            version 0, every ``eval_every`` versions and at the end.
        callbacks : Sequence[Callback], optional
            Called at the run's events after the built-in ones (central
            evaluation, progress log, checkpoints, time budget); any may end
            the run (see :mod:`afl_flwr.callbacks`).

        Returns
        -------
        Result
            As FedAvg's: final ``arrays``, ``train_metrics_clientapp`` and
            ``evaluate_metrics_clientapp`` / ``evaluate_metrics_serverapp``,
            keyed by version.

        Raises
        ------
        RunAbortedError
            When ``max_consecutive_failures`` tasks failed in a row, or fewer
            than ``min_available_nodes`` nodes connected within ``timeout``.
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
        self.scheduler.reset()
        self.aggregator.discard_pending()
        self.store.reset(arrayrecord_to_params(initial_arrays, writable=True))
        self.state = RunState(
            num_rounds=num_rounds,
            result=Result(arrays=initial_arrays),
            max_consecutive_failures=self._failure_limit(self.concurrency or 1),
            weighted_by_key=self.weighted_by_key,
        )
        self.scheduler.queue_depth = check_queue_depth(self.node_queue_depth, grid)
        self._wait_for_nodes(grid, timeout)
        if self.scheduler.queue_depth > 1:
            log(
                INFO,
                "Node queue depth %d: a busy node also holds %d waiting train task(s)",
                self.scheduler.queue_depth,
                self.scheduler.queue_depth - 1,
            )
        if is_superlink_grid(grid):
            self.scheduler.puller = ReplyPuller(grid, self.poll_interval)
        resumed = self._resume is not None
        if resumed:
            self._apply_resume()
        self.aggregator.bind_state(state_names(self.store.params, self.state_keys))

        def checkpoint(path: Path) -> None:
            everyone.on_flush(run, False)  # e.g. pending evaluations are recorded
            self.save_checkpoint(path)

        run = RunView(
            self.state,
            self.store,
            self.clock,
            self.scheduler,
            num_rounds,
            checkpoint,
            self.settings(),
        )
        built_in: list[Callback] = [
            ProgressLog(),
            CentralEvaluation(
                evaluate_fn, self.eval_every, background=self.background_evaluation
            ),
        ]
        if self.checkpoint_every:
            assert self.checkpoint_path is not None
            built_in.append(Checkpoint(self.checkpoint_path, self.checkpoint_every))
        if self.max_time is not None:
            built_in.append(TimeBudget(self.max_time))
        everyone = CallbackList([*built_in, *(callbacks or ())])
        federated = FederatedEvaluation(
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
        tasks = TrainTasks(
            store=self.store,
            state=self.state,
            config=ConfigRecord() if train_config is None else train_config,
            seed=self.seed,
            timeout=timeout,
            arrayrecord_key=self.arrayrecord_key,
            configrecord_key=self.configrecord_key,
        )
        everyone.on_start(run, resumed)
        try:
            self._loop(grid, run, everyone, federated, tasks, timeout)
        finally:
            try:
                self._finish(grid, run, everyone, federated, timeout)
            finally:
                if self.scheduler.puller is not None:
                    self.scheduler.puller.close()
                    self.scheduler.puller = None
        return self.state.result

    def _wait_for_nodes(self, grid: Grid, timeout: float) -> None:
        """Wait (at most ``timeout``) for ``min_available_nodes`` nodes."""
        deadline = time.time() + timeout
        next_log = 0.0
        while True:
            self.scheduler.refresh(grid, force=True)
            connected = len(self.scheduler.nodes)
            if connected >= self.min_available_nodes:
                break
            if time.time() >= deadline:
                message = (
                    f"only {connected} node(s) connected within {timeout}s; "
                    f"min_available_nodes={self.min_available_nodes}"
                )
                self.state.stop(message, failed=True)
                raise RunAbortedError(message)
            if time.time() >= next_log:
                log(
                    INFO,
                    "Waiting for nodes to connect: %d connected (minimum required: "
                    "%d).",
                    connected,
                    self.min_available_nodes,
                )
                next_log = time.time() + 10.0
            self._sleep(max(self.poll_interval, 0.5))
        slots = self.scheduler.slots
        if (
            self._rule_name is not None
            and self.concurrency is None
            and "buffer_size" not in self._rule_keywords
            and getattr(self.aggregator, "buffer_size", None) != buffer_for_slots(slots)
        ):
            self._rebuild_rule(buffer_for_slots(slots))
        self.state.max_consecutive_failures = self._failure_limit(slots)
        self.aggregator.check_population(len(self.scheduler.nodes))

    def use_aggregator(self, aggregator: Aggregator) -> None:
        """Run with ``aggregator`` from now on (a wrapper such as DP installs one)."""
        self.aggregator = aggregator
        self.aggregation = aggregator.name or type(aggregator).__name__
        self._rule_name = None
        self.store = ModelStore(keep_bases=aggregator.needs_base)
        self.sync.aggregator = aggregator

    def _rebuild_rule(self, buffer_size: int) -> None:
        """K defaults to half the slots sized when training starts (no concurrency)."""
        assert self._rule_name is not None
        self.aggregator = make_aggregator(
            self._rule_name, self._rule_keywords, default_buffer_size=buffer_size
        )
        self.aggregator.bind_state(state_names(self.store.params, self.state_keys))
        self.sync.aggregator = self.aggregator

    def _loop(
        self,
        grid: Grid,
        run: RunView,
        callbacks: CallbackList,
        federated: FederatedEvaluation,
        tasks: TrainTasks,
        timeout: float,
    ) -> None:
        scheduler = self.scheduler
        while self.version < run.num_rounds:
            if self._stop(callbacks.on_poll(run)) or self._announce(run, callbacks):
                return
            scheduler.refresh(grid)
            waiting = self._waiting_nodes()
            avoid = waiting if self.distinct_buffer else set()
            exclude = waiting if self.aggregator.distinct_clients else set()
            if scheduler.dispatch(grid, tasks, avoid, exclude):
                self.state.dispatched(self.clock.wall())
            if not scheduler.in_flight:
                log(INFO, "Waiting for nodes to connect...")
                self._sleep(max(self.poll_interval, 1.0))
                continue
            for reply in scheduler.poll(grid, timeout):
                self.state.record_unknown_reply(
                    version=self.version,
                    node_id=reply.metadata.src_node_id,
                    client=scheduler.label(reply.metadata.src_node_id),
                    reply_to=reply.metadata.reply_to_message_id,
                    wall=self.clock.wall(),
                    sim=self.clock.now(),
                )
            federated.close_ready(self.state, scheduler)
            processed = False
            while self.version < run.num_rounds and (
                outcome := scheduler.next_outcome()
            ):
                processed = True
                if outcome.task.kind == EVALUATE:
                    federated.add(outcome, self.state, scheduler)
                    continue
                stop = self._handle(outcome, grid, run, callbacks, federated, timeout)
                if self._stop(stop) or self._announce(run, callbacks):
                    return
                if self.clock.refill_each_outcome:
                    break  # refill the freed slot at this (simulated) instant first
            if not processed:
                self._sleep(self.poll_interval)

    def _stop(self, stop: Stop | None) -> bool:
        if stop is None:
            return False
        self.state.stop(stop.reason)
        return True

    def _announce(self, run: RunView, callbacks: CallbackList) -> bool:
        """Tell callbacks of new evaluations; whether one asked for a stop."""
        for evaluation in self.state.take_evaluations():
            if self._stop(callbacks.on_evaluation(run, evaluation)):
                return True
        return False

    @staticmethod
    def _sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _waiting_nodes(self) -> set[int]:
        """Nodes whose update waits in the aggregator's buffer."""
        return self.scheduler.nodes_of({u.client for u in self.aggregator.pending()})

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def _handle(
        self,
        outcome: Outcome,
        grid: Grid,
        run: RunView,
        callbacks: CallbackList,
        federated: FederatedEvaluation,
        timeout: float,
    ) -> Stop | None:
        """One train outcome: admit, add, merge, advance, record, notify."""
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
        record: dict[str, Any] = {
            "version": self.version,
            "node_id": task.node_id,
            "client": self.scheduler.label(task.node_id),
            "base_version": task.base_version,
            "wall_time": self.clock.wall(),
            "sim_time": outcome.sim_time,
            "sim_duration": outcome.sim_duration,
        }
        if isinstance(admitted, Refusal):
            self._refuse(task, admitted, tau, record)
            return None
        self.scheduler.record_success(task.node_id)
        update = Update(
            client=self.scheduler.label(task.node_id),
            params=admitted.params,
            base=base,
            base_version=task.base_version,
            staleness=tau,
            num_examples=admitted.num_examples,
            metrics=admitted.metrics,
        )
        event = self.state.record(
            status=MERGED,
            staleness=tau,
            weight=self.aggregator.weight(update),
            reply=admitted,
            **record,
        )
        self.state.admitted(event, admitted, task.node_id)
        if not self.aggregator.add(update):
            return None
        self.aggregator.observe_population(len(self.scheduler.nodes))
        try:
            new = self.aggregator.merge(self.store.params)
        except MergeRefused as refused:
            return Stop(str(refused))
        self.store.advance(new)
        merged = self.state.merged(self.version, self.train_metrics_aggr_fn)
        if federated.due(self.version, run.num_rounds):
            federated.send(grid, self.store, self.scheduler)
        return callbacks.on_version(run, merged)

    def _refuse(
        self, task: Task, refusal: Refusal, tau: int, record: dict[str, Any]
    ) -> None:
        log(WARNING, "Node %s: %s (%s)", task.node_id, refusal.status, refusal.reason)
        self.state.record(
            status=refusal.status,
            staleness=tau if refusal.status != "timeout" else None,
            reason=refusal.reason,
            reply=refusal.reply,
            **record,
        )
        if refusal.reply is not None:
            self.state.last_staleness[task.node_id] = tau
        if refusal.failure:
            self.scheduler.record_failure(task.node_id, refusal.reason)
            self.state.task_failed(task.node_id, refusal.reason)

    def _finish(
        self,
        grid: Grid,
        run: RunView,
        callbacks: CallbackList,
        federated: FederatedEvaluation,
        timeout: float,
    ) -> None:
        self.state.finish(self.scheduler.abandon())
        self.aggregator.discard_pending()
        try:
            federated.final(grid, self.store, self.scheduler)
            self._drain_evaluations(grid, federated, timeout)
            callbacks.on_flush(run, True)
            for evaluation in self.state.take_evaluations():
                callbacks.on_evaluation(run, evaluation)
        finally:
            callbacks.on_stop(run)
            self.state.result.arrays = self.store.record()
            self.state.log_final(self.version, self.clock.now(), self.clock.wall())

    def _drain_evaluations(
        self, grid: Grid, federated: FederatedEvaluation, timeout: float
    ) -> None:
        """Wait (at most ``timeout``) for the federated evaluations still out."""
        deadline = time.time() + timeout
        while federated.open_versions and time.time() < deadline:
            self.scheduler.poll(grid, timeout)
            while (outcome := self.scheduler.next_outcome()) is not None:
                federated.add(outcome, self.state, self.scheduler)
            if federated.open_versions:
                time.sleep(0.05)
        federated.close_ready(self.state, self.scheduler, force=True)

    # ------------------------------------------------- Flower's round loop
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's round loop: a round's train messages (the run is synchronous)."""
        return list(self.sync.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's round loop: aggregate a round's replies with the same rule."""
        return self.sync.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's round loop: a round's evaluate messages."""
        return list(self.sync.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's round loop: the weighted average of evaluation metrics."""
        return self.sync.aggregate_evaluate(server_round, replies)


def _check_arguments(**values: Any) -> None:
    """Range checks of the constructor's own arguments (not the rule's)."""
    for name in ("fraction_train", "fraction_evaluate"):
        if not 0.0 <= values[name] <= 1.0:
            raise ValueError(f"{name}={values[name]} must be in [0, 1]")
    for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        if values[name] < 0:
            raise ValueError(f"{name}={values[name]} must be >= 0")
    if values["concurrency"] is not None and values["concurrency"] < 1:
        raise ValueError(f"concurrency={values['concurrency']} must be >= 1")
    if values["max_staleness"] is not None and values["max_staleness"] < 0:
        raise ValueError(
            f"max_staleness={values['max_staleness']} must be >= 0 (tau_max)"
        )
    if values["eval_every"] < 1:
        raise ValueError(f"eval_every={values['eval_every']} must be >= 1")
    if values["max_time"] is not None and not values["max_time"] > 0:
        raise ValueError(f"max_time={values['max_time']} must be > 0")
    every, path = values["checkpoint_every"], values["checkpoint_path"]
    if every < 0 or (every and path is None):
        raise ValueError(
            f"checkpoint_every={every} must be >= 0, and > 0 needs a checkpoint_path"
        )
    depth = values["node_queue_depth"]
    if depth < 1:
        raise ValueError(f"node_queue_depth={depth} must be >= 1")
    failures = values["max_consecutive_failures"]
    if failures is not None and failures < 1:
        raise ValueError(f"max_consecutive_failures={failures} must be >= 1")


__all__ = ["RunAbortedError", "StalenessAwareAsyncStrategy", "TrainTasks"]
