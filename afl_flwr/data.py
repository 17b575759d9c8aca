"""Data sets: registry, offline IDX source, Dirichlet partitions and torch tensors.

Two sources feed the same partitioning code:

- **online** (``data-dir = ""``): the Hugging Face data set of the registry entry,
  fetched through :class:`flwr_datasets.FederatedDataset`; its ``train`` split is
  the pool that is partitioned and its ``test`` split is the central test set.
- **offline** (``data-dir`` = a directory of MNIST IDX files, MNIST only): the files
  are read with numpy and split deterministically, *without shuffling*: the first
  ``len - num-test`` examples form the training pool, the last ``num-test`` examples
  (default 2,000) the central held-out test set. With the 10,000-image MNIST test
  set this gives 8,000 training and 2,000 test images.

The pool is split among the clients with Flower's
:class:`~flwr_datasets.partitioner.DirichletPartitioner` on the label (non-IID,
concentration ``dirichlet-alpha``). Images become float32 tensors ``(N, C, H, W)``
normalised with mean 0.5 and std 0.5 per channel, as in the paper, i.e. in
``[-1, 1]``.

Each process loads and partitions a data set once: :func:`load_partition`,
:func:`load_central_testset` and :func:`partition_sizes` share one
``functools.lru_cache``-backed pool, reused across messages. Hugging Face
``datasets`` and ``flwr_datasets`` (with their pandas/matplotlib imports) are
imported only when a pool is built, so a process that reads a partition from the
on-disk cache (:mod:`afl_flwr.partition_cache`) never pays for them; torch is
imported where tensors are made, so the registry and the source files can be
read without it (a SuperNode's task process answers its profile query that way).
"""

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.logger import log

if TYPE_CHECKING:
    import datasets
    import torch
    from flwr_datasets.partitioner import DirichletPartitioner
    from torch.utils.data import TensorDataset

from afl_flwr.constants import NUM_PARTITIONS, PARTITION_ID

# Run-config keys named in error messages (the fields of ``AppConfig``).
DATASET_KEY = "dataset"
DATA_DIR_KEY = "data-dir"
NUM_TEST_KEY = "num-test"
ALPHA_KEY = "dirichlet-alpha"

