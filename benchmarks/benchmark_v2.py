"""Benchmark v2: six methods on one virtual clock, 95% intervals over seeds.

Methods: FedAvg (synchronous; rounds drawn by the project's seeded selector),
FedAsync, FedBuff, FedBuff with the paper's delay-aware client learning rate
(``lr-delay-alpha`` > 0; every other method runs alpha = 0), CA2FL and FADAS.
Every method does the same client work per update (same model, local epochs,
batch, optimizer), the same number of client updates in total, picks clients by
the same policy, and is evaluated on the same held-out test set every
``eval-updates`` merged client updates. All runs go through
:func:`afl_flwr.server_app.run` on
:class:`~afl_flwr.experiments.inprocess.InProcessGrid` (the ClientApp's own
handlers, in process; under the virtual clock this gives the same run as the Ray
simulation), with a process pool over runs.

Cells: Dirichlet alpha x scenario; ``--quick`` (this 2-core machine), ``--full``
(a GPU box) and ``--paper`` (the paper's own setting, AFL vs FedAvg). Each run's
numbers are cached under ``<out>/runs/`` so an interrupted benchmark resumes.
Usage::

    python benchmarks/benchmark_v2.py --quick --data-dir ../shared/data/mnist
"""

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.config import parse_config_args

from afl_flwr.aggregators import rule_keywords
from afl_flwr.clock import NodeProfile, speed_factors
from afl_flwr.config import AppConfig
from afl_flwr.data import partition_sizes
from afl_flwr.experiments.bound import async_rate_bound, completed_per_second
from afl_flwr.experiments.runs import markdown_table, run_pool
from afl_flwr.experiments.stats import Interval, t_interval
from afl_flwr.results import TEST_ACC

