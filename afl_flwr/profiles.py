"""A node's partition and profile, from its node config and the run config.

Torch-free, so a SuperNode's light task process can answer the virtual clock's
``query.profile`` itself: the partition id and the speed and delay come from
the node config and the run config, the example count from the partition's
on-disk cache file (:func:`afl_flwr.partition_cache.cached_num_examples`).
:mod:`afl_flwr.client_task` sizes the partition by loading it instead.
"""

from collections.abc import Mapping
from typing import Any

from flwr.app import Context

from afl_flwr.clock import NodeProfile, speed_factor
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.constants import MAX_DELAY_S, NUM_PARTITIONS, PARTITION_ID, SPEED_FACTOR
from afl_flwr.partition_cache import PartitionRequest, cached_num_examples


def node_config_of(context: Context | Mapping[str, Any]) -> Mapping[str, Any]:
    """The node config of a task's Context, or the mapping itself."""
    return context.node_config if isinstance(context, Context) else context


def node_partition(context: Context | Mapping[str, Any], cfg: AppConfig) -> int:
    """Return the node's partition id, validated against ``num-clients``.

    ``context`` is the task's Context or its node config.

    Raises
    ------
    ConfigError
        When the node config lacks ``partition-id`` or it is out of range.
    """
    node_config = node_config_of(context)
    if PARTITION_ID not in node_config:
        raise ConfigError(
            f"node config has no '{PARTITION_ID}'; start the SuperNode with "
            f'--node-config "{PARTITION_ID}=<i> {NUM_PARTITIONS}=<N>"'
        )
    partition_id = int(node_config[PARTITION_ID])
    if not 0 <= partition_id < cfg.num_clients:
        raise ConfigError(
            f"{PARTITION_ID}={partition_id} is out of range for num-clients="
            f"{cfg.num_clients}; allowed: 0..{cfg.num_clients - 1} (set num-clients "
            "to the number of SuperNodes)"
        )
    return partition_id


def partition_request(cfg: AppConfig, partition_id: int) -> PartitionRequest:
    """What identifies the node's training partition (and its cache file)."""
    return PartitionRequest(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        num_partitions=cfg.num_clients,
        partition_id=partition_id,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        num_test=cfg.num_test,
    )


def profile_with(
    context: Context | Mapping[str, Any],
    cfg: AppConfig,
    partition_id: int,
    num_examples: int,
) -> NodeProfile:
    """The node's profile: ``--node-config`` values win over run-config defaults.

    ``context`` is the task's Context or its node config.
    """
    node_config = node_config_of(context)
    speed = node_config.get(SPEED_FACTOR)
    if speed is None:
        speed = speed_factor(
            partition_id,
            cfg.num_clients,
            spread=cfg.speed_spread,
            straggler_fraction=cfg.straggler_fraction,
            straggler_slowdown=cfg.straggler_slowdown,
            seed=cfg.seed,
        )
    max_delay = node_config.get(MAX_DELAY_S, cfg.max_delay_s)
    return NodeProfile(
        partition_id=partition_id,
        num_examples=num_examples,
        speed_factor=float(speed),  # type: ignore[arg-type]
        max_delay_s=float(max_delay),  # type: ignore[arg-type]
    )


def cached_profile(
    context: Context | Mapping[str, Any], cfg: AppConfig
) -> NodeProfile | None:
    """The node's profile without loading its partition, or ``None``.

    ``None`` when the partition has no valid cache file yet (first run on this
    machine, cache off, online data): the caller then loads it.
    """
    partition_id = node_partition(context, cfg)
    count = cached_num_examples(partition_request(cfg, partition_id))
    if count is None:
        return None
    return profile_with(context, cfg, partition_id, count)
