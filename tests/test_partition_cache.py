"""The on-disk partition cache: hits, rebuilds, keys, and a light client import."""

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_idx
from torch.utils.data import TensorDataset

from afl_flwr import data, partition_cache
from afl_flwr.partition_cache import (
    CACHE_DIR_ENV,
    PartitionRequest,
    cache_path,
    cached_num_examples,
    load_partition_cached,
)

NUM_PARTITIONS = 3
NUM_TEST = 60
ALPHA = 0.5
SEED = 7
# The inputs of a partition (data_dir added per test).
BASE = {
    "dataset": "mnist",
    "num_partitions": NUM_PARTITIONS,
    "partition_id": 1,
    "alpha": ALPHA,
    "seed": SEED,
    "num_test": NUM_TEST,
}


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A tiny MNIST-shaped IDX folder: 300 training and 60 test images of 28x28."""
    directory = tmp_path / "mnist"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 300), ("t10k", NUM_TEST)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory


def clear_process_caches() -> None:
    """Forget the pools this process loaded (as a new task process would)."""
    data._splits.cache_clear()
    data._federated_pool.cache_clear()


def request(data_dir: Path, **changes: object) -> PartitionRequest:
    return PartitionRequest(data_dir=str(data_dir), **{**BASE, **changes})  # type: ignore[arg-type]


def fresh_load(data_dir: Path) -> TensorDataset:
    """The partition computed from the IDX files, bypassing every cache."""
    clear_process_caches()
    return data.load_partition(
        "mnist", str(data_dir), NUM_PARTITIONS, 1, ALPHA, SEED, num_test=NUM_TEST
    )


def key_of(data_dir: Path, **changes: object) -> str:
    return request(data_dir, **changes).key()


def cached(data_dir: Path, cache: Path | None) -> TensorDataset:
    return load_partition_cached(request(data_dir), directory=cache)


def expected_file(data_dir: Path, cache: Path) -> Path:
    return cache_path(cache, key_of(data_dir))


def assert_same(actual: TensorDataset, expected: TensorDataset) -> None:
    for got, want in zip(actual.tensors, expected.tensors, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def forbid_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any load from the IDX files fail, so only a cache hit can succeed."""

    def no_load(*_: object, **__: object) -> TensorDataset:
        raise AssertionError("load_partition called: the cache was not used")

    monkeypatch.setattr(PartitionRequest, "load", no_load)


