"""The warm task launcher: Flower's SuperExec, task processes forked from a template.

The command a forked task runs is checked against the one Flower's own
``SubprocessExecutor`` starts (its ``Popen`` call recorded); the template, the
executor's routing and the launcher's life cycle around a SuperNode command run
for real, bounded in time, every process stopped by pid.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import psutil
import pytest
from conftest import kill_group
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, subprocess_executor

from afl_flwr import warm_exec

SPECS = [
    {"insecure": True, "root_certificates_path": None, "parent_pid": None},
    {"insecure": False, "root_certificates_path": "/certs/ca.crt", "parent_pid": 42},
    {
        "insecure": False,
        "root_certificates_path": None,
        "parent_pid": 7,
        "runtime_dependency_install": True,
    },
]


def spec(task_type=TaskType.CLIENT_APP, **fields):
    values = {
        "task_type": task_type,
        "runtime_api_address": "127.0.0.1:9200",
        "token": "secret-token",
        "insecure": True,
        "root_certificates_path": None,
        "runtime_dependency_install": False,
        "parent_pid": None,
        "suppress_output": False,
        "task_id": 1,
    }
    values.update(fields)
    return ExecutionSpec(**values)


@pytest.mark.parametrize("fields", SPECS)
def test_task_command_is_the_one_flowers_subprocess_executor_starts(fields):
    task = spec(**fields)
    with mock.patch.object(subprocess_executor.subprocess, "Popen") as popen:
        subprocess_executor.SubprocessExecutor().launch(task)
    [call] = popen.call_args_list
    assert warm_exec.task_argv(task) == call.args[0]
    assert warm_exec.task_argv(task)[0] == warm_exec.TASK_COMMAND


def record_argv(path):
    """A template preload whose 'entry point' writes sys.argv and exits 3."""

    def preload():
        def entry():
            print("task output")
            Path(path).write_text(json.dumps({"argv": sys.argv, "ppid": os.getppid()}))
            sys.exit(3)

        return entry

    return preload


def wait_for_file(path, timeout=30.0):
    deadline = time.time() + timeout
    while not path.exists() or not path.read_text():
        assert time.time() < deadline, f"{path} not written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_the_template_forks_each_task_and_exits_when_its_pipe_closes(tmp_path):
    # Prepare
    out = tmp_path / "argv.json"
    template = warm_exec.Template.start(record_argv(out))

    # Execute
    try:
        template.launch(["flwr-clientapp", "--token", "t"], quiet=True)
        seen = wait_for_file(out)
        template.close()
        _, status = os.waitpid(template.pid, 0)
    finally:
        with_pid = psutil.pid_exists(template.pid)
        if with_pid:
            os.kill(template.pid, signal.SIGKILL)

    # Assert: the task ran in a child of the template, named as the command
    assert seen["ppid"] == template.pid
    assert Path(seen["argv"][0]).name == "flwr-clientapp"
    assert seen["argv"][1:] == ["--token", "t"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


FORKED_TASK = """
import json, os, sys
from pathlib import Path
from afl_flwr import warm_exec

def entry():
    print("task output")
    Path(sys.argv[-1]).write_text(json.dumps(sys.argv))
    sys.exit(3)

pid = os.fork()
if pid == 0:
    warm_exec.run_task(entry, ["flwr-clientapp", sys.argv[2]], quiet=sys.argv[1] == "1")
_, status = os.waitpid(pid, 0)
print("exit", os.WEXITSTATUS(status))
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_a_forked_task_keeps_the_entry_points_exit_code_and_output(tmp_path, quiet):
    out = tmp_path / "argv.json"
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_TASK, str(int(quiet)), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout == ("" if quiet else "task output\n") + "exit 3\n"
    argv = json.loads(out.read_text())
    assert Path(argv[0]).name == "flwr-clientapp" and argv[1:] == [str(out)]


def test_the_warm_executor_forks_clientapps_and_leaves_the_rest_to_flower():
    template = mock.Mock(spec=warm_exec.Template)
    executor = warm_exec.warm_executor_class()(template)
    task = spec(suppress_output=True)
    assert executor.launch(task).status.value == "accepted"
    template.launch.assert_called_once_with(warm_exec.task_argv(task), quiet=True)
    with mock.patch.object(subprocess_executor.subprocess, "Popen") as popen:
        executor.launch(spec(TaskType.SERVER_APP))
    [call] = popen.call_args_list
    assert call.args[0][0] == "flwr-serverapp"
    assert template.launch.call_count == 1
    # A dead template: this task and every later one start cold, as Flower's
    template.launch.side_effect = BrokenPipeError("broken pipe")
    with mock.patch.object(subprocess_executor.subprocess, "Popen") as popen:
        assert executor.launch(task).status.value == "accepted"
        assert executor.launch(task).status.value == "accepted"
    assert [c.args[0] for c in popen.call_args_list] == [warm_exec.task_argv(task)] * 2
    assert template.launch.call_count == 2


