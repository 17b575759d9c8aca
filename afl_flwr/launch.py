"""``afl-flwr``: run the app with ``flwr run`` and the right simulated federation.

Flower (1.40 and later) keeps federation settings (number of SuperNodes, client
resources) out of ``pyproject.toml``; by default a local simulation has 2
SuperNodes with 2 CPUs each and no GPU. ``afl-flwr run`` derives them from the run
config instead, so the federation always has ``num-clients`` SuperNodes, and wraps
``flwr run``::

    flwr run <app> local --stream --run-config "..." --federation-config
        "num-supernodes=<num-clients> client-resources-num-cpus=<c>
         client-resources-num-gpus=<g>"

with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (the app's dependencies,
torch included, are already installed: without it the local SuperLink installs
them again into a fresh environment for every run). ``--run-config`` takes
``key=value`` strings and Flower run-config TOML files (``presets/*.toml``), in
any number and order; later values win. A local SuperLink that this command had
to start is stopped again when the run ends.

With ``RAY_ADDRESS`` set (``host:port`` of a running ``ray start --head``), the
simulation's ``ray.init()`` attaches to that Ray cluster instead of starting a
private one: the variable reaches it through the local SuperLink this command
starts (docs/running.md, "Real clusters").

``afl-flwr check --nodes N --run-config ...`` validates the run config a
deployment of N SuperNodes would get (the app's ``pyproject.toml`` values, then
the overrides) and exits 2 with the error if it cannot work;
``docker/run-local-deployment.sh`` runs it before it starts any process.
"""

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from click import ClickException
from flwr.common.config import flatten_dict, get_project_config, parse_config_args

from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.constants import PARTITION_ID
from afl_flwr.data import DATA_DIR_KEY, source_files

NO_DEP_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
DEFAULT_PORT = "39091"
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def federation_config(cfg: AppConfig, client_cpus: int, client_gpus: float) -> str:
    """The ``--federation-config`` string of a simulation with one node per client."""
    if client_cpus < 1:
        raise ConfigError(f"--client-cpus={client_cpus} must be an integer >= 1")
    if not 0.0 <= client_gpus <= 1.0:
        raise ConfigError(f"--client-gpus={client_gpus} must be in [0, 1]")
    return (
        f"num-supernodes={cfg.num_clients} client-resources-num-cpus={client_cpus} "
        f"client-resources-num-gpus={client_gpus}"
    )


def to_run_config_arg(overrides: dict[str, Any]) -> str:
    """Serialise overrides back to ``flwr run --run-config`` syntax (TOML values)."""
    parts = []
    for key, value in overrides.items():
        if isinstance(value, str):
            parts.append(f'{key}="{value}"')
        elif isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def read_run_config(values: Sequence[str] | None) -> dict[str, Any]:
    """Merge ``--run-config`` values: TOML files and ``key=value`` strings, in order.

    Each value is parsed as ``flwr run --run-config`` parses it (a path ending in
    ``.toml`` is read as a run-config file), so a preset file means the same here
    as with ``flwr run``; unlike ``flwr run``, files and overrides may be mixed and
    later values override earlier ones.

    Raises
    ------
    ConfigError
        If a file cannot be read or a value is not valid run-config syntax.
    """
    merged: dict[str, Any] = {}
    for value in values or []:
        try:
            merged.update(parse_config_args([value]))
        except (OSError, ValueError, ClickException) as err:
            raise ConfigError(f"--run-config {value!r}: {err}") from err
    return merged


def build_command(
    app_dir: Path, overrides: dict[str, Any], federation: str, connection: str
) -> list[str]:
    """The ``flwr run`` command line."""
    command = ["flwr", "run", str(app_dir), connection, "--stream"]
    if overrides:
        command += ["--run-config", to_run_config_arg(overrides)]
    return [*command, "--federation-config", federation]


