"""The node worker: warm train tasks, the same replies, and a bounded lifetime.

Every worker a test starts watches a ``sleep`` process the test owns and is
stopped by pid at the end, also on failure.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from afl_flwr import node_worker
from afl_flwr.client_app import (
    profile_on_worker,
    train,
    train_on_worker,
    uses_node_worker,
)
from afl_flwr.client_task import build_model, query_profile
from afl_flwr.config import AppConfig, ConfigError

RUN_CONFIG = {
    "model": "small-cnn",
    "num-clients": 10,
    "local-epochs": 1,
    "max-delay-s": 0.0,
}


@pytest.fixture
def workers(monkeypatch, mnist_dir, short_dir):
    """A private worker folder, a process for workers to watch, cleanup by pid."""
    monkeypatch.setenv("AFL_FLWR_WORKER_DIR", str(short_dir))
    watched = subprocess.Popen(["sleep", "600"])
    started: list[int] = []
    try:
        yield {
            "dir": node_worker.worker_dir(),
            "watched": watched,
            "started": started,
            "run_config": {**RUN_CONFIG, "data-dir": str(mnist_dir)},
        }
    finally:
        for pid in {*started, *_logged_pids(node_worker.worker_dir())}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        watched.kill()
        watched.wait()


@pytest.fixture
def task_process(workers, monkeypatch, request):
    """This process as a task process: its parent is the process workers watch.

    One intra-op thread here and in the workers (a float sum's order depends
    on the thread count).
    """
    monkeypatch.setattr(os, "getppid", lambda: workers["watched"].pid)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))


def _logged_pids(folder: Path) -> list[int]:
    pids = []
    for log in folder.glob("*.log"):
        pids += [
            int(p) for p in re.findall(r"node worker (\d+) listening", log.read_text())
        ]
    return pids


def _context(node: int = 1) -> Context:
    return Context(
        run_id=7,
        node_id=node,
        node_config={"partition-id": node - 1, "num-partitions": 10},
        state=RecordDict(),
        run_config={},
    )


def _message(seed: int) -> Message:
    torch.manual_seed(0)
    cfg = AppConfig.from_run_config(RUN_CONFIG)
    content = RecordDict(
        {
            "arrays": ArrayRecord(build_model(cfg).state_dict()),
            "config": ConfigRecord({"task-seed": seed, "delay": 1, "local-epochs": 1}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node_worker.pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def _call(address, workers, request, **kwargs):
    answer = node_worker.call_worker(
        address, request, watch_pid=workers["watched"].pid, **kwargs
    )
    workers["started"].append(int(answer["timing"]["worker"]))
    return answer


@pytest.mark.timeout(300)
def test_worker_replies_bit_identically_and_stays_warm_until_its_node_goes(
    workers, task_process
):
    # Prepare (task_process: the worker watches this process's parent; one
    # intra-op thread on both sides)
    cfg = AppConfig.from_run_config(workers["run_config"])
    context = _context()

    # Execute: two tasks in this process, the same two on the node's worker
    local = [train(_message(seed), context, cfg) for seed in (3, 4)]
    remote = [
        train_on_worker(_message(seed), context, workers["run_config"])
        for seed in (3, 4)
    ]

    # Assert: the same weights bit for bit, the same metrics
    for here, there in zip(local, remote, strict=True):
        a, b = _arrays(here), _arrays(there)
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name], b[name])
        assert dict(here.content["metrics"]) == dict(there.content["metrics"])
    # One worker served both tasks
    pids = _logged_pids(workers["dir"])
    workers["started"].extend(pids)
    assert len(pids) == 1 and node_worker.pid_alive(pids[0])
    address = node_worker.worker_address(7, 1)
    assert address.exists()
    # The node goes: the worker exits and removes its socket and key
    workers["watched"].kill()
    workers["watched"].wait()
    assert _wait_gone(pids[0])
    assert not address.exists() and not address.with_suffix(".key").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cache", ["on", "off"])
def test_the_profile_query_starts_a_worker_that_warms_up_and_trains_identically(
    workers, task_process, monkeypatch, cache
):
    # Prepare: as above; with the cache on the partition's file exists (the
    # task process answers from it and starts the worker without waiting), off
    # the worker answers
    cfg = AppConfig.from_run_config(workers["run_config"])
    context = _context(node=3)
    query = Message(content=RecordDict(), dst_node_id=3, message_type="query.profile")
    here = query_profile(query, context, cfg)  # loads (and caches) the partition
    if cache == "off":
        monkeypatch.setenv("AFL_FLWR_CACHE_DIR", "off")

    # Execute: the profile, then at once a train task (the worker may still be
    # warming up), here and on the worker
    there = profile_on_worker(query, context, workers["run_config"])
    remote = train_on_worker(_message(5), context, workers["run_config"])
    local = train(_message(5), context, cfg)

    # Assert: the same profile record; one worker, which warmed up before the
    # train task; the same trained weights bit for bit
    assert dict(there.content["profile"]) == dict(here.content["profile"])
    assert there.content["profile"]["partition-id"] == 2
    pids = _logged_pids(workers["dir"])
    workers["started"].extend(pids)
    assert len(pids) == 1
    [log] = workers["dir"].glob("*.log")
    assert re.search(r"warmed up in [\d.]+ s", log.read_text())
    assert not list(workers["dir"].glob("*.warm-up.json"))
    a, b = _arrays(local), _arrays(remote)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert dict(local.content["metrics"]) == dict(remote.content["metrics"])


def test_a_cached_partition_is_sized_without_torch(mnist_dir):
    # Prepare: the partition's cache file (the fixture's cache folder)
    cfg = AppConfig.from_run_config({**RUN_CONFIG, "data-dir": str(mnist_dir)})
    context = _context(node=2)
    query = Message(content=RecordDict(), dst_node_id=2, message_type="query.profile")
    expected = dict(query_profile(query, context, cfg).content["profile"])
    code = (
        "import sys, json\n"
        "from afl_flwr.config import AppConfig\n"
        "from afl_flwr.profiles import cached_profile\n"
        f"cfg = AppConfig.from_run_config({cfg_literal(mnist_dir)})\n"
        "p = cached_profile({'partition-id': 1, 'num-partitions': 10}, cfg)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(json.dumps(dict(p.to_record())))\n"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )

    # Assert
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def cfg_literal(mnist_dir) -> str:
    return repr({**RUN_CONFIG, "data-dir": str(mnist_dir)})


@pytest.mark.timeout(300)
def test_an_idle_or_killed_worker_is_replaced_by_the_next_task(workers):
    # Prepare
    address = node_worker.worker_address(8, 2)
    request = {
        "run_config": workers["run_config"],
        "node_config": {"partition-id": 1},
        "config": {"task-seed": 1},
        "arrays": {
            k: v.numpy()
            for k, v in build_model(AppConfig.from_run_config(RUN_CONFIG))
            .state_dict()
            .items()
        },
    }

    # Execute: a worker that idles out after 1 s, then one SIGKILLed (its
    # socket file stays behind), each followed by a task
    first = _call(address, workers, request, idle_timeout_s=1.0)["timing"]["worker"]
    assert _wait_gone(int(first))
    second = _call(address, workers, request)["timing"]["worker"]
    os.kill(int(second), signal.SIGKILL)
    assert _wait_gone(int(second)) and address.exists()
    third = _call(address, workers, request)["timing"]["worker"]

    # Assert: three workers, one after the other
    assert len({first, second, third}) == 3


@pytest.mark.timeout(300)
def test_a_training_error_comes_back_with_the_workers_traceback(workers):
    address = node_worker.worker_address(9, 1)
    request = {
        "run_config": workers["run_config"],
        "node_config": {"partition-id": 12},  # num-clients is 10
        "config": {},
        "arrays": {},
    }

    with pytest.raises(RuntimeError, match=r"(?s)node worker.*partition-id=12"):
        node_worker.call_worker(address, request, watch_pid=workers["watched"].pid)


def test_a_task_process_imports_no_torch():
    code = (
        "import sys, afl_flwr.client_app\n"
        "from afl_flwr.client_app import profile_on_worker, train_on_worker\n"
        "import afl_flwr.clock, afl_flwr.node_worker  # what those two import\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_node_worker_mode_is_validated_and_auto_means_flowers_task_process(
    monkeypatch,
):
    assert uses_node_worker({"node-worker": "on"})
    assert not uses_node_worker({"node-worker": "off"})
    monkeypatch.setattr(sys, "argv", ["/usr/bin/python", "-m", "pytest"])
    assert not uses_node_worker({})
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    assert uses_node_worker({}) and not uses_node_worker({"node-worker": "off"})
    with pytest.raises(ValueError, match="node-worker"):
        uses_node_worker({"node-worker": "yes"})
    with pytest.raises(ConfigError, match="node-worker"):
        AppConfig.from_run_config({"node-worker": "yes"})


def test_the_worker_folder_must_be_private_and_socket_paths_short(
    tmp_path, monkeypatch
):
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    monkeypatch.setenv("AFL_FLWR_WORKER_DIR", str(folder))
    with pytest.raises(PermissionError, match="0700"):
        node_worker.worker_dir()

    deep = tmp_path / ("d" * 120)
    monkeypatch.setenv("AFL_FLWR_WORKER_DIR", str(deep))
    with pytest.raises(ValueError, match="AFL_FLWR_WORKER_DIR"):
        node_worker.worker_address(1, 2)


def test_a_worker_imports_the_afl_flwr_of_the_task_that_starts_it(tmp_path):
    # Prepare: a copy of the package elsewhere, as a SuperNode installs a FAB
    copy = tmp_path / "fab"
    shutil.copytree(Path(node_worker.__file__).parent, copy / "afl_flwr")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from afl_flwr import node_worker\n"
        "print(node_worker.worker_env()['PYTHONPATH'].split(':')[0])\n"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code, str(copy)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()

    # Assert: the worker's path starts at the copy, not at an installed one
    assert Path(out) == copy.resolve()
