"""A long-lived trainer per node: warm train tasks under a SuperNode.

A SuperNode runs every message in a new ``flwr-clientapp`` process, so each
train task would import torch, load its partition, build the model and run a
cold first epoch. With the node worker the task process stays light (Flower,
numpy and this module): it hands the received arrays and the task's config to
one process per (run, node) that keeps torch, the partition and its warm
kernels between tasks, and returns what that process trained.

The worker is started by the first task of a run on a node, listens on a Unix
socket in a per-user folder (mode 0700, an authentication key beside it) and
exits when

* the process that started that task's process exits (the SuperNode's
  SuperExec, which exits with its SuperNode), or
* no task has come for ``idle_timeout_s`` seconds (default
  :data:`IDLE_TIMEOUT_S`), e.g. after its run ended, or
* it gets SIGTERM, SIGINT or SIGHUP (a process group stopped as a whole).

It then removes its socket, key, log and lock file; a worker that crashed
leaves its log (the task that finds it dead names the file). A SuperNode runs
one message at a time, so two tasks of one node never start workers at once;
the lock is for launchers that would.

A task that finds no worker, or a dead one, starts a new one (one at a time per
node, under a file lock). An error in training comes back as the task's error
with the worker's traceback; a worker that dies during a task fails that task
only. Training is :func:`afl_flwr.client_task.fit_model`, the same function a
task runs in its own process, so the reply is the same bit for bit.

Run as ``python -m afl_flwr.node_worker --address A --watch-pid P``.
"""

import argparse
import contextlib
import fcntl
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import psutil

# A worker exits after this long without a task.
IDLE_TIMEOUT_S = 300.0
# How long a task waits for a new worker to listen (it imports torch first).
START_TIMEOUT_S = 120.0
# How often the worker checks the process it watches and its idle time.
WATCH_INTERVAL_S = 0.5


# Longest socket path Linux accepts (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def worker_dir() -> Path:
    """The folder of worker sockets, keys and logs (this user's, mode 0700).

    ``$AFL_FLWR_WORKER_DIR`` when set, else ``afl-flwr-workers-<uid>`` in the
    system's temporary folder.
    """
    configured = os.environ.get("AFL_FLWR_WORKER_DIR")
    path = (
        Path(configured)
        if configured
        else Path(tempfile.gettempdir()) / f"afl-flwr-workers-{os.getuid()}"
    )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
        raise PermissionError(
            f"{path} must belong to this user with mode 0700 (it holds the node "
            "workers' keys); remove it or set AFL_FLWR_WORKER_DIR"
        )
    return path


def worker_address(run_id: int, node_id: int) -> Path:
    """The socket of the worker of one node in one run (a short, unique name)."""
    stem = hashlib.sha1(f"{run_id}-{node_id}".encode()).hexdigest()[:16]
    address = worker_dir() / f"{stem}.sock"
    if len(os.fsencode(address)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"the node worker's socket path {address} is longer than "
            f"{MAX_SOCKET_PATH} bytes; set AFL_FLWR_WORKER_DIR to a shorter folder"
        )
    return address