SCENARIOS: dict[str, dict[str, Any]] = {
    "log-uniform 1-10x + delay U(0,2s)": {
        "speed-spread": 10.0,
        "max-delay-s": 2.0,
        "straggler-fraction": 0.0,
    },
    "20% stragglers 10x": {
        "speed-spread": 1.0,
        "max-delay-s": 0.0,
        "straggler-fraction": 0.2,
        "straggler-slowdown": 10.0,
    },
}
STRAGGLERS = "20% stragglers 10x"
# The paper's delay-aware lr is lr0 / (1 + alpha tau); at its alpha = 0.01 and
# the staleness seen here (~1-10) it changes the lr by 1-10%, so the benchmark
# uses a value that halves the lr at tau = 5.
DELAY_ALPHA = 0.2
PAPER_DELAY_ALPHA = 0.01
# Server steps (eta) of FADAS and CA2FL. Tuned once with --tune (seed TUNE_SEED, not an
# evaluation seed; Dirichlet 0.1, stragglers): see results/benchmark_v2_tuning.md.
FADAS_ETA = 1e-3
CA2FL_ETA = 0.3
TUNING = {
    "FADAS": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "CA2FL": (0.1, 0.3, 1.0),
}
TUNE_SEED = 100
FEDAVG = "FedAvg"
# CA2FL at the suggested server-lr 1.0, kept beside the tuned one.
CA2FL_UNTUNED = "CA2FL eta=1"
AFL = "FedBuff"
# The app's own defaults (AppConfig), with only the equal-work keys set: the row
# a user who changes nothing gets. Marked as "default_method" in the JSON.
DEFAULT = "Default"
# Candidates for the app's default, tuned on TUNE_SEEDS only (--tune-default):
# run-config overrides on top of the app's defaults, each written out in full
# (K = C is the quick size's clients-per-round, 10; "fedbuff K=C" is the
# default before issue 20).
DEFAULT_CANDIDATES: dict[str, dict[str, Any]] = {
    "fedbuff K=C": {"aggregation": "fedbuff", "buffer-size": 10, "staleness-a": 0.5},
    "fedbuff K=C/2": {"aggregation": "fedbuff", "buffer-size": 5, "staleness-a": 0.5},
    "fedbuff K=C a=1": {
        "aggregation": "fedbuff",
        "buffer-size": 10,
        "staleness-a": 1.0,
    },
    "fedbuff K=C/2 a=1": {
        "aggregation": "fedbuff",
        "buffer-size": 5,
        "staleness-a": 1.0,
    },
    "fedbuff K=C/2 a=2": {
        "aggregation": "fedbuff",
        "buffer-size": 5,
        "staleness-a": 2.0,
    },
    # Server momentum on the K=C/2 a=1 default (FLSim's asynchronous server
    # SGD with momentum); eta_g / (1 - beta) is the steady-state step.
    **{
        f"fedbuff K=C/2 a=1 m={beta} lr={lr}": {
            "aggregation": "fedbuff",
            "buffer-size": 5,
            "staleness-a": 1.0,
            "fedbuff-server-momentum": beta,
            "server-lr": lr,
        }
        for beta, lr in (
            (0.9, 0.1),
            (0.9, 0.2),
            (0.7, 0.2),
            (0.7, 0.3),
            (0.5, 0.4),
            (0.5, 0.5),
            (0.5, 1.0),
            (0.3, 0.7),
        )
    },
    # Third round: a larger plain server step (more progress per update where
    # the equal-work budget ends before the target).
    **{
        f"fedbuff K=C/2 a=1 lr={lr}": {
            "aggregation": "fedbuff",
            "buffer-size": 5,
            "staleness-a": 1.0,
            "server-lr": lr,
        }
        for lr in (1.5, 2.0)
    },
    # ... and with a linear server-lr warm-up over the first W merges
    # (fedbuff-server-lr-warmup; a ramp like Goyal et al.'s gradual warm-up).
    **{
        f"fedbuff K=C/2 a=1{f' m={beta}' if beta else ''} lr={lr} wu={w}": {
            "aggregation": "fedbuff",
            "buffer-size": 5,
            "staleness-a": 1.0,
            "server-lr": lr,
            "fedbuff-server-lr-warmup": w,
            **({"fedbuff-server-momentum": beta} if beta else {}),
        }
        for beta, lr, w in ((0, 1.0, 10), (0, 1.5, 10), (0, 2.0, 20), (0.3, 0.7, 10))
    },
    "ca2fl K=C eta=0.3": {"aggregation": "ca2fl", "buffer-size": 10, "server-lr": 0.3},
    "ca2fl K=C/2 eta=0.3": {"aggregation": "ca2fl", "buffer-size": 5, "server-lr": 0.3},
    "ca2fl K=C/2 eta=0.5": {"aggregation": "ca2fl", "buffer-size": 5, "server-lr": 0.5},
    "ca2fl K=C/2 eta=0.4": {"aggregation": "ca2fl", "buffer-size": 5, "server-lr": 0.4},
    # Fourth round: FedStaleWeight (Ma et al. 2024), which weighs each client by
    # its average staleness so that slow clients' data are not learned less.
    "fedstaleweight K=C/2": {"aggregation": "fedstaleweight", "buffer-size": 5},
    "fedstaleweight K=C": {"aggregation": "fedstaleweight", "buffer-size": 10},
    # Fifth round: the staleness bound at K = C/2 covers half the client
    # updates it covered at K = C (tau_max x K); restore them ...
    "fedbuff K=C/2 a=1 tmax=40": {
        "aggregation": "fedbuff",
        "buffer-size": 5,
        "staleness-a": 1.0,
        "max-staleness": 40,
    },
    # ... and ACED (Chang et al. 2025), every client's latest update in
    # each merge while it is at most tau_D versions old (heterogeneity
    # amplification: fast clients' data dominate under non-IID data). Each
    # cached delta enters every merge while active, so eta is scaled towards
    # K / N; eta = 1 (tau 5, 10, 20) reached 0.34-0.47 against FedAvg's
    # 0.67-0.80 in the first cell (Dir 0.1, stragglers) and was stopped there.
    **{
        f"aced K=C/2 tau={tau} lr={lr}": {
            "aggregation": "aced",
            "buffer-size": 5,
            "aced-max-delay": tau,
            "server-lr": lr,
        }
        for tau, lr in ((10, 0.5), (20, 0.5), (10, 0.25), (20, 0.25))
    },
    # Sixth round: FedAsync with its own exponent a = 0.5 (one version per
    # update), with the app's staleness bound of 20 versions and with 100, the
    # client updates 20 versions of K = 5 cover.
    "fedasync a=0.5": {"aggregation": "fedasync", "staleness-a": 0.5},
    "fedasync a=0.5 tmax=100": {
        "aggregation": "fedasync",
        "staleness-a": 0.5,
        "max-staleness": 100,
    },
}
TUNE_SEEDS = (100, 101, 102)


@dataclass(frozen=True)
class Size:
    """How big a benchmark is."""

    base: dict[str, Any]
    versions: int  # buffered versions; client updates = versions x K
    eval_updates: int
    seeds: tuple[int, ...]
    alphas: tuple[float, ...] = (0.1, 0.5)
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    methods: tuple[str, ...] = (
        FEDAVG,
        "FedAsync",
        "FedBuff",
        "FedBuff+delay-lr",
        "CA2FL",
        "FADAS",
        CA2FL_UNTUNED,
        DEFAULT,
    )
    target_fraction: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)


SIZES: dict[str, Size] = {
    "quick": Size(
        base={
            "model": "mlp",
            "num-clients": 20,
            "clients-per-round": 10,
            "buffer-size": 5,
            "local-epochs": 1,
        },
        versions=60,
        eval_updates=10,
        seeds=(0, 1, 2, 3, 4),
    ),
    "full": Size(
        base={
            "model": "small-cnn",
            "num-clients": 50,
            "clients-per-round": 10,
            "buffer-size": 5,
            "local-epochs": 1,
        },
        versions=200,
        eval_updates=10,
        seeds=tuple(range(10)),
    ),
    "paper": Size(
        base={
            "model": "paper-cnn",
            "num-clients": 10,
            "clients-per-round": 5,
            "buffer-size": 5,
            "local-epochs": 10,
        },
        versions=40,
        eval_updates=5,
        seeds=(0, 1, 2),
        alphas=(0.5,),
        methods=(FEDAVG, "AFL (paper)"),
    ),
}


