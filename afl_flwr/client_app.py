"""ClientApp: the paper's delay-aware local training with early stopping.

Handles ``train`` (local training from the received global model),
``evaluate`` (the global model on the local partition) and ``query.profile``
(the node's speed/delay profile, used by the server's simulated clock).

A deployed SuperNode runs every message in a fresh process, so what a task costs
before training (interpreter, imports, data, model) is paid per task: the first
train task of each process logs that split (``Cold task timing: ...``), which
``benchmarks/deployment.py`` reads, and partitions come from the on-disk cache of
:mod:`afl_flwr.partition_cache`.
"""

import itertools
import time
from collections.abc import Mapping
from functools import lru_cache
from logging import INFO
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch.utils.data import DataLoader, TensorDataset

from afl_flwr.clock import NodeProfile, speed_factor
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.constants import (
    ARRAYS_KEY,
    CLIENT_DELAY,
    CLIPPING_NORM_KEY,
    CONFIG_KEY,
    EPOCHS_RUN,
    EVAL_ACC,
    EVAL_LOSS,
    LOCAL_EPOCHS,
    MAX_DELAY_S,
    METRICS_KEY,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PROFILE_KEY,
    SPEED_FACTOR,
    STEPS,
    TASK_SEED,
    TRAIN_LOSS,
    UNIT_WEIGHT,
)
from afl_flwr.data import get_dataset_spec
from afl_flwr.models import get_model
from afl_flwr.partition_cache import PartitionRequest, load_partition_cached
from afl_flwr.training import evaluate, get_device, train_local

# Train tasks handled by this process; the first one logs its cold-start timing.
_TRAIN_TASKS = itertools.count()


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``overrides`` take precedence over the run config.

    ``flwr run`` passes the run config in the Context; ``overrides`` serve callers
    of ``flwr.simulation.run_simulation``, whose Contexts carry an empty one.
    """
    client_app = ClientApp()

    def config_of(context: Context) -> AppConfig:
        return AppConfig.from_run_config({**context.run_config, **(overrides or {})})

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, config_of(context))

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_local(msg, context, config_of(context))

    @client_app.query("profile")
    def _profile(msg: Message, context: Context) -> Message:
        return query_profile(msg, context, config_of(context))

    return client_app


def train(msg: Message, context: Context, cfg: AppConfig) -> Message:
    """Train the received model locally and reply with weights and metrics.

    A task whose config carries Flower's ``KEY_CLIPPING_NORM`` (client-side DP
    clipping, ``dp-clipping = "client"``) goes through Flower's
    ``fixedclipping_mod``: the reply's delta is clipped to that norm here.
    """
    config: Mapping[str, Any] = next(iter(msg.content.config_records.values()), {})
    if CLIPPING_NORM_KEY in config:
        from flwr.clientapp.mod import fixedclipping_mod

        return fixedclipping_mod(msg, context, lambda m, c: _fit(m, c, cfg))
    return _fit(msg, context, cfg)


def _fit(msg: Message, context: Context, cfg: AppConfig) -> Message:
    entered = time.perf_counter()
    process_age, startup_cpu = _process_age_s(), time.process_time()
    partition_id = node_partition(context, cfg)
    trainset = client_trainset(cfg, partition_id)
    data_loaded = time.perf_counter()
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    tau = _number(config.get(CLIENT_DELAY, 0), CLIENT_DELAY)
    epochs = int(_number(config.get(LOCAL_EPOCHS, cfg.local_epochs), LOCAL_EPOCHS))
    task_seed = int(_number(config.get(TASK_SEED, cfg.seed), TASK_SEED))

    model = build_model(cfg)
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    model_built = time.perf_counter()
    torch.manual_seed(task_seed)
    loader = DataLoader(
        trainset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(task_seed),
    )
    started = time.perf_counter()
    result = train_local(
        model,
        loader,
        epochs=epochs,
        lr0=cfg.learning_rate,
        alpha=cfg.lr_delay_alpha,
        tau=tau,
        patience=cfg.patience,
        min_rel_delta=cfg.early_stop_delta,
        device=get_device(),
    )
    if next(_TRAIN_TASKS) == 0:
        log(
            INFO,
            "Cold task timing: process age %.3f s (cpu %.3f s), data %.3f s, "
            "model %.3f s, train %.3f s",
            process_age,
            startup_cpu,
            data_loaded - entered,
            model_built - data_loaded,
            time.perf_counter() - started,
        )
    if cfg.clock == "real":
        profile = node_profile(context, cfg, partition_id)
        _sleep_like(profile, time.perf_counter() - started, task_seed)

    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(trainset),
            TRAIN_LOSS: result.mean_loss,
            EPOCHS_RUN: result.epochs_run,
            STEPS: result.steps,
        }
    )
    if config.get(UNIT_WEIGHT):
        metrics[UNIT_WEIGHT] = 1.0
    content = RecordDict(
        {ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics}
    )
    return Message(content=content, reply_to=msg)


def evaluate_local(msg: Message, context: Context, cfg: AppConfig) -> Message:
    """Evaluate the received model on the local partition."""
    partition_id = node_partition(context, cfg)
    dataset = client_trainset(cfg, partition_id)
    model = build_model(cfg)
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    loss, accuracy = evaluate(model, DataLoader(dataset, batch_size=256), get_device())
    metrics = MetricRecord(
        {EVAL_LOSS: loss, EVAL_ACC: accuracy, NUM_EXAMPLES: len(dataset)}
    )
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def query_profile(msg: Message, context: Context, cfg: AppConfig) -> Message:
    """Reply with this node's profile (partition, examples, speed, delay)."""
    profile = node_profile(context, cfg, node_partition(context, cfg))
    return Message(content=RecordDict({PROFILE_KEY: profile.to_record()}), reply_to=msg)