DEFAULT_NUM_TEST = 2000
# Flower's default; lowered on pools too small to give every partition that many.
MIN_PARTITION_SIZE = 10

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_UBYTE = 0x08
_CACHE_SIZE = 8


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Static description of an image classification data set.

    Parameters
    ----------
    name : str
        Registry name, the value of run-config key ``dataset``.
    hf_name : str
        Hugging Face Hub identifier used when online.
    image_key : str
        Column holding the images.
    label_key : str (default: "label")
        Column holding the integer labels.
    in_channels : int
        Number of image channels (1 grayscale, 3 RGB).
    image_size : int
        Height and width of the square images.
    num_classes : int (default: 10)
        Number of classes; labels are ``0 .. num_classes - 1``.
    idx_files : tuple[tuple[str, str], ...] (default: ())
        ``(images, labels)`` IDX file names (without ``.gz``) readable offline, in
        merge order; empty if the data set has no offline source.
    mean : tuple[float, ...]
        Per-channel normalisation mean, applied to pixels scaled to ``[0, 1]``.
    std : tuple[float, ...]
        Per-channel normalisation standard deviation.
    """

    name: str
    hf_name: str
    image_key: str
    label_key: str = "label"
    in_channels: int
    image_size: int
    num_classes: int = 10
    idx_files: tuple[tuple[str, str], ...] = ()
    mean: tuple[float, ...]
    std: tuple[float, ...]


MNIST_IDX_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        hf_name="ylecun/mnist",
        image_key="image",
        in_channels=1,
        image_size=28,
        idx_files=MNIST_IDX_FILES,
        mean=(0.5,),
        std=(0.5,),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        hf_name="uoft-cs/cifar10",
        image_key="img",
        in_channels=3,
        image_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}


@dataclass(frozen=True)
class _Splits:
    """The training pool to partition and the central test set."""

    pool: "datasets.Dataset"
    testset: "datasets.Dataset"


def get_dataset_spec(name: str) -> DatasetSpec:
    """Return the registry entry of data set ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`DATASETS`.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r} (key {DATASET_KEY!r}); "
            f"allowed: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed if named ``*.gz``).

    The header is a magic number ``0x0000 08 D`` (``D`` = number of dimensions)
    followed by ``D`` big-endian uint32 sizes; the payload is the array in C order.
    torchvision's ``read_sn3_pascalvincent_tensor`` reads the same format but
    opens plain files only (the shipped MNIST files are gzipped) and checks
    the header with ``assert`` (no message naming the file, and gone under
    ``python -O``), so this reader stays.

    Raises
    ------
    ValueError
        If the magic number is not that of unsigned bytes or the payload size does
        not match the dimensions in the header.
    """
    raw = (
        gzip.decompress(path.read_bytes())
        if path.suffix == ".gz"
        else path.read_bytes()
    )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes: magic bytes {raw[:4]!r}; "
            f"allowed: 00 00 08 <ndim> (e.g. {IDX_IMAGES_MAGIC} for images, "
            f"{IDX_LABELS_MAGIC} for labels)"
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated: header needs {header_size} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = len(raw) - header_size
    expected = int(np.prod(shape))
    if payload != expected:
        raise ValueError(
            f"{path} holds {payload} data bytes but its header announces shape "
            f"{shape} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def load_idx(
    data_dir: str | Path,
    idx_files: Sequence[tuple[str, str]] = MNIST_IDX_FILES,
) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST-style IDX image/label file pairs from ``data_dir``.

    Each name in ``idx_files`` may be present as is or gzip-compressed with a
    ``.gz`` suffix (the uncompressed file wins if both exist). Pairs present are
    concatenated in the order of ``idx_files``: with the defaults, ``train-*``
    before ``t10k-*``.

    Parameters
    ----------
    data_dir : str | Path
        Directory holding the files (run-config key ``data-dir``).
    idx_files : Sequence[tuple[str, str]] (default: MNIST train and t10k files)
        ``(images, labels)`` file names without ``.gz``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Images, uint8 of shape ``(N, rows, cols)``, and labels, int64 of shape
        ``(N,)``.

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` is not a directory, holds no complete pair, or holds the
        images of a pair without its labels (or vice versa).
    ValueError
        If a file is not a valid IDX file of the expected kind, or image and label
        counts differ.
    """
    directory = Path(data_dir).expanduser()
    expected = " + ".join(
        f"{images}[.gz], {labels}[.gz]" for images, labels in idx_files
    )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{DATA_DIR_KEY}={str(data_dir)!r} is not a directory; expected one "
            f"holding the IDX files {expected}"
        )
    all_images: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    for images_name, labels_name in idx_files:
        images_path = _find_idx_file(directory, images_name)
        labels_path = _find_idx_file(directory, labels_name)
        if images_path is None and labels_path is None:
            continue
        if images_path is None or labels_path is None:
            missing = images_name if images_path is None else labels_name
            raise FileNotFoundError(
                f"{DATA_DIR_KEY}={str(directory)!r} lacks {missing}[.gz], needed with "
                f"{images_name}[.gz] and {labels_name}[.gz]"
            )
        images, labels = _read_idx_pair(images_path, labels_path)
        all_images.append(images)
        all_labels.append(labels)
    if not all_images:
        raise FileNotFoundError(
            f"{DATA_DIR_KEY}={str(directory)!r} holds no IDX data; expected "
            f"{expected} (at least one image/label pair)"
        )
    return np.concatenate(all_images), np.concatenate(all_labels)


