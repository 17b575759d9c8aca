"""The README's main command, `afl-flwr run` (a wrapper of `flwr run`), for real.

Starts Flower's local SuperLink (background process) on private ports with a
private FLWR_HOME, runs the app through `flwr run --stream`, and checks that the
federation had `num-clients` SuperNodes, the run wrote its results, and no
SuperLink/SuperExec/simulation process is left behind.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_group, run_bounded

from afl_flwr.launch import flower_processes, stop_processes, superlink_pids

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leftovers(home: Path) -> list[int]:
    """PIDs of live processes under our FLWR_HOME (SuperLink, SuperExec, apps)."""
    return [p.pid for p in flower_processes(home)]


def test_afl_flwr_run_through_local_superlink(tmp_path, mnist_dir):
    home = tmp_path / "flwr-home"
    port, control = free_port(), free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    results = tmp_path / "results"
    run_config = (
        f"data-dir='{mnist_dir}' results-dir='{results}' num-clients=3 "
        "clients-per-round=2 buffer-size=2 num-server-rounds=3 local-epochs=1 "
        "model='small-cnn'"
    )
    try:
        proc = run_bounded(
            [
                sys.executable,
                "-m",
                "afl_flwr.launch",
                "run",
                str(REPO),
                "--run-config",
                run_config,
            ],
            timeout=360,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert "(3 simulated SuperNodes)" in proc.stdout
        [run_dir] = list(results.glob("async-*"))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["versions"] == 3
        assert summary["updates"]["merged"] >= 6
        deadline = time.time() + 20
        while leftovers(home) and time.time() < deadline:
            time.sleep(0.5)
        assert not leftovers(home)
    finally:
        stop_processes(superlink_pids(str(port)))
        for pid in leftovers(home):
            kill_group(pid)


def test_afl_flwr_run_rejects_bad_config_before_starting_anything(tmp_path):
    proc = run_bounded(
        [
            sys.executable,
            "-m",
            "afl_flwr.launch",
            "run",
            str(REPO),
            "--run-config",
            "num-clients=2 clients-per-round=3",
        ],
        timeout=60,
        env={**os.environ, "FLWR_HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "clients-per-round=3 exceeds num-clients=2" in proc.stdout
    assert not (tmp_path / "local-superlink").exists()
