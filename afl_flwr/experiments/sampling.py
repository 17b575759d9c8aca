"""Variance of the aggregated update under client sampling with/without replacement.

The server averages the updates of ``m`` clients drawn from a population of ``N``
clients with updates ``g_1 .. g_N`` (mean ``gbar``, population variance
``sigma^2 = (1/N) sum_i ||g_i - gbar||^2``). The paper's client-selection analysis
compares the two selections of :mod:`afl_flwr.selection`:

* with replacement: ``E||mean - gbar||^2 = sigma^2 / m``;
* without replacement: ``E||mean - gbar||^2 = sigma^2 / m * (N - m) / (N - 1)``,
  the finite-population correction (equal to 0 at ``m = N``).

This module checks both closed forms against Monte-Carlo draws made by the
project's real selectors. Run it as::

    python -m afl_flwr.experiments.sampling --out results/sampling

It then asks the same question through the server's own path
(:func:`server_path_study`): the real strategy picks among *idle* nodes while
others are busy, so what the closed forms assume (a fresh draw of ``m`` from all
``N``) holds only in some regimes. ``python -m afl_flwr.experiments sampling``
runs both, plus the accuracy effect (:mod:`afl_flwr.experiments.sampling_accuracy`).
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER, log
from matplotlib.figure import Figure

from afl_flwr.experiments.stats import t_interval
from afl_flwr.selection import SELECTIONS, make_selector

WITH_REPLACEMENT = "with-replacement"
WITHOUT_REPLACEMENT = "without-replacement"
DEFAULT_MS = (2, 4, 6, 8, 10, 12, 14, 16, 18)


def _check_population(updates: np.ndarray, m: int, *, max_m: bool = True) -> None:
    """Raise ``ValueError`` unless ``updates`` is ``(N, d)`` and ``1 <= m (<= N)``."""
    if updates.ndim != 2 or updates.shape[0] < 1:
        raise ValueError(
            f"updates must be a non-empty (N, d) array, got shape {updates.shape}"
        )
    num_clients = updates.shape[0]
    if m < 1 or (max_m and m > num_clients):
        allowed = f"in [1, N = {num_clients}]" if max_m else ">= 1"
        raise ValueError(f"m must be {allowed}, got {m}")


def population_variance(updates: np.ndarray) -> float:
    """``sigma^2 = (1/N) sum_i ||g_i - gbar||^2`` of an ``(N, d)`` array."""
    deviations = updates - updates.mean(axis=0)
    return float(np.sum(deviations**2) / updates.shape[0])


def closed_form_variances(updates: np.ndarray, m: int) -> tuple[float, float]:
    """Closed-form ``E||mean of m sampled updates - gbar||^2``.

    Parameters
    ----------
    updates : np.ndarray
        Client updates, shape ``(N, d)``.
    m : int
        Number of sampled clients, ``1 <= m <= N``.

    Returns
    -------
    tuple[float, float]
        ``(sigma^2 / m, sigma^2 / m * (N - m) / (N - 1))``: with and without
        replacement. ``sigma^2`` is the trace of the population covariance (the
        ``1/N`` definition), for which the finite-population factor is exactly
        ``(N - m) / (N - 1)``. With ``N = 1`` both are 0.
    """
    _check_population(updates, m)
    num_clients = updates.shape[0]
    with_replacement = population_variance(updates) / m
    if num_clients == 1:
        return with_replacement, 0.0
    correction = (num_clients - m) / (num_clients - 1)
    return with_replacement, with_replacement * correction


def draw_subsets(
    selection: str, num_clients: int, m: int, trials: int, seed: int
) -> np.ndarray:
    """Draw ``trials`` samples of ``m`` client indices with the project's selector.

    Each trial uses a fresh selector (its seed derived from ``seed``) and calls
    ``select`` ``m`` times with node ids ``0 .. N-1``, as the server dispatches:

    * ``with-replacement``: every node idle at each call, so picks are i.i.d.
      uniform and may repeat;
    * ``without-replacement``: nodes already picked in the trial are not idle.
      A fresh :class:`~afl_flwr.selection.WithoutReplacement` starts a new
      random permutation, so the ``m`` picks are a uniformly random ``m``-subset.

    A fresh selector per trial makes the trials independent, which the standard
    error of :func:`empirical_variance` assumes. One selector reused across
    trials would still give each draw a uniform ``m``-subset (the positions of a
    random permutation are exchangeable), but consecutive draws in one pass of
    ``N`` would be dependent (disjoint, when inside the pass).

    Parameters
    ----------
    selection : str
        A name registered in :data:`afl_flwr.selection.SELECTIONS`.
    num_clients : int
        Population size ``N``.
    m : int
        Clients per draw; at most ``N`` without replacement.
    trials : int
        Number of independent draws.
    seed : int
        Seed from which each trial's selector seed is derived.

    Returns
    -------
    np.ndarray
        Integer array of shape ``(trials, m)``.
    """
    if selection not in SELECTIONS:
        allowed = ", ".join(sorted(SELECTIONS))
        raise ValueError(f"Unknown selection '{selection}'; allowed: {allowed}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    nodes = list(range(num_clients))
    exclude_picked = selection == WITHOUT_REPLACEMENT
    trial_seeds = np.random.SeedSequence(seed).generate_state(trials)
    subsets = np.empty((trials, m), dtype=np.int64)
    for trial, trial_seed in enumerate(trial_seeds):
        selector = make_selector(selection, int(trial_seed))
        idle = list(nodes)
        for slot in range(m):
            node = selector.select(nodes, idle)
            if node is None:
                raise RuntimeError(f"{selection} found no idle node among {idle}")
            subsets[trial, slot] = node
            if exclude_picked:
                idle.remove(node)
    return subsets


def squared_deviations(updates: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """``||mean(updates[s]) - gbar||^2`` for every row ``s`` of ``subsets``."""
    means = updates[subsets].mean(axis=1)
    return np.sum((means - updates.mean(axis=0)) ** 2, axis=1)


def empirical_variance(
    updates: np.ndarray, m: int, selection: str, trials: int, seed: int
) -> tuple[float, float]:
    """Monte-Carlo estimate of ``E||mean of m sampled updates - gbar||^2``.

    Parameters
    ----------
    updates : np.ndarray
        Client updates, shape ``(N, d)``.
    m : int
        Clients per draw (at most ``N`` without replacement).
    selection : str
        ``with-replacement`` or ``without-replacement``; the draws are made by
        the project's selectors (see :func:`draw_subsets`).
    trials : int
        Number of independent draws.
    seed : int
        Seed of the draws.

    Returns
    -------
    tuple[float, float]
        The mean of the squared deviations and its standard error (their
        sample standard deviation over ``sqrt(trials)``; 0 for one trial).
    """
    _check_population(updates, m, max_m=selection == WITHOUT_REPLACEMENT)
    subsets = draw_subsets(selection, updates.shape[0], m, trials, seed)
    values = squared_deviations(updates, subsets)
    ddof = 1 if trials > 1 else 0
    return float(values.mean()), float(values.std(ddof=ddof) / np.sqrt(trials))


def synthetic_population(
    num_clients: int, dim: int, *, num_clusters: int = 4, seed: int = 0
) -> np.ndarray:
    """Non-IID client updates: cluster centre plus a client-specific offset.

    Clients are assigned to ``num_clusters`` clusters of unequal size; centres are
    ``N(0, 3^2 I)`` and each client adds ``N(0, s^2 I)`` noise with a
    client-specific scale ``s`` in ``[0.25, 1.5]``. Returns shape
    ``(num_clients, dim)``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, size=(num_clusters, dim))
    cluster_weights = rng.dirichlet(np.ones(num_clusters))
    membership = rng.choice(num_clusters, size=num_clients, p=cluster_weights)
    scales = rng.uniform(0.25, 1.5, size=(num_clients, 1))
    return centres[membership] + scales * rng.normal(size=(num_clients, dim))


