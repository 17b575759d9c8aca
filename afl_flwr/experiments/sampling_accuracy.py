"""Accuracy effect of with- vs without-replacement selection, through the product path.

The real ServerApp ``run`` drives the real ClientApp ``train`` in-process behind
a :class:`~afl_flwr.experiments.scripted_grid.ScriptedGrid` (no Ray), on the
virtual clock with heterogeneous node speeds, so outcomes come in
simulated-finish order and each run is reproducible. Only ``selection`` differs
between the paired runs of one seed (same partition, speeds and task seeds).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

from afl_flwr.client_app import node_profile, train
from afl_flwr.config import AppConfig
from afl_flwr.constants import NUM_PARTITIONS, PARTITION_ID
from afl_flwr.experiments.scripted_grid import ScriptedGrid, server_identity
from afl_flwr.results import TEST_ACC
from afl_flwr.server_app import run

# Sized for one busy CPU core: ~400 MNIST images per client, 1 local epoch.
ACCURACY_CONFIG: dict[str, Any] = {
    "dataset": "mnist",
    "model": "small-cnn",
    "num-clients": 20,
    "clients-per-round": 5,
    "local-epochs": 1,
    "num-server-rounds": 20,
    "eval-every": 4,
    "dirichlet-alpha": 0.1,
    "aggregation": "fedbuff",
    "staleness-fn": "constant",
    "distinct-buffer": False,
    "clock": "virtual",
}


@dataclass(frozen=True)
class AccuracyRun:
    """Central test accuracy of one run, and who was merged how often."""

    selection: str
    seed: int
    best_acc: float
    final_acc: float
    sim_time: float
    counts: list[int]
    path: str


def run_accuracy(
    run_config: Mapping[str, Any], selection: str, seed: int
) -> AccuracyRun:
    """One ServerApp run on a scripted Grid whose nodes run the real ClientApp.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Run config (kebab-case keys, ``data-dir`` and ``results-dir`` included).
    selection : str
        ``with-replacement`` or ``without-replacement``.
    seed : int
        The run's ``seed`` (partition, speeds, selection and task seeds).
    """
    cfg = AppConfig.from_run_config(
        {**run_config, "selection": selection, "seed": seed}
    )
    nodes = range(1, cfg.num_clients + 1)
    contexts = {
        n: Context(
            run_id=1,
            node_id=n,
            node_config={PARTITION_ID: n - 1, NUM_PARTITIONS: cfg.num_clients},
            state=RecordDict(),
            run_config={},
        )
        for n in nodes
    }

    def client(node: int, message: Message) -> RecordDict:
        return train(message, contexts[node], cfg).content

    grid = ScriptedGrid(
        replies=dict.fromkeys(nodes, client),
        profiles={n: node_profile(contexts[n], cfg, n - 1).to_record() for n in nodes},
    )
    with server_identity():
        outcome = run(grid, cfg)
    accs = [p.metrics[TEST_ACC] for p in outcome.history.evals]
    counts = [0] * cfg.num_clients
    for event in outcome.history.merged():
        counts[event.client] += 1
    return AccuracyRun(
        selection=selection,
        seed=seed,
        best_acc=max(accs),
        final_acc=accs[-1],
        sim_time=outcome.history.evals[-1].sim_time,
        counts=counts,
        path=str(Path(outcome.results_path).resolve()),
    )


def accuracy_study(
    run_config: Mapping[str, Any], selections: Sequence[str], seeds: Sequence[int]
) -> list[AccuracyRun]:
    """Every selection for every seed (paired: same seed, same federation)."""
    return [
        run_accuracy(run_config, selection, seed)
        for seed in seeds
        for selection in selections
    ]
