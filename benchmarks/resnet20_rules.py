"""ResNet-20 (BatchNorm) through every rule, against Flower's FedAvg, equal work.

The paper's CIFAR-10 model has BatchNorm: its running statistics and counters
travel in the state dict beside the weights, and a rule that steps them like
weights evaluates to NaN (negative variances) or stays at chance (FADAS). This
benchmark runs FedAvg (``mode='sync'``, Flower's own ``FedAvg``) and each
asynchronous rule on the same federation and the same number of client updates
(``versions x clients-per-round``; FedAsync merges one update per version, so it
runs ``versions x clients-per-round`` versions), through
:func:`afl_flwr.server_app.run` on the in-process engine, and reports for every
method the final and best test accuracy over seeds (mean, 95% t-interval,
per-seed values), the difference to FedAvg per seed, and every evaluation that
was not finite. Runs are cached under ``<out>/resnet20_runs/``.

CPU (this machine, the offline MNIST files)::

    python benchmarks/resnet20_rules.py --data-dir ../shared/data/mnist

CIFAR-10 on a GPU box (downloads the data set; see docs/benchmarks.md)::

    python benchmarks/resnet20_rules.py --dataset cifar10 --versions 40 \\
        --local-epochs 2 --workers 4
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from afl_flwr.experiments.runs import markdown_table, run_pool
from afl_flwr.experiments.stats import t_interval
from afl_flwr.results import TEST_ACC, TEST_LOSS

FEDAVG = "fedavg"
METHODS = (FEDAVG, "fedbuff", "ca2fl", "fadas", "fedasync", "fedstaleweight", "aced")
# The bar: each buffered rule within this many points of FedAvg.
WITHIN_PP = 10.0


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=RULE:key=value,...`` -> (name, rule, run-config overrides)."""
    name, _, rest = text.partition("=")
    rule, _, settings = rest.partition(":")
    if not name or rule not in METHODS or rule == FEDAVG:
        raise ValueError(
            f"--variant {text!r}: expected NAME=RULE:key=value,... with RULE one of "
            f"{', '.join(m for m in METHODS if m != FEDAVG)}"
        )
    values = parse_config_args([settings.replace(",", " ")]) if settings else {}
    return name, rule, values


def overrides(method: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Run config of one (method, seed); equal client work for every method."""
    if method in args.variant_table:
        rule, extra = args.variant_table[method]
        return {**overrides(rule, args, seed), **extra}
    base: dict[str, Any] = {
        "dataset": args.dataset,
        "data-dir": args.data_dir,
        "model": "resnet20",
        "num-clients": args.clients,
        "clients-per-round": args.concurrency,
        # K = concurrency: a version is one FedAvg round's client work.
        "buffer-size": args.concurrency,
        "num-server-rounds": args.versions,
        "local-epochs": args.local_epochs,
        "eval-every": 1,
        "seed": seed,
        "results-dir": str(Path(args.out) / "resnet20_runs" / "results"),
    }
    if method == FEDAVG:
        return {**base, "mode": "sync"}
    if method == "fedasync":
        updates = args.versions * args.concurrency
        return {
            **base,
            "aggregation": "fedasync",
            "num-server-rounds": updates,
            "eval-every": args.concurrency,
        }
    return {**base, "aggregation": method}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) through the in-process engine (cached)."""
    cache = Path(job["cache"])
    if cache.exists():
        return json.loads(cache.read_text())
    from afl_flwr.experiments.inprocess import run_inprocess

    started = time.time()
    outcome = run_inprocess(job["overrides"], torch_threads=None)
    evals = [
        {
            "version": p.version,
            "updates": p.client_updates,
            "acc": p.metrics.get(TEST_ACC, math.nan),
            "loss": p.metrics.get(TEST_LOSS, math.nan),
        }
        for p in outcome.history.evals
    ]
    record = {
        "method": job["method"],
        "seed": job["seed"],
        "evals": evals,
        "updates": len(outcome.history.merged()),
        "wall_s": time.time() - started,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record))
    return record


