"""The run-config presets in ``presets/``: valid, and read alike by Flower and us."""

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from afl_flwr.config import AppConfig

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "presets").glob("*.toml"))
PAPER = {
    "num-clients": 10,
    "clients-per-round": 5,
    "num-server-rounds": 40,
    "local-epochs": 10,
    "batch-size": 64,
    "learning-rate": 0.001,
    "lr-delay-alpha": 0.01,
    "patience": 10,
    "dirichlet-alpha": 0.5,
}


def read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


def app_defaults() -> dict[str, Any]:
    """``[tool.flwr.app.config]``, flattened as the SuperLink flattens it."""
    return flatten_dict(
        read_toml(REPO / "pyproject.toml")["tool"]["flwr"]["app"]["config"]
    )


def preset(name: str) -> AppConfig:
    return AppConfig.from_run_config(read_toml(REPO / "presets" / f"{name}.toml"))


def benchmark_module() -> ModuleType:
    path = REPO / "benchmarks" / "benchmark_v2.py"
    spec = importlib.util.spec_from_file_location("benchmark_v2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_presets_exist():
    assert {p.stem for p in PRESETS} == {
        "paper-mnist",
        "paper-cifar10",
        "quick-cpu",
        "stragglers",
        "heterogeneous",
        "cross-device",
        "dp-cross-device",
    }


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_into_a_valid_config(path):
    # Prepare
    raw = read_toml(path)

    # Execute
    cfg = AppConfig.from_run_config(raw)

    # Assert: every value survives validation unchanged
    parsed = cfg.to_run_config()
    assert {key: parsed[key] for key in raw} == raw


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_flower_reads_the_preset_as_the_same_run_config(path):
    # Prepare
    raw = read_toml(path)

    # Execute: `flwr run --run-config FILE` parsing, then the SuperLink's fusion
    # with the app's defaults (which refuses keys the app does not declare)
    overrides = parse_config_args([str(path)])
    fused = fuse_dicts(app_defaults(), overrides)

    # Assert
    assert overrides == raw
    assert {key: fused[key] for key in raw} == raw
    AppConfig.from_run_config(fused)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_offline_data_dir_is_the_shipped_mnist_folder(path, mnist_dir):
    data_dir = read_toml(path).get("data-dir", "")
    if data_dir:
        assert (REPO / data_dir).resolve() == mnist_dir.resolve()


@pytest.mark.parametrize(
    ("name", "dataset", "model"),
    [("paper-mnist", "mnist", "paper-cnn"), ("paper-cifar10", "cifar10", "resnet20")],
)
def test_paper_presets_hold_the_papers_settings(name, dataset, model):
    cfg = preset(name)

    assert (cfg.mode, cfg.dataset, cfg.model) == ("async", dataset, model)
    assert {key: cfg.to_run_config()[key] for key in PAPER} == PAPER
    assert cfg.data_dir == ""  # the full data set, downloaded


def test_quick_cpu_preset_is_small():
    cfg = preset("quick-cpu")

    assert cfg.model == "small-cnn"
    assert cfg.local_epochs == 1
    assert cfg.num_server_rounds <= 10


@pytest.mark.parametrize(
    ("name", "scenario"),
    [
        ("heterogeneous", "log-uniform 1-10x + delay U(0,2s)"),
        ("stragglers", "20% stragglers 10x"),
    ],
)
def test_scenario_presets_are_the_benchmark_scenarios(name, scenario):
    # Prepare: the benchmark's scenario settings (speeds, delays, stragglers)
    bench = benchmark_module()
    expected = dict(bench.SCENARIOS[scenario])

    # Execute
    cfg = preset(name).to_run_config()

    # Assert
    assert {key: cfg[key] for key in expected} == expected
