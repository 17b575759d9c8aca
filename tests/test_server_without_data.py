"""The ServerApp in a deployment without central data: federated evaluation only.

The real ServerApp ``run`` drives the real ClientApp functions in-process through
the fake Grid; the server's own ``data-dir`` does not exist, so any attempt to
load central data would fail the run.
"""

import json

import pytest
from conftest import FakeGrid
from flwr.app import Context, Message, RecordDict

from afl_flwr.client_app import evaluate_local, node_profile, train
from afl_flwr.config import AppConfig
from afl_flwr.server_app import run


@pytest.mark.timeout(300)
def test_async_run_with_server_eval_off_evaluates_on_the_clients(tmp_path, mnist_dir):
    # Prepare: clients hold the data; the server's data-dir is missing
    client_cfg = AppConfig.from_run_config(
        {
            "data-dir": str(mnist_dir),
            "num-clients": 3,
            "clients-per-round": 2,
            "model": "small-cnn",
            "local-epochs": 1,
        }
    )
    server_cfg = AppConfig.from_run_config(
        {
            **client_cfg.to_run_config(),
            "data-dir": str(tmp_path / "no-such-dir"),
            "server-eval": False,
            "fraction-evaluate": 1.0,
            "eval-every": 2,
            "num-server-rounds": 2,
            "results-dir": str(tmp_path / "results"),
        }
    )
    nodes = (1, 2, 3)
    contexts = {
        n: Context(
            run_id=1,
            node_id=n,
            node_config={"partition-id": n - 1, "num-partitions": 3},
            state=RecordDict(),
            run_config={},
        )
        for n in nodes
    }

    def client(node: int, message: Message, params) -> RecordDict:
        handler = (
            evaluate_local if message.metadata.message_type == "evaluate" else train
        )
        return handler(message, contexts[node], client_cfg).content

    grid = FakeGrid(
        replies=dict.fromkeys(nodes, client),
        profiles={
            n: node_profile(contexts[n], client_cfg, n - 1).to_record() for n in nodes
        },
    )

    # Execute
    outcome = run(grid, server_cfg)

    # Assert: client-side evaluation at version 2, written to the results folder
    metrics = outcome.result.evaluate_metrics_clientapp
    assert list(metrics) == [2]
    assert 0.0 <= metrics[2]["eval-acc"] <= 1.0
    assert outcome.result.evaluate_metrics_serverapp == {}
    history = json.loads((outcome.results_path / "history.json").read_text())
    assert [p["version"] for p in history["federated"]] == [2]
