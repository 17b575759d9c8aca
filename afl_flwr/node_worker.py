"""A long-lived trainer per node: warm train tasks under a SuperNode.

A SuperNode runs every message in a new ``flwr-clientapp`` process, so each
train task would import torch, load its partition, build the model and run a
cold first epoch. With the node worker the task process stays light (Flower,
numpy and this module): it hands the received arrays and the task's config to
one process per (run, node) that keeps torch, the partition and its warm
kernels between tasks, and returns what that process trained.

The worker also answers the node's profile query (``query.profile``, the first
message a node gets under the virtual clock), then warms up
(:func:`afl_flwr.client_task.warm_up`: the partition read and a throwaway
two-batch training pass) while the SuperNode sleeps before its next pull, so a
node's first train task is as warm as its later ones.

The worker is started by the first task of a run on a node, listens on a Unix
socket in a per-user folder (mode 0700, an authentication key beside it) and
exits when

* the process that started that task's process exits (the SuperNode's
  SuperExec, or the template of :mod:`afl_flwr.warm_exec`; both exit with
  their SuperNode), or
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

Run as ``python -m afl_flwr.node_worker --address A --watch-pid P`` (plus
``--lock-fd`` and ``--warm-up`` when a task starts it).
"""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import psutil

# What a request asks (its "op"; a request without one trains).
TRAIN = "train"
PROFILE = "profile"
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
        ``run_config`` and ``node_config``; to train (``op`` absent or
        :data:`TRAIN`), also ``config`` (the task's config record) and
        ``arrays`` (the received model, name -> ``np.ndarray``); ``op`` =
        :data:`PROFILE` asks for the node's profile instead (the worker then
        warms up, :func:`~afl_flwr.client_task.warm_up`, after answering).
    watch_pid : int
        The process a new worker lives as long as (the SuperExec).
    idle_timeout_s : float (default: IDLE_TIMEOUT_S)
        A new worker exits after this long without a task.

    Returns
    -------
    dict[str, Any]
        ``arrays`` (the trained model), ``metrics``, ``timing`` (data, model,
        train seconds and the worker's pid); for :data:`PROFILE`, ``profile``
        (the :class:`~afl_flwr.clock.NodeProfile`'s fields) and ``timing``.

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
        what = "the profile query" if request.get("op") == PROFILE else "training"
        raise RuntimeError(f"{what} failed in the node worker:\n{answer['error']}")
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
    with _start_lock(address) as lock:
        connection = _connect(address)  # another task may have started it
        if connection is not None:
            return connection
        process = _spawn(address, watch_pid, idle_timeout_s, lock, warm_up=None)
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


def prestart(
    address: Path,
    warm_up: Mapping[str, Any],
    *,
    watch_pid: int,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> bool:
    """Start the node's worker without waiting for it; whether one was started.

    The new worker imports torch and warms up on ``warm_up`` (``run_config``
    and ``node_config``; :func:`~afl_flwr.client_task.warm_up`) before it
    listens, holding the start lock until then: a task that comes meanwhile
    waits for it (:func:`call_worker`) instead of starting a second one.
    Nothing is started when a worker already answers.
    """
    with _start_lock(address) as lock:
        connection = _connect(address)
        if connection is not None:
            connection.close()
            return False
        _spawn(address, watch_pid, idle_timeout_s, lock, warm_up=warm_up)
        return True


@contextlib.contextmanager
def _start_lock(address: Path) -> Iterator[int]:
    """Hold the node's start lock (bounded wait); yields its file descriptor.

    A worker being started holds the lock too (it inherits the descriptor) and
    lets go once it listens, or when it dies.
    """
    fd = os.open(address.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the node worker at {address} did not start within "
                        f"{START_TIMEOUT_S:.0f} s; its log: {_log_path(address)}"
                    ) from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)


def _spawn(
    address: Path,
    watch_pid: int,
    idle_timeout_s: float,
    lock_fd: int,
    *,
    warm_up: Mapping[str, Any] | None,
) -> subprocess.Popen[bytes]:
    """Write a fresh key and start ``python -m afl_flwr.node_worker`` (not waited)."""
    address.unlink(missing_ok=True)
    key = _key_path(address)
    key.unlink(missing_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    command = [
        sys.executable,
        "-m",
        "afl_flwr.node_worker",
        "--address",
        str(address),
        "--watch-pid",
        str(watch_pid),
        "--idle-timeout",
        str(idle_timeout_s),
        "--lock-fd",
        str(lock_fd),
    ]
    if warm_up is not None:
        spec = address.with_suffix(".warm-up.json")
        fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({k: dict(warm_up[k]) for k in ("run_config", "node_config")}, out)
        command += ["--warm-up", str(spec)]
    with open(_log_path(address), "ab") as log_file:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
            pass_fds=(lock_fd,),
            env=worker_env(),
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


def serve(
    address: Path,
    watch_pid: int,
    idle_timeout_s: float,
    *,
    lock_fd: int | None = None,
    warm_up_spec: Path | None = None,
) -> None:
    """Answer tasks on ``address`` until ``watch_pid`` exits or it idles.

    ``lock_fd`` is the start lock inherited from the starting task, released
    once listening; ``warm_up_spec`` a JSON file (``run_config``,
    ``node_config``) to warm up on before that.
    """
    from afl_flwr.client_task import (  # torch: here, not in the task
        fit_model,
        node_partition,
        node_profile,
        warm_up,
    )
    from afl_flwr.config import AppConfig

    state = {"last": time.monotonic(), "busy": True}

    def stop(*_: Any) -> None:
        lock = address.with_suffix(".lock")
        spec = address.with_suffix(".warm-up.json")
        for path in (address, _key_path(address), _log_path(address), lock, spec):
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
    if warm_up_spec is not None:
        try:
            spec = json.loads(warm_up_spec.read_text())
            warm_up_spec.unlink()
            cfg = AppConfig.from_run_config(spec["run_config"])
            seconds = warm_up(cfg, spec["node_config"])
            print(f"warmed up in {seconds:.3f} s", flush=True)
        except Exception:  # a failed warm-up costs only its time
            print(f"warm-up failed:\n{traceback.format_exc()}", flush=True)
    key = _key_path(address).read_bytes()
    listener = Listener(str(address), family="AF_UNIX", authkey=key)
    if lock_fd is not None:
        os.close(lock_fd)  # tasks waiting to start a worker now find this one
    state.update(busy=False, last=time.monotonic())
    print(f"node worker {os.getpid()} listening on {address}", flush=True)
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError) as error:  # a client that failed to authenticate
            print(f"refused a connection: {error!r}", flush=True)
            continue
        with connection:
            state["busy"] = True
            request: dict[str, Any] = {}
            try:
                request = connection.recv()
                cfg = AppConfig.from_run_config(request["run_config"])
                node_config = request["node_config"]
                if request.get("op", TRAIN) == PROFILE:
                    profile = node_profile(
                        node_config, cfg, node_partition(node_config, cfg)
                    )
                    answer: dict[str, Any] = {
                        "profile": dataclasses.asdict(profile),
                        "timing": {"worker": float(os.getpid())},
                    }
                else:
                    fit = fit_model(
                        request["arrays"], request["config"], cfg, node_config
                    )
                    answer = {
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
            try:
                if request.get("op") == PROFILE and "error" not in answer:
                    # While the SuperNode sleeps before its next pull
                    print(f"warmed up in {warm_up(cfg, node_config):.3f} s", flush=True)
            except Exception:  # a failed warm-up costs only its time
                print(f"warm-up failed:\n{traceback.format_exc()}", flush=True)
            finally:
                state["busy"] = False
                state["last"] = time.monotonic()


def main(argv: list[str] | None = None) -> None:
    """``python -m afl_flwr.node_worker --address A --watch-pid P``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", type=Path, required=True)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S)
    parser.add_argument("--lock-fd", type=int, default=None)
    parser.add_argument("--warm-up", type=Path, default=None)
    args = parser.parse_args(argv)
    serve(
        args.address,
        args.watch_pid,
        args.idle_timeout,
        lock_fd=args.lock_fd,
        warm_up_spec=args.warm_up,
    )


if __name__ == "__main__":
    main()
