"""The results folder: metrics as JSON and CSV, the final model, PNG plots.

Layout (the same for ``mode = "async"`` and ``mode = "sync"``)::

    <results-dir>/<mode>-<timestamp>/
        config.json      the validated run config
        summary.json     final/best accuracy, versions, updates, times, staleness
        evals.csv        one row per central evaluation (version)
        events.csv       one row per client reply (merged/dropped/rejected/...)
        history.json     evals + events + per-client counts
        model.pt         final global model (torch state_dict)
        curves.png       test loss/accuracy vs version and vs (simulated) time
        staleness.png    histogram of measured staleness
        participation.png  per-client merged/dropped/rejected updates
"""

import csv
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afl_flwr.history import MERGED, STATUSES, RunHistory

TEST_LOSS = "test-loss"
TEST_ACC = "test-acc"


def eval_rows(history: RunHistory) -> list[dict[str, Any]]:
    """One row per evaluation, with the client updates merged since the previous.

    Columns: version, client_updates, wall_time (when the version was
    installed), sim_time, test_loss, test_acc, mean_train_loss (of the updates
    merged since the previous evaluation), clients (their ids, space-separated)
    and eval_seconds (the evaluation's own wall time); under DP, epsilon (spent
    up to that version).
    """
    rows = []
    previous = -1
    for point in history.evals:
        merged = history.merged_between(previous, point.version)
        losses = [e.train_loss for e in merged if e.train_loss is not None]
        rows.append(
            {
                "version": point.version,
                "client_updates": point.client_updates,
                "wall_time": round(point.wall_time, 4),
                "sim_time": round(point.sim_time, 4),
                "test_loss": point.metrics.get(TEST_LOSS, ""),
                "test_acc": point.metrics.get(TEST_ACC, ""),
                "mean_train_loss": float(np.mean(losses)) if losses else "",
                "clients": " ".join(str(e.client) for e in merged),
                "eval_seconds": round(point.eval_seconds, 4),
                **(
                    {"epsilon": history.epsilon_at(point.version)}
                    if history.privacy
                    else {}
                ),
            }
        )
        previous = point.version
    return rows


def summarize(history: RunHistory, concurrency: int | None = None) -> dict[str, Any]:
    """Headline numbers of a run.

    ``utilisation`` is the fraction of simulated time the ``concurrency`` client
    slots were busy (sum of task durations / (slots x elapsed)); it needs the
    virtual clock and is None otherwise.
    """
    accs = [p.metrics[TEST_ACC] for p in history.evals if TEST_ACC in p.metrics]
    taus = history.staleness_values()
    counts = {s: sum(1 for e in history.events if e.status == s) for s in STATUSES}
    last = history.evals[-1] if history.evals else None
    return {
        "versions": last.version if last else 0,
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
        "updates": counts,
        "mean_staleness": float(np.mean(taus)) if taus else 0.0,
        "max_staleness": max(taus) if taus else 0,
        "sim_time": last.sim_time if last else 0.0,
        "wall_time": last.wall_time if last else 0.0,
        "eval_seconds": sum(p.eval_seconds for p in history.evals),
        "abandoned_tasks": history.abandoned,
        "first_dispatch_wall": history.first_dispatch_wall,
        "utilisation": _utilisation(history, concurrency),
        "epsilon": history.privacy[-1][1] if history.privacy else None,
    }


def _utilisation(history: RunHistory, concurrency: int | None) -> float | None:
    busy = sum(e.sim_duration for e in history.events)
    end = max((e.sim_time for e in history.events), default=0.0)
    if not concurrency or busy <= 0 or end <= 0:
        return None
    return busy / (concurrency * end)


def write_results(
    out_dir: Path,
    *,
    config: Mapping[str, Any],
    history: RunHistory,
    state_dict: Mapping[str, torch.Tensor],
    plots: bool = True,
) -> Path:
    """Write the results folder (see module docstring) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", dict(config))
    _write_json(
        out_dir / "summary.json",
        summarize(history, config.get("clients-per-round")),
    )
    _write_json(out_dir / "history.json", history.to_dict())
    _write_csv(out_dir / "evals.csv", eval_rows(history))
    _write_csv(out_dir / "events.csv", history.to_dict()["events"])
    torch.save(dict(state_dict), out_dir / "model.pt")
    if plots:
        plot_curves(history, out_dir / "curves.png")
        plot_staleness(history, out_dir / "staleness.png")
        plot_participation(history, out_dir / "participation.png")
    return out_dir


def new_run_dir(results_dir: str, mode: str) -> Path:
    """A fresh ``<results-dir>/<mode>-<timestamp>`` folder name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(results_dir) / f"{mode}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(results_dir) / f"{mode}-{stamp}-{suffix}"
    return path


def plot_curves(history: RunHistory, path: Path) -> None:
    """Test loss and accuracy vs version and vs (simulated) time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in history.evals if TEST_ACC in p.metrics]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    if points:
        versions = [p.version for p in points]
        times = [p.sim_time for p in points]
        for col, (xs, xlabel) in enumerate(
            ((versions, "global version"), (times, "time (s, simulated if virtual)"))
        ):
            axes[0, col].plot(xs, [p.metrics[TEST_ACC] for p in points], marker=".")
            axes[1, col].plot(xs, [p.metrics[TEST_LOSS] for p in points], marker=".")
            axes[1, col].set_xlabel(xlabel)
        axes[0, 0].set_ylabel("central test accuracy")
        axes[1, 0].set_ylabel("central test loss")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_staleness(history: RunHistory, path: Path) -> None:
    """Histogram of the measured staleness of merged and dropped updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = history.staleness_values()
    fig, ax = plt.subplots(figsize=(6, 4))
    if taus:
        ax.hist(taus, bins=[t - 0.5 for t in range(max(taus) + 2)], edgecolor="black")
    ax.set_xlabel("staleness tau (versions)")
    ax.set_ylabel("updates")
    ax.set_title(f"Measured staleness (mean {np.mean(taus) if taus else 0:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_participation(history: RunHistory, path: Path) -> None:
    """Per-client stacked bars: merged / dropped / rejected / timed-out updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = history.client_counts()
    clients = list(counts)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(clients)), 4))
    bottom = np.zeros(len(clients))
    for status in STATUSES:
        values = np.array([counts[c][status] for c in clients], dtype=float)
        if values.any() or status == MERGED:
            ax.bar([str(c) for c in clients], values, bottom=bottom, label=status)
            bottom += values
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("updates")
    ax.set_title("How often each client was selected")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
