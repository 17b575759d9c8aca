"""End to end through Flower's Ray simulation on real MNIST (offline, bounded).

Each run uses 4 clients over the 8,000-image training pool of the shipped MNIST
test set and evaluates on the 2,000 held-out images. The accuracy check
discriminates: in the same test, every client's model trained alone (the same
initial model, one local epoch, no merging) is evaluated, and the federated model
must beat the best of them.
"""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_bounded

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]

TIMEOUT_S = 420


def simulate(tmp_path: Path, mnist_dir: Path, extra: str) -> Path:
    run_config = (
        f"data-dir='{mnist_dir}' results-dir='{tmp_path}' num-clients=4 "
        "clients-per-round=2 local-epochs=1 model='small-cnn' " + extra
    )
    proc = run_bounded(
        [sys.executable, "-m", "afl_flwr.simulate", "--run-config", run_config],
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("Results: "))


def single_client_accuracies(mnist_dir: Path, num_clients: int = 4) -> list[float]:
    """Test accuracy of each client's model trained alone for one local epoch."""
    from torch.utils.data import DataLoader

    from afl_flwr.client_app import build_model, client_trainset
    from afl_flwr.config import AppConfig
    from afl_flwr.data import load_central_testset
    from afl_flwr.training import evaluate, train_local

    cfg = AppConfig.from_run_config(
        {
            "data-dir": str(mnist_dir),
            "num-clients": num_clients,
            "clients-per-round": 2,
            "model": "small-cnn",
        }
    )
    testset = load_central_testset(cfg.dataset, cfg.data_dir, cfg.num_test)
    accuracies = []
    for partition in range(num_clients):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        loader = DataLoader(
            client_trainset(cfg, partition), batch_size=cfg.batch_size, shuffle=True
        )
        train_local(
            model,
            loader,
            epochs=1,
            lr0=cfg.learning_rate,
            alpha=0.0,
            tau=0,
            patience=1,
            device=torch.device("cpu"),
        )
        accuracies.append(
            evaluate(model, DataLoader(testset, 512), torch.device("cpu"))[1]
        )
    return accuracies


def test_async_simulation_learns_and_is_reproducible(tmp_path, mnist_dir):
    # Heterogeneous clients (speeds 1..10x, delays) on the virtual clock, twice
    extra = "mode='async' num-server-rounds=8 speed-spread=10.0 aggregation='buffered'"
    first = simulate(tmp_path / "first", mnist_dir, extra)
    second = simulate(tmp_path / "second", mnist_dir, extra)

    summary = json.loads((first / "summary.json").read_text())
    events = list(csv.DictReader((first / "events.csv").open()))
    alone = single_client_accuracies(mnist_dir)
    assert summary["best_test_acc"] > max(alone) + 0.02, (summary, alone)
    assert summary["max_staleness"] > 0
    assert any(int(e["staleness"]) > 0 for e in events if e["status"] == "merged")
    assert summary["sim_time"] > 0
    for name in ("curves.png", "staleness.png", "participation.png", "model.pt"):
        assert (first / name).stat().st_size > 0

    # Same seed: same (client, staleness) sequence and identical final weights,
    # although Ray scheduled the real training differently.
    again = list(csv.DictReader((second / "events.csv").open()))
    assert [(e["client"], e["staleness"]) for e in events] == [
        (e["client"], e["staleness"]) for e in again
    ]
    weights = torch.load(first / "model.pt")
    weights_again = torch.load(second / "model.pt")
    for name, tensor in weights.items():
        assert torch.equal(tensor, weights_again[name]), name


def test_sync_fedavg_baseline_learns(tmp_path, mnist_dir):
    path = simulate(tmp_path, mnist_dir, "mode='sync' num-server-rounds=4 eval-every=1")

    summary = json.loads((path / "summary.json").read_text())
    rows = list(csv.DictReader((path / "evals.csv").open()))
    assert summary["best_test_acc"] > max(single_client_accuracies(mnist_dir)) + 0.02
    assert [int(r["version"]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(len(r["clients"].split()) == 2 for r in rows[1:])
    assert summary["mean_staleness"] == 0.0


def test_bad_data_dir_fails_before_training(tmp_path):
    proc = run_bounded(
        [
            sys.executable,
            "-m",
            "afl_flwr.simulate",
            "--run-config",
            f"data-dir='{tmp_path}/missing' num-clients=2 clients-per-round=1",
        ],
        timeout=TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "data-dir" in proc.stdout