def superlink_pids(port: str) -> list[int]:
    """PIDs of ``flower-superlink`` processes serving ``port`` (by command line)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        words = proc.info["cmdline"] or []
        if any(w.endswith("flower-superlink") for w in words[:2]) and port in words:
            pids.append(int(proc.info["pid"]))
    return pids


def flower_processes(flwr_home: Path) -> list[psutil.Process]:
    """Live processes whose ``FLWR_HOME`` is ``flwr_home`` or lies below it.

    What a test, a benchmark or the deployment runbook started under its own
    ``FLWR_HOME`` (SuperLink, SuperNodes, SuperExec, app processes); zombies
    and processes that cannot be read are left out.
    """
    root = Path(flwr_home).resolve()
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ValueError):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            home = proc.environ().get("FLWR_HOME")
            if home and (Path(home) == root or root in Path(home).parents):
                found.append(proc)
    return found


def ray_address_note(superlinks: Sequence[int], address: str) -> str | None:
    """A note when a running SuperLink's simulations would not use ``address``.

    Flower's simulation calls ``ray.init()`` in a process the SuperLink starts,
    with the SuperLink's environment: ``RAY_ADDRESS`` (``address``, ``""`` when
    unset) reaches it only through a SuperLink started with it. ``None`` when
    every SuperLink in ``superlinks`` has the same ``RAY_ADDRESS``.
    """
    for pid in superlinks:
        try:
            theirs = psutil.Process(pid).environ().get(RAY_ADDRESS_ENV, "")
        except psutil.Error:
            if not address:
                continue
            theirs = "<unreadable>"
        if theirs != address:
            return (
                f"note: the running local SuperLink (pid {pid}) was started with "
                f"{RAY_ADDRESS_ENV}={theirs!r}, not {address!r}: its simulations use "
                "the Ray cluster its own environment names; stop it to let "
                "afl-flwr start one with yours."
            )
    return None


def stop_processes(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``grace_s``."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()


def check_deployment(
    app_dir: Path, values: Sequence[str] | None, nodes: int
) -> AppConfig:
    """Validate the run config of a deployment of ``nodes`` SuperNodes.

    The config is the app's ``[tool.flwr.app.config]`` with ``values`` applied in
    order, as ``flwr run --run-config`` builds it. SuperNode ``i`` serves
    ``partition-id = i``.

    Raises
    ------
    ConfigError
        If :meth:`AppConfig.from_run_config` refuses the config, ``num-clients``
        is below ``nodes`` (a node's partition id would be out of range), or
        ``data-dir`` holds no data set files.
    """
    try:
        project = get_project_config(app_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"app {str(app_dir)!r}: {err}") from err
    defaults = flatten_dict(project["tool"]["flwr"]["app"].get("config", {}))
    cfg = AppConfig.from_run_config({**defaults, **read_run_config(values)})
    if cfg.num_clients < nodes:
        raise ConfigError(
            f"num-clients={cfg.num_clients} is below the {nodes} SuperNodes: "
            f"{PARTITION_ID}={nodes - 1} would be out of range; allowed: "
            f"num-clients >= {nodes}"
        )
    if cfg.data_dir and not source_files(cfg.dataset, cfg.data_dir):
        raise ConfigError(
            f"{DATA_DIR_KEY}={cfg.data_dir!r} holds no {cfg.dataset} IDX files"
        )
    return cfg


def check(argv: Sequence[str]) -> int:
    """``afl-flwr check``: refuse a deployment config before any process starts."""
    parser = argparse.ArgumentParser(
        prog="afl-flwr check",
        description="Validate the run config of a deployment of N SuperNodes.",
    )
    parser.add_argument("app", nargs="?", default=".", help="app directory (default .)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--run-config", action="append", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = check_deployment(Path(args.app), args.run_config, args.nodes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"Run config OK for {args.nodes} SuperNodes: mode={cfg.mode} "
        f"num-clients={cfg.num_clients} clients-per-round={cfg.clients_per_round}"
    )
    return 0


def run(argv: Sequence[str]) -> int:
    """``afl-flwr run``: validate, run through ``flwr run``, clean up."""
    parser = argparse.ArgumentParser(prog="afl-flwr run", description=__doc__)
    parser.add_argument("app", nargs="?", default=".", help="app directory (default .)")
    parser.add_argument(
        "--run-config",
        action="append",
        default=None,
        help="run-config overrides (\"data-dir='../shared/data/mnist'\") or a "
        "run-config TOML file (presets/quick-cpu.toml); repeatable, later wins",
    )
    parser.add_argument("--client-cpus", type=int, default=1)
    parser.add_argument(
        "--client-gpus",
        type=float,
        default=None,
        help="GPU fraction per client (default: 1/clients-per-round with CUDA, else 0)",
    )
    parser.add_argument("--connection", default="local")
    parser.add_argument(
        "--keep-superlink", action="store_true", help="leave the SuperLink running"
    )
    args = parser.parse_args(argv)

    try:
        overrides = read_run_config(args.run_config)
        cfg = AppConfig.from_run_config(overrides)
        cfg.check_simulation()
        if "results-dir" not in overrides:
            overrides["results-dir"] = cfg.results_dir
        # The ServerApp runs in the SuperLink's working directory: pass an
        # absolute path so results land where the user asked.
        overrides["results-dir"] = str(Path(overrides["results-dir"]).resolve())
        if cfg.data_dir:
            overrides["data-dir"] = str(Path(cfg.data_dir).resolve())
        gpus = args.client_gpus
        if gpus is None:
            gpus = default_gpu_fraction(cfg)
        federation = federation_config(cfg, args.client_cpus, gpus)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if shutil.which("flwr") is None or shutil.which("flower-superexec") is None:
        print(
            "error: `flwr`/`flower-superexec` not on PATH; activate the venv where "
            "afl-flwr is installed",
            file=sys.stderr,
        )
        return 2

    port = os.environ.get(PORT_ENV, DEFAULT_PORT)
    already_running = superlink_pids(port)
    if already_running and os.environ.get(NO_DEP_INSTALL) != "1":
        print(
            f"note: a local SuperLink is already running (pid {already_running}); "
            f"if it was started without {NO_DEP_INSTALL}=1 it installs the app's "
            "dependencies per run: stop it to let afl-flwr start a fresh one.",
            file=sys.stderr,
        )
    ray_address = os.environ.get(RAY_ADDRESS_ENV, "")
    note = ray_address_note(already_running, ray_address)
    if note:
        print(note, file=sys.stderr)
    elif ray_address:
        print(f"Ray: attaching to the existing cluster {RAY_ADDRESS_ENV}={ray_address}")
    env = {**os.environ, NO_DEP_INSTALL: "1"}
    command = build_command(Path(args.app), overrides, federation, args.connection)
    print("$", " ".join(command), flush=True)
    try:
        proc = subprocess.run(command, env=env, check=False, capture_output=False)
        code = proc.returncode
    finally:
        started = [p for p in superlink_pids(port) if p not in already_running]
        if started and not args.keep_superlink:
            print(f"Stopping the local SuperLink started for this run (pid {started})")
            stop_processes(started)
    print(f"Results folder: {overrides['results-dir']}/{cfg.mode}-<timestamp>")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``afl-flwr`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "run": run,
        "simulate": _simulate,
        "experiment": _experiment,
        "check": check,
    }
    if not argv or argv[0] not in commands:
        print(
            "usage: afl-flwr {run,simulate,experiment,check} ...\n"
            "  run         run the app with `flwr run` (simulation or SuperLink)\n"
            "  simulate    run in-process with Flower's run_simulation\n"
            "  experiment  reproduce one of the paper's studies (see README)\n"
            "  check       validate a deployment's run config (N SuperNodes)",
            file=sys.stderr,
        )
        return 2
    return commands[argv[0]](argv[1:])


def _simulate(argv: Sequence[str]) -> int:
    from afl_flwr.simulate import main as simulate_main

    return simulate_main(list(argv))


def _experiment(argv: Sequence[str]) -> int:
    from afl_flwr.experiments import main as experiments_main

    return experiments_main(list(argv))


def default_gpu_fraction(cfg: AppConfig) -> float:
    """GPU share per client: ``1/clients-per-round`` with CUDA, else 0.

    With this share the clients kept busy at once fit on one GPU together; Ray
    hides the GPU from a client that asks for none, so 0 means CPU training.
    """
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return round(1.0 / cfg.clients_per_round, 4)


if __name__ == "__main__":
    sys.exit(main())
