"""ClientApp: the paper's delay-aware local training with early stopping.

Handles ``train`` (local training from the received global model),
``evaluate`` (the global model on the local partition) and ``query.profile``
(the node's speed/delay profile, used by the server's simulated clock); the
work itself is in :mod:`afl_flwr.client_task`.

A deployed SuperNode runs every message in a fresh process. Under one, train
tasks and the profile query go to the node's warm worker by default (run-config
key ``node-worker``, :mod:`afl_flwr.node_worker`; the worker warms up after the
profile, before the first train task): this module imports Flower and numpy
only, so a task process neither imports torch nor loads data. Each train task's process
logs what it cost before training (``Cold task timing: ...``), which
``benchmarks/deployment.py`` reads.
"""

import importlib
import os
import sys
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from afl_flwr.constants import (
    ARRAYS_KEY,
    CLIPPING_NORM_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NODE_WORKER_KEY,
    NODE_WORKER_MODES,
    PROFILE_KEY,
)

if TYPE_CHECKING:
    from afl_flwr.config import AppConfig

# What this module re-exports from afl_flwr.client_task (imported on first use).
_TASK_EXPORTS = (
    "build_model",
    "client_trainset",
    "evaluate_local",
    "fit_model",
    "node_partition",
    "node_profile",
    "query_profile",
)
# The process Flower starts for every message of a SuperNode.
TASK_PROCESS = "flwr-clientapp"


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``overrides`` take precedence over the run config.

    ``flwr run`` passes the run config in the Context; ``overrides`` serve callers
    of ``flwr.simulation.run_simulation``, whose Contexts carry an empty one.
    """
    client_app = ClientApp()

    def run_config_of(context: Context) -> dict[str, Any]:
        return {**context.run_config, **(overrides or {})}

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        run_config = run_config_of(context)
        if uses_node_worker(run_config):
            return _with_client_clipping(
                msg, context, lambda m, c: train_on_worker(m, c, run_config)
            )
        return train(msg, context, _app_config(run_config))

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        task = _task()
        return task.evaluate_local(msg, context, _app_config(run_config_of(context)))

    @client_app.query("profile")
    def _profile(msg: Message, context: Context) -> Message:
        run_config = run_config_of(context)
        if uses_node_worker(run_config):
            return profile_on_worker(msg, context, run_config)
        task = _task()
        return task.query_profile(msg, context, _app_config(run_config))

    return client_app


def train(msg: Message, context: Context, cfg: "AppConfig") -> Message:
    """Train the received model in this process and reply with weights and metrics.

    A task whose config carries Flower's ``KEY_CLIPPING_NORM`` (client-side DP
    clipping, ``dp-clipping = "client"``) goes through Flower's
    ``fixedclipping_mod``: the reply's delta is clipped to that norm here.
    """
    task = _task()
    return _with_client_clipping(msg, context, lambda m, c: task.fit(m, c, cfg))


def uses_node_worker(run_config: Mapping[str, Any]) -> bool:
    """Whether train tasks and profile queries go to the node's warm worker.

    The run-config key ``node-worker``:

    ``auto`` (the default): when this process is Flower's per-message
    ``flwr-clientapp`` process of a SuperNode; ``on``: always; ``off``: never
    (Flower's simulation and the in-process engine keep their workers warm
    anyway).
    """
    mode = run_config.get(NODE_WORKER_KEY, NODE_WORKER_MODES[0])
    if mode not in NODE_WORKER_MODES:
        raise ValueError(
            f"{NODE_WORKER_KEY}={mode!r} is not allowed; allowed: "
            f"{', '.join(NODE_WORKER_MODES)}"
        )
    if mode == "auto":
        return Path(sys.argv[0]).name == TASK_PROCESS
    return mode == "on"


def train_on_worker(
    msg: Message, context: Context, run_config: Mapping[str, Any]
) -> Message:
    """Train the received model on the node's worker; :func:`train`'s reply."""
    from afl_flwr import node_worker

    process_age, startup_cpu = process_age_s(), time.process_time()
    config = msg.content.config_records.get(CONFIG_KEY)
    request = {
        "run_config": dict(run_config),
        "node_config": dict(context.node_config),
        "config": dict(config) if config is not None else {},
        "arrays": {
            k: v.numpy() for k, v in msg.content.array_records[ARRAYS_KEY].items()
        },
    }
    answer = node_worker.call_worker(
        node_worker.worker_address(context.run_id, context.node_id),
        request,
        watch_pid=os.getppid(),
    )
    log_task_timing(process_age, startup_cpu, answer["timing"])
    arrays = ArrayRecord({k: Array(v) for k, v in answer["arrays"].items()})
    content = RecordDict(
        {ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(answer["metrics"])}
    )
    return Message(content=content, reply_to=msg)


def profile_on_worker(
    msg: Message, context: Context, run_config: Mapping[str, Any]
) -> Message:
    """Answer the profile query and get the node's worker going: ``query_profile``.

    With the partition in the on-disk cache, this process answers from the
    cache file's labels (:func:`afl_flwr.profiles.cached_profile`, no torch)
    and starts the worker without waiting (:func:`~afl_flwr.node_worker.prestart`;
    it warms up while the SuperNode sleeps before its next pull). Otherwise the
    worker answers (loading and caching the partition) and then warms up.
    """
    from afl_flwr import node_worker
    from afl_flwr.clock import NodeProfile
    from afl_flwr.profiles import cached_profile

    address = node_worker.worker_address(context.run_id, context.node_id)
    request = {
        "op": node_worker.PROFILE,
        "run_config": dict(run_config),
        "node_config": dict(context.node_config),
    }
    profile = cached_profile(context, _app_config(run_config))
    if profile is not None:
        node_worker.prestart(address, request, watch_pid=os.getppid())
    else:
        answer = node_worker.call_worker(address, request, watch_pid=os.getppid())
        profile = NodeProfile(**answer["profile"])
    return Message(content=RecordDict({PROFILE_KEY: profile.to_record()}), reply_to=msg)


def _with_client_clipping(msg: Message, context: Context, fit: Any) -> Message:
    """``fit(msg, context)``, through ``fixedclipping_mod`` when the task asks."""
    config: Mapping[str, Any] = next(iter(msg.content.config_records.values()), {})
    if CLIPPING_NORM_KEY in config:
        from flwr.clientapp.mod import fixedclipping_mod

        return fixedclipping_mod(msg, context, fit)
    return fit(msg, context)


def log_task_timing(
    process_age: float, startup_cpu: float, timing: Mapping[str, float]
) -> None:
    """Log a task process's cold-start split (``benchmarks/deployment.py`` reads it).

    ``process_age`` and ``startup_cpu`` are the task process's age and CPU
    seconds when its handler started; ``timing`` holds the data, model and
    train seconds of :func:`~afl_flwr.client_task.fit_model`, and with a
    ``worker`` entry (the node worker's pid) the line says the training ran
    there.
    """
    where = f", on node worker {int(timing['worker'])}" if "worker" in timing else ""
    log(
        INFO,
        "Cold task timing: process age %.3f s (cpu %.3f s), data %.3f s, "
        "model %.3f s, train %.3f s%s",
        process_age,
        startup_cpu,
        timing["data"],
        timing["model"],
        timing["train"],
        where,
    )


def process_age_s() -> float:
    """Seconds since this process started (NaN where psutil cannot tell)."""
    try:
        return time.time() - psutil.Process().create_time()
    except (psutil.Error, OSError):
        return float("nan")


def _app_config(run_config: Mapping[str, Any]) -> "AppConfig":
    from afl_flwr.config import AppConfig

    return AppConfig.from_run_config(run_config)


def _task() -> Any:
    return importlib.import_module("afl_flwr.client_task")


def __getattr__(name: str) -> Any:
    if name in _TASK_EXPORTS:
        return getattr(_task(), name)
    raise AttributeError(f"module 'afl_flwr.client_app' has no attribute {name!r}")


app = make_client_app()
