"""Privacy against utility: asynchronous DP (AFL+DP) against FedAvg under Flower's DP.

The cross-device preset under DP (``presets/dp-cross-device.toml``: 1,000
clients, Dirichlet 0.5, the app's small CNN, log-uniform speeds and network
delays) on the virtual clock, for each noise multiplier z:

* **AFL+DP**: the asynchronous strategy (FedBuff, eta_g = 1) wrapped in
  :class:`afl_flwr.privacy.AsyncDPFixedClipping`, K = ``--buffer-size``
  distinct clients per release, ``--concurrency`` clients training at a time;
* **FedAvg+DP**: Flower's ``FedAvg`` wrapped in Flower's own
  ``DifferentialPrivacyServerSideFixedClipping``, K clients per round.

Both clip every delta to the same C, add the same noise per release
(std z C / K per coordinate) and account with Flower's ``RdpAccountant`` at the
same delta, population and (no) amplification: after r releases both have spent
exactly the same epsilon, so "equal epsilon" is "equal release count". Reported
per z, with 95% t-intervals over seeds (per-seed values in the JSON): epsilon
at the last release, final and best accuracy, simulated time to
``--target`` accuracy and the per-seed ratio FedAvg / AFL. A plot shows accuracy
against epsilon. Runs go through ``server_app.run`` in process (as
benchmark_v2), two at a time, cached under ``<out>/dp_utility_runs/``.

    python benchmarks/dp_utility.py --data-dir ../shared/data/mnist
"""

import argparse
import hashlib
import json
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from afl_flwr.experiments.runs import markdown_table, run_pool
from afl_flwr.experiments.stats import t_interval
from afl_flwr.results import TEST_ACC

PRESET = Path(__file__).resolve().parents[1] / "presets" / "dp-cross-device.toml"
AFL = "AFL+DP (FedBuff)"
FEDAVG = "FedAvg+DP (Flower's wrapper)"


