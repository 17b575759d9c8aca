"""Reproduce the paper's studies: ``python -m afl_flwr.experiments <name>``.

Names: ``curve``, ``concurrency``, ``afl-vs-sfl``, ``staleness-fns``,
``sampling`` (see :mod:`afl_flwr.experiments.studies`). Each writes results,
PNG plots and a markdown table to ``--out`` (default ``results/experiments/<name>``).
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.common.config import parse_config_args

from afl_flwr.config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    from afl_flwr.experiments.studies import BASE_CONFIG, STUDIES

    parser = argparse.ArgumentParser(
        prog="python -m afl_flwr.experiments", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", choices=sorted(STUDIES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--data-dir",
        default="",
        help="MNIST IDX folder for offline runs (e.g. ../shared/data/mnist)",
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=None,
        help="overrides of the study's base config, as in flwr run",
    )
    parser.add_argument(
        "--target", type=float, default=0.9, help="accuracy for time-to-target"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or Path("results") / "experiments" / args.name
    out.mkdir(parents=True, exist_ok=True)
    try:
        base = {**BASE_CONFIG, **parse_config_args(args.run_config)}
        if args.data_dir:
            base["data-dir"] = str(Path(args.data_dir).resolve())
        base.setdefault("results-dir", str((out / "runs").resolve()))
        STUDIES[args.name](out, base, args.target)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Written to {out.resolve()}")
    return 0