def method_overrides(method: str, size: Size) -> dict[str, Any]:
    """Run-config of ``method``: equal client updates and evaluation schedule."""
    per_round = int(size.base["clients-per-round"])
    k = int(size.base["buffer-size"])
    updates = size.versions * k
    no_delay_lr = {"lr-delay-alpha": 0.0}
    buffered = {
        "mode": "async",
        "num-server-rounds": size.versions,
        "eval-every": size.eval_updates // k,
    }
    candidate = method.removeprefix("candidate: ")
    if (
        method != DEFAULT
        and candidate != method
        and candidate not in DEFAULT_CANDIDATES
    ):
        raise ValueError(
            f"Unknown candidate {candidate!r}; known: {', '.join(DEFAULT_CANDIDATES)}"
        )
    if method == DEFAULT or method.startswith("candidate: "):
        extra = (
            DEFAULT_CANDIDATES[method.removeprefix("candidate: ")]
            if (method != DEFAULT)
            else {}
        )
        return {**app_default_work(size, extra), **extra}
    if method == FEDAVG:
        return {
            "mode": "sync",
            "sync-selection": "selector",
            "num-server-rounds": updates // per_round,
            "eval-every": size.eval_updates // per_round,
            **no_delay_lr,
        }
    if method == "FedAsync":
        # One version per update: the staleness cap covers the same client
        # updates (K x max-staleness) as for the buffered rules.
        return {
            "mode": "async",
            "aggregation": "fedasync",
            "num-server-rounds": updates,
            "eval-every": size.eval_updates,
            "max-staleness": k * AppConfig().max_staleness,
            **no_delay_lr,
        }
    if method == "FedBuff":
        return {**buffered, "aggregation": "fedbuff", **no_delay_lr}
    if method == "FedBuff+delay-lr":
        return {**buffered, "aggregation": "fedbuff", "lr-delay-alpha": DELAY_ALPHA}
    if method == "AFL (paper)":
        return {
            **buffered,
            "aggregation": "fedbuff",
            "lr-delay-alpha": PAPER_DELAY_ALPHA,
        }
    if method == "CA2FL":
        return {
            **buffered,
            "aggregation": "ca2fl",
            "server-lr": CA2FL_ETA,
            **no_delay_lr,
        }
    if method == CA2FL_UNTUNED:
        return {**buffered, "aggregation": "ca2fl", "server-lr": 1.0, **no_delay_lr}
    if method == "FADAS":
        return {
            **buffered,
            "aggregation": "fadas",
            "server-lr": FADAS_ETA,
            **no_delay_lr,
        }
    raise ValueError(f"Unknown method '{method}'")


def default_rule() -> dict[str, Any]:
    """The app's default rule, as run-config values (``0``/``-1``: the rule's own)."""
    keys = (
        "aggregation",
        "buffer-size",
        "server-lr",
        "fedbuff-server-momentum",
        "staleness-fn",
        "staleness-a",
        "staleness-b",
        "max-staleness",
        "lr-delay-alpha",
    )
    config = AppConfig().to_run_config()
    return {k: config[k] for k in keys}


def app_default_work(size: Size, extra: dict[str, Any]) -> dict[str, Any]:
    """The app's defaults with the size's equal work: updates = versions x K.

    Only the keys that fix the work are set (and ``buffer-size`` back to the
    app's default unless ``extra`` sets it), so every other setting is the app's.
    """
    updates = size.versions * int(size.base["buffer-size"])
    defaults = AppConfig()
    config = AppConfig.from_run_config(
        {
            **size.base,
            "buffer-size": extra.get("buffer-size", defaults.buffer_size),
            **extra,
        }
    )
    # A rule without a buffer (FedAsync) makes one version per update.
    buffered = "buffer_size" in rule_keywords(config.aggregation)
    k = config.effective_buffer_size if buffered else 1
    if updates % k or size.eval_updates % k:
        raise ValueError(f"K={k} does not divide the size's updates and evaluations")
    return {
        "mode": "async",
        "buffer-size": defaults.buffer_size,
        "num-server-rounds": updates // k,
        "eval-every": size.eval_updates // k,
    }


# ------------------------------------------------------------------ one run
def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (cell, method, seed) in process; return its numbers (cached)."""
    cache = Path(job["cache"])
    if cache.exists():
        return json.loads(cache.read_text())
    from afl_flwr.experiments.inprocess import run_inprocess

    started = time.time()
    outcome = run_inprocess(job["overrides"])
    history = outcome.history
    cfg = AppConfig.from_run_config(job["overrides"])
    evals = [
        (p.client_updates, p.sim_time, p.metrics[TEST_ACC])
        for p in history.evals
        if TEST_ACC in p.metrics
    ]
    finishes = [e.sim_time for e in history.events]
    record = {
        **{k: job[k] for k in ("alpha", "scenario", "method", "seed")},
        "evals": evals,
        "completed": len(finishes),
        "rate": completed_per_second(finishes),
        "rate_bound": rate_bound(cfg),
        "mean_staleness": float(np.mean(history.staleness_values() or [0])),
        "dropped": sum(1 for e in history.events if e.status == "dropped"),
        "wall_s": time.time() - started,
        "results_path": str(outcome.results_path),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record))
    return record


def rate_bound(cfg: AppConfig) -> float:
    """:func:`async_rate_bound` for the run's own clients."""
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
    return async_rate_bound(
        profiles,
        concurrency=cfg.clients_per_round,
        local_epochs=min(cfg.patience + 1, cfg.local_epochs),
        batch_size=cfg.batch_size,
        step_time_s=cfg.step_time_s,
    )