def _row(updates: np.ndarray, m: int, trials: int, seed: int) -> dict[str, float]:
    """Closed forms, estimates and z-scores for one ``m``."""
    closed_with, closed_without = closed_form_variances(updates, m)
    seed_with, seed_without = np.random.SeedSequence([seed, m]).generate_state(2)
    emp_with, se_with = empirical_variance(
        updates, m, WITH_REPLACEMENT, trials, int(seed_with)
    )
    emp_without, se_without = empirical_variance(
        updates, m, WITHOUT_REPLACEMENT, trials, int(seed_without)
    )
    return {
        "m": m,
        "closed_with": closed_with,
        "empirical_with": emp_with,
        "se_with": se_with,
        "z_with": (emp_with - closed_with) / se_with if se_with > 0 else 0.0,
        "closed_without": closed_without,
        "empirical_without": emp_without,
        "se_without": se_without,
        "z_without": (
            (emp_without - closed_without) / se_without if se_without > 0 else 0.0
        ),
        "ratio_closed": closed_without / closed_with,
        "ratio_empirical": emp_without / emp_with,
    }


# --- the same question through the server's own selection path -----------------

GRADIENT_KEY = "g"
# Regimes of the server-path study: (concurrency, tick delays) per name.
EQUAL = "equal-delays"
HETEROGENEOUS = "heterogeneous-delays"
SEQUENTIAL = "sequential"
REGIMES = (EQUAL, HETEROGENEOUS, SEQUENTIAL)