def split_holdout(
    images: np.ndarray, labels: np.ndarray, num_test: int = DEFAULT_NUM_TEST
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Split examples, in order, into a training pool and a held-out test set.

    The first ``len - num_test`` examples form the pool, the last ``num_test`` the
    test set; nothing is shuffled, so the split is the same on every machine.

    Returns
    -------
    tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
        ``((pool_images, pool_labels), (test_images, test_labels))``.

    Raises
    ------
    ValueError
        If ``num_test`` does not leave at least one example on each side, or
        ``images`` and ``labels`` differ in length.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not 0 < num_test < len(labels):
        raise ValueError(
            f"{NUM_TEST_KEY}={num_test} cannot split {len(labels)} examples; "
            f"allowed: 1..{len(labels) - 1}"
        )
    cut = len(labels) - num_test
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def min_partition_size(pool_size: int, num_partitions: int) -> int:
    """Return the minimum partition size requested from the Dirichlet partitioner.

    :data:`MIN_PARTITION_SIZE`, lowered to a quarter of the even share on small
    pools, and never below 1 so that every partition is non-empty.
    """
    return max(1, min(MIN_PARTITION_SIZE, pool_size // (4 * num_partitions)))


def partition_pool(
    pool: "datasets.Dataset",
    *,
    num_partitions: int,
    alpha: float,
    seed: int,
    label_key: str = "label",
) -> "DirichletPartitioner":
    """Partition ``pool`` by label with Flower's Dirichlet partitioner.

    Each label's examples are spread over the partitions in Dir(``alpha``)
    proportions (Yurochkin et al., 2019, https://arxiv.org/abs/1905.12022),
    self-balanced, each partition getting at least :func:`min_partition_size`
    examples (at least one if that minimum cannot be met). The same ``pool``,
    ``alpha`` and ``seed`` give the same partitions.

    Parameters
    ----------
    pool : datasets.Dataset
        Examples to partition; must have column ``label_key``.
    num_partitions : int
        Number of partitions (clients).
    alpha : float
        Dirichlet concentration; smaller is more non-IID.
    seed : int
        Seed of the partitioner's random generator.
    label_key : str (default: "label")
        Label column.

    Returns
    -------
    DirichletPartitioner
        The partitioner, its data set assigned and partitions already drawn.

    Raises
    ------
    ValueError
        If ``num_partitions`` is not in ``1 .. len(pool)``, ``alpha`` is not
        positive, or no draw leaves every partition non-empty.
    """
    if not 1 <= num_partitions <= len(pool):
        raise ValueError(
            f"{NUM_PARTITIONS}={num_partitions} cannot partition {len(pool)} "
            f"examples; allowed: 1..{len(pool)}"
        )
    if not alpha > 0:
        raise ValueError(f"{ALPHA_KEY}={alpha} must be > 0")
    min_size = min_partition_size(len(pool), num_partitions)
    try:
        return _draw_partitions(pool, num_partitions, alpha, seed, label_key, min_size)
    except ValueError as err:
        if min_size == 1:
            raise _partitioning_error(len(pool), num_partitions, alpha, 1) from err
    # Very skewed draws (small alpha, many partitions) rarely reach the preferred
    # minimum; settle for non-empty partitions rather than fail the run.
    log(
        WARNING,
        "No Dirichlet draw gave every partition %d examples; requiring only 1",
        min_size,
    )
    try:
        return _draw_partitions(pool, num_partitions, alpha, seed, label_key, 1)
    except ValueError as err:
        raise _partitioning_error(len(pool), num_partitions, alpha, 1) from err


def images_to_tensor(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> "torch.Tensor":
    """Convert uint8 images to normalised float32 tensors ``(N, C, H, W)``.

    Pixels are scaled to ``[0, 1]``, then ``(x - mean) / std`` per channel.

    Parameters
    ----------
    images : np.ndarray
        uint8 array ``(N, H, W)`` (grayscale) or ``(N, H, W, C)`` (channels last).
    mean : Sequence[float]
        Per-channel mean, length ``C``.
    std : Sequence[float]
        Per-channel standard deviation, length ``C``.

    Raises
    ------
    ValueError
        If ``images`` is not uint8 of 3 or 4 dimensions, or ``mean``/``std`` do not
        have one entry per channel.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"images of dtype {images.dtype} and shape {images.shape}; allowed: "
            "uint8 of shape (N, H, W) or (N, H, W, C)"
        )
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if images.ndim == 3 else tensor.permute(0, 3, 1, 2)
    channels = tensor.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean {tuple(mean)} and std {tuple(std)} must have {channels} entries, "
            "one per image channel"
        )
    shift = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
    return ((tensor.to(torch.float32) / 255.0 - shift) / scale).contiguous()


def to_tensor_dataset(ds: "datasets.Dataset", spec: DatasetSpec) -> "TensorDataset":
    """Convert a Hugging Face data set of ``spec`` to ``TensorDataset(x, y)``.

    The whole data set is decoded in one numpy-formatted read, then normalised
    with :func:`images_to_tensor`; labels become int64.

    Raises
    ------
    ValueError
        If the images do not have ``spec``'s size and channels, or pixel values
        or labels are out of range.
    """
    columns = ds.with_format("numpy")[:]
    images = np.asarray(columns[spec.image_key])
    labels = np.asarray(columns[spec.label_key]).astype(np.int64)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    size = (spec.image_size, spec.image_size)
    expected = size if spec.in_channels == 1 else (*size, spec.in_channels)
    if images.shape[1:] != expected:
        raise ValueError(
            f"{spec.name} images of shape {images.shape[1:]}; expected {expected}"
        )
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(
            f"{spec.name} pixel values in [{images.min()}, {images.max()}]; "
            "allowed: 0..255"
        )
    label_histogram(labels, spec.num_classes)  # validates the label range
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(
        images_to_tensor(images.astype(np.uint8), spec.mean, spec.std),
        torch.from_numpy(labels),
    )


def label_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the number of examples of each class, an int64 array ``(num_classes,)``.

    Raises
    ------
    ValueError
        If a label is outside ``0 .. num_classes - 1``.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels in [{labels.min()}, {labels.max()}]; allowed: 0..{num_classes - 1}"
        )
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def load_partition(
    dataset: str,
    data_dir: str,
    num_partitions: int,
    partition_id: int,
    alpha: float,
    seed: int,
    *,
    num_test: int = DEFAULT_NUM_TEST,
) -> "TensorDataset":
    """Return partition ``partition_id`` of the training pool as tensors.

    The pool is loaded and partitioned once per process (cached) and reused.

    Parameters
    ----------
    dataset : str
        Registry name (run-config key ``dataset``).
    data_dir : str
        ``""`` to download from Hugging Face, else a directory of MNIST IDX files.
    num_partitions : int
        Number of partitions (clients).
    partition_id : int
        Partition to return, in ``0 .. num_partitions - 1``.
    alpha : float
        Dirichlet concentration (run-config key ``dirichlet-alpha``).
    seed : int
        Partitioning seed.
    num_test : int (default: 2000)
        Offline only: size of the held-out test set cut from the end of the files.

    Raises
    ------
    ValueError
        On an unknown data set, an out-of-range ``partition_id`` or invalid
        partitioning parameters.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"{PARTITION_ID}={partition_id} is out of range; allowed: "
            f"[0, {num_partitions}) for {NUM_PARTITIONS}={num_partitions}"
        )
    spec = get_dataset_spec(dataset)
    partitioner = _federated_pool(
        dataset, _canonical_dir(data_dir), num_partitions, float(alpha), seed, num_test
    )
    return to_tensor_dataset(partitioner.load_partition(partition_id), spec)


def load_central_testset(
    dataset: str, data_dir: str, num_test: int = DEFAULT_NUM_TEST
) -> "TensorDataset":
    """Return the central test set as tensors (cached pool, see module docstring).

    Online this is the Hugging Face ``test`` split; offline the last ``num_test``
    examples of the IDX files.
    """
    spec = get_dataset_spec(dataset)
    splits = _splits(dataset, _canonical_dir(data_dir), num_test)
    return to_tensor_dataset(splits.testset, spec)


def partition_sizes(
    dataset: str,
    data_dir: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    *,
    num_test: int = DEFAULT_NUM_TEST,
) -> list[int]:
    """Return the number of examples of each partition (see :func:`load_partition`)."""
    get_dataset_spec(dataset)
    return list(
        _partition_sizes(
            dataset,
            _canonical_dir(data_dir),
            num_partitions,
            float(alpha),
            seed,
            num_test,
        )
    )


def source_files(dataset: str, data_dir: str) -> list[Path]:
    """Return the files an offline load of ``dataset`` reads from ``data_dir``.

    Absolute paths, in load order; empty online (``data_dir = ""``) or when
    ``data_dir`` holds none of the registry entry's IDX files.
    """
    if not data_dir:
        return []
    directory = Path(_canonical_dir(data_dir))
    names = [name for pair in get_dataset_spec(dataset).idx_files for name in pair]
    found = (_find_idx_file(directory, name) for name in names)
    return [path for path in found if path is not None]


def _find_idx_file(directory: Path, name: str) -> Path | None:
    """Return ``directory/name`` or ``directory/name.gz``, whichever exists first."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_pair(
    images_path: Path, labels_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an images file and its labels file."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(
            f"{images_path} has {images.ndim} dimensions; expected 3 (magic "
            f"{IDX_IMAGES_MAGIC})"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"{labels_path} has {labels.ndim} dimensions; expected 1 (magic "
            f"{IDX_LABELS_MAGIC})"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels"
        )
    return images, labels.astype(np.int64)


def _draw_partitions(
    pool: "datasets.Dataset",
    num_partitions: int,
    alpha: float,
    seed: int,
    label_key: str,
    min_size: int,
) -> "DirichletPartitioner":
    """Build a Dirichlet partitioner on ``pool`` and draw its partitions now."""
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=label_key,
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=True,
        seed=seed,
    )
    partitioner.dataset = pool
    # Partitioning is lazy in flwr-datasets; draw now so failures surface here.
    partitioner.load_partition(0)
    return partitioner


def _partitioning_error(
    pool_size: int, num_partitions: int, alpha: float, min_size: int
) -> ValueError:
    """Return the error for a Dirichlet draw that left a partition too small."""
    return ValueError(
        f"Dirichlet partitioning of {pool_size} examples into "
        f"{NUM_PARTITIONS}={num_partitions} with {ALPHA_KEY}={alpha} left some "
        f"partition with fewer than {min_size} example(s) in every attempt; "
        f"allowed: a larger {ALPHA_KEY} or fewer partitions"
    )


def _offline_names() -> str:
    """Return the comma-separated names of the data sets readable offline."""
    return ", ".join(sorted(name for name, s in DATASETS.items() if s.idx_files))


def _canonical_dir(data_dir: str) -> str:
    """Return an absolute ``data_dir`` (``""`` stays online) so cache keys agree."""
    return str(Path(data_dir).expanduser().resolve()) if data_dir else ""


@lru_cache(maxsize=_CACHE_SIZE)
def _splits(dataset: str, data_dir: str, num_test: int) -> _Splits:
    """Load the pool and central test set of ``dataset`` (offline if ``data_dir``)."""
    spec = get_dataset_spec(dataset)
    if data_dir:
        return _load_offline(spec, data_dir, num_test)
    return _load_online(spec)


@lru_cache(maxsize=_CACHE_SIZE)
def _federated_pool(
    dataset: str,
    data_dir: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    num_test: int,
) -> "DirichletPartitioner":
    """Return the partitioner of the cached pool, partitions drawn once."""
    spec = get_dataset_spec(dataset)
    pool = _splits(dataset, data_dir, num_test).pool
    partitioner = partition_pool(
        pool,
        num_partitions=num_partitions,
        alpha=alpha,
        seed=seed,
        label_key=spec.label_key,
    )
    log(
        INFO,
        "Partitioned %d %s examples into %d Dirichlet(alpha=%s, seed=%d) partitions",
        len(pool),
        dataset,
        num_partitions,
        alpha,
        seed,
    )
    return partitioner


@lru_cache(maxsize=_CACHE_SIZE)
def _partition_sizes(
    dataset: str,
    data_dir: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    num_test: int,
) -> tuple[int, ...]:
    """Return the partition sizes of the cached pool."""
    partitioner = _federated_pool(
        dataset, data_dir, num_partitions, alpha, seed, num_test
    )
    return tuple(len(partitioner.load_partition(i)) for i in range(num_partitions))


def _load_offline(spec: DatasetSpec, data_dir: str, num_test: int) -> _Splits:
    """Read ``spec``'s IDX files and split them into pool and test set."""
    import datasets  # heavy (pyarrow, pandas): only where a pool is built

    if not spec.idx_files:
        raise ValueError(
            f"Offline data ({DATA_DIR_KEY}={data_dir!r}) is not supported for "
            f"{DATASET_KEY}={spec.name!r}; allowed offline: {_offline_names()}. Set "
            f'{DATA_DIR_KEY}="" to download {spec.hf_name!r} from Hugging Face.'
        )
    images, labels = load_idx(data_dir, spec.idx_files)
    size = (spec.image_size, spec.image_size)
    if images.shape[1:] != size:
        raise ValueError(
            f"{DATA_DIR_KEY}={data_dir!r} holds images of shape {images.shape[1:]}; "
            f"{spec.name} expects {size}"
        )
    label_histogram(labels, spec.num_classes)  # validates the label range
    (pool_x, pool_y), (test_x, test_y) = split_holdout(images, labels, num_test)
    log(
        INFO,
        "Loaded %d %s images from %s: first %d for training, last %d held out",
        len(labels),
        spec.name,
        data_dir,
        len(pool_y),
        len(test_y),
    )
    features = datasets.Features(
        {
            spec.image_key: datasets.Array2D(shape=size, dtype="uint8"),
            spec.label_key: datasets.Value("int64"),
        }
    )
    return _Splits(
        pool=datasets.Dataset.from_dict(
            {spec.image_key: pool_x, spec.label_key: pool_y}, features=features
        ),
        testset=datasets.Dataset.from_dict(
            {spec.image_key: test_x, spec.label_key: test_y}, features=features
        ),
    )


def _load_online(spec: DatasetSpec) -> _Splits:
    """Download ``spec`` from Hugging Face through Flower's ``FederatedDataset``.

    Raises
    ------
    RuntimeError
        If the download or loading fails for any reason (no network, Hub error);
        the message gives the cause and how to run offline.
    """
    from flwr_datasets import FederatedDataset

    # Partitioners are attached per (num-partitions, alpha, seed) by the cache
    # above, so one download serves them all and the test set needs none.
    try:
        fds = FederatedDataset(dataset=spec.hf_name, partitioners={}, shuffle=False)
        splits = _Splits(pool=fds.load_split("train"), testset=fds.load_split("test"))
    except Exception as err:  # any Hub/network/cache failure means "cannot download"
        raise RuntimeError(
            f"Downloading {DATASET_KEY}={spec.name!r} ({spec.hf_name!r}) from Hugging "
            f"Face failed: {type(err).__name__}: {err}. To run offline, set the "
            f"run-config option {DATA_DIR_KEY} to a directory of MNIST IDX files "
            f"(e.g. --run-config \"{DATA_DIR_KEY}='../shared/data/mnist'\"); "
            f"offline supports: {_offline_names()}"
        ) from err
    log(
        INFO,
        "Loaded %s from Hugging Face: %d training, %d test examples",
        spec.hf_name,
        len(splits.pool),
        len(splits.testset),
    )
    return splits