def run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Run jobs in a process pool, printing progress and an ETA."""
    return run_pool(
        run_job,
        jobs,
        workers,
        lambda r: (
            f"alpha {r['alpha']} | {r['scenario']} | {r['method']} | seed "
            f"{r['seed']}: best acc {max(a for _, _, a in r['evals']):.3f}, run "
            f"{r['wall_s']:.0f}s"
        ),
    )


def make_jobs(
    size: Size,
    base: dict[str, Any],
    out: Path,
    user: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every (cell, method, seed) of ``size``; the stragglers cells first.

    ``user`` run-config values (``--run-config``) override the size's, but not
    what defines a cell or a method.
    """
    jobs = []
    scenarios = sorted(size.scenarios, key=lambda s: s != STRAGGLERS)
    for alpha in sorted(size.alphas):
        for scenario in scenarios:
            for seed in size.seeds:
                for method in methods or size.methods:
                    overrides = {
                        **base,
                        **size.base,
                        **SCENARIOS[scenario],
                        **(user or {}),
                        "dirichlet-alpha": alpha,
                        "seed": seed,
                        **method_overrides(method, size),
                    }
                    # The default's row follows the app's defaults, which its
                    # overrides leave implicit: key it by the resolved config.
                    keyed = (
                        AppConfig.from_run_config(overrides).to_run_config()
                        if method == DEFAULT
                        else overrides
                    )
                    digest = hashlib.sha1(
                        json.dumps(keyed, sort_keys=True).encode()
                    ).hexdigest()[:8]
                    key = f"a{alpha}-{scenario}-{method}-s{seed}-{digest}"
                    key = "".join(c if c.isalnum() or c in ".-" else "_" for c in key)
                    overrides["results-dir"] = str(out / "runs" / key)
                    AppConfig.from_run_config(overrides)  # fail before any run
                    jobs.append(
                        {
                            "alpha": alpha,
                            "scenario": scenario,
                            "method": method,
                            "seed": seed,
                            "overrides": overrides,
                            "cache": str(out / "runs" / f"{key}.json"),
                        }
                    )
    # Stragglers (the headline claims) first, then the rest.
    jobs.sort(key=lambda j: (j["scenario"] != STRAGGLERS, j["alpha"]))
    return jobs


# ------------------------------------------------------------- per-seed metrics
def time_to(evals: list[list[float]], target: float) -> tuple[float | None, int | None]:
    """First (simulated time, client updates) with test accuracy >= target."""
    for updates, sim_time, acc in evals:
        if acc >= target:
            return sim_time, int(updates)
    return None, None


def acc_at(evals: list[list[float]], sim_time: float) -> float:
    """Accuracy of the last evaluation at or before ``sim_time``."""
    return max(
        ((t, a) for _, t, a in evals if t <= sim_time + 1e-9), key=lambda x: x[0]
    )[1]


def per_seed(records: list[dict[str, Any]], size: Size) -> dict[str, Any]:
    """Per-seed metrics of every cell and method, with each cell's target."""
    cells: dict[tuple[float, str], dict[str, dict[int, dict[str, Any]]]] = {}
    for r in records:
        cells.setdefault((r["alpha"], r["scenario"]), {}).setdefault(r["method"], {})[
            r["seed"]
        ] = r
    out: dict[str, Any] = {}
    for (alpha, scenario), methods in sorted(cells.items()):
        fedavg = methods.get(FEDAVG, {})
        fedavg_best = [max(a for *_, a in r["evals"]) for r in fedavg.values()]
        target = (
            math.floor(100 * size.target_fraction * float(np.mean(fedavg_best))) / 100
            if fedavg_best
            else 0.0
        )
        seeds = sorted(set.intersection(*(set(m) for m in methods.values())))
        rows: dict[str, dict[str, list[Any]]] = {m: {} for m in methods}
        for seed in seeds:
            equal_time = min(methods[m][seed]["evals"][-1][1] for m in methods)
            base = methods.get(FEDAVG, {}).get(seed)
            t_base = time_to(base["evals"], target)[0] if base else None
            for method, by_seed in methods.items():
                r = by_seed[seed]
                t, u = time_to(r["evals"], target)
                values = {
                    "seed": seed,
                    "time_to_target": t,
                    "updates_to_target": u,
                    "speedup": t_base / t if t and t_base else None,
                    "best_acc": max(a for *_, a in r["evals"]),
                    "final_acc": r["evals"][-1][2],
                    "acc_at_equal_time": acc_at(r["evals"], equal_time),
                    "equal_time": equal_time,
                    "rate": r["rate"],
                    "rate_ratio": r["rate"] / base["rate"] if base else None,
                    "bound_ratio": r["rate_bound"] / base["rate"] if base else None,
                    "mean_staleness": r["mean_staleness"],
                    "dropped": r["dropped"],
                    "wall_s": r["wall_s"],
                }
                for key, value in values.items():
                    rows[method].setdefault(key, []).append(value)
        out[f"Dir {alpha}, {scenario}"] = {
            "alpha": alpha,
            "scenario": scenario,
            "target": target,
            "seeds": seeds,
            "methods": rows,
            "curves": {m: {s: methods[m][s]["evals"] for s in seeds} for m in methods},
        }
    return out


