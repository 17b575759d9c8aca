"""Framework overhead: an async simulation vs a bare PyTorch loop doing the same work.

1. Run one asynchronous simulation through Flower's Ray runtime (in process)
   and time it end to end; the same run on the in-process engine
   (:mod:`afl_flwr.experiments.inprocess`, no Ray) is a second row.
2. Replay exactly the client training it did — same partitions, same local
   epochs, same model, same batch size, one task per reply plus the tasks still
   in flight at the end — in a bare single-process PyTorch loop using every core
   (the physical floor on this machine), then the same central evaluations.
3. Report the ratio and where the rest goes: Ray start-up and shutdown (outside
   the strategy loop), the loop, the central evaluation (in a background
   thread, overlapping training) and the wait for the final evaluation.
   ``--repeats`` repeats everything; ratios are per repeat, with a t-interval.

Usage::

    python benchmarks/overhead.py --data-dir ../shared/data/mnist
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from flwr.common.config import parse_config_args
from torch.utils.data import DataLoader

from afl_flwr.client_app import build_model
from afl_flwr.config import AppConfig
from afl_flwr.data import load_central_testset, load_partition
from afl_flwr.experiments.runs import (
    RunRecord,
    load_run,
    markdown_table,
    run_simulation_record,
)
from afl_flwr.experiments.stats import t_interval
from afl_flwr.simulate import simulate
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
            min_rel_delta=cfg.early_stop_delta,
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


def simulation_row(run: RunRecord) -> dict[str, float]:
    """Where one simulated run's wall time went (seconds)."""
    evals = run.evals
    # The loop ends once the final evaluation is recorded: it is waited for.
    loop = float(evals[-1]["wall_time"]) + float(evals[-1]["eval_seconds"])
    first = float(run.summary["first_dispatch_wall"])
    return {
        "total": run.wall_seconds,
        "outside": run.wall_seconds - loop,
        "loop": loop,
        "first_dispatch": first,
        "after_first_dispatch": loop - first,
        "eval": float(run.summary["eval_seconds"]),
        "final_eval": float(evals[-1]["eval_seconds"]),
    }


def replayed_tasks(run: RunRecord) -> list[int]:
    """Partition ids of every task the run trained, in order."""
    trained = [int(e["client"]) for e in run.events if e["status"] != "timeout"]
    # Tasks still in flight at the end trained too; replay them on typical clients.
    return trained + trained[: int(run.summary["abandoned_tasks"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", type=Path, default=Path("results/overhead"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-config", action="append", default=None)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    overrides = {**BASE, **parse_config_args(args.run_config)}
    if args.data_dir:
        overrides["data-dir"] = str(Path(args.data_dir).resolve())
    overrides["results-dir"] = str((args.out / "runs").resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = AppConfig.from_run_config(overrides)

    steps = 3 * args.repeats
    ray_rows, inproc_rows, bare_rows, raw = [], [], [], []
    threads = 1
    for rep in range(args.repeats):
        step = 3 * rep
        print(f"[{step + 1}/{steps}] Flower Ray simulation ...", flush=True)
        started = time.time()
        path = simulate(overrides, client_cpus=1)
        ray_run = load_run(path, "ray", time.time() - started)
        inproc_run = run_simulation_record(
            overrides, "in-process engine", progress=f"[{step + 2}/{steps}]"
        )
        trained = replayed_tasks(ray_run)
        if rep == 0:
            # The floor is the faster of one thread and all cores (intra-op
            # threading does not always pay off for small convolutions).
            cores = os.cpu_count() or 1
            probe = {
                t: bare_loop(cfg, trained[:2], 0, t)[0] for t in sorted({1, cores})
            }
            threads = min(probe, key=probe.__getitem__)
        print(
            f"[{step + 3}/{steps}] bare PyTorch loop: {len(trained)} tasks, "
            f"{threads} thread(s) ...",
            flush=True,
        )
        train_s, eval_s = bare_loop(cfg, trained, len(ray_run.evals), threads)
        ray_rows.append(simulation_row(ray_run))
        inproc_rows.append(simulation_row(inproc_run))
        bare_rows.append({"train": train_s, "eval": eval_s, "total": train_s + eval_s})
        raw.append(
            {
                "ray": ray_rows[-1],
                "inprocess": inproc_rows[-1],
                "bare": bare_rows[-1],
                "tasks": len(trained),
                "evaluations": len(ray_run.evals),
            }
        )

    def ratio(rows: list[dict[str, float]], key: str) -> str:
        return t_interval(
            [r[key] / b["total"] for r, b in zip(rows, bare_rows, strict=True)]
        ).format()

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    rows = [
        ["bare PyTorch loop (train + eval)", mean(bare_rows, "total"), "1"],
        [
            "Flower Ray simulation, end to end",
            mean(ray_rows, "total"),
            ratio(ray_rows, "total"),
        ],
        [
            "  Ray start-up/shutdown, data load (outside the loop)",
            mean(ray_rows, "outside"),
            "",
        ],
        ["  the asynchronous loop", mean(ray_rows, "loop"), ratio(ray_rows, "loop")],
        [
            "    up to the first task (profile query: actors import the ClientApp, "
            "load data)",
            mean(ray_rows, "first_dispatch"),
            "",
        ],
        [
            "    from the first task to the end",
            mean(ray_rows, "after_first_dispatch"),
            ratio(ray_rows, "after_first_dispatch"),
        ],
        [
            "    central evaluation (background thread, overlaps training)",
            mean(ray_rows, "eval"),
            "",
        ],
        ["    waiting for the final evaluation", mean(ray_rows, "final_eval"), ""],
        [
            "in-process engine (no Ray), end to end",
            mean(inproc_rows, "total"),
            ratio(inproc_rows, "total"),
        ],
    ]
    table = markdown_table(["what", "wall s (mean)", "x bare, mean [95% CI]"], rows)
    note = (
        f"\n{args.repeats} repeats of the same seeded run: {raw[0]['tasks']} client "
        f"tasks ({cfg.local_epochs} local epochs, model {cfg.model}, "
        f"{cfg.clients_per_round} clients in parallel, 1 CPU each) and "
        f"{raw[0]['evaluations']} central evaluations (eval-every "
        f"{cfg.eval_every}); the bare loop does the same tasks and evaluations in "
        f"one process with {threads} thread(s) (probe: {probe}). Ratios are "
        "per repeat (simulation / bare loop of the same repeat).\n"
    )
    (args.out / "overhead.md").write_text(table + note)
    (args.out / "overhead.json").write_text(json.dumps(raw, indent=2))
    print(table + note)


if __name__ == "__main__":
    main()
