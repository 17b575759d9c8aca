"""Flower's quickstart at its own learning rate: FedAvg against the swapped strategy.

``tests/quickstart_app`` is Flower's quickstart-pytorch (its LeNet, SGD with
momentum 0.9, ``FedAvg(fraction_train=...)``) offline on the shipped MNIST
images. For each seed this runs its ServerApp as written and with ``FedAvg``
replaced by ``StalenessAwareAsyncStrategy`` under the strategy's
defaults (nothing else changed but ``background_evaluation=False``, see
``SWAP``), over the same plain ClientApp on four in-process nodes, one 8x
slower, at equal client updates (rounds x 4 against versions x K),
and reports the central test accuracy of both, per seed, and the mean gap with
its 95% t-interval.

    python benchmarks/quickstart_lr.py --lr 0.1 --rounds 16 --seeds 0 1 2 3 4
"""

import argparse
import logging
import sys
import time
import types
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from afl_flwr.aggregators import buffer_for_slots
from afl_flwr.experiments.runs import markdown_table
from afl_flwr.experiments.scripted_grid import ScriptedGrid, clientapp_replies
from afl_flwr.experiments.stats import t_interval

APP = Path(__file__).resolve().parents[1] / "tests" / "quickstart_app"
NODES = 4
DELAYS = {1: 8, 2: 1, 3: 1, 4: 1}  # node 1 is 8x slower
# The class swapped, nothing else but where central evaluation runs: here the
# clients train in this process, and a background evaluation thread would draw
# from torch's global RNG (each DataLoader iterator takes a base seed from it)
# while a client's training does, at moments set by wall time, so no two
# invocations would agree. Inline, each run is reproducible; in Flower's
# simulation and in deployments the clients are other processes.
SWAP = {
    "from flwr.serverapp.strategy import FedAvg": (
        "from afl_flwr import StalenessAwareAsyncStrategy"
    ),
    "FedAvg(": "StalenessAwareAsyncStrategy(background_evaluation=False, ",
}


def server_source(swapped: bool) -> str:
    """The quickstart's ServerApp source, as written or with the class swapped."""
    source = (APP / "server_app.py").read_text()
    if swapped:
        for old, new in SWAP.items():
            source = source.replace(old, new)
    return source


def run_quickstart(
    source: str, run_config: dict, seed: int
) -> tuple[list[float], ScriptedGrid]:
    """Run the ServerApp ``source`` on in-process nodes; central accuracy per round."""
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    import client_app  # the quickstart's own ClientApp (tests/quickstart_app)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.manual_seed(seed)
    module = types.ModuleType("quickstart_server")
    module.__file__ = str(APP / "server_app.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    grid = ScriptedGrid(
        replies=clientapp_replies(client_app.app, NODES, run_config=run_config),
        delays=DELAYS,
    )
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    module.app(grid, context)
    metrics = module.outcome["result"].evaluate_metrics_serverapp
    return [float(metrics[r]["accuracy"]) for r in sorted(metrics)], grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_config = {
        "fraction-train": 1.0,
        "num-server-rounds": args.rounds,
        "lr": args.lr,
        "local-epochs": 1,
        "batch-size": 32,
    }
    rows, gaps = [], []
    started = time.time()
    for seed in args.seeds:
        fedavg, _ = run_quickstart(server_source(False), run_config, seed)
        # Equal client work: the default K is half the slots.
        versions = args.rounds * NODES // buffer_for_slots(NODES)
        ours, _ = run_quickstart(
            server_source(True), {**run_config, "num-server-rounds": versions}, seed
        )
        gaps.append(ours[-1] - fedavg[-1])
        rows.append(
            [
                seed,
                f"{fedavg[-1]:.3f}",
                f"{max(fedavg):.3f}",
                f"{ours[-1]:.3f}",
                f"{max(ours):.3f}",
                f"{100 * gaps[-1]:+.1f}",
                f"{min(ours[len(ours) // 2 :]):.3f}",
            ]
        )
        print(f"seed {seed}: FedAvg {fedavg}\n        async  {ours}", flush=True)
    interval = t_interval([100 * g for g in gaps])
    text = "\n".join(
        [
            "# Flower's quickstart at its own learning rate",
            "",
            f"`python benchmarks/quickstart_lr.py --lr {args.lr} --rounds "
            f"{args.rounds} --seeds {' '.join(map(str, args.seeds))}`",
            "",
            f"LeNet, SGD lr {args.lr} momentum 0.9, 4 nodes (one 8x slower), "
            f"{args.rounds} FedAvg rounds against the same client updates in "
            "versions of the default K; the strategy's defaults. Final gap "
            f"(async - FedAvg): {interval.format(3)} pp (mean [95% t-interval]); "
            f"{time.time() - started:.0f} s.",
            "",
            markdown_table(
                [
                    "seed",
                    "FedAvg final",
                    "FedAvg best",
                    "async final",
                    "async best",
                    "gap (pp)",
                    "async lowest in its second half",
                ],
                rows,
            ),
            "",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quickstart_lr{args.lr:g}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
