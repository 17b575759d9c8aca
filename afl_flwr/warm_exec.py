r"""Flower's SuperExec with warm task processes, forked from a pre-imported template.

Under a SuperNode every message runs in a new ``flwr-clientapp`` process: its
SuperExec starts the command, which imports Flower's SuperNode CLI, FastAPI,
SQLAlchemy and the rest (about 1.5 CPU seconds) before it asks for its task.
This launcher is Flower's own ``flower-superexec`` (its argument parser, task
loop and plugin, unchanged) with one difference: a ``flwr-clientapp`` task
process is not started from scratch but forked from a **template** process that
imported ``flwr-clientapp``'s modules once, at start. The forked process then
runs Flower's ``flwr-clientapp`` entry point with the arguments Flower's
``SubprocessExecutor`` would have given the command, so every task still gets
a process of its own that runs once and exits; only the imports are inherited.

This is what Flower's prestarted warm workers do for Kubernetes and agent tasks
(``flwr.supercore.task_worker``), for local subprocess tasks. Run it in place
of ``flower-superexec`` beside a SuperNode started with ``--isolation
process``, or give it the SuperNode's command after ``--``: it then starts the
SuperNode, exits when the SuperNode exits and stops it when stopped, so one
command runs a node (``docker/run-local-deployment.sh`` runs each node so)::

    python -m afl_flwr.warm_exec --insecure --runtime-api-address 127.0.0.1:9200 -- \
        flower-supernode --isolation process --port 9200 ...

The template imports Flower only, never the app: a task loads the ``afl_flwr``
of the FAB it runs, as a cold process would. It is forked before the SuperExec
starts any thread, it forks each task process from its one thread, and it exits
when the SuperExec exits (its request pipe closes). Other task types (and
``--executor kubernetes``) go to Flower's own executor.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from types import FrameType
from typing import IO, Any

USAGE = """\
usage: python -m afl_flwr.warm_exec [flower-superexec options] [-- SUPERNODE COMMAND]

Flower's SuperExec with ClientApp task processes forked from a template that
imported flwr-clientapp once. After `--`, the command of the SuperNode to serve
(with `--isolation process`): it is started here, the SuperExec exits when it
does, and it is stopped when the SuperExec stops. flower-superexec's options:
"""

# What Flower's SubprocessExecutor starts for a ClientApp task.
TASK_COMMAND = "flwr-clientapp"


class Template:
    """The parent side of a template process: hands it task command lines.

    Parameters
    ----------
    pid : int
        The template's process id.
    requests : IO[bytes]
        The write end of its request pipe (one JSON line per task).
    """

    def __init__(self, pid: int, requests: IO[bytes]) -> None:
        self.pid = pid
        self._requests = requests
        self._lock = threading.Lock()

    @classmethod
    def start(cls, preload: Callable[[], Any] | None = None) -> "Template":
        """Fork the template; in it, run ``preload`` and then serve requests.

        Call it before the calling process starts threads (a fork copies the
        calling thread only). ``preload`` defaults to importing what
        ``flwr-clientapp`` imports.
        """
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the template: the default signal handling
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(write_fd)
            code = 1
            try:
                code = serve(os.fdopen(read_fd, "rb"), preload or _preload)
            finally:
                os._exit(code)
        os.close(read_fd)
        return cls(pid, os.fdopen(write_fd, "wb"))

    def launch(self, argv: Sequence[str], *, quiet: bool = False) -> None:
        """Have the template fork a process that runs ``argv``'s entry point.

        ``quiet`` sends the process's output to ``/dev/null``, as Flower's
        ``suppress_output`` does. Raises ``OSError`` when the template is gone.
        """
        line = json.dumps({"argv": list(argv), "quiet": quiet}).encode() + b"\n"
        with self._lock:
            self._requests.write(line)
            self._requests.flush()

    def close(self) -> None:
        """Close the request pipe: the template exits (its tasks run on)."""
        with self._lock:
            self._requests.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the pipe and reap the template; SIGKILL it after ``timeout`` s."""
        self.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return  # already reaped
            if pid:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.05)


def _preload() -> Any:
    """Import ``flwr-clientapp``'s entry point (and so Flower's client runtime)."""
    from flwr.supernode.cli import flwr_clientapp

    return flwr_clientapp


def serve(requests: IO[bytes], preload: Callable[[], Any]) -> int:
    """The template's loop: fork one task process per request line until EOF.

    Finished task processes are reaped as they exit. Returns the template's
    exit code.
    """
    entry = preload()

    def reap(_signum: int, _frame: FrameType | None) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    signal.signal(signal.SIGCHLD, reap)
    for line in requests:
        request = json.loads(line)
        if os.fork() == 0:
            requests.close()
            run_task(entry, request["argv"], quiet=bool(request["quiet"]))
    return 0


