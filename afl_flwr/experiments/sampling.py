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
"""

import argparse
import json
import sys
from collections.abc import Sequence
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from matplotlib.figure import Figure

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
