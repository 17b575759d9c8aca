"""Run the app in Flower's Ray simulation from Python, without a SuperLink.

``flwr run .`` is the standard way to run the app (see README). This module is
the programmatic path used by the tests, the experiments and the benchmarks:
one process, Flower's ``run_simulation`` with the app's ServerApp and ClientApp,
and the run config passed in directly::

    python -m afl_flwr.simulate --run-config "mode='sync' num-server-rounds=5"
"""

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.data import load_central_testset


def simulate(
    run_config: Mapping[str, Any] | None = None,
    *,
    num_supernodes: int | None = None,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
) -> Path:
    """Run one simulation and return its results folder.

    Parameters
    ----------
    run_config : Mapping[str, Any], optional
        Run-config overrides (kebab-case keys); missing keys take defaults.
    num_supernodes : int, optional
        Simulated nodes; defaults to ``num-clients``.
    client_cpus : int (default: 1)
        CPUs Ray reserves per client (fewer = more clients in parallel).
    client_gpus : float (default: 0.0)
        GPU fraction per client, e.g. 0.2 runs five clients per GPU.

    Returns
    -------
    Path
        The results folder written by the ServerApp.
    """
    from flwr.simulation import run_simulation

    from afl_flwr.client_app import make_client_app
    from afl_flwr.server_app import make_server_app

    overrides = dict(run_config or {})
    cfg = AppConfig.from_run_config(overrides)
    cfg.check_simulation()
    # Fail fast on a bad data-dir before Ray starts (the load is cached in-process).
    load_central_testset(cfg.dataset, cfg.data_dir, cfg.num_test)
    outcomes: list[Path] = []
    run_simulation(
        server_app=make_server_app(
            overrides, on_finish=lambda o: outcomes.append(o.results_path)
        ),
        client_app=make_client_app(overrides),
        num_supernodes=num_supernodes or cfg.num_clients,
        backend_config={
            "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": {"include_dashboard": False},
        },
    )
    if not outcomes:
        raise RuntimeError("The simulation ended without results; see the log above")
    return outcomes[0]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the results folder as the last line."""
    parser = argparse.ArgumentParser(
        prog="python -m afl_flwr.simulate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=None,
        help="Overrides as in flwr run, e.g. \"num-server-rounds=5 mode='sync'\"",
    )
    parser.add_argument("--num-supernodes", type=int, default=None)
    parser.add_argument("--client-cpus", type=int, default=1)
    parser.add_argument("--client-gpus", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        overrides = parse_config_args(args.run_config)
        path = simulate(
            overrides,
            num_supernodes=args.num_supernodes,
            client_cpus=args.client_cpus,
            client_gpus=args.client_gpus,
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads((path / "summary.json").read_text())))
    print(f"Results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