def interval95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t interval (0 for one value)."""
    interval = t_interval([float(v) for v in values])
    if interval.n < 2:
        return interval.mean, 0.0
    return interval.mean, (interval.high - interval.low) / 2


def regime_delays(regime: str, num_clients: int, max_delay: int = 8) -> list[int]:
    """Reply delays in ticks per client: all 1, or spread linearly over 1..max."""
    if regime == HETEROGENEOUS:
        return [
            1 + round((max_delay - 1) * i / max(num_clients - 1, 1))
            for i in range(num_clients)
        ]
    if regime in (EQUAL, SEQUENTIAL):
        return [1] * num_clients
    raise ValueError(f"Unknown regime '{regime}'; allowed: {', '.join(REGIMES)}")


@dataclass(frozen=True)
class ServerPathRun:
    """What one strategy run measured.

    ``deltas`` holds the global model's change at each merge (row ``v`` is
    version ``v+1`` minus version ``v``), ``merged_clients`` the clients whose
    updates each merge contained, ``counts`` the merged updates per client.
    """

    deltas: np.ndarray
    merged_clients: list[list[int]]
    counts: np.ndarray


def run_server_path(
    updates: np.ndarray,
    *,
    m: int,
    selection: str,
    delays: Sequence[int],
    merges: int,
    seed: int,
    concurrency: int | None = None,
) -> ServerPathRun:
    """Drive the real strategy on a scripted Grid with ``x_i = x + g_i`` clients.

    FedBuff with ``K = m``, server rate 1, ``s(tau) = 1`` and equal example
    counts, so each merge moves the model by the plain mean of the ``g_i`` of
    the updates it contains; ``distinct_buffer=False`` lets the selector alone
    decide who works. Client ``i`` is node ``i + 1``.

    Parameters
    ----------
    updates : np.ndarray
        ``g_1 .. g_N``, shape ``(N, d)``.
    m : int
        Updates per merge ``K``, and the concurrency unless given.
    selection : str
        A name registered in :data:`afl_flwr.selection.SELECTIONS`.
    delays : Sequence[int]
        Reply delay of each client in Grid polls.
    merges : int
        Global versions to run.
    seed : int
        Seed of the strategy (its selector).
    concurrency : int, optional (default: None)
        Tasks in flight; ``None`` means ``m``.
    """
    # Imported here: the closed-form part of this module needs no Flower server.
    from afl_flwr.experiments.scripted_grid import ScriptedGrid, server_identity
    from afl_flwr.strategy import StalenessAwareAsyncStrategy

    _check_population(updates, m, max_m=False)
    num_clients = updates.shape[0]
    if len(delays) != num_clients:
        raise ValueError(f"need {num_clients} delays, got {len(delays)}")
    gradients = updates.astype(np.float64)

    def reply(node: int, message: Message) -> RecordDict:
        received = message.content.array_records["arrays"][GRADIENT_KEY].numpy()
        moved = received + gradients[node - 1]
        return RecordDict(
            {
                "arrays": ArrayRecord({GRADIENT_KEY: Array(moved)}),
                "metrics": MetricRecord({"num-examples": 1.0}),
            }
        )

    grid = ScriptedGrid(
        replies=dict.fromkeys(range(1, num_clients + 1), reply),
        delays={i + 1: int(delay) for i, delay in enumerate(delays)},
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=concurrency or m,
        buffer_size=m,
        staleness_fn="constant",
        max_staleness=None,
        selection=selection,
        distinct_buffer=False,
        seed=seed,
        poll_interval=0.0,
    )
    models: dict[int, np.ndarray] = {}

    def snapshot(version: int, arrays: ArrayRecord) -> MetricRecord:
        models[version] = arrays[GRADIENT_KEY].numpy().copy()
        return MetricRecord()

    initial = ArrayRecord({GRADIENT_KEY: Array(np.zeros(updates.shape[1]))})
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(WARNING)  # one INFO line per version otherwise
    try:
        with server_identity():
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=merges,
                evaluate_fn=snapshot,
            )
    finally:
        FLOWER_LOGGER.setLevel(level)
    deltas = np.diff(np.stack([models[v] for v in range(merges + 1)]), axis=0)
    merged_clients: list[list[int]] = [[] for _ in range(merges)]
    for event in strategy.history.merged():
        assert event.merged_into is not None
        merged_clients[event.merged_into - 1].append(event.client - 1)
    counts = np.bincount(
        [c for clients in merged_clients for c in clients], minlength=num_clients
    )
    return ServerPathRun(deltas, merged_clients, counts)


def relabelled_variance(
    sigma2: float, num_clients: int, multiplicities: Sequence[int]
) -> float:
    """``E||sum_j c_j g_pi(j) / m - gbar||^2`` over random relabellings ``pi``.

    A merge holding client ``j`` ``c_j`` times (``m = sum c_j``), with the
    clients' identities drawn at random: the error due to the merge's *shape*
    (repeats) alone. With ``E[d_a . d_a] = sigma^2`` and ``E[d_a . d_b] =
    -sigma^2 / (N - 1)`` for the deviations ``d = g - gbar`` of distinct
    clients, it is ``sigma^2 / m^2 (S - (m^2 - S) / (N - 1))`` with
    ``S = sum c_j^2``: the finite-population form when all ``c_j = 1``, and
    ``sigma^2 / m`` in expectation under i.i.d. draws.
    """
    counts = np.asarray(multiplicities, dtype=float)
    m, squares = counts.sum(), np.sum(counts**2)
    if num_clients == 1:
        return 0.0
    return float(sigma2 / m**2 * (squares - (m**2 - squares) / (num_clients - 1)))


def server_path_measures(updates: np.ndarray, run: ServerPathRun) -> dict[str, float]:
    """Per-run measures: merged-update error around ``gbar`` and participation.

    ``mse`` is the mean over merges of ``||delta - gbar||^2``; it splits into
    ``bias2 = ||mean delta - gbar||^2`` and ``spread`` (the mean of
    ``||delta - mean delta||^2``). ``window_mse`` is the same error for the mean
    of ``N/m`` consecutive merges (one pass over the population), ``repeat_rate``
    the fraction of merges holding some client twice, ``participation_cv`` the
    coefficient of variation of the per-client merged-update counts.
    """
    num_clients = updates.shape[0]
    m = len(run.merged_clients[0])
    gbar = updates.mean(axis=0)
    errors = np.sum((run.deltas - gbar) ** 2, axis=1)
    mean_delta = run.deltas.mean(axis=0)
    window = max(num_clients // m, 1)
    usable = (len(run.deltas) // window) * window
    windows = run.deltas[:usable].reshape(-1, window, updates.shape[1]).mean(axis=1)
    counts = run.counts.astype(float)
    return {
        "mse": float(errors.mean()),
        "mse_se": float(errors.std(ddof=1) / np.sqrt(errors.size)),
        "bias2": float(np.sum((mean_delta - gbar) ** 2)),
        "spread": float(np.mean(np.sum((run.deltas - mean_delta) ** 2, axis=1))),
        "window_mse": float(np.mean(np.sum((windows - gbar) ** 2, axis=1))),
        "repeat_rate": float(
            np.mean([len(set(c)) < len(c) for c in run.merged_clients])
        ),
        "participation_cv": float(counts.std() / counts.mean()),
        "closed_repeats": float(
            np.mean(
                [
                    relabelled_variance(
                        population_variance(updates),
                        num_clients,
                        np.unique(clients, return_counts=True)[1].tolist(),
                    )
                    for clients in run.merged_clients
                ]
            )
        ),
    }


def server_path_study(
    updates: np.ndarray,
    *,
    m: int,
    merges: int,
    seeds: Sequence[int],
    regimes: Sequence[str] = REGIMES,
    max_delay: int = 8,
) -> list[dict[str, Any]]:
    """Both selections in every regime, several seeds: rows with 95% intervals.

    ``equal-delays``: concurrency ``m``, every reply one tick, so every node is
    idle at each dispatch. ``heterogeneous-delays``: concurrency ``m``, client
    ``i``'s delay grows linearly from 1 to ``max_delay`` ticks, so dispatch
    picks among the idle nodes while slow ones are busy. ``sequential``:
    concurrency 1 and ``K = m``, equal delays: the textbook setting where each
    of the ``m`` picks sees every node idle.
    """
    closed_with, closed_without = closed_form_variances(updates, min(m, len(updates)))
    rows = []
    for regime in regimes:
        delays = regime_delays(regime, updates.shape[0], max_delay)
        concurrency = 1 if regime == SEQUENTIAL else m
        for selection in (WITH_REPLACEMENT, WITHOUT_REPLACEMENT):
            per_seed = []
            for seed in seeds:
                run = run_server_path(
                    updates,
                    m=m,
                    selection=selection,
                    delays=delays,
                    merges=merges,
                    seed=seed,
                    concurrency=concurrency,
                )
                per_seed.append(
                    {
                        "seed": seed,
                        **server_path_measures(updates, run),
                        "counts": run.counts.tolist(),
                    }
                )
            row: dict[str, Any] = {
                "regime": regime,
                "selection": selection,
                "concurrency": concurrency,
                "delays": delays,
                "closed_with": closed_with,
                "closed_without": closed_without,
                "per_seed": per_seed,
            }
            for key in (
                "mse",
                "bias2",
                "spread",
                "window_mse",
                "repeat_rate",
                "closed_repeats",
            ):
                row[key], row[f"{key}_ci"] = interval95([s[key] for s in per_seed])
            cv = [s["participation_cv"] for s in per_seed]
            row["participation_cv"], row["participation_cv_ci"] = interval95(cv)
            rows.append(row)
            log(
                INFO,
                "%s, %s: mse %.4f ± %.4f (closed with %.4f, without %.4f), cv %.3f",
                regime,
                selection,
                row["mse"],
                row["mse_ci"],
                closed_with,
                closed_without,
                row["participation_cv"],
            )
    return rows


def markdown_table(rows: Sequence[dict[str, float]]) -> str:
    """Render result rows as a markdown table."""
    lines = [
        "| m | closed with | empirical with ± se | closed without "
        "| empirical without ± se | ratio without/with: empirical (closed) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['m']} | {row['closed_with']:.4f} "
            f"| {row['empirical_with']:.4f} ± {row['se_with']:.4f} "
            f"| {row['closed_without']:.4f} "
            f"| {row['empirical_without']:.4f} ± {row['se_without']:.4f} "
            f"| {row['ratio_empirical']:.3f} ({row['ratio_closed']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[dict[str, float]], num_clients: int, path: Path) -> None:
    """Save both estimates with error bars and the closed forms (log y-axis)."""
    ms = [row["m"] for row in rows]
    # Figure without pyplot renders through Agg, leaving global backend state alone.
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for key, label, colour in (
        ("with", "with replacement", "tab:blue"),
        ("without", "without replacement", "tab:orange"),
    ):
        ax.plot(ms, [r[f"closed_{key}"] for r in rows], "--", color=colour)
        ax.errorbar(
            ms,
            [r[f"empirical_{key}"] for r in rows],
            yerr=[r[f"se_{key}"] for r in rows],
            fmt="o",
            color=colour,
            capsize=3,
            label=f"{label} (lines: closed form)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("clients per aggregation m")
    ax.set_ylabel(r"$E\,\|\bar g_S - \bar g\|^2$")
    ax.set_title(f"Variance of the aggregated update, N = {num_clients}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_sampling_variance(
    out_dir: Path,
    *,
    num_clients: int = 20,
    dim: int = 10,
    ms: Sequence[int] = DEFAULT_MS,
    trials: int = 4000,
    seed: int = 0,
) -> dict:
    """Compare closed-form and Monte-Carlo variances on a synthetic population.

    Writes ``sampling_variance.json``, ``sampling_variance.md`` and
    ``sampling_variance.png`` to ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Output folder (created if missing).
    num_clients : int (default: 20)
        Population size ``N``.
    dim : int (default: 10)
        Dimension of the client updates.
    ms : Sequence[int] (default: 2, 4, ..., 18)
        Clients per aggregation, each in ``[1, N]``.
    trials : int (default: 4000)
        Monte-Carlo draws per ``m`` and selection.
    seed : int (default: 0)
        Seed of the population and of the draws.

    Returns
    -------
    dict
        The content written to the JSON file: ``config``, ``sigma2`` and one
        row per ``m``.
    """
    bad = [m for m in ms if not 1 <= m <= num_clients]
    if not ms or bad:
        raise ValueError(f"ms must be non-empty, in [1, {num_clients}]; bad: {bad}")
    updates = synthetic_population(num_clients, dim, seed=seed)
    sigma2 = population_variance(updates)
    log(INFO, "Population N=%d, d=%d, sigma^2=%.4f", num_clients, dim, sigma2)
    rows = []
    for m in ms:
        row = _row(updates, m, trials, seed)
        log(
            INFO,
            "m=%d: with %.4f (z=%+.2f), without %.4f (z=%+.2f)",
            m,
            row["empirical_with"],
            row["z_with"],
            row["empirical_without"],
            row["z_without"],
        )
        rows.append(row)
    result = {
        "config": {
            "num_clients": num_clients,
            "dim": dim,
            "ms": list(ms),
            "trials": trials,
            "seed": seed,
        },
        "sigma2": sigma2,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sampling_variance.json").write_text(json.dumps(result, indent=2))
    (out_dir / "sampling_variance.md").write_text(markdown_table(rows))
    _plot(rows, num_clients, out_dir / "sampling_variance.png")
    log(INFO, "Results written to %s", out_dir.resolve())
    return result


SERVER_PATH_NAME = "sampling_server_path"


def server_path_table(
    rows: Sequence[dict[str, Any]], accuracy: Sequence[dict[str, Any]] = ()
) -> str:
    """Markdown tables: measured error and participation, then accuracy."""
    lines = [
        "| regime | selection | concurrency | per-merge E‖Δ−ḡ‖² (95% CI) "
        "| closed: with / without | closed given repeats | bias² "
        "| pass-mean E‖·−ḡ‖² | merges with a repeat | participation CV |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['regime']} | {row['selection']} | {row['concurrency']} "
            f"| {row['mse']:.3f} ± {row['mse_ci']:.3f} "
            f"| {row['closed_with']:.3f} / {row['closed_without']:.3f} "
            f"| {row['closed_repeats']:.3f} | {row['bias2']:.4f} "
            f"| {row['window_mse']:.3f} ± {row['window_mse_ci']:.3f} "
            f"| {row['repeat_rate']:.1%} | {row['participation_cv']:.3f} "
            f"± {row['participation_cv_ci']:.3f} |"
        )
    if accuracy:
        lines += [
            "",
            "| MNIST selection | seeds | best acc (95% CI) | final acc (95% CI) "
            "| participation CV |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in accuracy:
            lines.append(
                f"| {row['selection']} | {len(row['per_seed'])} "
                f"| {row['best_acc']:.3f} ± {row['best_acc_ci']:.3f} "
                f"| {row['final_acc']:.3f} ± {row['final_acc_ci']:.3f} "
                f"| {row['participation_cv']:.3f} ± {row['participation_cv_ci']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def summarise_accuracy(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-seed accuracy runs by selection, with 95% intervals."""
    rows = []
    for selection in (WITH_REPLACEMENT, WITHOUT_REPLACEMENT):
        per_seed = [r for r in runs if r["selection"] == selection]
        if not per_seed:
            continue
        row: dict[str, Any] = {"selection": selection, "per_seed": per_seed}
        for key in ("best_acc", "final_acc"):
            row[key], row[f"{key}_ci"] = interval95([r[key] for r in per_seed])
        cvs = [np.std(r["counts"]) / np.mean(r["counts"]) for r in per_seed]
        row["participation_cv"], row["participation_cv_ci"] = interval95(cvs)
        rows.append(row)
    return rows


