"""The paper's studies: one function per figure, each writing JSON, PNG, markdown.

All runs go through the real app (Flower's Ray simulation, the async strategy or
Flower's FedAvg) on the virtual clock, so AFL and SFL share one simulated time.
Defaults are sized for a 2-core CPU (small CNN, 1 local epoch, 10 clients);
``--run-config`` scales them up (e.g. ``model='paper-cnn' local-epochs=10`` or
``dataset='cifar10' model='resnet20'`` on a GPU box).
"""

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from afl_flwr.experiments.runs import RunRecord, markdown_table, run_simulation_record

Study = Callable[[Path, dict[str, Any], float], dict[str, Any]]

# CPU-sized defaults; every key can be overridden from the command line.
BASE_CONFIG: dict[str, Any] = {
    "dataset": "mnist",
    "model": "small-cnn",
    "num-clients": 10,
    "clients-per-round": 5,
    "local-epochs": 1,
    "num-server-rounds": 15,
}


def curve(out: Path, base: dict[str, Any], target: float) -> dict[str, Any]:
    """AFL training curve and client selection histogram.

    Test loss/accuracy and mean client train loss (the paper's "server loss") vs
    versions and simulated time, plus how often each client was selected.
    """
    run = run_simulation_record({**base, "mode": "async"}, "AFL", progress="[1/1]")
    rows = [
        [
            int(r["version"]),
            float(r["sim_time"]),
            _float(r["test_acc"]),
            _float(r["test_loss"]),
            _float(r["mean_train_loss"]),
        ]
        for r in run.evals
    ]
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    versions = [r[0] for r in rows]
    axes[0, 0].plot(versions, [r[2] for r in rows], marker=".")
    axes[0, 0].set(xlabel="global version", ylabel="central test accuracy")
    axes[0, 1].plot([r[1] for r in rows], [r[2] for r in rows], marker=".")
    axes[0, 1].set(xlabel="simulated time (s)", ylabel="central test accuracy")
    axes[1, 0].plot(versions, [r[3] for r in rows], marker=".", label="test loss")
    axes[1, 0].plot(
        versions, [r[4] for r in rows], marker=".", label="mean client train loss"
    )
    axes[1, 0].set(xlabel="global version", ylabel="loss")
    axes[1, 0].legend()
    counts = _selection_counts(run)
    axes[1, 1].bar([str(c) for c in counts], list(counts.values()))
    axes[1, 1].set(xlabel="client", ylabel="merged updates", title="Client selection")
    _save(fig, out / "curve.png")
    table = markdown_table(
        ["version", "sim time (s)", "test acc", "test loss", "mean client train loss"],
        rows,
    )
    return _write(out, "curve", {"run": str(run.path), "rows": rows}, table)


def concurrency(out: Path, base: dict[str, Any], target: float) -> dict[str, Any]:
    """Clients per round (concurrency) swept over 3..8."""
    values = range(3, 9)
    runs = [
        run_simulation_record(
            {**base, "mode": "async", "clients-per-round": c},
            f"concurrency={c}",
            progress=f"[{i}/{len(values)}]",
        )
        for i, c in enumerate(values, start=1)
    ]
    _plot_accuracy_vs_time(runs, out / "concurrency.png")
    rows = [
        [
            c,
            run.summary["best_test_acc"],
            run.time_to(target),
            run.summary["mean_staleness"],
            run.summary["updates"]["merged"],
        ]
        for c, run in zip(values, runs, strict=True)
    ]
    table = markdown_table(
        [
            "clients per round",
            "best acc",
            f"sim time to {target:.0%}",
            "mean staleness",
            "merged updates",
        ],
        rows,
    )
    return _write(out, "concurrency", {"rows": rows}, table)


def afl_vs_sfl(out: Path, base: dict[str, Any], target: float) -> dict[str, Any]:
    """AFL (async strategy) vs SFL (Flower's FedAvg) on one simulated clock."""
    runs = [
        run_simulation_record({**base, "mode": "async"}, "AFL", progress="[1/2]"),
        run_simulation_record(
            {**base, "mode": "sync"}, "SFL (FedAvg)", progress="[2/2]"
        ),
    ]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        axes[0].plot(*run.curve("sim_time"), marker=".", label=run.label)
        axes[1].plot(*run.curve("client_updates"), marker=".", label=run.label)
    axes[0].set(xlabel="simulated time (s)", ylabel="central test accuracy")
    axes[1].set(xlabel="client updates merged", ylabel="central test accuracy")
    for ax in axes:
        ax.legend()
    _save(fig, out / "afl_vs_sfl.png")
    return _write_comparison(out, "afl_vs_sfl", runs, target)