def run_task(entry: Callable[[], Any], argv: Sequence[str], *, quiet: bool) -> None:
    """In a forked process: run ``entry`` as the command ``argv``; never returns.

    ``sys.argv`` becomes ``argv`` with its first word resolved on ``PATH`` (so
    the process looks to Flower and the app as the ``flwr-clientapp`` command
    does); the exit code is the entry point's.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = [shutil.which(argv[0]) or argv[0], *argv[1:]]
        entry()
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # pylint: disable=broad-exception-caught
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def task_argv(spec: Any) -> list[str]:
    """The command line Flower's ``SubprocessExecutor.launch`` builds for ``spec``."""
    from flwr.supercore.constant import (
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
        TASK_TYPE_TO_COMMAND,
    )

    args = [
        TASK_TYPE_TO_COMMAND[spec.task_type],
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
        spec.runtime_api_address,
        "--token",
        spec.token,
    ]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def warm_executor_class() -> type:
    """Flower's ``SubprocessExecutor`` with ClientApp tasks forked from a template.

    If the template is gone (it died, or failed to import Flower), the executor
    logs it once and starts every later task process cold, as Flower does.
    """
    from flwr.common.logger import log
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import (
        SubprocessExecutor,
    )

    class WarmExecutor(SubprocessExecutor):  # type: ignore[misc]
        """Forks ``flwr-clientapp`` tasks from a template; the rest as Flower does."""

        def __init__(self, template: Template) -> None:
            self.template = template
            self.cold = False  # the template died: Flower's cold launch

        def launch(self, spec: Any) -> Any:
            if spec.task_type != TaskType.CLIENT_APP or self.cold:
                return super().launch(spec)
            try:
                self.template.launch(task_argv(spec), quiet=spec.suppress_output)
            except (OSError, ValueError) as err:
                log(
                    WARNING,
                    "The warm task template is gone (%s): starting task "
                    "processes cold from now on, as flower-superexec does",
                    err,
                )
                self.cold = True
                return super().launch(spec)
            return LaunchResult.accepted()

        def close(self) -> None:
            self.template.close()
            super().close()

    return WarmExecutor


def install(template: Template) -> None:
    """Make Flower's SuperExec use the template for its subprocess executor.

    Replaces the ``get_executor`` that ``flwr.supercore.superexec.run_superexec``
    calls; a Kubernetes executor is still Flower's own.
    """
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec

    flower_get_executor = run_superexec.get_executor
    executor_class = warm_executor_class()

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            return executor_class(template)
        return flower_get_executor(executor_type, *args, **kwargs)

    run_superexec.get_executor = get_executor


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``flower-superexec`` arguments, and the SuperNode command after ``--``."""
    args = list(argv)
    if "--" not in args:
        return args, []
    cut = args.index("--")
    return args[:cut], args[cut + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flower-superexec`` with ClientApp tasks forked warm; its exit code.

    ``argv`` is ``flower-superexec``'s arguments, optionally followed by ``--``
    and the command of the SuperNode to serve (started with ``--isolation
    process``): that SuperNode is then started here, watched as the SuperExec's
    ``--parent-pid`` (the SuperExec exits when it does) and stopped when the
    SuperExec stops, so one command runs a node.
    """
    superexec_args, supernode_command = split_command(
        sys.argv[1:] if argv is None else argv
    )
    if {"-h", "--help"} & set(superexec_args):
        print(USAGE, flush=True)
        from flwr.supercore.cli import flower_superexec

        sys.argv = ["flower-superexec", "--help"]
        flower_superexec()  # prints its options and exits
    # SIGTERM/SIGINT are recorded, and unwind through the `finally` below (which
    # stops the SuperNode and the template) only once the children are known;
    # Flower's SuperExec later installs its own handlers.
    signals = _Signals()
    template: Template | None = None
    supernode: subprocess.Popen[bytes] | None = None
    code = 0
    try:
        template = Template.start()  # before any thread or child exists
        if supernode_command:
            try:
                supernode = subprocess.Popen(supernode_command)
            except OSError as err:
                print(
                    f"error: cannot start the SuperNode command after '--' "
                    f"({supernode_command[0]!r}): {err}",
                    file=sys.stderr,
                )
                return 2
            superexec_args += ["--parent-pid", str(supernode.pid)]
            # Reap it as soon as it exits: the SuperExec's parent monitor sees
            # a zombie as alive.
            threading.Thread(target=supernode.wait, daemon=True).start()
        signals.arm()  # a signal that came meanwhile is raised now
        from flwr.common.logger import log
        from flwr.supercore.cli import flower_superexec

        install(template)
        log(
            INFO,
            "Warm task launcher: ClientApp tasks fork from template %d",
            template.pid,
        )
        sys.argv = [
            shutil.which("flower-superexec") or "flower-superexec",
            *superexec_args,
        ]
        flower_superexec()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    finally:
        signals.disarm()  # a second signal must not cut the cleanup short
        if supernode is not None:
            _stop(supernode)
        if template is not None:
            template.stop()
    if supernode is not None and supernode.returncode not in (None, 0) and code == 0:
        code = 1
    return code


class _Signals:
    """SIGTERM and SIGINT, recorded; raised as ``SystemExit`` only while armed."""

    NUMBERS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.armed = False
        self.pending: list[int] = []
        self.install()

    def install(self) -> None:
        """Make this object the handler of both signals."""
        for signum in self.NUMBERS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.pending.append(signum)
        if self.armed:
            raise SystemExit(128 + signum)

    def arm(self) -> None:
        """Raise from now on, and at once for a signal recorded before."""
        self.armed = True
        if self.pending:
            raise SystemExit(128 + self.pending[0])

    def disarm(self) -> None:
        """Record only (taking both signals back from Flower's handlers)."""
        self.armed = False
        self.install()


# Seconds a SuperNode gets to stop after SIGTERM before it is killed.
STOP_GRACE_S = 10.0


def _stop(process: "subprocess.Popen[bytes]") -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
