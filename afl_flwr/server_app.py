"""ServerApp: run the async strategy or Flower's FedAvg and write the results.

Builds the model and initial weights, evaluates the global model centrally on
the held-out test set, and writes the results folder (:mod:`afl_flwr.results`).
"""

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from torch.utils.data import DataLoader, TensorDataset

from afl_flwr.client_app import build_model
from afl_flwr.clock import VirtualClock
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.constants import NUM_EXAMPLES, UNIT_WEIGHT
from afl_flwr.data import load_central_testset
from afl_flwr.history import RunHistory
from afl_flwr.model_state import state_names
from afl_flwr.results import TEST_ACC, TEST_LOSS, new_run_dir, write_results
from afl_flwr.strategy import RunAbortedError, StalenessAwareAsyncStrategy
from afl_flwr.sync_baseline import ClockedFedAvg
from afl_flwr.training import evaluate, get_device

NODE_WAIT_S = 30.0
# Replies larger than this are rejected (the largest registered model, ResNet-20,
# is ~1 MB; a reply 1 GB big is malformed or hostile).
MAX_REPLY_BYTES = 1 << 30


@dataclass(frozen=True)
class RunOutcome:
    """What a run produced."""

    result: Result
    history: RunHistory
    results_path: Path


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_finish: Callable[[RunOutcome], None] | None = None,
) -> ServerApp:
    """Build the ServerApp; ``overrides`` take precedence over the run config.

    ``flwr run`` passes the run config in the Context; ``overrides`` serve callers
    of ``flwr.simulation.run_simulation``, whose Context carries an empty one.
    ``on_finish`` receives the :class:`RunOutcome` of an in-process run.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = AppConfig.from_run_config({**context.run_config, **(overrides or {})})
        outcome = run(grid, cfg)
        if on_finish is not None:
            on_finish(outcome)

    return server_app


def run(grid: Grid, cfg: AppConfig) -> RunOutcome:
    """Run one experiment (async or sync) on ``grid`` and write its results."""
    random.seed(cfg.seed)  # Flower's FedAvg samples nodes with `random`
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # Load the test set first: a bad data-dir fails here, before any training.
    # A deployment without central data sets server-eval=false and evaluates on
    # the clients (fraction-evaluate) instead.
    evaluate_fn = None
    if cfg.server_eval:
        testset = load_central_testset(cfg.dataset, cfg.data_dir, cfg.num_test)
        evaluate_fn = central_evaluation(cfg, testset)
    model = build_model(cfg)
    initial = ArrayRecord(model.state_dict())
    wait_for_nodes(grid, cfg.num_clients)
    clock = (
        VirtualClock(
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            step_time_s=cfg.step_time_s,
            seed=cfg.seed,
            # Early stopping ends a job after patience + 1 epochs at the earliest.
            min_epochs=cfg.patience + 1,
            profile_query=cfg.profile_query,
        )
        if cfg.clock == "virtual"
        else None
    )
    log(INFO, "Mode %s, model %s, dataset %s", cfg.mode, cfg.model, cfg.dataset)
    run_dir = new_run_dir(cfg.results_dir, cfg.mode)
    strategy: StalenessAwareAsyncStrategy | ClockedFedAvg
    runner: Any
    train_config = ConfigRecord()
    sync_kwargs: dict[str, Any] = {}
    if cfg.mode == "async":
        strategy = make_async_strategy(cfg, clock, run_dir / "checkpoint.npz")
        runner = private(strategy, cfg) if cfg.dp_enabled else strategy
        if cfg.resume_from:
            version = strategy.resume_from(cfg.resume_from)
            log(INFO, "Resuming from %s (version %d)", cfg.resume_from, version)
    else:
        num_nodes = len(list(grid.get_node_ids()))
        strategy = ClockedFedAvg(
            clock=clock,
            eval_every=cfg.eval_every,
            seed=cfg.seed,
            selection=cfg.selection if cfg.sync_selection == "selector" else None,
            fraction_train=min(1.0, cfg.clients_per_round / max(num_nodes, 1)),
            fraction_evaluate=0.0,
            min_train_nodes=min(cfg.clients_per_round, max(num_nodes, 1)),
            min_evaluate_nodes=0,
            min_available_nodes=min(cfg.clients_per_round, max(num_nodes, 1)),
            weighted_by_key=UNIT_WEIGHT if cfg.dp_enabled else NUM_EXAMPLES,
        )
        runner = strategy
        if cfg.dp_enabled:
            train_config[UNIT_WEIGHT] = True
            sync_kwargs["runner"] = flower_private(strategy, cfg, initial)
    try:
        result = runner.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.task_timeout,
            train_config=train_config,
            evaluate_fn=evaluate_fn,
            **sync_kwargs,
        )
    except RunAbortedError:
        # Record what happened before failing the run.
        assert isinstance(strategy, StalenessAwareAsyncStrategy)
        model.load_state_dict(strategy.store.record().to_torch_state_dict())
        path = write_results(
            run_dir,
            config=cfg.to_run_config(),
            history=strategy.history,
            state_dict=model.state_dict(),
        )
        log(WARNING, "Run aborted; what happened is recorded in %s", path.resolve())
        raise
    model.load_state_dict(result.arrays.to_torch_state_dict())
    path = write_results(
        run_dir,
        config=cfg.to_run_config(),
        history=strategy.history,
        state_dict=model.state_dict(),
    )
    log(INFO, "Results written to %s", path.resolve())
    return RunOutcome(result=result, history=strategy.history, results_path=path)


def make_async_strategy(
    cfg: AppConfig, clock: VirtualClock | None, checkpoint_path: Path | None = None
) -> StalenessAwareAsyncStrategy:
    """The asynchronous strategy configured from the run config."""
    return StalenessAwareAsyncStrategy(
        checkpoint_every=cfg.checkpoint_every if checkpoint_path else 0,
        checkpoint_path=checkpoint_path,
        concurrency=cfg.clients_per_round,
        # run() has waited (bounded) for num-clients nodes; start with what is
        # there, later nodes are picked up as they join.
        min_available_nodes=1,
        aggregation=cfg.aggregation,
        max_staleness=cfg.max_staleness,
        selection=cfg.selection,
        distinct_buffer=cfg.distinct_buffer,
        max_consecutive_failures=cfg.max_consecutive_failures or None,
        node_queue_depth=cfg.node_queue_depth,
        fraction_evaluate=cfg.fraction_evaluate,
        seed=cfg.seed,
        clock=clock,
        eval_every=cfg.eval_every,
        max_reply_bytes=MAX_REPLY_BYTES,
        **cfg.strategy_keywords(),
    )


def make_accountant(cfg: AppConfig) -> Any:
    """Flower's RDP accountant for the ``dp-*`` keys (population = num-clients)."""
    from flwr.serverapp import PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

    return RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.dp_target_delta,
            population_size=cfg.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=cfg.dp_max_epsilon or None,
        )
    )


