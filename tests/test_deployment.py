"""A real Flower deployment on 127.0.0.1: SuperLink, SuperNodes and `flwr run`.

Every test drives the runbook ``docker/run-local-deployment.sh`` (so the README's
deployment steps are what is tested) with private ports, FLWR_HOMEs and results
folders under ``tmp_path``. Each test is bounded in time and, on any exit path,
stops the runbook (whose trap stops its SuperLink and SuperNodes), then kills
whatever Flower process of the test is still alive. The helpers are in
``deployment_helpers.py``; the fault tests in ``test_deployment_faults.py``.
"""

import json
import re
import subprocess

import pytest
from conftest import run_bounded
from deployment_helpers import (
    DEPLOYMENT_TIMEOUT_S,
    background,
    deployment_env,
    free_port,
    free_port_block,
    healthy,
    read_csv,
    run_folder,
    runbook,
    stop_leftovers,
    supernode_id,
    wait_for,
)

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]


def test_insecure_deployment_trains_three_partitions_asynchronously(
    tmp_path, short_dir
):
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

    workers = short_dir  # the node workers' sockets, keys and logs
    env = {**deployment_env(), "AFL_FLWR_WORKER_DIR": str(workers)}

    # Execute
    try:
        proc = run_bounded(command, timeout=DEPLOYMENT_TIMEOUT_S, env=env)
    finally:
        leftovers = stop_leftovers(work)

    # Assert
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Run status: finished:completed" in proc.stdout
    # Every task process was forked by the node's warm launcher (the runbook's
    # default), every train task ran on its node's worker (node-worker = auto),
    # one worker per node for the whole run, and every worker went with its node
    for i in range(3):
        log = (work / "logs" / f"supernode-{i}.log").read_text()
        assert "Warm task launcher: ClientApp tasks fork from template" in log
        assert "Start `flwr-clientapp` process" in log  # Flower's entry point ran
        # ... and the SuperNode is Flower's, with the runbook's idle pull interval
        assert (
            "SuperNode pull intervals: 0.5 s after an empty pull (Flower: 3 s)" in log
        )
        timings = re.findall(r"Cold task timing: .*", log)
        pids = set(re.findall(r"on node worker (\d+)", log))
        assert len(timings) >= 2 and all("on node worker" in t for t in timings)
        assert len(pids) == 1, timings
    assert not list(workers.iterdir())  # no socket, key, log or lock left
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
    # Flower's own task launcher here (the other tests use the warm one).
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
    config = "num-server-rounds=1 clients-per-round=1"
    command = runbook(work, port, free_port_block(1), 1, config, tls=True)
    command += ["--task-launcher", "flower"]

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
    assert "Warm task launcher" not in (work / "logs" / "supernode-0.log").read_text()
    registered = {int(n) for n in re.findall(r"SuperNode (\d+) registered", output)}
    assert registered == {supernode_id(work / "logs" / "supernode-0.log")}
    folder = run_folder(work)
    events = read_csv(folder / "events.csv")
    assert events
    assert {int(e["node_id"]) for e in events} == registered
    assert json.loads((folder / "summary.json").read_text())["updates"]["merged"] == 1
    assert leftovers == []