def ci(values: list[Any]) -> Interval | None:
    """t-interval of the values, or None when any seed has no value."""
    if not values or any(v is None for v in values):
        return None
    return t_interval([float(v) for v in values])


def fmt(values: list[Any], digits: int = 3) -> str:
    """``mean [95% CI]``, or how many seeds missed."""
    missing = sum(v is None for v in values)
    if missing:
        return f"{missing}/{len(values)} not reached"
    interval = ci(values)
    return interval.format(digits) if interval else "-"


# ------------------------------------------------------------------ reports
def table(cells: dict[str, Any]) -> str:
    """The headline markdown table: one row per cell and method."""
    header = [
        "cell (target)",
        "method",
        "sim s to target",
        "speedup vs FedAvg",
        "best acc",
        "final acc (equal work)",
        "acc at equal sim time",
        "updates/s vs FedAvg",
        "bound on it",
        "max measured/bound",
        "mean staleness",
    ]
    rows = []
    for name, cell in cells.items():
        for method, m in cell["methods"].items():
            is_base = method == FEDAVG
            ratios = [
                r / b for r, b in zip(m["rate_ratio"], m["bound_ratio"], strict=True)
            ]
            rows.append(
                [
                    f"{name} ({cell['target']:.2f})",
                    method,
                    fmt(m["time_to_target"]),
                    "1" if is_base else fmt(m["speedup"]),
                    fmt(m["best_acc"]),
                    fmt(m["final_acc"]),
                    fmt(m["acc_at_equal_time"]),
                    "1" if is_base else fmt(m["rate_ratio"]),
                    "-" if is_base else fmt(m["bound_ratio"]),
                    "-" if is_base else f"{max(ratios):.3f}",
                    f"{np.mean(m['mean_staleness']):.2f}",
                ]
            )
    return markdown_table(header, rows)


def paired(a: list[Any], b: list[Any]) -> Interval | None:
    """t-interval of per-seed differences ``a - b``."""
    if any(v is None for v in [*a, *b]):
        return None
    return t_interval([x - y for x, y in zip(a, b, strict=True)])


def targets(cells: dict[str, Any]) -> list[str]:
    """The issue's targets, each checked on the measured per-seed values."""
    lines = []
    for name, cell in cells.items():
        if cell["alpha"] != 0.1 or cell["scenario"] != STRAGGLERS:
            continue
        m = cell["methods"]
        if not {"CA2FL", "FADAS", "FedBuff"} <= set(m):
            continue
        best = max(("CA2FL", "FADAS"), key=lambda x: float(np.mean(m[x]["final_acc"])))
        diff = paired(m[best]["final_acc"], m["FedBuff"]["final_acc"])
        sooner = paired(m[best]["time_to_target"], m["FedBuff"]["time_to_target"])
        assert diff is not None
        lines.append(
            f"- {name}: best of CA2FL/FADAS by mean final accuracy is {best}; "
            f"{best} - FedBuff final accuracy (paired over seeds) = "
            f"{100 * diff.mean:+.2f} pp [{100 * diff.low:+.2f}, {100 * diff.high:+.2f}]"
            f" -> {'MET' if diff.low > 0 else 'MISSED'} (needs the interval > 0); "
            f"time to target {best} - FedBuff = "
            + (
                f"{sooner.mean:+.3g} s [{sooner.low:+.3g}, {sooner.high:+.3g}] -> "
                f"{'MET' if sooner.mean < 0 else 'MISSED'} (needs < 0)"
                if sooner
                else "not comparable (a seed missed the target)"
            )
        )
    for name, cell in cells.items():
        if cell["scenario"] != STRAGGLERS:
            continue
        m = cell["methods"]
        afl = next((a for a in (AFL, "AFL (paper)") if a in m), None)
        if afl is None or FEDAVG not in m:
            continue
        best = paired(m[afl]["best_acc"], m[FEDAVG]["best_acc"])
        assert best is not None
        speed_text = straggler_speedup(m[afl]["speedup"])
        lines.append(
            f"- {name}: AFL ({afl}) vs FedAvg time to target: {speed_text}; best "
            f"accuracy AFL - FedAvg = {100 * best.mean:+.2f} pp "
            f"[{100 * best.low:+.2f}, {100 * best.high:+.2f}] -> "
            f"{'MET' if best.mean >= -0.01 else 'MISSED'} (needs within 1 pp)"
        )
    return lines


