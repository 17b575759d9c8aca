"""Flower's quickstart at its own learning rate (0.1): the swapped default survives.

The issue's bar, on one seed (3, where an earlier, non-reproducible harness saw
the asynchronous run collapse): the quickstart's LeNet with SGD momentum 0.9 at
lr 0.1, four nodes, one 8x slower, equal client updates; the default rule does
not collapse to a dead network and ends within 2 pp of FedAvg. The harness is
``benchmarks/quickstart_lr.py`` (central evaluation inline, so a seeded run
repeats exactly); its 5-seed table is ``benchmarks/results/quickstart_lr0.1.md``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quickstart_lr

from afl_flwr.aggregators import buffer_for_slots

ROUNDS = 16
SEED = 3


def test_default_rule_survives_the_quickstart_learning_rate_and_ends_near_fedavg():
    # Prepare
    run_config = {
        "fraction-train": 1.0,
        "num-server-rounds": ROUNDS,
        "lr": 0.1,
        "local-epochs": 1,
        "batch-size": 32,
    }
    versions = ROUNDS * quickstart_lr.NODES // buffer_for_slots(quickstart_lr.NODES)

    # Execute
    fedavg, _ = quickstart_lr.run_quickstart(
        quickstart_lr.server_source(False), run_config, SEED
    )
    ours, _ = quickstart_lr.run_quickstart(
        quickstart_lr.server_source(True),
        {**run_config, "num-server-rounds": versions},
        SEED,
    )

    # Assert: no dead network in the second half (chance is 0.1), and the final
    # accuracy within 2 pp of FedAvg's
    assert len(ours) == versions + 1
    assert min(ours[len(ours) // 2 :]) > 0.5, ours
    assert ours[-1] >= fedavg[-1] - 0.02, (fedavg, ours)
