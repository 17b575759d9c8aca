"""Shared test fixtures: the real MNIST folder and a scripted fake Grid."""

import contextlib
import gzip
import os
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from afl_flwr.experiments.scripted_grid import ScriptedGrid
from afl_flwr.partition_cache import CACHE_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "mnist"

# A reply factory gets (node_id, the train message, its arrays as numpy) and
# returns reply content (RecordDict), an Error, or None (never reply).
ReplyFn = Callable[[int, Message, dict[str, np.ndarray]], RecordDict | Error | None]


@pytest.fixture(autouse=True, scope="session")
def partition_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Tests and the processes they start cache partitions in a private folder."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("partition-cache")
        patch.setenv(CACHE_DIR_ENV, str(directory))
        yield directory


@pytest.fixture(autouse=True)
def task_identity():
    """Creating a Message needs the identity a ServerApp process would have."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed if named ``*.gz``."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST test-set folder shipped beside the repository."""
    if not (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST data not found at {DATA_DIR} (see its README)")
    return DATA_DIR


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny two-array float32 'model'."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(3, 2)).astype(np.float32),
        "b": rng.normal(size=(2,)).astype(np.float32),
    }


def to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    # np.ascontiguousarray would turn 0-d arrays (num_batches_tracked) into 1-d.
    return ArrayRecord(
        {
            k: Array(v if v.flags.c_contiguous else np.array(v))
            for k, v in params.items()
        }
    )


def from_message(message: Message) -> dict[str, np.ndarray]:
    record = next(iter(message.content.array_records.values()))
    return {k: v.numpy() for k, v in record.items()}


def reply_content(
    params: dict[str, np.ndarray], num_examples: float, loss: float = 1.0
) -> RecordDict:
    return RecordDict(
        {
            "arrays": to_record(params),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        }
    )


def shift_by(delta: float, num_examples: float = 10.0) -> ReplyFn:
    """A well-behaved client: returns the received model plus ``delta``."""

    def reply(node: int, message: Message, params: dict[str, np.ndarray]) -> RecordDict:
        shifted = {
            k: (v + np.float32(delta)).astype(v.dtype) for k, v in params.items()
        }
        return reply_content(shifted, num_examples)

    return reply


class FakeGrid(ScriptedGrid):
    """The project's :class:`ScriptedGrid` with the tests' reply functions.

    A test's reply function also gets the train message's arrays as numpy
    (``(node, message, params)``); every ``pull_messages`` call advances the
    clock by one tick, and a reply to a message pushed at tick ``t`` to node
    ``n`` becomes available at tick ``t + delays[n]``. Profile queries are
    answered from ``profiles`` only.
    """

    def __init__(self, replies: dict[int, ReplyFn], **kwargs) -> None:
        def adapt(fn: ReplyFn):
            def reply(node: int, message: Message):
                if message.metadata.message_type == "query.profile":
                    return None
                return fn(node, message, from_message(message))

            return reply

        super().__init__(replies={n: adapt(f) for n, f in replies.items()}, **kwargs)


def run_bounded(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd=None
) -> "subprocess.CompletedProcess[str]":
    """Run ``cmd`` in its own process group; kill the whole group on any exit path.

    Ray and Flower spawn helpers (raylet, workers, SuperExec); killing the group
    makes sure a failing or hanging test leaves nothing behind.
    """
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish within {timeout}s:\n{out[-4000:]}")
    finally:
        kill_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def kill_group(pid: int) -> None:
    """SIGKILL a process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def short_dir():
    """A fresh folder with a short path (for Unix sockets), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="afw-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def checkpoint_round_trip(rule, params, path: Path, make_rule):
    """Write ``params`` and ``rule``'s state to ``path``; read them into a new rule.

    Returns the loaded params and ``make_rule()`` with the loaded state.
    """
    from afl_flwr.checkpoint import load_checkpoint, save_checkpoint

    arrays, meta = rule.state()
    save_checkpoint(
        path, params, {"aggregator": meta, "param_order": list(params)}, arrays
    )
    loaded, state = load_checkpoint(path)
    restored = make_rule()
    restored.load_state(state["extra_arrays"], state["aggregator"])
    return loaded, restored
