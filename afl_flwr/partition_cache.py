"""On-disk cache of prepared client partitions, shared by the processes of a node.

A deployed SuperNode starts a fresh ClientApp process for every message, so the
in-process ``lru_cache`` of :mod:`afl_flwr.data` never gets a second hit there:
each task would read the IDX files, partition the pool and normalise the images
again. :func:`load_partition_cached` keeps the finished float32 tensors of a
partition in one ``.npz`` file per partition under the cache directory and reads
them back (a few milliseconds, without importing ``datasets``/``flwr_datasets``).

The file name holds a SHA-256 of everything that determines the partition
(:meth:`PartitionRequest.key`): data set, resolved ``data-dir`` and the size and
modification time of each source file, ``num-partitions``, ``partition-id``,
``dirichlet-alpha``, ``seed``, ``num-test``, the flwr-datasets version and the
cache format. A file is trusted only if it parses, its stored key equals the
expected one and its arrays have the expected dtypes and shapes; anything else
is rebuilt and replaced. Files are written to a temporary name and renamed
(``os.replace``), so a reader never sees half a file.

The cache directory is ``$AFL_FLWR_CACHE_DIR`` when set (``off`` disables the
cache), else ``$XDG_CACHE_HOME/afl-flwr`` or ``~/.cache/afl-flwr``. Online data
(``data-dir = ""``) is not cached: its files live in the Hugging Face cache and
have no stable fingerprint here.
"""

import hashlib
import importlib.metadata
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.logger import log

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

from afl_flwr.data import (
    DEFAULT_NUM_TEST,
    get_dataset_spec,
    load_partition,
    source_files,
)

CACHE_DIR_ENV = "AFL_FLWR_CACHE_DIR"
CACHE_OFF = "off"
# Bump when the file layout or the preparation of the tensors changes.
CACHE_FORMAT = 1
_SUBDIR = "partitions"


def cache_dir() -> Path | None:
    """The partition cache directory, or ``None`` when the cache is off."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    if configured.lower() == CACHE_OFF:
        return None
    if configured:
        return Path(configured).expanduser() / _SUBDIR
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "afl-flwr" / _SUBDIR


@dataclass(frozen=True, kw_only=True)
class PartitionRequest:
    """The inputs of :func:`afl_flwr.data.load_partition`, one partition's identity.

    Parameters
    ----------
    dataset : str
        Registry name (run-config key ``dataset``).
    data_dir : str
        Directory of IDX files; ``""`` (online) is never cached.
    num_partitions : int
        Number of partitions (clients).
    partition_id : int
        The partition, in ``0 .. num_partitions - 1``.
    alpha : float
        Dirichlet concentration (``dirichlet-alpha``).
    seed : int
        Partitioning seed.
    num_test : int (default: 2000)
        Size of the held-out test set cut from the end of the files.
    """

    dataset: str
    data_dir: str
    num_partitions: int
    partition_id: int
    alpha: float
    seed: int
    num_test: int = DEFAULT_NUM_TEST

    def load(self) -> "TensorDataset":
        """The partition, computed from the source files (no disk cache)."""
        return load_partition(
            self.dataset,
            self.data_dir,
            self.num_partitions,
            self.partition_id,
            self.alpha,
            self.seed,
            num_test=self.num_test,
        )

    def key(self) -> str:
        """Canonical JSON of every input that determines the partition's tensors.

        Raises
        ------
        FileNotFoundError
            If ``data_dir`` holds none of the data set's source files.
        """
        files = source_files(self.dataset, self.data_dir)
        if not files:
            raise FileNotFoundError(
                f"no source files of {self.dataset!r} in {self.data_dir!r}"
            )
        sources = [
            [str(path), stat.st_size, stat.st_mtime_ns]
            for path, stat in ((path, path.stat()) for path in files)
        ]
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                "flwr-datasets": importlib.metadata.version("flwr-datasets"),
                "dataset": self.dataset,
                "sources": sources,
                "num-partitions": self.num_partitions,
                "partition-id": self.partition_id,
                "dirichlet-alpha": float(self.alpha),
                "seed": self.seed,
                "num-test": self.num_test,
            },
            sort_keys=True,
        )


def cache_path(directory: Path, key: str) -> Path:
    """The cache file of the partition described by ``key``."""
    fields = json.loads(key)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    name = (
        f"{fields['dataset']}-{fields['partition-id']}-of-"
        f"{fields['num-partitions']}-{digest}.npz"
    )
    return directory / name


def load_partition_cached(
    request: PartitionRequest, *, directory: Path | None = None
) -> "TensorDataset":
    """``request.load()``, read from the on-disk cache when a valid file exists.

    ``directory`` is the cache directory (default: :func:`cache_dir`). With the
    cache off, online data, or a source missing, this is plain ``request.load()``
    (whose errors name the bad value). A cache that cannot be written is logged
    and skipped: the partition is still returned.
    """
    directory = directory or cache_dir()
    if (
        directory is None
        or not request.data_dir
        or not 0 <= request.partition_id < request.num_partitions
    ):
        return request.load()
    try:
        key = request.key()
    except (FileNotFoundError, ValueError):
        return request.load()  # raises the precise error
    path = cache_path(directory, key)
    if path.exists():
        try:
            return _read(path, key, request.dataset)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log(WARNING, "Rebuilding partition cache %s: %s", path, err)
    partition = request.load()
    try:
        _write(path, key, partition)
    except OSError as err:
        log(WARNING, "Cannot write partition cache %s: %s", path, err)
    else:
        log(
            INFO,
            "Cached partition %d of %d in %s",
            request.partition_id,
            request.num_partitions,
            path,
        )
    return partition


def cached_num_examples(
    request: PartitionRequest, *, directory: Path | None = None
) -> int | None:
    """Examples in ``request``'s partition if a cache file for it exists, else None.

    Reads the file's stored key and labels only (numpy; no torch, no images), so
    a process can size a partition without loading it. ``None`` whenever
    :func:`load_partition_cached` would not read this file (cache off, online
    data, a missing source, no file, a file for other inputs or unreadable).
    """
    directory = directory or cache_dir()
    if (
        directory is None
        or not request.data_dir
        or not 0 <= request.partition_id < request.num_partitions
    ):
        return None
    try:
        key = request.key()
        path = cache_path(directory, key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            labels = stored["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if labels.dtype != np.int64 or labels.ndim != 1 or len(labels) == 0:
        return None
    return len(labels)


def _read(path: Path, key: str, dataset: str) -> "TensorDataset":
    """Read and check one cache file; ``ValueError`` if it is not the expected one."""
    spec = get_dataset_spec(dataset)
    with np.load(path, allow_pickle=False) as stored:
        if str(stored["key"]) != key:
            raise ValueError("stored key differs from the expected key")
        images, labels = stored["images"], stored["labels"]
    image_shape = (spec.in_channels, spec.image_size, spec.image_size)
    if (
        images.dtype != np.float32
        or labels.dtype != np.int64
        or images.shape[1:] != image_shape
        or labels.shape != images.shape[:1]
        or len(labels) == 0
    ):
        raise ValueError(
            f"arrays {images.dtype}{images.shape} and {labels.dtype}{labels.shape}; "
            f"expected float32 (N, {', '.join(map(str, image_shape))}) and int64 (N,)"
        )
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _write(path: Path, key: str, partition: "TensorDataset") -> None:
    """Write ``partition`` to ``path`` atomically (temporary file, then rename)."""
    images, labels = partition.tensors
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(
                handle, key=np.array(key), images=images.numpy(), labels=labels.numpy()
            )
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
