"""A FedAvg user's ServerApp, with only the class name swapped, runs asynchronously.

``tests/quickstart_app`` is Flower's quickstart-pytorch in its own shape (its
LeNet, SGD with momentum, ``FedAvg(fraction_train=...)``, ``strategy.start(grid=,
initial_arrays=, train_config=, num_rounds=, evaluate_fn=)``, ``result.arrays``),
offline on the shipped MNIST images. The test runs that ServerApp as written,
then the same source with ``FedAvg`` replaced by ``StalenessAwareAsyncStrategy``
(its import line and its one use: nothing else), over the same plain ClientApp
with one node 8x slower, and checks that the swapped app fills the same
``Result`` and trains asynchronously.
"""

import difflib
import sys
import types
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from afl_flwr.experiments.scripted_grid import ScriptedGrid, clientapp_replies

APP = Path(__file__).parent / "quickstart_app"
NODES = 4
RUN_CONFIG = {
    "fraction-train": 1.0,
    "num-server-rounds": 4,
    "lr": 0.05,
    "local-epochs": 1,
    "batch-size": 32,
}
SWAP = {
    "from flwr.serverapp.strategy import FedAvg": (
        "from afl_flwr import StalenessAwareAsyncStrategy"
    ),
    "FedAvg(": "StalenessAwareAsyncStrategy(",
}


@pytest.fixture
def quickstart(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    for name in ("task", "client_app", "server_app"):
        sys.modules.pop(name, None)
    import client_app

    yield client_app.app
    for name in ("task", "client_app", "server_app"):
        sys.modules.pop(name, None)


def _server_module(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = str(APP / "server_app.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _run(source: str, client_app, name: str) -> dict:
    torch.manual_seed(0)
    module = _server_module(source, name)
    grid = ScriptedGrid(
        replies=clientapp_replies(client_app, NODES, run_config=RUN_CONFIG),
        delays={1: 8, 2: 1, 3: 1, 4: 1},  # node 1 (partition 0) is 8x slower
    )
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=RUN_CONFIG
    )
    module.app(grid, context)
    return {"outcome": module.outcome, "grid": grid}


def test_swapping_the_class_name_is_the_only_change(quickstart):
    # Prepare: the quickstart's ServerApp, and the same with the class swapped
    original = (APP / "server_app.py").read_text()
    swapped = original
    for old, new in SWAP.items():
        assert old in swapped
        swapped = swapped.replace(old, new)
    changed = [
        line
        for line in difflib.unified_diff(
            original.splitlines(), swapped.splitlines(), lineterm="", n=0
        )
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(changed) == 4  # the import line and the constructor call

    # Execute
    fedavg = _run(original, quickstart, "quickstart_fedavg")
    asynchronous = _run(swapped, quickstart, "quickstart_async")

    # Assert: the same Result fields, filled the same way (keyed 1..4)
    for run in (fedavg, asynchronous):
        result = run["outcome"]["result"]
        assert set(result.train_metrics_clientapp) == {1, 2, 3, 4}
        assert set(result.evaluate_metrics_clientapp) == {1, 2, 3, 4}
        assert set(result.evaluate_metrics_serverapp) == {0, 1, 2, 3, 4}
        assert "train_loss" in result.train_metrics_clientapp[4]
        assert "eval_acc" in result.evaluate_metrics_clientapp[4]
        accuracy = result.evaluate_metrics_serverapp[4]["accuracy"]
        assert accuracy > 0.5  # it learns (chance is 0.1)
        run["outcome"]["model"].load_state_dict(result.arrays.to_torch_state_dict())
    # ... and the swapped one is asynchronous: it did not wait for the slow
    # node's rounds, so the same updates took fewer polls of the grid
    fedavg_grid, async_grid = fedavg["grid"], asynchronous["grid"]
    assert async_grid.tick > 0
    trains = [m.metadata.dst_node_id for m in async_grid.train_messages()]
    slow = 1
    assert trains.count(slow) < max(trains.count(n) for n in (2, 3, 4))
    assert len(fedavg_grid.train_messages()) == 4 * NODES  # FedAvg: whole rounds