def test_split_command_takes_the_supernode_after_the_separator():
    assert warm_exec.split_command(["--insecure"]) == (["--insecure"], [])
    assert warm_exec.split_command(["--insecure", "--", "flower-supernode", "-x"]) == (
        ["--insecure"],
        ["flower-supernode", "-x"],
    )


def launcher(node_command, log):
    """The launcher around ``node_command`` (nothing serves its Runtime API)."""
    with SocketPort() as port:
        command = [
            sys.executable,
            "-m",
            "afl_flwr.warm_exec",
            "--insecure",
            "--runtime-api-address",
            f"127.0.0.1:{port}",
            "--",
            *node_command,
        ]
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


class SocketPort:
    """A free loopback port (closed again on entry's exit)."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def family(pid):
    """``pid`` and its descendants still running (zombies have ended)."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in members if running(p)]


def running(proc):
    """Alive and not a zombie (Flower's imports spawn short-lived helpers)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(members, timeout=20.0):
    """The ``members`` still running after up to ``timeout`` seconds."""
    deadline = time.time() + timeout
    while (left := [p for p in members if running(p)]) and time.time() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.process
@pytest.mark.timeout(120)
def test_the_launcher_exits_with_its_supernode_and_stops_it_when_stopped(tmp_path):
    # A stand-in SuperNode that lives 3 s: the launcher and its template follow
    # it out. One that would live 600 s: SIGTERM to the launcher stops it.
    short = [sys.executable, "-c", "import time; time.sleep(3)"]
    long = [sys.executable, "-c", "import time; time.sleep(600)"]
    with (tmp_path / "short.log").open("w") as log:
        proc = launcher(short, log)
        try:
            proc.wait(timeout=60)
        finally:
            kill_group(proc.pid)
    with (tmp_path / "long.log").open("w") as log:
        proc = launcher(long, log)
        try:
            deadline = time.time() + 60
            started = "Warm task launcher: ClientApp tasks fork from template"
            while started not in (tmp_path / "long.log").read_text():
                assert time.time() < deadline, (tmp_path / "long.log").read_text()
                time.sleep(0.2)
            members = family(proc.pid)
            commands = []
            for member in members:
                with contextlib.suppress(psutil.Error):
                    commands.append(" ".join(member.cmdline()))
            # the launcher, its template and the SuperNode (at least)
            assert sum("afl_flwr.warm_exec" in c for c in commands) >= 2, commands
            assert any("time.sleep(600)" in c for c in commands), commands
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            alive = still_running(members)
        finally:
            kill_group(proc.pid)
    output = (tmp_path / "long.log").read_text()
    assert alive == [], output[-3000:]
    assert proc.returncode != 0


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_launcher_stopped_while_it_starts_still_stops_its_supernode(tmp_path):
    long = [sys.executable, "-c", "import time; time.sleep(600)"]
    with (tmp_path / "long.log").open("w") as log:
        proc = launcher(long, log)
        try:
            deadline = time.time() + 60
            while len(family(proc.pid)) < 3:  # launcher, template, SuperNode
                assert time.time() < deadline, (tmp_path / "long.log").read_text()
                time.sleep(0.02)
            members = family(proc.pid)
            proc.send_signal(signal.SIGTERM)  # most likely before Flower's handlers
            proc.wait(timeout=60)
            alive = still_running(members)
        finally:
            kill_group(proc.pid)
    assert alive == [], (tmp_path / "long.log").read_text()[-3000:]


def run_launcher(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m afl_flwr.warm_exec ARGS`` to its end (bounded), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "afl_flwr.warm_exec", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_names_the_supernode_separator_and_flowers_options():
    proc = run_launcher("--help")
    assert proc.returncode == 0
    assert "[-- SUPERNODE COMMAND]" in proc.stdout
    assert "--runtime-api-address" in proc.stdout  # flower-superexec's own help
    assert "Warm task launcher" not in proc.stdout + proc.stderr  # nothing started


def test_a_supernode_command_that_cannot_start_is_named_and_exits_2():
    with SocketPort() as port:
        address = f"127.0.0.1:{port}"
    proc = run_launcher(
        "--insecure", "--runtime-api-address", address, "--", "no-such-cmd"
    )
    assert proc.returncode == 2
    assert "cannot start the SuperNode command after '--'" in proc.stderr
    assert "'no-such-cmd'" in proc.stderr
    assert "Traceback" not in proc.stderr
