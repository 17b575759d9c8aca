"""Faults in a real deployment on 127.0.0.1: a SuperNode or the ServerApp dies.

Both tests drive the runbook ``docker/run-local-deployment.sh`` and recover the
way docs/deployment.md ("Faults") tells a user to: a SuperNode killed mid-run is
started again with the command line the runbook printed for it; a killed
ServerApp's run is stopped with ``flwr stop`` and resumed from its
``checkpoint.npz`` by a second ``flwr run`` (the runbook's ``--keep-running``
keeps the SuperLink and SuperNodes up and prints that command). Ports, FLWR_HOMEs
and results live under ``tmp_path``; every process a test started is stopped by
pid on every exit path (see ``deployment_helpers``).
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import run_bounded
from deployment_helpers import (
    DEPLOYMENT_TIMEOUT_S,
    SUPERNODE_PROGRAMS,
    background,
    deployment_env,
    free_port,
    free_port_block,
    pids_running,
    printed_command,
    read_csv,
    runbook,
    stop_leftovers,
    supernode_id,
    wait_for,
)

from afl_flwr.checkpoint import load_checkpoint
from afl_flwr.client_app import client_trainset
from afl_flwr.config import AppConfig
from afl_flwr.launch import flower_processes

pytestmark = [pytest.mark.process, pytest.mark.timeout(600)]

# A task timeout above a task's duration on a busy 2-core machine (10-35 s); a
# dead node's task frees its slot when it expires (or the node is seen offline).
FAULT_RUN = "buffer-size=2 clock='none' task-timeout=40"


def train_tasks_received(log: Path) -> int:
    return log.read_text().count("Receiving: train message") if log.exists() else 0


def run_tasks_received(logs: list[Path], run_id: str) -> int:
    """Train tasks of run ``run_id`` the SuperNodes logged as received."""
    header = re.compile(rf"\[RUN {run_id}, ROUND \d+\]\n[^\n]*Receiving: train message")
    return sum(len(header.findall(log.read_text())) for log in logs if log.exists())


def run_started_at(folder: Path) -> float:
    """Epoch seconds no later than the run's wall-time zero (its folder's stamp).

    The ServerApp names ``<mode>-YYYYmmdd-HHMMSS`` before the strategy starts its
    clock, so an event's ``wall_time`` above ``t - run_started_at`` is after ``t``.
    """
    match = re.fullmatch(r"async-(\d{8}-\d{6})(-\d+)?", folder.name)
    assert match, folder
    return time.mktime(time.strptime(match.group(1), "%Y%m%d-%H%M%S"))


def flwr_cli(work: Path, *args: str) -> str:
    """Run a ``flwr`` CLI command with the runbook's connection; return stdout."""
    env = {**deployment_env(), "FLWR_HOME": str(work / "flwr-home" / "cli")}
    proc = subprocess.run(
        ["flwr", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def run_statuses(work: Path) -> dict[int, str]:
    runs = json.loads(flwr_cli(work, "list", "afl-local", "--format", "json"))
    return {int(r["run-id"]): r["status"] for r in runs["runs"]}


def warm_launchers(home: Path) -> list[int]:
    """PIDs of live warm launchers (SuperExecs) whose FLWR_HOME is ``home``.

    Their template and the task processes forked from it run under the same
    command line; a launcher is the one whose parent is not a launcher.
    """
    pids = []
    for proc in flower_processes(home):
        with contextlib.suppress(psutil.Error):
            parent = proc.parent()
            if "afl_flwr.warm_exec" in proc.cmdline()[:3] and (
                parent is None or "afl_flwr.warm_exec" not in parent.cmdline()[:3]
            ):
                pids.append(proc.pid)
    return pids


def test_killed_supernode_restarted_rejoins_and_its_partition_trains(tmp_path):
    # Prepare
    work = tmp_path / "deployment"
    nodes = 3
    log = tmp_path / "runbook.log"
    node_logs = [work / "logs" / f"supernode-{i}.log" for i in range(nodes)]
    restart_log = work / "logs" / "supernode-restarted.log"
    command = runbook(
        work,
        free_port(),
        free_port_block(nodes),
        nodes,
        f"num-server-rounds=8 {FAULT_RUN}",
        tls=False,
    )

    def second_task_node() -> int | None:
        """A node that got its second train task: it replied once, then went on."""
        for i, node_log in enumerate(node_logs):
            if train_tasks_received(node_log) >= 2:
                return i
        return None

    # Execute: SIGKILL the first SuperNode that trains a second task, mid-task;
    # start it again with the command line the runbook printed for it.
    try:
        with background(command, log) as deployment:
            wait_for(
                lambda: second_task_node() is not None,
                "a second train task",
                180,
                deployment,
                log,
            )
            victim = second_task_node()
            assert victim is not None
            home = work / "flwr-home" / f"supernode-{victim}"
            [victim_pid] = pids_running(home, *SUPERNODE_PROGRAMS)
            running = psutil.Process(victim_pid).cmdline()
            os.kill(victim_pid, signal.SIGKILL)
            # Its SuperExec (the warm launcher that started it) follows it out:
            # only the new node's SuperExec is to poll the Runtime API port the
            # new node serves again.
            wait_for(
                lambda: not warm_launchers(home),
                "the dead SuperNode's SuperExec to exit",
                30,
                deployment,
                log,
            )
            restart = printed_command(log.read_text(), home)
            env = {**deployment_env(), "FLWR_HOME": str(home)}
            restarted_at = time.time()
            with background(restart, restart_log, env) as replacement:
                deployment.wait(timeout=DEPLOYMENT_TIMEOUT_S)
                replacement_alive = replacement.poll() is None
    finally:
        leftovers = stop_leftovers(work)

    # Assert: the printed command is the one that ran (the SuperNode's after
    # the warm launcher's `--`), the run completed
    output = log.read_text()
    assert restart[:3] == ["python", "-m", "afl_flwr.warm_exec"]
    node_command = restart[restart.index("--") + 1 :]
    assert node_command[:3] == ["python", "-m", "afl_flwr.supernode"]
    assert Path(running[0]).name.startswith("python")
    assert running[1:] == node_command[1:]
    assert f"partition-id={victim} num-partitions={nodes}" in restart
    assert deployment.returncode == 0, output[-6000:]
    assert "Run status: finished:completed" in output
    assert replacement_alive, restart_log.read_text()[-4000:]
    folder = next((work / "results").glob("async-*"))
    events = read_csv(folder / "events.csv")
    dead, new = supernode_id(node_logs[victim]), supernode_id(restart_log)
    assert new != dead  # a restarted SuperNode registers as a new node
    after = [e for e in events if int(e["node_id"]) == new and e["status"] == "merged"]
    assert after, f"no merged update from the restarted node {new}"
    since_restart = restarted_at - run_started_at(folder)
    assert min(float(e["wall_time"]) for e in after) > since_restart
    # It trained the victim's partition: its size, unlike the other partitions'.
    cfg = AppConfig.from_run_config(json.loads((folder / "config.json").read_text()))
    sizes = [len(client_trainset(cfg, p)) for p in range(nodes)]
    assert {float(e["num_examples"]) for e in after} == {sizes[victim]}
    assert sizes.count(sizes[victim]) == 1
    # The task it was killed in ended as a timeout (or the SuperLink's error
    # reply); an earlier one may have merged.
    dead_statuses = {e["status"] for e in events if int(e["node_id"]) == dead}
    assert dead_statuses & {"timeout", "rejected"}
    assert dead_statuses <= {"timeout", "rejected", "merged"}
    versions = [int(row["version"]) for row in read_csv(folder / "evals.csv")]
    assert versions == list(range(9))  # strictly increasing, no gap, no repeat
    assert leftovers == []


def test_killed_serverapp_resumes_from_its_checkpoint_without_gap(tmp_path):
    # Prepare
    work = tmp_path / "deployment"
    nodes, rounds = 3, 4
    log = tmp_path / "runbook.log"
    node_logs = [work / "logs" / f"supernode-{i}.log" for i in range(nodes)]
    superlink_home = work / "flwr-home" / "superlink"
    command = [
        *runbook(
            work,
            free_port(),
            free_port_block(nodes),
            nodes,
            f"num-server-rounds={rounds} {FAULT_RUN} checkpoint-every=1",
            tls=False,
        ),
        "--keep-running",
    ]

    def checkpoint_version() -> int:
        paths = list((work / "results").glob("async-*/checkpoint.npz"))
        return int(load_checkpoint(paths[0])[1]["version"]) if paths else -1

    # Execute: SIGKILL the ServerApp process once version 2 is checkpointed, stop
    # its run, and resume it with the `flwr run` the runbook prints.
    try:
        with background(command, log) as deployment:
            wait_for(
                lambda: checkpoint_version() >= 2,
                "the checkpoint of version 2",
                240,
                deployment,
                log,
            )
            [serverapp] = pids_running(superlink_home, "flwr-serverapp")
            os.kill(serverapp, signal.SIGKILL)
            wait_for(
                lambda: (
                    not psutil.pid_exists(serverapp)
                    or psutil.Process(serverapp).status() == psutil.STATUS_ZOMBIE
                ),
                "the ServerApp to die",
                10,
                deployment,
                log,
            )
            [checkpoint] = list((work / "results").glob("async-*/checkpoint.npz"))
            resumed_from = checkpoint_version()  # final: its writer is dead
            [dead_run] = re.findall(r"Successfully started run (\d+)", log.read_text())
            status_after_kill = run_statuses(work)[int(dead_run)]
            flwr_cli(work, "stop", dead_run, "afl-local")
            stale_at_stop = run_tasks_received(node_logs, dead_run)
            wait_for(
                lambda: "Another run" in log.read_text(),
                "the runbook to keep the deployment up",
                60,
                deployment,
                log,
            )
            another_run = printed_command(log.read_text(), work / "flwr-home" / "cli")
            resume = [*another_run, "--run-config", f"resume-from='{checkpoint}'"]
            env = {**deployment_env(), "FLWR_HOME": str(work / "flwr-home" / "cli")}
            resumed = run_bounded(resume, timeout=DEPLOYMENT_TIMEOUT_S, env=env)
            statuses = run_statuses(work)
            stale_at_end = run_tasks_received(node_logs, dead_run)
            still_up = deployment.poll() is None
    finally:
        leftovers = stop_leftovers(work, grace_s=20.0)

    # Assert: the dead run was stopped, the resumed one completed
    output = log.read_text()
    assert status_after_kill == "running"  # until Flower misses its heartbeat
    assert "Run status: finished:stopped" in output
    assert still_up, output[-6000:]
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert f"Resuming from {checkpoint} (version {resumed_from})" in resumed.stdout
    assert statuses.pop(int(dead_run)) == "finished:stopped"
    assert list(statuses.values()) == ["finished:completed"]
    # The resumed run's folder holds the whole history: checkpointed, then new.
    [folder] = [
        f for f in (work / "results").glob("async-*") if (f / "summary.json").exists()
    ]
    assert folder != checkpoint.parent
    assert json.loads((folder / "summary.json").read_text())["versions"] == rounds
    versions = [int(row["version"]) for row in read_csv(folder / "evals.csv")]
    assert versions == list(range(rounds + 1))  # no gap, no repeated version
    history = load_checkpoint(checkpoint)[1]["history"]
    saved = [p["version"] for p in history["evals"]]
    assert saved == list(range(resumed_from + 1))
    new_events = read_csv(folder / "events.csv")[len(history["events"]) :]
    merged_into = [int(e["merged_into"]) for e in new_events if e["merged_into"]]
    assert sorted(set(merged_into)) == list(range(resumed_from + 1, rounds + 1))
    # Every update of the resumed run started from the checkpoint or later.
    bases = [int(e["base_version"]) for e in new_events if e["base_version"]]
    assert bases
    assert min(bases) >= resumed_from
    # `flwr stop` dropped the dead run's queued tasks: no node received one after.
    assert stale_at_end == stale_at_stop
    assert leftovers == []
