"""Typed, validated run configuration.

The run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden with
``flwr run . --run-config "key=value ..."``) is parsed once, at the edge, into the
frozen :class:`AppConfig`; everything downstream receives that object.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from afl_flwr.aggregators import aggregation_names
from afl_flwr.clock import PROFILE_QUERIES
from afl_flwr.data import DATASETS
from afl_flwr.models import MODELS
from afl_flwr.selection import SELECTIONS
from afl_flwr.staleness import STALENESS_FUNCTIONS

MODES = ("async", "sync")
# How FedAvg (mode='sync') samples a round's nodes: the project's `selection`
# policy (as the async strategy), or Flower's own sampler.
SYNC_SELECTIONS = ("selector", "flower")
CLOCKS = ("virtual", "real", "none")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True, kw_only=True)
class AppConfig:
    """Every tunable of the app; field ``foo_bar`` is run-config key ``foo-bar``.

    The defaults are a run that reaches >= 97% MNIST test accuracy within a few
    minutes on 2 CPU cores: the paper's federation (10 clients, 5 kept busy,
    batch 64, Adam lr 1e-3, delay alpha 0.01, Dirichlet alpha 0.5) with the small
    CNN, 3 local epochs and early stopping that can act (patience 1, an epoch
    must cut the train loss by 20%). The paper's exact settings (paper CNN, 10
    local epochs, patience 10, 40 versions) ship as ``presets/paper-mnist.toml``.
    The README's configuration table documents each key.
    """

    # What to train.
    mode: str = "async"
    dataset: str = "mnist"
    model: str = "small-cnn"
    data_dir: str = ""
    num_test: int = 2000
    # Federation and schedule.
    num_clients: int = 10
    clients_per_round: int = 5
    num_server_rounds: int = 30
    eval_every: int = 2
    server_eval: bool = True
    fraction_evaluate: float = 0.0
    seed: int = 42
    # Local training (the paper's client rule).
    local_epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_delay_alpha: float = 0.01
    patience: int = 1
    early_stop_delta: float = 0.2
    dirichlet_alpha: float = 0.5
    # Asynchronous aggregation.
    aggregation: str = "fedbuff"
    buffer_size: int = 0
    server_lr: float = 1.0
    mixing_rate: float = 0.5
    staleness_fn: str = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    max_staleness: int = 20
    selection: str = "without-replacement"
    sync_selection: str = "selector"
    distinct_buffer: bool = True
    task_timeout: float = 600.0
    max_consecutive_failures: int = 0
    # Heterogeneous clients and the simulation clock.
    clock: str = "virtual"
    profile_query: str = "on-join"
    speed_spread: float = 10.0
    straggler_fraction: float = 0.0
    straggler_slowdown: float = 10.0
    max_delay_s: float = 2.0
    step_time_s: float = 0.01
    # Output and fault tolerance.
    results_dir: str = "results"
    checkpoint_every: int = 0
    resume_from: str = ""

    @property
    def effective_buffer_size(self) -> int:
        """Buffer size K; ``buffer-size = 0`` means K = ``clients-per-round``."""
        return self.buffer_size or self.clients_per_round

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AppConfig":
        """Parse and validate a Flower run config (kebab-case keys).

        Missing keys take their defaults, so a ``run_simulation`` caller may pass
        only what it changes.

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or an invalid value; the
            message names the key and what is allowed.
        """
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"Unknown run-config key(s) {unknown}; allowed: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            field = known[key]
            values[field.name] = _coerce(key, value, field.type)
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """Return the kebab-case run-config dictionary of this configuration."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Check every value; raise :class:`ConfigError` naming the first bad key."""
        _choice("mode", self.mode, MODES)
        _choice("dataset", self.dataset, sorted(DATASETS))
        _choice("model", self.model, sorted(MODELS))
        _choice("aggregation", self.aggregation, aggregation_names())
        _choice("staleness-fn", self.staleness_fn, sorted(STALENESS_FUNCTIONS))
        _choice("selection", self.selection, sorted(SELECTIONS))
        _choice("sync-selection", self.sync_selection, SYNC_SELECTIONS)
        _choice("clock", self.clock, CLOCKS)
        _choice("profile-query", self.profile_query, PROFILE_QUERIES)
        for key in (
            "num-clients",
            "clients-per-round",
            "num-server-rounds",
            "eval-every",
            "local-epochs",
            "batch-size",
            "patience",
            "num-test",
        ):
            _positive(key, getattr(self, key.replace("-", "_")))
        for key in ("learning-rate", "dirichlet-alpha", "server-lr", "task-timeout"):
            _positive(key, getattr(self, key.replace("-", "_")))
        for key in (
            "lr-delay-alpha",
            "staleness-a",
            "staleness-b",
            "max-staleness",
            "buffer-size",
            "max-delay-s",
            "step-time-s",
            "checkpoint-every",
            "max-consecutive-failures",
        ):
            _non_negative(key, getattr(self, key.replace("-", "_")))
        if self.resume_from and self.mode != "async":
            raise ConfigError(
                f"resume-from={self.resume_from!r} needs mode='async' (FedAvg runs "
                "are not checkpointed)"
            )
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} exceeds "
                f"num-clients={self.num_clients}; allowed: 1..{self.num_clients}"
            )
        if not 0.0 <= self.early_stop_delta < 1.0:
            raise ConfigError(
                f"early-stop-delta={self.early_stop_delta} is out of range; "
                "allowed: [0, 1)"
            )
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(
                f"fraction-evaluate={self.fraction_evaluate} is out of range; "
                "allowed: [0, 1]"
            )
        if not self.server_eval and self.mode == "sync":
            raise ConfigError(
                "server-eval=false needs mode='async' (the FedAvg baseline is "
                "compared on the central test set)"
            )
        if not 0.0 < self.mixing_rate <= 1.0:
            raise ConfigError(
                f"mixing-rate={self.mixing_rate} is out of range; allowed: (0, 1]"
            )
        if self.speed_spread < 1.0 or self.straggler_slowdown < 1.0:
            raise ConfigError(
                f"speed-spread={self.speed_spread} and straggler-slowdown="
                f"{self.straggler_slowdown} must both be >= 1 (1 = no slowdown)"
            )
        if not 0.0 <= self.straggler_fraction <= 1.0:
            raise ConfigError(
                f"straggler-fraction={self.straggler_fraction} is out of range; "
                "allowed: [0, 1]"
            )


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, refusing lossy conversions."""
    if annotation in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if annotation in (float, "float") and isinstance(value, int | float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if annotation in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if float(value) != int(value):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if annotation in (str, "str") and isinstance(value, str):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {annotation}")


def _choice(key: str, value: str, allowed: "list[str] | tuple[str, ...]") -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}"
        )


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value!r} must be > 0")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key}={value!r} must be >= 0")