def test_cache_hit_returns_the_fresh_tensors(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    cache = tmp_path / "cache"
    expected = fresh_load(idx_dir)
    cached(idx_dir, cache)  # miss: builds and writes the file
    forbid_rebuild(monkeypatch)

    # Execute
    hit = cached(idx_dir, cache)

    # Assert
    assert expected_file(idx_dir, cache).is_file()
    assert_same(hit, expected)


def write_npz(path: Path, key: str, image_size: int = 28) -> None:
    with path.open("wb") as handle:
        np.savez(
            handle,
            key=np.array(key),
            images=np.zeros((5, 1, image_size, image_size), np.float32),
            labels=np.zeros(5, np.int64),
        )


def garbage(path: Path) -> None:
    path.write_bytes(b"not a zip file")


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def stale_key(path: Path) -> None:
    write_npz(path, '{"other": "key"}')


def wrong_shape(path: Path) -> None:
    with np.load(path) as stored:
        key = str(stored["key"])
    write_npz(path, key, image_size=14)


@pytest.mark.parametrize("damage", [garbage, truncated, stale_key, wrong_shape])
def test_damaged_cache_file_is_rebuilt(
    idx_dir: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    # Prepare
    cache = tmp_path / "cache"
    cached(idx_dir, cache)
    path = expected_file(idx_dir, cache)
    damage(path)

    # Execute
    rebuilt = cached(idx_dir, cache)

    # Assert: the right tensors, and the file repaired on disk.
    expected = fresh_load(idx_dir)
    assert_same(rebuilt, expected)
    with np.load(path) as stored:
        assert np.array_equal(stored["images"], expected.tensors[0].numpy())
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary left


def test_a_cached_partition_is_sized_from_its_file_alone(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no file yet, then the file a load writes
    cache = tmp_path / "cache"
    before = cached_num_examples(request(idx_dir), directory=cache)
    expected = len(fresh_load(idx_dir))
    cached(idx_dir, cache)
    forbid_rebuild(monkeypatch)

    # Execute
    size = cached_num_examples(request(idx_dir), directory=cache)

    # Assert
    assert before is None
    assert size == expected
    other = cached_num_examples(request(idx_dir, partition_id=2), directory=cache)
    assert other is None  # another partition has no file


@pytest.mark.parametrize("damage", [garbage, truncated, stale_key])
def test_a_damaged_or_foreign_file_gives_no_size(
    idx_dir: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    cache = tmp_path / "cache"
    cached(idx_dir, cache)
    damage(expected_file(idx_dir, cache))

    assert cached_num_examples(request(idx_dir), directory=cache) is None


def test_no_size_with_the_cache_off_or_online_data(
    idx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, "off")
    assert cached_num_examples(request(idx_dir)) is None
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert cached_num_examples(PartitionRequest(data_dir="", **BASE)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"num_partitions": 4},
        {"partition_id": 2},
        {"alpha": 0.3},
        {"seed": 8},
        {"num_test": 50},
    ],
    ids=lambda change: next(iter(change)),
)
def test_key_changes_with_every_partition_input(
    idx_dir: Path, change: dict[str, object]
) -> None:
    assert key_of(idx_dir, **change) != key_of(idx_dir)
    assert cache_path(Path("c"), key_of(idx_dir, **change)) != cache_path(
        Path("c"), key_of(idx_dir)
    )


@pytest.mark.parametrize("edit", ["mtime", "content", "copy"])
def test_key_changes_when_the_source_files_change(
    idx_dir: Path, tmp_path: Path, edit: str
) -> None:
    # Prepare
    before = expected_file(idx_dir, tmp_path)
    images = idx_dir / "train-images-idx3-ubyte"
    target = idx_dir

    # Execute
    if edit == "mtime":
        stat = images.stat()
        os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif edit == "content":
        write_idx(images, np.ones((301, 28, 28), np.uint8))
    else:
        target = tmp_path / "copy"
        target.mkdir()
        for source in idx_dir.iterdir():
            (target / source.name).write_bytes(source.read_bytes())
            os.utime(target / source.name, ns=(0, source.stat().st_mtime_ns))

    # Assert
    assert expected_file(target, tmp_path) != before


def test_changed_source_is_not_served_from_the_old_file(
    idx_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    cache = tmp_path / "cache"
    cached(idx_dir, cache)
    write_idx(idx_dir / "train-images-idx3-ubyte", np.zeros((300, 28, 28), np.uint8))
    clear_process_caches()

    # Execute
    reloaded = cached(idx_dir, cache)

    # Assert: all-black images normalise to -1.
    assert torch.all(reloaded.tensors[0] == -1.0)


def test_cache_off_writes_nothing(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, "off")
    monkeypatch.setattr(partition_cache, "_write", None)  # any write would fail

    partition = cached(idx_dir, None)

    assert_same(partition, fresh_load(idx_dir))
    assert partition_cache.cache_dir() is None


def test_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert partition_cache.cache_dir() == tmp_path / "mine" / "partitions"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert partition_cache.cache_dir() == tmp_path / "xdg" / "afl-flwr" / "partitions"


def test_client_path_imports_no_dataset_hub_or_plotting(
    idx_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the partition is cached, as on a node after its first task.
    cache = tmp_path / "cache"
    env = {**os.environ, CACHE_DIR_ENV: str(cache), "PYTHONPATH": str(REPO)}
    cached(idx_dir, cache / "partitions")
    script = (
        "import json, sys\n"
        "from afl_flwr.client_app import client_trainset\n"
        "from afl_flwr.config import AppConfig\n"
        "cfg = AppConfig.from_run_config({'data-dir': sys.argv[1], 'num-clients': "
        f"{NUM_PARTITIONS}, 'clients-per-round': 1, 'num-test': {NUM_TEST}, "
        f"'dirichlet-alpha': {ALPHA}, 'seed': {SEED}}})\n"
        "print(len(client_trainset(cfg, 1)))\n"
        "heavy = ('datasets', 'flwr_datasets', 'matplotlib', 'pandas', 'pyarrow',"
        " 'afl_flwr.strategy', 'afl_flwr.server_app')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", script, str(idx_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    size, imported = proc.stdout.strip().splitlines()[-2:]
    assert int(size) == len(fresh_load(idx_dir))
    assert json.loads(imported) == []


def test_only_the_first_train_task_of_a_process_logs_its_cold_start(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a fresh process's task counter, and a recorder for the log.
    from afl_flwr import client_app, client_task
    from afl_flwr.experiments.inprocess import run_inprocess

    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(client_task, "_TRAIN_TASKS", itertools.count())
    monkeypatch.setattr(client_app, "log", lambda *args: calls.append(args))
    config = {
        "model": "mlp",
        "num-clients": 2,
        "clients-per-round": 2,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "num-test": 500,
        "clock": "none",
        "data-dir": str(mnist_dir),
        "results-dir": str(tmp_path),
    }

    # Execute: several train tasks in this one process.
    outcome = run_inprocess(config)

    # Assert
    summary = json.loads((outcome.results_path / "summary.json").read_text())
    assert summary["updates"]["merged"] >= 3
    timings = [c for c in calls if "Cold task timing" in str(c[1])]
    assert len(timings) == 1
    age, cpu, *phases, where = timings[0][2:]
    assert age > 0 and cpu > 0  # the process started before this test ran
    assert all(phase >= 0 for phase in phases) and len(phases) == 3
    assert where == ""  # trained in this process, not on a node worker