def overrides(method: str, z: float, seed: int, args: argparse.Namespace) -> dict:
    """The run config of one (method, z, seed)."""
    base = tomllib.loads(PRESET.read_text())
    base.update(
        {
            "data-dir": args.data_dir,
            "clock": "virtual",
            "seed": seed,
            "num-server-rounds": args.releases,
            "eval-every": args.eval_every,
            "dp-noise-multiplier": z,
            "dp-clipping-norm": args.clipping_norm,
            "dp-max-epsilon": 0.0,
            "results-dir": str(args.out / "dp_utility_runs" / "results"),
        }
    )
    if method == AFL:
        base.update(
            {"buffer-size": args.buffer_size, "clients-per-round": args.concurrency}
        )
        if args.staleness_fn:
            base["staleness-fn"] = args.staleness_fn
    else:
        base.update(
            {
                "mode": "sync",
                "clients-per-round": args.buffer_size,
                "sync-selection": "selector",
            }
        )
        base.pop("buffer-size", None)
        base.pop("aggregation", None)
    return base


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (method, z, seed) in process and keep its curve (cached)."""
    cache = Path(job["cache"])
    if cache.exists():
        return json.loads(cache.read_text())
    from afl_flwr.experiments.inprocess import run_inprocess

    started = time.time()
    outcome = run_inprocess(job["overrides"])
    history = outcome.history
    epsilon = dict(history.privacy)
    record = {
        **{k: job[k] for k in ("method", "z", "seed")},
        # (release, simulated time, test accuracy, epsilon or None) per evaluation
        "evals": [
            (p.version, p.sim_time, p.metrics[TEST_ACC], epsilon.get(p.version))
            for p in history.evals
            if TEST_ACC in p.metrics
        ],
        "mean_staleness": float(np.mean(history.staleness_values() or [0])),
        "wall_s": time.time() - started,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record))
    return record


def time_to(evals: list[list[float]], target: float) -> float | None:
    """First simulated time with test accuracy >= target."""
    return next((t for _, t, acc, _ in evals if acc >= target), None)


def acc_at(evals: list[list[float]], sim_time: float) -> float:
    """Accuracy of the last evaluation at or before ``sim_time``."""
    return [acc for _, t, acc, _ in evals if t <= sim_time + 1e-9][-1]


def fmt(values: list[float | None], digits: int = 3) -> str:
    """``mean [95% CI]`` over seeds, or how many seeds missed."""
    missing = sum(v is None for v in values)
    if missing:
        return f"{missing}/{len(values)} not reached"
    return t_interval([float(v) for v in values if v is not None]).format(digits)


def fmt_epsilon(values: list[float | None]) -> str:
    """The epsilon spent (equal on every seed: it depends on z and releases only)."""
    if all(v is None for v in values):
        return "no DP"
    return f"{max(v for v in values if v is not None):.4g}"


def summarise(records: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Per z and method: per-seed values, and the per-seed time ratios."""
    cells: dict[str, Any] = {}
    for z in sorted({r["z"] for r in records}):
        cell: dict[str, Any] = {}
        for method in (AFL, FEDAVG):
            runs = sorted(
                (r for r in records if r["z"] == z and r["method"] == method),
                key=lambda r: r["seed"],
            )
            cell[method] = {
                "seeds": [r["seed"] for r in runs],
                "epsilon": [r["evals"][-1][3] for r in runs],
                "final_acc": [r["evals"][-1][2] for r in runs],
                "best_acc": [max(e[2] for e in r["evals"]) for r in runs],
                "time_to_target": [time_to(r["evals"], target) for r in runs],
                "sim_time": [r["evals"][-1][1] for r in runs],
                "mean_staleness": [r["mean_staleness"] for r in runs],
            }
        # Accuracy at equal simulated time: the earlier of the two ends, per seed.
        ends = [
            min(a, f)
            for a, f in zip(
                cell[AFL]["sim_time"], cell[FEDAVG]["sim_time"], strict=True
            )
        ]
        for method in (AFL, FEDAVG):
            runs = sorted(
                (r for r in records if r["z"] == z and r["method"] == method),
                key=lambda r: r["seed"],
            )
            cell[method]["acc_at_equal_time"] = [
                acc_at(r["evals"], end) for r, end in zip(runs, ends, strict=True)
            ]
        cell["equal_time"] = ends
        pairs = zip(
            cell[FEDAVG]["time_to_target"], cell[AFL]["time_to_target"], strict=True
        )
        cell["speedup"] = [f / a if f and a else None for f, a in pairs]
        cells[str(z)] = cell
    return cells