def straggler_speedup(speedups: list[Any]) -> str:
    """The straggler cells' time-to-target bar, checked on per-seed speedups."""
    speed = ci(speedups)
    if speed is None:
        missed = sum(v is None for v in speedups)
        return f"not comparable ({missed} seed(s) missed the target)"
    verdict = "MET" if speed.mean >= 3.3 and speed.low > 2 else "MISSED"
    return (
        f"{speed.mean:.2f}x [{speed.low:.2f}, {speed.high:.2f}] -> {verdict} "
        "(needs mean >= 3.3x, lower end > 2x)"
    )


def default_targets(cells: dict[str, Any]) -> list[str]:
    """Issue 20's targets for the app's default rule, on the measured seeds."""
    lines = []
    for name, cell in cells.items():
        m = cell["methods"]
        if DEFAULT not in m or FEDAVG not in m:
            continue
        speed = ci(m[DEFAULT]["speedup"])
        missed = sum(v is None for v in m[DEFAULT]["speedup"])
        if cell["scenario"] == STRAGGLERS:
            best = paired(m[DEFAULT]["best_acc"], m[FEDAVG]["best_acc"])
            assert best is not None
            speed_text = straggler_speedup(m[DEFAULT]["speedup"])
            lines.append(
                f"- {name}: {DEFAULT} vs FedAvg time to target {speed_text}; best "
                f"accuracy {DEFAULT} - FedAvg = {100 * best.mean:+.2f} pp "
                f"[{100 * best.low:+.2f}, {100 * best.high:+.2f}] -> "
                f"{'MET' if best.mean >= -0.01 else 'MISSED'} (needs within 1 pp)"
            )
        else:
            lines.append(
                f"- {name}: {DEFAULT} vs FedAvg time to target "
                + (
                    f"{speed.mean:.2f}x [{speed.low:.2f}, {speed.high:.2f}] -> "
                    f"{'MET' if speed.low > 1 else 'MISSED'} (needs the interval > 1)"
                    if speed
                    else f"not comparable ({missed} seed(s) missed the target)"
                )
            )
    return lines