def staleness_fns(out: Path, base: dict[str, Any], target: float) -> dict[str, Any]:
    """Staleness functions compared at high skew (immediate merges, stragglers)."""
    skew = {
        **base,
        "mode": "async",
        "aggregation": "immediate",
        "num-server-rounds": 4 * int(base["num-server-rounds"]),
        "speed-spread": 10.0,
        "straggler-fraction": 0.2,
        "straggler-slowdown": 10.0,
    }
    variants: dict[str, dict[str, Any]] = {
        "constant": {"staleness-fn": "constant"},
        "polynomial a=0.5": {"staleness-fn": "polynomial", "staleness-a": 0.5},
        "hinge a=10 b=4": {
            "staleness-fn": "hinge",
            "staleness-a": 10.0,
            "staleness-b": 4.0,
        },
        "exponential b=0.5": {"staleness-fn": "exponential", "staleness-b": 0.5},
    }
    runs = [
        run_simulation_record(
            {**skew, **extra}, name, progress=f"[{i}/{len(variants)}]"
        )
        for i, (name, extra) in enumerate(variants.items(), start=1)
    ]
    _plot_accuracy_vs_time(runs, out / "staleness_fns.png")
    return _write_comparison(out, "staleness_fns", runs, target)


# Keys of the sampling study itself, removed from the run config it passes on.
SAMPLING_KEYS: dict[str, Any] = {
    "sampling-seeds": 5,  # seeds of the server-path variance runs
    "sampling-merges": 400,  # merges per variance run
    "accuracy-seeds": 3,  # seeds of the MNIST runs per selection; 0 skips them
}


def sampling(out: Path, base: dict[str, Any], target: float) -> dict[str, Any]:
    """Variance of the aggregated update, with vs without replacement.

    First the selectors against the closed forms (``sampling_variance.*``), then
    the same question through the server's own path (``sampling_server_path.*``):
    the real strategy on a scripted Grid in three regimes, and the accuracy
    effect on MNIST with the real ClientApp in-process. Overrides given with
    ``--run-config`` apply to the MNIST runs, over
    :data:`~afl_flwr.experiments.sampling_accuracy.ACCURACY_CONFIG`.
    """
    from afl_flwr.experiments.sampling import (
        WITH_REPLACEMENT,
        WITHOUT_REPLACEMENT,
        run_sampling_variance,
        server_path_study,
        synthetic_population,
        write_server_path_report,
    )
    from afl_flwr.experiments.sampling_accuracy import ACCURACY_CONFIG, accuracy_study

    settings = {k: int(base.pop(k, v)) for k, v in SAMPLING_KEYS.items()}
    run_sampling_variance(out)
    num_clients, dim, m = 20, 10, 5
    updates = synthetic_population(num_clients, dim, seed=0)
    rows = server_path_study(
        updates,
        m=m,
        merges=settings["sampling-merges"],
        seeds=range(settings["sampling-seeds"]),
    )
    overrides = {k: v for k, v in base.items() if BASE_CONFIG.get(k) != v}
    run_config = {**ACCURACY_CONFIG, **overrides}
    runs = accuracy_study(
        run_config,
        (WITH_REPLACEMENT, WITHOUT_REPLACEMENT),
        range(settings["accuracy-seeds"]),
    )
    config = {
        **settings,
        "num_clients": num_clients,
        "dim": dim,
        "m": m,
        "accuracy_run_config": run_config,
    }
    result = write_server_path_report(out, rows, [vars(r) for r in runs], config)
    print((out / "sampling_server_path.md").read_text())
    return result


def COMPARISON_HEADER(target: float) -> list[str]:  # noqa: N802 - a table header
    """Columns of :func:`_comparison_row`."""
    return [
        "run",
        "best acc",
        "final acc",
        f"sim time to {target:.0%} (s)",
        "merged updates",
        "mean staleness",
        "utilisation",
        "wall (s)",
    ]


def _plot_accuracy_vs_time(runs: list[RunRecord], path: Path) -> None:
    fig, ax = _pyplot().subplots(figsize=(7, 5))
    for run in runs:
        ax.plot(*run.curve(), marker=".", label=run.label)
    ax.set(xlabel="simulated time (s)", ylabel="central test accuracy")
    ax.legend()
    _save(fig, path)


def _write_comparison(
    out: Path, name: str, runs: list[RunRecord], target: float
) -> dict[str, Any]:
    rows = [_comparison_row(run, target) for run in runs]
    return _write(
        out, name, {"rows": rows}, markdown_table(COMPARISON_HEADER(target), rows)
    )


def _comparison_row(run: RunRecord, target: float) -> list[Any]:
    s = run.summary
    return [
        run.label,
        s["best_test_acc"],
        s["final_test_acc"],
        run.time_to(target),
        s["updates"]["merged"],
        s["mean_staleness"],
        s["utilisation"],
        round(run.wall_seconds, 1),
    ]


def _selection_counts(run: RunRecord) -> dict[int, int]:
    counts: dict[int, int] = {}
    for event in run.events:
        if event["status"] == "merged":
            client = int(event["client"])
            counts[client] = counts.get(client, 0) + 1
    return dict(sorted(counts.items()))


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _write(
    out: Path, name: str, payload: Mapping[str, Any], table: str
) -> dict[str, Any]:
    (out / f"{name}.json").write_text(
        json.dumps(payload, indent=2, default=_json_default) + "\n"
    )
    (out / f"{name}.md").write_text(table)
    print(table)
    return dict(payload)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


STUDIES: dict[str, Study] = {
    "curve": curve,
    "concurrency": concurrency,
    "afl-vs-sfl": afl_vs_sfl,
    "staleness-fns": staleness_fns,
    "sampling": sampling,
}
