"""Running simulations for experiments and reading their results folders."""

import csv
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afl_flwr.config import AppConfig
from afl_flwr.results import TEST_ACC


def run_pool(
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    jobs: Sequence[dict[str, Any]],
    workers: int,
    describe: Callable[[dict[str, Any]], str],
    *,
    torch_threads: int = 1,
) -> list[dict[str, Any]]:
    """Run ``fn`` on every job in a pool of ``workers`` spawned processes.

    Each worker is set up by :func:`quiet_worker`; one line per finished job
    (``describe(record)``, elapsed time and an ETA) is printed. Returns the
    records in order of completion.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    started = time.time()
    records = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, context, initializer=quiet_worker, initargs=(torch_threads,)
    ) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for done, future in enumerate(as_completed(futures), start=1):
            record = future.result()
            records.append(record)
            elapsed = time.time() - started
            eta = elapsed / done * (len(jobs) - done)
            print(
                f"[{done}/{len(jobs)}] {describe(record)}; elapsed "
                f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
                flush=True,
            )
    return records


def quiet_worker(torch_threads: int = 1) -> None:
    """Set up a benchmark's worker process: ``torch_threads`` threads, quiet logs.

    Used as a ``ProcessPoolExecutor`` initializer, one run per worker at a time.
    """
    import torch

    torch.set_num_threads(torch_threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class RunRecord:
    """One finished run, loaded back from its results folder."""

    label: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    evals: list[dict[str, Any]]
    events: list[dict[str, Any]]
    wall_seconds: float

    def curve(self, x: str = "sim_time") -> tuple[np.ndarray, np.ndarray]:
        """``(x, test accuracy)`` over the evaluations (x: sim_time/version/...)."""
        rows = [r for r in self.evals if r["test_acc"] != ""]
        return (
            np.array([float(r[x]) for r in rows]),
            np.array([float(r["test_acc"]) for r in rows]),
        )

    def time_to(self, target: float, x: str = "sim_time") -> float | None:
        """First ``x`` (simulated time by default) with test accuracy >= target."""
        xs, accs = self.curve(x)
        hits = np.nonzero(accs >= target)[0]
        return float(xs[hits[0]]) if hits.size else None


def load_run(path: Path, label: str = "", wall_seconds: float = 0.0) -> RunRecord:
    """Read a results folder written by the ServerApp."""

    def rows(name: str) -> list[dict[str, Any]]:
        with (path / name).open() as handle:
            return list(csv.DictReader(handle))

    return RunRecord(
        label=label or path.name,
        path=path,
        config=json.loads((path / "config.json").read_text()),
        summary=json.loads((path / "summary.json").read_text()),
        evals=rows("evals.csv"),
        events=rows("events.csv"),
        wall_seconds=wall_seconds,
    )


def run_simulation_record(
    overrides: Mapping[str, Any],
    label: str,
    *,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    progress: str = "",
) -> RunRecord:
    """Run one experiment and load its results folder.

    Runs on the virtual clock go through the in-process engine
    (:func:`afl_flwr.experiments.inprocess.run_inprocess`: the same ServerApp and
    ClientApp code, the same results, without Ray's start-up and scheduling);
    others through Flower's Ray simulation (:func:`afl_flwr.simulate.simulate`).
    """
    from afl_flwr.experiments.inprocess import run_inprocess
    from afl_flwr.simulate import simulate

    cfg = AppConfig.from_run_config(overrides)  # fail before any run starts
    print(f"{progress} {label}: running ...", flush=True)
    started = time.time()
    if cfg.clock == "virtual":
        path = run_inprocess(overrides, torch_threads=None).results_path
    else:
        path = simulate(overrides, client_cpus=client_cpus, client_gpus=client_gpus)
    record = load_run(path, label, time.time() - started)
    best = record.summary.get("best_test_acc")
    print(
        f"{progress} {label}: done in {record.wall_seconds:.0f}s, best "
        f"{TEST_ACC} {best if best is None else f'{best:.4f}'}, sim time "
        f"{record.summary['sim_time']:.1f}s",
        flush=True,
    )
    return record


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
