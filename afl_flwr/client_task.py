"""The ClientApp's work: the paper's delay-aware local training with early stopping.

:mod:`afl_flwr.client_app` routes Flower's messages here, in its own process
or on the node's warm worker (:mod:`afl_flwr.node_worker`): ``train`` (local
training from the received global model, :func:`fit_model` for the model
itself), ``evaluate`` (the global model on the local partition) and
``query.profile`` (the node's speed/delay profile, used by the server's
simulated clock). Partitions come from the on-disk cache of
:mod:`afl_flwr.partition_cache`.
"""

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from torch.utils.data import DataLoader, TensorDataset

from afl_flwr.client_app import log_task_timing, process_age_s
from afl_flwr.clock import NodeProfile
from afl_flwr.config import AppConfig
from afl_flwr.constants import (
    ARRAYS_KEY,
    CLIENT_DELAY,
    CONFIG_KEY,
    EPOCHS_RUN,
    EVAL_ACC,
    EVAL_LOSS,
    LOCAL_EPOCHS,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROFILE_KEY,
    STEPS,
    TASK_SEED,
    TRAIN_LOSS,
    UNIT_WEIGHT,
)
from afl_flwr.data import get_dataset_spec
from afl_flwr.models import get_model
from afl_flwr.partition_cache import load_partition_cached
from afl_flwr.profiles import (
    node_partition,
    partition_request,
    profile_with,
)
from afl_flwr.training import evaluate, get_device, train_local

# Train tasks handled by this process; the first one logs its cold-start timing.
_TRAIN_TASKS = itertools.count()


def fit(msg: Message, context: Context, cfg: AppConfig) -> Message:
    """Train the received model in this process; the reply's weights and metrics."""
    process_age, startup_cpu = process_age_s(), time.process_time()
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    trained = fit_model(state, config, cfg, context.node_config)
    if next(_TRAIN_TASKS) == 0:
        log_task_timing(process_age, startup_cpu, trained.timing)
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(trained.model.state_dict()),
            METRICS_KEY: trained.metrics,
        }
    )
    return Message(content=content, reply_to=msg)


@dataclass
class Fit:
    """What one train task produced: the trained model, its metrics and timing."""

    model: torch.nn.Module
    metrics: MetricRecord
    timing: dict[str, float]


def fit_model(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    cfg: AppConfig,
    node_config: Mapping[str, Any],
) -> Fit:
    """Train the model ``state`` on this node's partition as the task says.

    Parameters
    ----------
    state : Mapping[str, Any]
        The received global model (a state dict of tensors or arrays).
    config : Mapping[str, Any]
        The task's config record (delay ``tau``, local epochs, task seed, ...).
    cfg : AppConfig
        The run config.
    node_config : Mapping[str, Any]
        The SuperNode's node config (``partition-id``, optional profile).

    Returns
    -------
    Fit
        The trained model, the reply's metrics and the seconds spent loading
        the data (``data``), building the model (``model``) and training
        (``train``).
    """
    started = time.perf_counter()
    partition_id = node_partition(node_config, cfg)
    trainset = client_trainset(cfg, partition_id)
    data_loaded = time.perf_counter()
    tau = _number(config.get(CLIENT_DELAY, 0), CLIENT_DELAY)
    epochs = int(_number(config.get(LOCAL_EPOCHS, cfg.local_epochs), LOCAL_EPOCHS))
    task_seed = int(_number(config.get(TASK_SEED, cfg.seed), TASK_SEED))

    model = build_model(cfg)
    model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in state.items()}  # arrays or tensors
    )
    model_built = time.perf_counter()
    torch.manual_seed(task_seed)
    loader = DataLoader(
        trainset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(task_seed),
    )
    training = time.perf_counter()
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
    timing = {
        "data": data_loaded - started,
        "model": model_built - data_loaded,
        "train": time.perf_counter() - training,
    }
    if cfg.clock == "real":
        profile = node_profile(node_config, cfg, partition_id)
        _sleep_like(profile, time.perf_counter() - training, task_seed)

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
    return Fit(model=model, metrics=metrics, timing=timing)


# Batches of the throwaway training pass that warms a node worker up.
WARM_UP_BATCHES = 2


def warm_up(cfg: AppConfig, node_config: Mapping[str, Any]) -> float:
    """Run a throwaway training pass on this node's data; its seconds.

    Builds the configured model and trains it on the partition's first
    :data:`WARM_UP_BATCHES` batches (no shuffling), then drops it, so a process's
    one-time costs (the partition read, the optimiser's and the kernels' first
    calls) are paid before its first real task. Nothing it touches is read by
    :func:`fit_model` again except the cached partition: ``fit_model`` loads the
    received weights and seeds torch from the task before it trains.
    """
    started = time.perf_counter()
    trainset = client_trainset(cfg, node_partition(node_config, cfg))
    count = min(len(trainset), WARM_UP_BATCHES * cfg.batch_size)
    subset = torch.utils.data.Subset(trainset, range(count))
    train_local(
        build_model(cfg),
        DataLoader(subset, batch_size=cfg.batch_size),
        epochs=1,
        lr0=cfg.learning_rate,
        alpha=0.0,
        tau=0.0,
        patience=cfg.patience,
        device=get_device(),
    )
    return time.perf_counter() - started


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


def node_profile(
    context: Context | Mapping[str, Any], cfg: AppConfig, partition_id: int
) -> NodeProfile:
    """The node's profile: ``--node-config`` values win over run-config defaults.

    ``context`` is the task's Context or its node config; the example count is
    the loaded partition's (:func:`client_trainset`).
    """
    count = len(client_trainset(cfg, partition_id))
    return profile_with(context, cfg, partition_id, count)


# Large enough for every partition of a federation served from one process
# (a Ray worker hosting many nodes, or the in-process benchmark engine).
@lru_cache(maxsize=256)
def client_trainset(cfg: AppConfig, partition_id: int) -> TensorDataset:
    """Return the training partition of a node: once per process, once per disk."""
    return load_partition_cached(partition_request(cfg, partition_id))


def build_model(cfg: AppConfig) -> torch.nn.Module:
    """The configured model for the configured data set."""
    spec = get_dataset_spec(cfg.dataset)
    return get_model(cfg.model, spec.in_channels, spec.num_classes)


def _number(value: object, key: str) -> float:
    """A numeric message-config value, or a ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config '{key}'={value!r} must be a number")
    return float(value)


def _sleep_like(profile: NodeProfile, compute_s: float, task_seed: int) -> None:
    """``real`` clock: sleep as a slower node with network delay would take."""
    extra = compute_s * (profile.speed_factor - 1.0)
    delay = float(np.random.default_rng(task_seed).uniform(0, profile.max_delay_s))
    time.sleep(max(0.0, extra) + delay)