def private(strategy: StalenessAwareAsyncStrategy, cfg: AppConfig) -> Any:
    """The async strategy under user-level DP (K = the buffer size)."""
    from afl_flwr.privacy import AsyncDPFixedClipping

    return AsyncDPFixedClipping(
        strategy,
        noise_multiplier=cfg.dp_noise_multiplier,
        clipping_norm=cfg.dp_clipping_norm,
        accountant=make_accountant(cfg),
        clipping=cfg.dp_clipping,
    )


def flower_private(
    strategy: ClockedFedAvg, cfg: AppConfig, initial: ArrayRecord
) -> Any:
    """FedAvg under Flower's own fixed-clipping DP wrapper.

    ``DifferentialPrivacyServerSideFixedClipping``, or its client-side twin
    with ``dp-clipping = "client"``: the same clipping norm, noise multiplier and
    accountant as the async path, with K = ``clients-per-round`` (every round
    samples exactly K nodes).

    Raises
    ------
    ConfigError
        If the model has state arrays (BatchNorm buffers, counters): Flower's
        wrapper clips and noises every array, state included.
    """
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    state = state_names(
        dict(zip(initial.keys(), initial.to_numpy_ndarrays(), strict=True))
    )
    if state:
        raise ConfigError(
            f"mode='sync' with dp-noise-multiplier > 0 uses Flower's "
            f"DifferentialPrivacyServerSideFixedClipping, which clips and noises "
            f"every array; model={cfg.model!r} has state arrays "
            f"({', '.join(sorted(state)[:3])}, ...): use mode='async'"
        )
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if cfg.dp_clipping == "client"
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(
        strategy,
        noise_multiplier=cfg.dp_noise_multiplier,
        clipping_norm=cfg.dp_clipping_norm,
        num_sampled_clients=cfg.clients_per_round,
        accountant=make_accountant(cfg),
    )


def central_evaluation(
    cfg: AppConfig, testset: TensorDataset
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """``evaluate_fn`` for Flower strategies: the global model on the test set."""
    loader = DataLoader(testset, batch_size=512)
    model = build_model(cfg)
    device = get_device()

    def evaluate_fn(version: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, loader, device)
        return MetricRecord({TEST_LOSS: loss, TEST_ACC: accuracy})

    return evaluate_fn


def wait_for_nodes(grid: Grid, expected: int, timeout: float = NODE_WAIT_S) -> int:
    """Wait (bounded) until ``expected`` nodes are connected; return how many are.

    The simulation registers its nodes while the ServerApp starts, and in a
    deployment SuperNodes connect over time; the strategies also pick up nodes
    that join later.
    """
    deadline = time.time() + timeout
    count = len(list(grid.get_node_ids()))
    while count < expected and time.time() < deadline:
        time.sleep(0.5)
        count = len(list(grid.get_node_ids()))
    if count < expected:
        log(
            WARNING,
            "Only %d of num-clients=%d nodes connected after %.0fs; continuing. In "
            "simulation start `flwr run` with --federation-config "
            '"num-supernodes=%d" (see README).',
            count,
            expected,
            timeout,
            expected,
        )
    return count


app = make_server_app()