def node_partition(context: Context, cfg: AppConfig) -> int:
    """Return the node's partition id, validated against ``num-clients``.

    Raises
    ------
    ConfigError
        When the node config lacks ``partition-id`` or it is out of range.
    """
    if PARTITION_ID not in context.node_config:
        raise ConfigError(
            f"node config has no '{PARTITION_ID}'; start the SuperNode with "
            f'--node-config "{PARTITION_ID}=<i> {NUM_PARTITIONS}=<N>"'
        )
    partition_id = int(context.node_config[PARTITION_ID])  # type: ignore[call-overload]
    if not 0 <= partition_id < cfg.num_clients:
        raise ConfigError(
            f"{PARTITION_ID}={partition_id} is out of range for num-clients="
            f"{cfg.num_clients}; allowed: 0..{cfg.num_clients - 1} (set num-clients "
            "to the number of SuperNodes)"
        )
    return partition_id


def node_profile(context: Context, cfg: AppConfig, partition_id: int) -> NodeProfile:
    """The node's profile: ``--node-config`` values win over run-config defaults."""
    speed = context.node_config.get(SPEED_FACTOR)
    if speed is None:
        speed = speed_factor(
            partition_id,
            cfg.num_clients,
            spread=cfg.speed_spread,
            straggler_fraction=cfg.straggler_fraction,
            straggler_slowdown=cfg.straggler_slowdown,
            seed=cfg.seed,
        )
    max_delay = context.node_config.get(MAX_DELAY_S, cfg.max_delay_s)
    return NodeProfile(
        partition_id=partition_id,
        num_examples=len(client_trainset(cfg, partition_id)),
        speed_factor=float(speed),  # type: ignore[arg-type]
        max_delay_s=float(max_delay),  # type: ignore[arg-type]
    )


# Large enough for every partition of a federation served from one process
# (a Ray worker hosting many nodes, or the in-process benchmark engine).
@lru_cache(maxsize=256)
def client_trainset(cfg: AppConfig, partition_id: int) -> TensorDataset:
    """Return the training partition of a node: once per process, once per disk."""
    request = PartitionRequest(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        num_partitions=cfg.num_clients,
        partition_id=partition_id,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        num_test=cfg.num_test,
    )
    return load_partition_cached(request)


def build_model(cfg: AppConfig) -> torch.nn.Module:
    """The configured model for the configured data set."""
    spec = get_dataset_spec(cfg.dataset)
    return get_model(cfg.model, spec.in_channels, spec.num_classes)


def _number(value: object, key: str) -> float:
    """A numeric message-config value, or a ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config '{key}'={value!r} must be a number")
    return float(value)


def _process_age_s() -> float:
    """Seconds since this process started (NaN where psutil cannot tell)."""
    try:
        return time.time() - psutil.Process().create_time()
    except (psutil.Error, OSError):
        return float("nan")


def _sleep_like(profile: NodeProfile, compute_s: float, task_seed: int) -> None:
    """``real`` clock: sleep as a slower node with network delay would take."""
    extra = compute_s * (profile.speed_factor - 1.0)
    delay = float(np.random.default_rng(task_seed).uniform(0, profile.max_delay_s))
    time.sleep(max(0.0, extra) + delay)


app = make_client_app()