def call_worker(
    address: Path,
    request: Mapping[str, Any],
    *,
    watch_pid: int,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> dict[str, Any]:
    """Send one task to the node's worker (starting it if needed); its answer.

    Parameters
    ----------
    address : Path
        The worker's socket (:func:`worker_address`).
    request : Mapping[str, Any]
        ``run_config``, ``node_config``, ``config`` (the task's config record)
        and ``arrays`` (the received model, name -> ``np.ndarray``).
    watch_pid : int
        The process a new worker lives as long as (the SuperExec).
    idle_timeout_s : float (default: IDLE_TIMEOUT_S)
        A new worker exits after this long without a task.

    Returns
    -------
    dict[str, Any]
        ``arrays`` (the trained model), ``metrics``, ``timing`` (data, model,
        train seconds and the worker's pid).

    Raises
    ------
    RuntimeError
        When training failed in the worker (with its traceback), the worker
        died during the task, or a new one did not start.
    """
    connection = _connect(address)
    if connection is None:
        connection = _start(address, watch_pid, idle_timeout_s)
    with connection:
        try:
            connection.send(dict(request))
            answer = connection.recv()
        except (EOFError, OSError) as error:
            raise RuntimeError(
                f"the node worker at {address} exited during the task ({error}); "
                f"its log: {_log_path(address)}"
            ) from error
    if "error" in answer:
        raise RuntimeError(f"training failed in the node worker:\n{answer['error']}")
    return answer


def _key_path(address: Path) -> Path:
    return address.with_suffix(".key")


def _log_path(address: Path) -> Path:
    return address.with_suffix(".log")


def _connect(address: Path) -> Connection | None:
    """A connection to a listening worker, or None (absent, or its socket stale)."""
    try:
        key = _key_path(address).read_bytes()
        return Client(str(address), family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError):
        # No socket or key, nobody listening (a killed worker's socket), or a
        # worker that went away while answering the handshake.
        return None


def _start(address: Path, watch_pid: int, idle_timeout_s: float) -> Connection:
    """Start the node's worker (one task at a time does) and connect to it."""
    with open(address.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        connection = _connect(address)  # another task may have started it
        if connection is not None:
            return connection
        address.unlink(missing_ok=True)
        key = _key_path(address)
        key.unlink(missing_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
        with open(_log_path(address), "ab") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "afl_flwr.node_worker",
                    "--address",
                    str(address),
                    "--watch-pid",
                    str(watch_pid),
                    "--idle-timeout",
                    str(idle_timeout_s),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                close_fds=True,
                env=worker_env(),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the node worker exited with code {process.returncode} before "
                    f"listening; its log: {_log_path(address)}"
                )
            if address.exists():
                connection = _connect(address)
                if connection is not None:
                    return connection
            time.sleep(0.05)
        process.kill()
        raise RuntimeError(
            f"the node worker did not listen within {START_TIMEOUT_S:.0f} s; its "
            f"log: {_log_path(address)}"
        )


def worker_env() -> dict[str, str]:
    """A new worker's environment: ours, with our ``afl_flwr`` first on the path.

    A SuperNode imports the app from the FAB it installed for the run, which
    need not be (or match) a copy installed in the interpreter: the worker
    imports the same package as the task that starts it.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, path) if p),
    }


# ------------------------------------------------------------------ the worker
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (and is not a zombie)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. another user's process: it exists
        return True


def serve(address: Path, watch_pid: int, idle_timeout_s: float) -> None:
    """Answer train tasks on ``address`` until ``watch_pid`` exits or it idles."""
    from afl_flwr.client_task import fit_model  # torch: here, not in the task
    from afl_flwr.config import AppConfig

    key = _key_path(address).read_bytes()
    listener = Listener(str(address), family="AF_UNIX", authkey=key)
    state = {"last": time.monotonic(), "busy": False}

    def stop(*_: Any) -> None:
        lock = address.with_suffix(".lock")
        for path in (address, _key_path(address), _log_path(address), lock):
            with contextlib.suppress(OSError):
                path.unlink()
        os._exit(0)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)

    def watch() -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            idle = time.monotonic() - state["last"]
            if not pid_alive(watch_pid) or (
                not state["busy"] and idle > idle_timeout_s
            ):
                stop()

    threading.Thread(target=watch, name="afl-flwr-watch", daemon=True).start()
    print(f"node worker {os.getpid()} listening on {address}", flush=True)
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError) as error:  # a client that failed to authenticate
            print(f"refused a connection: {error!r}", flush=True)
            continue
        with connection:
            state["busy"] = True
            try:
                request = connection.recv()
                cfg = AppConfig.from_run_config(request["run_config"])
                fit = fit_model(
                    request["arrays"], request["config"], cfg, request["node_config"]
                )
                answer: dict[str, Any] = {
                    "arrays": {
                        k: v.detach().cpu().numpy()
                        for k, v in fit.model.state_dict().items()
                    },
                    "metrics": dict(fit.metrics),
                    "timing": {**fit.timing, "worker": float(os.getpid())},
                }
            except Exception:
                answer = {"error": traceback.format_exc()}
            try:
                connection.send(answer)
            except OSError as error:
                print(f"could not answer a task: {error!r}", flush=True)
            finally:
                state["busy"] = False
                state["last"] = time.monotonic()


def main(argv: list[str] | None = None) -> None:
    """``python -m afl_flwr.node_worker --address A --watch-pid P``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", type=Path, required=True)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S)
    args = parser.parse_args(argv)
    serve(args.address, args.watch_pid, args.idle_timeout)


if __name__ == "__main__":
    main()