def _plot_server_path(
    rows: Sequence[dict[str, Any]], accuracy: Sequence[dict[str, Any]], path: Path
) -> None:
    """Measured error vs closed forms, participation, and accuracy."""
    panels = 3 if accuracy else 2
    fig = Figure(figsize=(5.0 * panels, 4.4))
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    colours = {WITH_REPLACEMENT: "tab:blue", WITHOUT_REPLACEMENT: "tab:orange"}
    regimes = list(dict.fromkeys(row["regime"] for row in rows))
    for offset, selection in ((-0.1, WITH_REPLACEMENT), (0.1, WITHOUT_REPLACEMENT)):
        chosen = [r for r in rows if r["selection"] == selection]
        axes[0].errorbar(
            [regimes.index(r["regime"]) + offset for r in chosen],
            [r["mse"] for r in chosen],
            yerr=[r["mse_ci"] for r in chosen],
            fmt="o",
            capsize=3,
            color=colours[selection],
            label=selection,
        )
    axes[0].axhline(rows[0]["closed_with"], ls="--", color="tab:blue", lw=1)
    axes[0].axhline(rows[0]["closed_without"], ls="--", color="tab:orange", lw=1)
    axes[0].set_xticks(range(len(regimes)), regimes, fontsize=8)
    axes[0].set_ylabel(r"per-merge $E\,\|\Delta - \bar g\|^2$ (lines: closed forms)")
    axes[0].legend(fontsize=8)
    hetero = [r for r in rows if r["regime"] == HETEROGENEOUS] or list(rows)
    for offset, row in zip((-0.2, 0.2), hetero[:2], strict=False):
        counts = np.mean([s["counts"] for s in row["per_seed"]], axis=0)
        axes[1].bar(
            np.arange(len(counts)) + offset,
            counts,
            width=0.4,
            color=colours[row["selection"]],
            label=row["selection"],
        )
    axes[1].set_xlabel(f"client (delay grows left to right), {hetero[0]['regime']}")
    axes[1].set_ylabel("merged updates (mean over seeds)")
    axes[1].legend(fontsize=8)
    if accuracy:
        for i, row in enumerate(accuracy):
            axes[2].errorbar(
                [i - 0.1, i + 0.1],
                [row["best_acc"], row["final_acc"]],
                yerr=[row["best_acc_ci"], row["final_acc_ci"]],
                fmt="o",
                capsize=3,
                color=colours[row["selection"]],
            )
        axes[2].set_xticks(
            range(len(accuracy)), [r["selection"] for r in accuracy], fontsize=8
        )
        axes[2].set_ylabel("MNIST central test acc: best (left), final (right)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_server_path_report(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    accuracy_runs: Sequence[dict[str, Any]],
    config: dict[str, Any],
) -> dict[str, Any]:
    """Write ``sampling_server_path.{json,md,png}`` to ``out_dir``; return the JSON."""
    accuracy = summarise_accuracy(accuracy_runs)
    result = {"config": config, "variance": list(rows), "accuracy": accuracy}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{SERVER_PATH_NAME}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    (out_dir / f"{SERVER_PATH_NAME}.md").write_text(server_path_table(rows, accuracy))
    _plot_server_path(rows, accuracy, out_dir / f"{SERVER_PATH_NAME}.png")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the experiment and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/sampling"))
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-clients",
        type=int,
        default=20,
        help="population size N; m runs over the even numbers in [2, N)",
    )
    args = parser.parse_args(argv)
    ms = tuple(range(2, args.num_clients, 2))
    if not ms:
        parser.error(f"--num-clients must be >= 3, got {args.num_clients}")
    result = run_sampling_variance(
        args.out,
        num_clients=args.num_clients,
        ms=ms,
        trials=args.trials,
        seed=args.seed,
    )
    print(markdown_table(result["rows"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