def plot(cells: dict[str, Any], path: Path) -> None:
    """Curves (mean accuracy vs simulated time) and bars per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cells)
    fig, axes = plt.subplots(3, len(names), figsize=(5 * len(names), 12), squeeze=False)
    for col, name in enumerate(names):
        cell = cells[name]
        methods = list(cell["methods"])
        ax = axes[0][col]
        for method in methods:
            curves = cell["curves"][method]
            end = min(c[-1][1] for c in curves.values())
            grid = np.linspace(0, end, 200)
            accs = [
                [acc_at(c, t) for t in grid] for c in curves.values()
            ]  # step curve of each seed
            ax.plot(grid, np.mean(accs, axis=0), label=method)
        ax.axhline(cell["target"], color="grey", linestyle=":", label="target")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("simulated seconds")
        ax.set_ylabel("test accuracy (mean over seeds)")
        if col == 0:
            ax.legend(fontsize=7)
        for row, (key, label) in enumerate(
            (
                ("final_acc", "final accuracy, equal client work"),
                ("time_to_target", "simulated s to target"),
            ),
            start=1,
        ):
            ax = axes[row][col]
            means, errs = [], []
            for method in methods:
                interval = ci(cell["methods"][method][key])
                means.append(interval.mean if interval else np.nan)
                errs.append(interval.high - interval.mean if interval else 0.0)
            ax.bar(range(len(methods)), means, yerr=errs, capsize=3)
            ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=7)
            ax.set_ylabel(label + " (95% CI)")
            if key == "final_acc":
                low = np.nanmin(means) if not np.all(np.isnan(means)) else 0
                ax.set_ylim(max(0.0, low - 0.1), 1.0)
            elif np.any(np.asarray(means) > 0):
                ax.set_yscale("log")
            else:  # no method reached the target on every seed
                ax.text(
                    0.5,
                    0.5,
                    "target missed on some seed by every method",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=7,
                )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(
    records: list[dict[str, Any]],
    size_name: str,
    size: Size,
    out: Path,
    wall: float | None,
) -> str:
    """Write the markdown table, the JSON and the plot; return the markdown."""
    cells = per_seed(records, size)
    name = "benchmark_v2" if size_name == "quick" else f"benchmark_v2_{size_name}"
    runs = len(records)
    run_s = sum(r["wall_s"] for r in records)
    own = f"the runs' own times sum to {run_s / 60:.1f} min"
    timing = (
        f"{wall / 60:.1f} min wall for this invocation (cached runs reused), {own}"
        if wall is not None
        else f"table regenerated from cached runs; {own}"
    )
    note = (
        f"\nSize `{size_name}`: {size.base}, {size.versions * size.base['buffer-size']}"
        f" client updates per run, evaluation every {size.eval_updates} updates, "
        f"seeds {list(size.seeds)}; mean [95% t-interval] over seeds. Target per cell "
        f"= {size.target_fraction:.0%} of FedAvg's mean best accuracy. 'final acc' is "
        "after the same number of client updates for every method; 'acc at equal "
        "sim time' at the earliest end among the methods of that seed. 'updates/s "
        "vs FedAvg' is completed client tasks per simulated second over FedAvg's; "
        "'bound on it' is async_rate_bound (no asynchronous protocol completes more "
        "tasks per simulated second) over FedAvg's measured rate, so measured/bound "
        f"<= 1 always. {runs} runs, {timing}.\n"
    )
    lines = targets(cells) + default_targets(cells)
    text = (
        f"# Benchmark v2 ({size_name})\n\n"
        + table(cells)
        + note
        + ("\n## Targets\n\n" + "\n".join(lines) + "\n" if lines else "")
    )
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "size": size_name,
                "default_method": DEFAULT,
                "default_rule": default_rule(),
                "base": size.base,
                "versions": size.versions,
                "eval_updates": size.eval_updates,
                "delay_alpha": DELAY_ALPHA,
                "fadas_eta": FADAS_ETA,
                "ca2fl_eta": CA2FL_ETA,
                "scenarios": SCENARIOS,
                "wall_s": wall,
                "cells": cells,
            },
            indent=1,
        )
    )
    plot(cells, out / f"{name}.png")
    return text


def tune(base: dict[str, Any], out: Path, workers: int) -> str:
    """Server step of FADAS and CA2FL on one cell and seed TUNE_SEED.

    One value per method, chosen by final accuracy on Dirichlet 0.1 with
    stragglers at seed ``TUNE_SEED`` (not an evaluation seed).
    """
    size = SIZES["quick"]
    jobs = []
    for method, candidates in TUNING.items():
        for eta in candidates:
            tag = f"{method.lower()}-{eta}"
            overrides = {
                **base,
                **size.base,
                **SCENARIOS[STRAGGLERS],
                "dirichlet-alpha": 0.1,
                "seed": TUNE_SEED,
                **method_overrides(method, size),
                "server-lr": eta,
                "results-dir": str(out / "tuning" / tag),
            }
            jobs.append(
                {
                    "alpha": 0.1,
                    "scenario": STRAGGLERS,
                    "method": f"{method} eta={eta}",
                    "seed": TUNE_SEED,
                    "overrides": overrides,
                    "cache": str(out / "tuning" / f"{tag}.json"),
                }
            )
    records = run_all(jobs, workers)
    rows = [
        [r["method"], max(a for *_, a in r["evals"]), r["evals"][-1][2]]
        for r in sorted(records, key=lambda r: r["method"])
    ]
    text = (
        "# Server step tuning (quick size, Dirichlet 0.1, stragglers, seed "
        f"{TUNE_SEED}; not an evaluation seed)\n\n"
        + markdown_table(["candidate", "best acc", "final acc"], rows)
        + f"\nChosen: FADAS eta = {FADAS_ETA}, CA2FL eta = {CA2FL_ETA}.\n"
    )
    (out.parent / "benchmark_v2_tuning.md").write_text(text)
    return text


def tune_default(
    base: dict[str, Any],
    out: Path,
    workers: int,
    names: Sequence[str] | None = None,
) -> str:
    """Rank the default's candidates on TUNE_SEEDS (never evaluation seeds).

    Every candidate (:data:`DEFAULT_CANDIDATES`, or only ``names``) and FedAvg
    run on all four cells of the quick size at each tuning seed. Rule, fixed
    before any run: among the candidates whose mean speedup over FedAvg (time
    to the cell's target, per seed) is >= 3.3 in both straggler cells and > 1
    in every cell, pick the one with the largest worst-cell mean gap in best
    accuracy to FedAvg; with none eligible, the largest worst-cell gap overall.
    ``names`` (a later round, ranked beside the current default re-run in the
    same invocation) writes its own report, ``..._default_tuning_<digest>``.
    """
    unknown = [n for n in names or () if n not in DEFAULT_CANDIDATES]
    if unknown:
        raise ValueError(
            f"Unknown candidate {unknown[0]!r}; known: {', '.join(DEFAULT_CANDIDATES)}"
        )
    chosen_names = list(names or DEFAULT_CANDIDATES)
    size = Size(**{**SIZES["quick"].__dict__, "seeds": TUNE_SEEDS})
    methods = [FEDAVG, *(f"candidate: {name}" for name in chosen_names)]
    records = run_all(make_jobs(size, base, out, methods=methods), workers)
    cells = per_seed(records, size)
    rows, scores = [], {}
    for name in chosen_names:
        method = f"candidate: {name}"
        gaps, speedups, eligible = [], [], True
        for cell in cells.values():
            ours, theirs = cell["methods"][method], cell["methods"][FEDAVG]
            gap = float(np.mean(ours["best_acc"]) - np.mean(theirs["best_acc"]))
            times = [v if v is not None else 0.0 for v in ours["speedup"]]
            speedup = float(np.mean(times))
            gaps.append(gap)
            speedups.append(speedup)
            needed = 3.3 if cell["scenario"] == STRAGGLERS else 1.0
            eligible &= speedup >= needed if needed > 1 else speedup > needed
        scores[name] = (eligible, min(gaps))
        rows.append(
            [
                name,
                *(
                    f"{g * 100:+.1f} pp / {x:.2f}x"
                    for g, x in zip(gaps, speedups, strict=True)
                ),
                f"{min(gaps) * 100:+.1f} pp",
                "yes" if eligible else "no",
            ]
        )
    chosen = max(scores, key=lambda n: (scores[n][0], scores[n][1]))
    command = (
        "python benchmarks/benchmark_v2.py --tune-default --data-dir "
        "../shared/data/mnist"
    )
    stem = "benchmark_v2_default_tuning"
    if names:
        command += " --candidates " + " ".join(f"'{n}'" for n in names)
        stem += "_" + hashlib.sha1(" ".join(names).encode()).hexdigest()[:8]
    text = (
        f"# Choosing the default rule (quick size, tuning seeds {list(TUNE_SEEDS)}; "
        "never evaluation seeds)\n\n"
        f"`{command}`\n\n"
        "Each cell: mean best-accuracy gap to FedAvg / mean speedup to the cell's "
        "target (a seed that misses counts 0). Eligible: speedup >= 3.3 in both "
        "straggler cells and > 1 in every cell. Chosen: the eligible candidate "
        "with the largest worst-cell gap (rule fixed before the runs).\n\n"
        + markdown_table(["candidate", *cells.keys(), "worst gap", "eligible"], rows)
        + f"\nChosen: **{chosen}** ({DEFAULT_CANDIDATES[chosen]}).\n"
    )
    (out.parent / f"{stem}.md").write_text(text)
    (out.parent / f"{stem}.json").write_text(
        json.dumps(
            {
                "candidates": {n: DEFAULT_CANDIDATES[n] for n in chosen_names},
                "chosen": chosen,
                "cells": cells,
            },
            indent=1,
        )
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="2-core size (default)")
    group.add_argument("--full", action="store_true", help="GPU-box size")
    group.add_argument("--paper", action="store_true", help="the paper's setting")
    group.add_argument("--tune", action="store_true", help="tune FADAS's, CA2FL's eta")
    group.add_argument(
        "--tune-default",
        action="store_true",
        help="rank the app-default candidates on the tuning seeds",
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        help="with --tune-default: rank only these candidates (a later round; "
        "name the current default among them to re-run it beside them)",
    )
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--run-config",
        action="append",
        default=None,
        help="run-config overrides, e.g. \"dataset='cifar10' model='resnet20'\"",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="tabulate cached runs only"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="run and tabulate only these methods (e.g. FedAvg Default "
        "'candidate: fedbuff K=C'); written to their own files",
    )
    args = parser.parse_args()
    if args.candidates and not args.tune_default:
        parser.error("--candidates needs --tune-default")
    unknown = [n for n in args.candidates or () if n not in DEFAULT_CANDIDATES]
    if unknown:
        parser.error(
            f"unknown candidate {unknown[0]!r}; known: {', '.join(DEFAULT_CANDIDATES)}"
        )
    size_name = "full" if args.full else "paper" if args.paper else "quick"
    size = SIZES[size_name]
    if args.seeds:
        size = Size(**{**size.__dict__, "seeds": tuple(args.seeds)})
    base: dict[str, Any] = {"clock": "virtual", "patience": 10}
    if args.data_dir:
        base["data-dir"] = str(Path(args.data_dir).resolve())
    out = args.out.resolve()
    user = parse_config_args(args.run_config) if args.run_config else {}
    if user:  # runs of another config never share a cache
        digest = hashlib.sha1(json.dumps(user, sort_keys=True).encode()).hexdigest()
        size_name = f"{size_name}_{digest[:8]}"
    if args.methods:
        size = Size(**{**size.__dict__, "methods": tuple(args.methods)})
        digest = hashlib.sha1(" ".join(args.methods).encode()).hexdigest()
        report_name = f"{size_name}_methods_{digest[:8]}"
    else:
        report_name = size_name
    work = out / f"benchmark_v2_{size_name}_runs"
    if args.tune:
        print(tune(base, work, args.workers))
        return
    if args.tune_default:
        print(
            tune_default(
                base,
                out / "benchmark_v2_default_tuning_runs",
                args.workers,
                args.candidates,
            )
        )
        return
    jobs = make_jobs(size, base, work, user)
    started = time.time()
    print(f"{len(jobs)} runs ({size_name}), {args.workers} workers", flush=True)
    if args.report_only:
        records = [
            json.loads(Path(j["cache"]).read_text())
            for j in jobs
            if Path(j["cache"]).exists()
        ]
    else:
        records = run_all(jobs, args.workers)
    wall = None if args.report_only else time.time() - started
    print(report(records, report_name, size, out, wall))


if __name__ == "__main__":
    main()