def report(cells: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown report."""
    rows = []
    for z, cell in cells.items():
        for method in (AFL, FEDAVG):
            m = cell[method]
            rows.append(
                [
                    z,
                    method,
                    fmt_epsilon(m["epsilon"]),
                    fmt(m["final_acc"]),
                    fmt(m["best_acc"]),
                    fmt(m["acc_at_equal_time"]),
                    fmt(m["time_to_target"]),
                    fmt(cell["speedup"]) if method == AFL else "",
                ]
            )
    seeds = cells[next(iter(cells))][AFL]["seeds"]
    return "\n".join(
        [
            "# Privacy against utility: AFL+DP vs FedAvg under Flower's DP wrapper",
            "",
            f"`python benchmarks/dp_utility.py --data-dir {args.data_dir}"
            f" --buffer-size {args.buffer_size} --concurrency {args.concurrency}"
            f" --clipping-norm {args.clipping_norm} --releases {args.releases}"
            f" --seeds {' '.join(map(str, seeds))}"
            f" --noise {' '.join(map(str, cells))}"
            + (f" --staleness-fn {args.staleness_fn}" if args.staleness_fn else "")
            + "`",
            "",
            f"`presets/dp-cross-device.toml` (1,000 clients) with K = "
            f"{args.buffer_size} clipped deltas per release (C = "
            f"{args.clipping_norm}), {args.releases} releases, noise std "
            "z C / K per coordinate, Flower's RdpAccountant at delta = 1e-5 without "
            "sampling amplification. Both methods release the same noise with the "
            "same accountant, so epsilon is equal at equal release counts. AFL+DP "
            f"keeps {args.concurrency} clients training; FedAvg samples K per round. "
            f"Mean [95% t-interval] over seeds {seeds}; time in simulated seconds; "
            "'acc at equal sim time': at the earlier of the two methods' ends, per "
            f"seed; target accuracy {args.target}; speedup = FedAvg's time / AFL's, "
            "per seed.",
            "",
            markdown_table(
                [
                    "z",
                    "method",
                    "epsilon at the end",
                    "final acc",
                    "best acc",
                    "acc at equal sim time",
                    f"time to {args.target}",
                    "speedup",
                ],
                rows,
            ),
            "",
            "![accuracy against epsilon](dp_utility.png)",
            "",
        ]
    )


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Mean accuracy against epsilon, one line per (method, z)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eps, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for color, z in enumerate(sorted({r["z"] for r in records})):
        for method, style in ((AFL, "-"), (FEDAVG, "--")):
            runs = [r for r in records if r["z"] == z and r["method"] == method]
            if not runs:
                continue
            acc = np.mean([[e[2] for e in r["evals"]] for r in runs], axis=0)
            eps = [e[3] for e in runs[0]["evals"]]
            sim = np.mean([[e[1] for e in r["evals"]] for r in runs], axis=0)
            label = f"{method.split(' ')[0]} " + (f"z={z}" if z else "no DP")
            if z:
                ax_eps.plot(
                    eps[1:], acc[1:], style, color=f"C{color}", marker=".", label=label
                )
            ax_time.plot(sim, acc, style, color=f"C{color}", marker=".", label=label)
    ax_eps.set(xlabel="epsilon (delta = 1e-5)", ylabel="test accuracy", xscale="log")
    ax_time.set(xlabel="simulated time (s)", ylabel="test accuracy")
    ax_eps.legend(fontsize=7)
    ax_time.legend(fontsize=7)
    fig.suptitle("User-level DP: mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 1.0, 2.0],
        help="noise multipliers z; 0 runs both methods without DP (the reference)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    preset = tomllib.loads(PRESET.read_text())
    parser.add_argument("--buffer-size", type=int, default=preset["buffer-size"])
    parser.add_argument("--concurrency", type=int, default=preset["clients-per-round"])
    parser.add_argument(
        "--clipping-norm", type=float, default=preset["dp-clipping-norm"]
    )
    parser.add_argument("--releases", type=int, default=preset["num-server-rounds"])
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--staleness-fn",
        default="",
        help="AFL+DP's staleness function (default: the app's); the report "
        "goes to dp_utility_<fn>.*",
    )
    args = parser.parse_args()
    if args.concurrency < args.buffer_size:
        parser.error("--concurrency must be >= --buffer-size")
    jobs = []
    for z in args.noise:
        for seed in args.seeds:
            for method in (AFL, FEDAVG):
                config = overrides(method, z, seed, args)
                key = hashlib.sha1(
                    json.dumps(config, sort_keys=True).encode()
                ).hexdigest()[:12]
                jobs.append(
                    {
                        "method": method,
                        "z": z,
                        "seed": seed,
                        "overrides": config,
                        "cache": str(args.out / "dp_utility_runs" / f"{key}.json"),
                    }
                )
    records = run_pool(
        run_job,
        jobs,
        args.workers,
        lambda r: (
            f"z={r['z']} {r['method']} seed {r['seed']}: final acc "
            f"{r['evals'][-1][2]:.3f}, epsilon {r['evals'][-1][3]}"
        ),
    )
    cells = summarise(records, args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"dp_utility_{args.staleness_fn}" if args.staleness_fn else "dp_utility"
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "args": {**vars(args), "out": str(args.out)},
                "cells": cells,
                "runs": records,
            },
            indent=1,
        )
    )
    plot(records, args.out / f"{name}.png")
    text = report(cells, args).replace("(dp_utility.png)", f"({name}.png)")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
