"""Framework overhead: an async simulation vs a bare PyTorch loop doing the same work.

1. Run one asynchronous simulation through Flower's Ray runtime (in process)
   and time it end to end.
2. Replay exactly the client training it did — same partitions, same local
   epochs, same model, same batch size, one task per reply plus the tasks still
   in flight at the end — in a bare single-process PyTorch loop using every core
   (the physical floor on this machine), then the same central evaluations.
3. Report the ratio and where the rest goes: Ray start-up and shutdown (outside
   the strategy loop), central evaluation, and everything else in the loop
   (scheduling, serialisation, Ray actors).

Usage::

    python benchmarks/overhead.py --data-dir ../shared/data/mnist
"""

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.common.config import parse_config_args
from torch.utils.data import DataLoader

from afl_flwr.client_app import build_model
from afl_flwr.config import AppConfig
from afl_flwr.data import load_central_testset, load_partition
from afl_flwr.experiments.runs import markdown_table, run_simulation_record
from afl_flwr.training import evaluate, get_device, train_local

BASE: dict[str, Any] = {
    "dataset": "mnist",
    "model": "small-cnn",
    "num-clients": 10,
    "clients-per-round": 2,
    "local-epochs": 2,
    "num-server-rounds": 10,
    "mode": "async",
}


def bare_loop(
    cfg: AppConfig, clients: list[int], evals: int, threads: int
) -> tuple[float, float]:
    """Seconds to train ``clients`` (one task each) and run ``evals`` evaluations."""
    torch.set_num_threads(threads)
    device = get_device()
    data = {
        pid: load_partition(
            cfg.dataset,
            cfg.data_dir,
            cfg.num_clients,
            pid,
            cfg.dirichlet_alpha,
            cfg.seed,
            num_test=cfg.num_test,
        )
        for pid in set(clients)
    }
    model = build_model(cfg)
    started = time.perf_counter()
    for pid in clients:
        loader = DataLoader(data[pid], batch_size=cfg.batch_size, shuffle=True)
        train_local(
            model,
            loader,
            epochs=cfg.local_epochs,
            lr0=cfg.learning_rate,
            alpha=cfg.lr_delay_alpha,
            tau=0.0,
            patience=cfg.patience,
            device=device,
        )
    train_s = time.perf_counter() - started
    testset = DataLoader(
        load_central_testset(cfg.dataset, cfg.data_dir, cfg.num_test), batch_size=512
    )
    started = time.perf_counter()
    for _ in range(evals):
        evaluate(model, testset, device)
    return train_s, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", type=Path, default=Path("results/overhead"))
    parser.add_argument("--run-config", action="append", default=None)
    args = parser.parse_args()
    overrides = {**BASE, **parse_config_args(args.run_config)}
    if args.data_dir:
        overrides["data-dir"] = str(Path(args.data_dir).resolve())
    overrides["results-dir"] = str((args.out / "runs").resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = AppConfig.from_run_config(overrides)

    run = run_simulation_record(overrides, "async simulation", progress="[1/2]")
    trained = [int(e["client"]) for e in run.events if e["status"] != "timeout"]
    # Tasks still in flight at the end trained too; replay them on typical clients.
    trained += trained[: run.summary["abandoned_tasks"]]
    # The floor is the faster of one thread and all cores (intra-op threading
    # does not always pay off for small convolutions).
    cores = os.cpu_count() or 1
    probe = {t: bare_loop(cfg, trained[:2], 0, t)[0] for t in sorted({1, cores})}
    threads = min(probe, key=probe.__getitem__)
    print(f"[2/2] bare PyTorch loop: {len(trained)} tasks, {threads} thread(s) ...")
    train_s, eval_s = bare_loop(cfg, trained, len(run.evals), threads)
    bare = train_s + eval_s

    total = run.wall_seconds
    loop = float(run.evals[-1]["wall_time"])
    sim_eval = float(run.summary["eval_seconds"])
    rows = [
        ["bare PyTorch loop (train + eval)", bare, 1.0],
        ["async simulation, end to end", total, total / bare],
        ["  Ray start-up/shutdown, data load (outside the loop)", total - loop, ""],
        ["  central evaluation", sim_eval, ""],
        [
            "  rest of the loop (training, scheduling, serialisation)",
            loop - sim_eval,
            "",
        ],
        ["async loop without start-up", loop, loop / bare],
    ]
    table = markdown_table(["what", "wall s", "x bare"], rows)
    note = (
        f"\n{len(trained)} client tasks ({cfg.local_epochs} local epochs, model "
        f"{cfg.model}, {cfg.clients_per_round} clients in parallel) and "
        f"{len(run.evals)} central evaluations; bare loop uses "
        f"{threads} thread(s) (probe: {probe}).\n"
    )
    (args.out / "overhead.md").write_text(table + note)
    print(table + note)


if __name__ == "__main__":
    main()
