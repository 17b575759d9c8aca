"""Helpers of the real-deployment tests (``test_deployment*.py``).

They drive the runbook ``docker/run-local-deployment.sh`` with private ports,
FLWR_HOMEs and results folders, find the Flower processes a test started (by
their FLWR_HOME), and stop every one of them, also when a test fails.
"""

import contextlib
import csv
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import kill_group

from afl_flwr.launch import flower_processes

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docker" / "run-local-deployment.sh"
# Hard bound of one deployment (normally done in 60-150 s on two cores).
DEPLOYMENT_TIMEOUT_S = 300.0
# Small, fast workload: one local epoch of a small CNN on a third of MNIST.
WORKLOAD = "local-epochs=1 model='small-cnn' num-test=1000 eval-every=1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(size: int) -> int:
    """First of ``size`` consecutive ports that are free right now."""
    for _ in range(50):
        base = free_port()
        if base + size > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + size):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    pytest.fail(f"no block of {size} free ports found")


def deployment_env() -> dict[str, str]:
    """The venv's Flower executables first on PATH, no update check."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
    }


def runbook(
    work: Path, port: int, node_port: int, nodes: int, *run_config: str, tls: bool
) -> list[str]:
    command = [
        "bash",
        str(RUNBOOK),
        "--work-dir",
        str(work),
        "--port",
        str(port),
        "--node-base-port",
        str(node_port),
        "--nodes",
        str(nodes),
        "--data-dir",
        str(REPO.parent / "shared" / "data" / "mnist"),
        "--results-dir",
        str(work / "results"),
    ]
    for overrides in (WORKLOAD, *run_config):
        command += ["--run-config", overrides]
    return command if tls else [*command, "--insecure"]


def flower_pids(work: Path) -> list[int]:
    """PIDs of live processes whose FLWR_HOME lies under ``work``."""
    return [p.pid for p in flower_processes(work)]


def programs_of(cmdline: list[str]) -> set[str]:
    """What a command line may run: its first two words' names, or a ``-m`` module."""
    if len(cmdline) > 2 and cmdline[1] == "-m":
        return {cmdline[2]}
    return {Path(word).name for word in cmdline[:2]}


def pids_running(home: Path, *programs: str) -> list[int]:
    """PIDs of live processes running one of ``programs`` with FLWR_HOME ``home``.

    A program is a console script (``flower-supernode``) or a module run with
    ``python -m`` (``afl_flwr.supernode``).
    """
    pids = []
    for proc in flower_processes(home):
        with contextlib.suppress(psutil.Error):
            if programs_of(proc.cmdline()) & set(programs):
                pids.append(proc.pid)
    return pids


# A SuperNode: Flower's console script, or Flower's SuperNode with the
# runbook's idle pull interval (python -m afl_flwr.supernode).
SUPERNODE_PROGRAMS = ("flower-supernode", "afl_flwr.supernode")


def supernode_pids(work: Path, index: int) -> list[int]:
    """PIDs of SuperNode processes whose FLWR_HOME is ``supernode-<index>``."""
    home = work / "flwr-home" / f"supernode-{index}"
    return pids_running(home, *SUPERNODE_PROGRAMS)


def stop_leftovers(work: Path, grace_s: float = 10.0) -> list[int]:
    """Wait for the test's Flower processes to exit; SIGKILL and return stragglers."""
    deadline = time.time() + grace_s
    while (alive := flower_pids(work)) and time.time() < deadline:
        time.sleep(0.3)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return alive


@contextlib.contextmanager
def background(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` in its own session; stop it (SIGTERM, then the group) after.

    Output goes to ``log``, not a pipe: Flower's helpers (SuperExec) would hold a
    pipe open after their parent exits. Waiting on ``proc`` also reaps it, which
    those helpers need to see their parent gone (a zombie still "exists").
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or deployment_env(),
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the runbook's trap stops its nodes
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        # The rest of its group (SuperExec, a node worker) follows its parent
        # within a second or two: give it that before killing what is left.
        deadline = time.time() + 10.0
        while time.time() < deadline and proc.poll() is not None:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        kill_group(proc.pid)
        proc.wait()


def wait_for(
    predicate: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen[str],
    log: Path,
) -> None:
    """Poll ``predicate``; fail if ``proc`` exits or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            tail = log.read_text()[-4000:]
            pytest.fail(
                f"exited (rc {proc.returncode}) while waiting for {what}:\n{tail}"
            )
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)


def healthy(url: str, cafile: Path | None = None) -> bool:
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def run_folder(work: Path) -> Path:
    [folder] = list((work / "results").glob("async-*"))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def supernode_id(log: Path) -> int:
    match = re.search(r"SuperNode ID: (\d+)", log.read_text())
    assert match, f"no node id in {log}"
    return int(match.group(1))


def printed_command(output: str, home: Path) -> list[str]:
    """The argv of the runbook's printed ``FLWR_HOME=<home> <command>`` line.

    The runbook prints every process it starts, and the ``flwr run`` of another
    run, as a line a user pastes into a shell; this is the command of the one
    whose FLWR_HOME is ``home``.
    """
    for line in output.splitlines():
        line = line.strip().removeprefix("+ ")
        if line.startswith("FLWR_HOME="):
            words = shlex.split(line, comments=True)
            if words[0] == f"FLWR_HOME={home}":
                return words[1:]
    pytest.fail(f"the runbook printed no command with FLWR_HOME={home}")
