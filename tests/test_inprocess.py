"""The in-process engine: the real ClientApp handlers behind Flower's Grid API.

Under the virtual clock a run is determined by the replies' contents and
simulated durations, not by when they arrive, so an asynchronous run on
:class:`InProcessGrid` must take the same decisions as the same config run
through Flower's Ray simulation.
"""

import csv
import sys
from pathlib import Path

import pytest
from conftest import run_bounded
from flwr.app import Message, RecordDict

from afl_flwr.config import AppConfig
from afl_flwr.experiments.inprocess import InProcessGrid, run_inprocess

TINY = {
    "model": "mlp",
    "num-clients": 4,
    "clients-per-round": 2,
    "buffer-size": 1,
    "local-epochs": 1,
    "num-server-rounds": 6,
    "eval-every": 3,
    "num-test": 500,
    "speed-spread": 10.0,
    "max-delay-s": 1.0,
    "seed": 3,
}


def _config(mnist_dir: Path, tmp_path: Path, **extra) -> dict:
    return {
        **TINY,
        "data-dir": str(mnist_dir),
        "results-dir": str(tmp_path),
        **extra,
    }


def _sequence(results: Path) -> list[tuple[str, str, str, str]]:
    with (results / "events.csv").open() as handle:
        return [
            (r["client"], r["staleness"], r["status"], r["base_version"])
            for r in csv.DictReader(handle)
        ]


def _accuracies(results: Path) -> list[float]:
    with (results / "evals.csv").open() as handle:
        return [float(r["test_acc"]) for r in csv.DictReader(handle)]


def test_nodes_answer_with_the_clientapps_profiles(mnist_dir):
    # Prepare
    cfg = AppConfig.from_run_config({**TINY, "data-dir": str(mnist_dir)})
    grid = InProcessGrid(cfg)
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type="query.profile")
        for node in grid.get_node_ids()
    ]

    # Execute
    replies = list(grid.send_and_receive(messages))

    # Assert: one profile per partition, in node order
    partitions = [int(r.content["profile"]["partition-id"]) for r in replies]
    assert partitions == list(range(cfg.num_clients))
    assert all(
        r.metadata.src_node_id == m.metadata.dst_node_id
        for r, m in zip(replies, messages, strict=True)
    )


def test_a_failing_handler_gives_an_error_reply(mnist_dir):
    # Prepare: a message type no handler serves
    cfg = AppConfig.from_run_config({**TINY, "data-dir": str(mnist_dir)})
    grid = InProcessGrid(cfg)
    node = next(iter(grid.get_node_ids()))
    message = Message(RecordDict(), dst_node_id=node, message_type="query.nothing")

    # Execute
    [message_id] = grid.push_messages([message])
    [reply] = grid.pull_messages([message_id])

    # Assert
    assert reply.has_error()
    assert "no handler" in reply.error.reason


def test_replies_are_computed_once_when_pulled(mnist_dir):
    # Prepare
    cfg = AppConfig.from_run_config({**TINY, "data-dir": str(mnist_dir)})
    grid = InProcessGrid(cfg)
    node = next(iter(grid.get_node_ids()))
    message = Message(RecordDict(), dst_node_id=node, message_type="query.profile")

    # Execute
    [message_id] = grid.push_messages([message])
    handled_before = len(grid.handled)
    first = list(grid.pull_messages([message_id]))
    second = list(grid.pull_messages([message_id]))

    # Assert
    assert handled_before == 0
    assert len(first) == 1 and second == []


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_runs_are_deterministic(mnist_dir, tmp_path, mode):
    # Prepare
    overrides = _config(mnist_dir, tmp_path, mode=mode)

    # Execute
    first = run_inprocess(overrides)
    second = run_inprocess(overrides)

    # Assert: same decisions and the same model, bit for bit
    assert _sequence(first.results_path) == _sequence(second.results_path)
    assert _accuracies(first.results_path) == _accuracies(second.results_path)
    assert len(_sequence(first.results_path)) >= 6


@pytest.mark.process
@pytest.mark.timeout(600)
def test_async_run_matches_the_ray_simulation(mnist_dir, tmp_path):
    # Prepare
    overrides = _config(mnist_dir, tmp_path / "inprocess")
    ray_config = " ".join(
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
        for k, v in {**overrides, "results-dir": str(tmp_path / "ray")}.items()
    )

    # Execute
    inprocess = run_inprocess(overrides).results_path
    proc = run_bounded(
        [sys.executable, "-m", "afl_flwr.simulate", "--run-config", ray_config],
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ray = Path(proc.stdout.strip().splitlines()[-1].removeprefix("Results: "))

    # Assert: the same (client, staleness, status, base version) sequence; the
    # models agree up to float summation order across processes
    assert _sequence(inprocess) == _sequence(ray)
    assert _accuracies(inprocess) == pytest.approx(_accuracies(ray), abs=0.02)
