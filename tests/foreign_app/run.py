"""A user's Flower project: its own ClientApp, afl_flwr's strategy on the server.

``python run.py NUM_NODES NUM_ROUNDS`` runs Flower's Ray simulation with the
strategy's defaults and prints one ``SUMMARY {json}`` line.
"""

import json
import sys

import numpy as np
from client import app as client_app
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from afl_flwr import StalenessAwareAsyncStrategy
from afl_flwr.strategy import RunAbortedError

server_app = ServerApp()
summary: dict = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = StalenessAwareAsyncStrategy()  # the defaults, as a user would
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(16, dtype=np.float32))}),
            num_rounds=int(sys.argv[2]),
            timeout=60,
        )
        summary["aborted"] = ""
    except RunAbortedError as err:
        summary["aborted"] = str(err)
    summary["events"] = [
        {
            "node": e.node_id,
            "status": e.status,
            "staleness": e.staleness,
            "merged_into": e.merged_into,
        }
        for e in strategy.history.events
    ]
    summary["version"] = strategy.version


if __name__ == "__main__":
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(sys.argv[1]),
        backend_config={
            "client_resources": {"num_cpus": 0.5, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "num_cpus": 2},
        },
    )
    print("SUMMARY " + json.dumps(summary))
