"""Tests for the run config: defaults, kebab-case keys, types, ranges, drift."""

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.data import DATASETS
from afl_flwr.models import MODELS
from afl_flwr.selection import SELECTIONS
from afl_flwr.staleness import STALENESS_FUNCTIONS

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _error_message(run_config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as excinfo:
        AppConfig.from_run_config(run_config)
    return str(excinfo.value)


def test_empty_run_config_gives_the_quick_defaults() -> None:
    # Prepare
    run_config: dict[str, Any] = {}

    # Execute
    config = AppConfig.from_run_config(run_config)

    # Assert: the paper's federation with the quick model and an early stopping
    # that can fire (patience + 1 < local epochs), written out independently.
    assert config == AppConfig()
    assert config.mode == "async"
    assert config.dataset == "mnist"
    assert config.model == "small-cnn"
    assert config.num_clients == 10
    assert config.clients_per_round == 5
    assert config.local_epochs == 3
    assert config.batch_size == 64
    assert config.learning_rate == 1e-3
    assert config.lr_delay_alpha == 0.01
    assert config.patience == 1
    assert config.early_stop_delta == 0.2
    assert config.patience + 1 < config.local_epochs
    assert config.dirichlet_alpha == 0.5
    assert config.aggregation == "fedbuff"


def test_kebab_case_keys_set_fields() -> None:
    # Prepare
    run_config = {
        "num-clients": 20,
        "clients-per-round": 7,
        "learning-rate": 0.01,
        "staleness-fn": "hinge",
        "data-dir": "/tmp/data",
        "max-delay-s": 0.5,
    }

    # Execute
    config = AppConfig.from_run_config(run_config)

    # Assert
    assert config.num_clients == 20
    assert config.clients_per_round == 7
    assert config.learning_rate == 0.01
    assert config.staleness_fn == "hinge"
    assert config.data_dir == "/tmp/data"
    assert config.max_delay_s == 0.5
    assert config.batch_size == AppConfig().batch_size  # untouched key


def test_config_is_frozen() -> None:
    # Prepare
    config = AppConfig()

    # Execute / Assert
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_clients = 3  # type: ignore[misc]


def test_to_run_config_round_trips() -> None:
    # Prepare
    config = AppConfig.from_run_config(
        {"model": "resnet20", "dataset": "cifar10", "seed": 7, "server-lr": 0.5}
    )

    # Execute
    run_config = config.to_run_config()

    # Assert
    assert all("_" not in key for key in run_config)
    assert run_config["server-lr"] == 0.5
    assert AppConfig.from_run_config(run_config) == config


# buffer-size 0: half of the 5 default slots
@pytest.mark.parametrize(("buffer_size", "expected"), [(0, 2), (3, 3), (9, 9)])
def test_effective_buffer_size(buffer_size: int, expected: int) -> None:
    # Prepare
    config = AppConfig.from_run_config(
        {"buffer-size": buffer_size, "clients-per-round": 5}
    )

    # Execute / Assert
    assert config.effective_buffer_size == expected


@pytest.mark.parametrize("key", ["num_clients", "learning_rate", "lr", "foo-bar"])
def test_unknown_key_is_rejected_by_name(key: str) -> None:
    # Prepare / Execute
    message = _error_message({key: 1})

    # Assert
    assert key in message
    assert "num-clients" in message  # the allowed keys are listed


def test_int_is_accepted_for_float_and_integral_float_for_int() -> None:
    # Prepare / Execute
    config = AppConfig.from_run_config({"server-lr": 1, "num-clients": 12.0})

    # Assert
    assert config.server_lr == 1.0
    assert isinstance(config.server_lr, float)
    assert config.num_clients == 12
    assert isinstance(config.num_clients, int)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-clients", "10"),
        ("num-clients", 2.5),
        ("num-clients", True),
        ("learning-rate", "0.1"),
        ("learning-rate", False),
        ("model", 3),
        ("dataset", None),
        ("seed", [1]),
    ],
)
def test_wrong_type_is_rejected_by_name(key: str, value: Any) -> None:
    # Prepare / Execute
    message = _error_message({key: value})

    # Assert
    assert key in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("model", sorted(MODELS)),
        ("dataset", sorted(DATASETS)),
        ("staleness-fn", sorted(STALENESS_FUNCTIONS)),
        ("selection", sorted(SELECTIONS)),
        ("mode", ["async", "sync"]),
        ("aggregation", ["buffered", "immediate"]),
        ("clock", ["virtual", "real", "none"]),
    ],
)
def test_unknown_choice_names_key_and_allowed_values(
    key: str, allowed: list[str]
) -> None:
    # Prepare
    bad = "no-such-choice"

    # Execute
    message = _error_message({key: bad})

    # Assert
    assert key in message
    assert bad in message
    for name in allowed:
        assert name in message


@pytest.mark.parametrize(
    ("run_config", "key", "allowed"),
    [
        ({"num-clients": 0}, "num-clients", "> 0"),
        ({"num-clients": -3}, "num-clients", "> 0"),
        ({"num-clients": 4, "clients-per-round": 5}, "clients-per-round", "1..4"),
        ({"num-clients": 10, "clients-per-round": 11}, "clients-per-round", "1..10"),
        ({"learning-rate": 0.0}, "learning-rate", "> 0"),
        ({"learning-rate": -0.1}, "learning-rate", "> 0"),
        ({"learning-rate": float("nan")}, "learning-rate", "> 0"),
        ({"local-epochs": 0}, "local-epochs", "> 0"),
        ({"local-epochs": -1}, "local-epochs", "> 0"),
        ({"batch-size": 0}, "batch-size", "> 0"),
        ({"batch-size": -64}, "batch-size", "> 0"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha", "> 0"),
        ({"dirichlet-alpha": -0.5}, "dirichlet-alpha", "> 0"),
        ({"mixing-rate": 0.0}, "mixing-rate", "(0, 1]"),
        ({"mixing-rate": 1.5}, "mixing-rate", "(0, 1]"),
        ({"staleness-a": -0.5}, "staleness-a", ">= 0"),
        ({"straggler-fraction": 1.5}, "straggler-fraction", "[0, 1]"),
    ],
)
def test_out_of_range_value_names_key_and_range(
    run_config: dict[str, Any], key: str, allowed: str
) -> None:
    # Prepare / Execute
    message = _error_message(run_config)

    # Assert
    assert key in message
    assert allowed in message


@pytest.mark.parametrize(
    "run_config",
    [
        {"num-clients": 1, "clients-per-round": 1},
        {"num-clients": 10, "clients-per-round": 10},
        {"aggregation": "fedasync", "mixing-rate": 1.0},
        {"dirichlet-alpha": 1e-6},
        {"straggler-fraction": 0.0},
        {"straggler-fraction": 1.0},
    ],
)
def test_boundary_values_are_accepted(run_config: dict[str, Any]) -> None:
    # Prepare / Execute
    config = AppConfig.from_run_config(run_config)

    # Assert
    assert config.to_run_config().items() >= run_config.items()


def test_pyproject_run_config_matches_dataclass_defaults() -> None:
    # Prepare
    with PYPROJECT.open("rb") as file:
        table = tomllib.load(file)["tool"]["flwr"]["app"]["config"]

    # Execute
    defaults = AppConfig().to_run_config()

    # Assert: same keys, same values, so docs/config cannot drift.
    assert sorted(table) == sorted(defaults)
    for key, value in table.items():
        assert value == defaults[key], key
    assert AppConfig.from_run_config(table) == AppConfig()
