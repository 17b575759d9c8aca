"""A real Flower deployment on 127.0.0.1: SuperLink, SuperNodes and `flwr run`.

Every test drives the runbook ``docker/run-local-deployment.sh`` (so the README's
deployment steps are what is tested) with private ports, FLWR_HOMEs and results
folders under ``tmp_path``. Each test is bounded in time and, on any exit path,
stops the runbook (whose trap stops its SuperLink and SuperNodes), then kills
whatever Flower process of the test is still alive.
"""

import contextlib
import csv
import json
import os
import re
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
from conftest import kill_group, run_bounded

from afl_flwr.launch import flower_processes

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]

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


def supernode_pids(work: Path, index: int) -> list[int]:
    """PIDs of SuperNode processes whose FLWR_HOME is ``supernode-<index>``."""
    home = work / "flwr-home" / f"supernode-{index}"
    pids = []
    for proc in flower_processes(home):
        with contextlib.suppress(psutil.Error):
            if any("flower-supernode" in w for w in proc.cmdline()):
                pids.append(proc.pid)
    return pids


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


def test_insecure_deployment_trains_three_partitions_asynchronously(tmp_path):
    # Prepare
    work = tmp_path / "deployment"
    command = runbook(
        work,
        free_port(),
        free_port_block(3),
        3,
        # clock='none': merge in arrival order, skipping the profile queries.
        "num-server-rounds=6 clients-per-round=2 buffer-size=2 clock='none'",
        tls=False,
    )

    # Execute
    try:
        proc = run_bounded(command, timeout=DEPLOYMENT_TIMEOUT_S, env=deployment_env())
    finally:
        leftovers = stop_leftovers(work)

    # Assert
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Run status: finished:completed" in proc.stdout
    folder = run_folder(work)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["versions"] == 6
    assert summary["updates"]["merged"] >= 12
    assert summary["best_test_acc"] > 0.5
    assert summary["max_staleness"] > 0  # slots refilled before the buffer flushes
    merged = [e for e in read_csv(folder / "events.csv") if e["status"] == "merged"]
    node_ids = {supernode_id(work / "logs" / f"supernode-{i}.log") for i in range(3)}
    assert {int(e["node_id"]) for e in merged} == node_ids
    assert leftovers == []


def test_tls_node_auth_admits_registered_and_refuses_unregistered_node(tmp_path):
    # Prepare: the runbook registers supernode-0; an extra key stays unregistered.
    work = tmp_path / "deployment"
    port = free_port()
    rogue_key = tmp_path / "rogue" / "supernode-rogue"
    rogue_key.parent.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", rogue_key],
        check=True,
    )
    ca = work / "certs" / "ca.crt"
    log = tmp_path / "runbook.log"
    rogue_log = tmp_path / "rogue.log"
    command = runbook(
        work,
        port,
        free_port_block(1),
        1,
        "num-server-rounds=1 clients-per-round=1",
        tls=True,
    )

    # Execute
    try:
        with background(command, log) as deployment:
            wait_for(
                lambda: ca.exists() and healthy(f"https://127.0.0.1:{port}/health", ca),
                "the TLS SuperLink",
                60,
                deployment,
                log,
            )
            # Same CA, a valid partition: only the missing registration differs.
            rogue_command = [
                "flower-supernode",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(ca),
                "--auth-supernode-private-key",
                str(rogue_key),
                "--node-config",
                "partition-id=0 num-partitions=1",
                "--port",
                str(free_port()),
                "--max-retries",
                "2",
                "--max-wait-time",
                "15",
            ]
            rogue_env = {
                **deployment_env(),
                "FLWR_HOME": str(work / "flwr-home" / "rogue"),
            }
            with background(rogue_command, rogue_log, rogue_env) as rogue:
                rogue.wait(timeout=60)
            deployment.wait(timeout=DEPLOYMENT_TIMEOUT_S)
    finally:
        leftovers = stop_leftovers(work)

    # Assert
    output = log.read_text()
    assert deployment.returncode == 0, output[-6000:]
    assert "Run status: finished:completed" in output
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in rogue_log.read_text()
    assert "Receiving:" not in rogue_log.read_text()
    registered = {int(n) for n in re.findall(r"SuperNode (\d+) registered", output)}
    assert registered == {supernode_id(work / "logs" / "supernode-0.log")}
    folder = run_folder(work)
    events = read_csv(folder / "events.csv")
    assert events
    assert {int(e["node_id"]) for e in events} == registered
    assert json.loads((folder / "summary.json").read_text())["updates"]["merged"] == 1
    assert leftovers == []


def test_run_completes_after_a_supernode_is_killed_mid_run(tmp_path):
    # Prepare
    work = tmp_path / "deployment"
    nodes = 3
    log = tmp_path / "runbook.log"
    node_logs = [work / "logs" / f"supernode-{i}.log" for i in range(nodes)]
    command = runbook(
        work,
        free_port(),
        free_port_block(nodes),
        nodes,
        # A task timeout above a task's duration on a busy 2-core machine (10-35 s):
        # a shorter one also expires live nodes' tasks, which then queue up.
        "num-server-rounds=3 clients-per-round=2 buffer-size=2 clock='none' "
        "task-timeout=40",
        tls=False,
    )

    def training_node() -> int | None:
        for i, node_log in enumerate(node_logs):
            if node_log.exists() and "Receiving: train message" in node_log.read_text():
                return i
        return None

    # Execute: SIGKILL the first SuperNode that receives a task, mid-task.
    try:
        with background(command, log) as deployment:
            wait_for(
                lambda: training_node() is not None,
                "a train task",
                120,
                deployment,
                log,
            )
            victim = training_node()
            [victim_pid] = supernode_pids(work, victim)
            os.kill(victim_pid, signal.SIGKILL)
            deployment.wait(timeout=DEPLOYMENT_TIMEOUT_S)
    finally:
        leftovers = stop_leftovers(work)

    # Assert
    output = log.read_text()
    assert deployment.returncode == 0, output[-6000:]
    assert "Run status: finished:completed" in output
    folder = run_folder(work)
    dead = supernode_id(node_logs[victim])
    events = read_csv(folder / "events.csv")
    # The dead node's task ends as a timeout (strategy) or as the SuperLink's
    # "message expired" error reply (rejected); its slot went to the others.
    dead_statuses = {e["status"] for e in events if int(e["node_id"]) == dead}
    assert dead_statuses & {"timeout", "rejected"}
    assert "merged" not in dead_statuses
    survivors = {int(e["node_id"]) for e in events if e["status"] == "merged"} - {dead}
    assert len(survivors) == nodes - 1
    versions = [int(row["version"]) for row in read_csv(folder / "evals.csv")]
    assert versions == list(range(4))  # strictly increasing, no gap, no repeat
    assert leftovers == []
