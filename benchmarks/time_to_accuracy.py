"""Headline benchmark: time to a target accuracy, AFL vs Flower's FedAvg.

Same clients, data, local work and concurrency; both runs charged on the same
virtual clock (each client task lasts planned steps x step time x its speed
factor + a seeded network delay; a FedAvg round lasts as long as its slowest
client). Two scenarios:

(a) speed factors log-uniform over 1..10x plus delays U(0, 2 s);
(b) stragglers: 20% of the clients 10x slower, no delays.

For each scenario and seed it reports the simulated time each method needs to
reach the target accuracy, the speedup, and the *bound* given by the speeds
alone (simulated time per update, sync vs async, from
:func:`afl_flwr.experiments.bound.speed_bound`), best accuracy of both at equal
client work, slot utilisation and the machine's wall time. Usage::

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data/mnist
"""

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from afl_flwr.clock import NodeProfile, speed_factors
from afl_flwr.config import AppConfig
from afl_flwr.data import partition_sizes
from afl_flwr.experiments.bound import speed_bound
from afl_flwr.experiments.runs import markdown_table, run_simulation_record
from afl_flwr.experiments.studies import BASE_CONFIG

SCENARIOS: dict[str, dict[str, Any]] = {
    "a: speeds 1-10x, delays U(0,2s)": {
        "speed-spread": 10.0,
        "max-delay-s": 2.0,
        "straggler-fraction": 0.0,
    },
    "b: 20% stragglers 10x slower": {
        "speed-spread": 1.0,
        "max-delay-s": 0.0,
        "straggler-fraction": 0.2,
        "straggler-slowdown": 10.0,
    },
}
BASE: dict[str, Any] = {**BASE_CONFIG, "clock": "virtual"}


def bound_for(cfg: AppConfig, updates: int) -> Any:
    """Speed-only bound for the run's own profiles (sizes, speeds, delays)."""
    sizes = partition_sizes(
        cfg.dataset,
        cfg.data_dir,
        cfg.num_clients,
        cfg.dirichlet_alpha,
        cfg.seed,
        num_test=cfg.num_test,
    )
    speeds = speed_factors(
        cfg.num_clients,
        spread=cfg.speed_spread,
        straggler_fraction=cfg.straggler_fraction,
        straggler_slowdown=cfg.straggler_slowdown,
        seed=cfg.seed,
    )
    profiles = [
        NodeProfile(pid, size, float(speed), cfg.max_delay_s)
        for pid, (size, speed) in enumerate(zip(sizes, speeds, strict=True))
    ]
    return speed_bound(
        profiles,
        concurrency=cfg.clients_per_round,
        updates=max(updates, 2000),
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        step_time_s=cfg.step_time_s,
        seed=cfg.seed,
        selection=cfg.selection,
    )


def mean_sd(values: list[float | None]) -> str:
    """``mean ± sd`` of the values, or how many runs missed."""
    present = [v for v in values if v is not None]
    if len(present) < len(values):
        return f"{len(values) - len(present)}/{len(values)} not reached"
    if len(present) == 1:
        return f"{present[0]:.3g}"
    return f"{statistics.mean(present):.3g} ± {statistics.stdev(present):.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("results/time_to_accuracy"))
    parser.add_argument("--run-config", action="append", default=None)
    args = parser.parse_args()
    base = {**BASE, **parse_config_args(args.run_config)}
    if args.data_dir:
        base["data-dir"] = str(Path(args.data_dir).resolve())
    base["results-dir"] = str((args.out / "runs").resolve())
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    total = len(SCENARIOS) * len(args.seeds) * 2
    done = 0
    per_run: list[dict[str, Any]] = []
    table_rows = []
    for scenario, extra in SCENARIOS.items():
        stats: dict[str, list[Any]] = {}
        for seed in args.seeds:
            records = {}
            for mode in ("sync", "async"):
                done += 1
                overrides = {**base, **extra, "seed": seed, "mode": mode}
                records[mode] = run_simulation_record(
                    overrides,
                    f"{scenario} | seed {seed} | {mode}",
                    progress=f"[{done}/{total}]",
                )
            cfg = AppConfig.from_run_config({**base, **extra, "seed": seed})
            updates = cfg.num_server_rounds * cfg.clients_per_round
            bound = bound_for(cfg, updates)
            t_sync = records["sync"].time_to(args.target)
            t_async = records["async"].time_to(args.target)
            speedup = t_sync / t_async if t_sync and t_async else None
            row = {
                "scenario": scenario,
                "seed": seed,
                "t_sync": t_sync,
                "t_async": t_async,
                "speedup": speedup,
                "bound": bound.speedup,
                "of_bound": speedup / bound.speedup if speedup else None,
                "best_sync": records["sync"].summary["best_test_acc"],
                "best_async": records["async"].summary["best_test_acc"],
                "util_sync": records["sync"].summary["utilisation"],
                "util_async": records["async"].summary["utilisation"],
                "bound_util_sync": bound.sync_utilisation,
                "bound_util_async": bound.async_utilisation,
                "mean_staleness": records["async"].summary["mean_staleness"],
                "wall_sync": records["sync"].wall_seconds,
                "wall_async": records["async"].wall_seconds,
            }
            per_run.append(row)
            for key, value in row.items():
                stats.setdefault(key, []).append(value)
        diff_pp = [
            100 * (a - s)
            for a, s in zip(stats["best_async"], stats["best_sync"], strict=True)
        ]
        table_rows.append(
            [
                scenario,
                mean_sd(stats["t_sync"]),
                mean_sd(stats["t_async"]),
                mean_sd(stats["speedup"]),
                mean_sd(stats["bound"]),
                mean_sd(stats["of_bound"]),
                mean_sd(stats["best_sync"]),
                mean_sd(stats["best_async"]),
                mean_sd(diff_pp),
                mean_sd(stats["util_sync"]),
                mean_sd(stats["util_async"]),
                mean_sd(stats["mean_staleness"]),
                mean_sd(stats["wall_async"]),
            ]
        )
    header = [
        "scenario",
        f"FedAvg sim s to {args.target:.0%}",
        f"AFL sim s to {args.target:.0%}",
        "speedup",
        "speed bound",
        "speedup / bound",
        "FedAvg best acc",
        "AFL best acc",
        "AFL - FedAvg (pp)",
        "FedAvg utilisation",
        "AFL utilisation",
        "AFL mean staleness",
        "AFL wall s / run",
    ]
    table = markdown_table(header, table_rows)
    note = (
        f"\nmean ± sd over seeds {args.seeds}; {BASE['num-clients']} clients, "
        f"{BASE['clients-per-round']} per round, equal client work "
        f"({base['num-server-rounds']} versions/rounds x "
        f"{base['clients-per-round']} updates); total wall "
        f"{time.time() - started:.0f}s on this machine.\n"
    )
    (args.out / "time_to_accuracy.md").write_text(table + note)
    (args.out / "time_to_accuracy.json").write_text(
        json.dumps({"runs": per_run, "base": base, "scenarios": SCENARIOS}, indent=2)
    )
    print(table + note)


if __name__ == "__main__":
    main()