def summarise(records: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per method: final/best accuracy per seed, intervals, NaN evaluations."""
    by = {(r["method"], r["seed"]): r for r in records}
    out: dict[str, Any] = {}
    fedavg_final = [by[(FEDAVG, s)]["evals"][-1]["acc"] for s in seeds]
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [by[(method, s)] for s in seeds]
        final = [r["evals"][-1]["acc"] for r in runs]
        best = [max(e["acc"] for e in r["evals"]) for r in runs]
        not_finite = [
            sum(
                1
                for e in r["evals"]
                if not (math.isfinite(e["acc"]) and math.isfinite(e["loss"]))
            )
            for r in runs
        ]
        diff = [100 * (f - g) for f, g in zip(final, fedavg_final, strict=True)]
        out[method] = {
            "final": final,
            "best": best,
            "not_finite_evals": not_finite,
            "updates": [r["updates"] for r in runs],
            "final_ci": t_interval(final).__dict__,
            "best_ci": t_interval(best).__dict__,
            "diff_pp": diff,
            "diff_pp_ci": t_interval(diff).__dict__,
            # "within 10 pp of FedAvg": not more than that below it, on average
            "within_pp": sum(diff) / len(diff) >= -WITHIN_PP,
            "wall_s": [r["wall_s"] for r in runs],
        }
    return out


def _fmt_ci(ci: dict[str, float], scale: float = 1.0) -> str:
    if ci["n"] < 2:
        return f"{ci['mean'] * scale:.3f}"
    return (
        f"{ci['mean'] * scale:.3f} [{ci['low'] * scale:.3f}, {ci['high'] * scale:.3f}]"
    )


def table(summary: dict[str, Any]) -> str:
    """The report's table (one row per method)."""
    rows = []
    for method, s in summary.items():
        rows.append(
            [
                method,
                _fmt_ci(s["final_ci"]),
                " ".join(f"{v:.3f}" for v in s["final"]),
                _fmt_ci(s["best_ci"]),
                "-" if method == FEDAVG else _fmt_ci(s["diff_pp_ci"]),
                sum(s["not_finite_evals"]),
                int(sum(s["updates"]) / len(s["updates"])),
                f"{sum(s['wall_s']) / len(s['wall_s']):.0f}",
            ]
        )
    return markdown_table(
        [
            "method",
            "final acc, mean [95% CI]",
            "per seed",
            "best acc",
            "final - FedAvg (pp)",
            "non-finite evals",
            "updates",
            "wall s/run",
        ],
        rows,
    )


def main() -> None:
    """Run every (method, seed), then write JSON and Markdown reports."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="", help="MNIST IDX folder (offline)")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="an extra method NAME=RULE:key=value,... (e.g. "
        "fadas-0.01=fadas:server-lr=0.01)",
    )
    parser.add_argument("--versions", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads/run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    for name in ("versions", "clients", "concurrency", "local_epochs", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if FEDAVG not in args.methods:
        parser.error("--methods must include fedavg (the baseline)")
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as err:
        parser.error(str(err))
    args.variant_table = {name: (rule, extra) for name, rule, extra in variants}
    args.methods = [*args.methods, *args.variant_table]
    tag = f"{args.dataset}-v{args.versions}-e{args.local_epochs}"
    jobs = [
        {
            "method": method,
            "seed": seed,
            "overrides": overrides(method, args, seed),
            "cache": str(
                Path(args.out) / "resnet20_runs" / f"{tag}-{method}-s{seed}.json"
            ),
        }
        for seed in args.seeds
        for method in args.methods
    ]
    started = time.time()
    records = run_pool(
        run_job,
        jobs,
        args.workers,
        lambda r: (
            f"{r['method']} seed {r['seed']}: final acc "
            f"{r['evals'][-1]['acc']:.3f}, {r['wall_s']:.0f}s"
        ),
        torch_threads=args.threads,
    )
    summary = summarise(records, args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/resnet20_rules.py " + " ".join(sys.argv[1:]),
        "setting": {
            k: v for k, v in vars(args).items() if k not in ("out", "variant_table")
        },
        "summary": summary,
        "runs": sorted(records, key=lambda r: (r["method"], r["seed"])),
        "elapsed_s": time.time() - started,
    }
    (out / f"resnet20_rules_{tag}.json").write_text(json.dumps(payload, indent=1))
    report = (
        f"# ResNet-20 through every rule ({args.dataset}, {args.versions} versions of "
        f"{args.concurrency} updates, {args.local_epochs} local epoch(s), seeds "
        f"{args.seeds})\n\n`{payload['command']}`\n\n{table(summary)}\n"
    )
    (out / f"resnet20_rules_{tag}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
