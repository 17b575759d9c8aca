"""Tests for the data module: IDX reading, split, tensors, partitions, errors."""

from collections import Counter
from pathlib import Path

import datasets
import flwr_datasets
import numpy as np
import pytest
import torch
from conftest import write_idx
from flwr_datasets.partitioner import DirichletPartitioner
from PIL import Image

from afl_flwr import data

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
# Class counts of the MNIST test set, as published with it (see DATA_DIR/README.md).
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
NUM_PARTITIONS = 10
ALPHA = 0.5
SEED = 42

requires_mnist = pytest.mark.skipif(
    not (DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"MNIST IDX files not found in {DATA_DIR}",
)


def _tiny_idx_dir(directory: Path, *, train: int, test: int) -> tuple[np.ndarray, ...]:
    """Write a plain ``train-*`` pair and a gzipped ``t10k-*`` pair of 4x4 images."""
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(train, 4, 4), dtype=np.uint8)
    train_y = rng.integers(0, 10, size=train, dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(test, 4, 4), dtype=np.uint8)
    test_y = rng.integers(0, 10, size=test, dtype=np.uint8)
    write_idx(directory / "train-images-idx3-ubyte", train_x)
    write_idx(directory / "train-labels-idx1-ubyte", train_y)
    write_idx(directory / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", test_y)
    return train_x, train_y, test_x, test_y


def _pool_dataset(labels: np.ndarray) -> datasets.Dataset:
    """Return a label-only pool with an ``index`` column to trace examples."""
    return datasets.Dataset.from_dict(
        {"index": np.arange(len(labels)), "label": labels.astype(np.int64)}
    )


def _indices(partitioner: DirichletPartitioner, num_partitions: int) -> list[list[int]]:
    """Return the sorted pool indices of each partition."""
    return [
        sorted(partitioner.load_partition(i)["index"]) for i in range(num_partitions)
    ]


def _row_counter(
    images: torch.Tensor, labels: torch.Tensor
) -> Counter[tuple[bytes, int]]:
    """Multiset of (image bytes, label) rows."""
    return Counter(
        (image.numpy().tobytes(), int(label))
        for image, label in zip(images, labels, strict=True)
    )


# --- registry ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_registry_entries_are_consistent(name: str) -> None:
    # Execute
    spec = data.get_dataset_spec(name)

    # Assert
    assert spec.name == name
    assert spec.num_classes == 10
    assert spec.mean == (0.5,) * spec.in_channels
    assert spec.std == (0.5,) * spec.in_channels


def test_unknown_dataset_names_key_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"'svhn'.*'dataset'.*cifar10, mnist"):
        data.get_dataset_spec("svhn")


def test_load_partition_rejects_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
        data.load_partition("svhn", str(DATA_DIR), NUM_PARTITIONS, 0, ALPHA, SEED)


# --- IDX files --------------------------------------------------------------------


@requires_mnist
def test_load_idx_reads_real_mnist_test_set() -> None:
    # Execute
    images, labels = data.load_idx(DATA_DIR)

    # Assert
    assert images.shape == (10_000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == MNIST_TEST_CLASS_COUNTS
    assert images.min() == 0
    assert images.max() == 255


def test_load_idx_merges_train_then_t10k_plain_or_gzip(tmp_path: Path) -> None:
    # Prepare
    train_x, train_y, test_x, test_y = _tiny_idx_dir(tmp_path, train=7, test=5)

    # Execute
    images, labels = data.load_idx(tmp_path)

    # Assert
    np.testing.assert_array_equal(images, np.concatenate([train_x, test_x]))
    np.testing.assert_array_equal(labels, np.concatenate([train_y, test_y]))


def test_load_idx_missing_dir_names_key_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="data-dir") as info:
        data.load_idx(missing)
    assert str(missing) in str(info.value)
    assert "t10k-images-idx3-ubyte" in str(info.value)


def test_load_idx_empty_dir_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data-dir.*t10k-labels-idx1-ubyte"):
        data.load_idx(tmp_path)


def test_load_idx_images_without_labels(tmp_path: Path) -> None:
    # Prepare
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_idx(tmp_path)


def test_load_idx_rejects_count_mismatch(tmp_path: Path) -> None:
    # Prepare
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"3 images.*2 labels"):
        data.load_idx(tmp_path)


def test_load_idx_rejects_bad_magic(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04" + bytes(8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"not an IDX file.*2051"):
        data.load_idx(tmp_path)


def test_load_idx_rejects_truncated_payload(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((3, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"47 data bytes.*\(3, 4, 4\)"):
        data.load_idx(tmp_path)


# --- split and central test set ---------------------------------------------------


def test_split_holdout_keeps_order() -> None:
    # Prepare
    images = np.arange(10 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2)
    labels = np.arange(10)

    # Execute
    (pool_x, pool_y), (test_x, test_y) = data.split_holdout(images, labels, 3)

    # Assert
    np.testing.assert_array_equal(pool_y, np.arange(7))
    np.testing.assert_array_equal(test_y, np.arange(7, 10))
    np.testing.assert_array_equal(pool_x, images[:7])
    np.testing.assert_array_equal(test_x, images[7:])


@pytest.mark.parametrize("num_test", [0, 10, -1])
def test_split_holdout_rejects_bad_num_test(num_test: int) -> None:
    with pytest.raises(ValueError, match=rf"num-test={num_test}.*allowed: 1\.\.9"):
        data.split_holdout(np.zeros((10, 2, 2), np.uint8), np.zeros(10), num_test)


@requires_mnist
def test_offline_split_is_8000_train_2000_test() -> None:
    # Execute
    sizes = data.partition_sizes("mnist", str(DATA_DIR), NUM_PARTITIONS, ALPHA, SEED)
    testset = data.load_central_testset("mnist", str(DATA_DIR))

    # Assert
    assert sum(sizes) == 8000
    assert len(testset) == 2000


@requires_mnist
def test_central_testset_is_last_2000_normalised() -> None:
    # Prepare
    images, labels = data.load_idx(DATA_DIR)
    expected = images[-2000:].astype(np.float32)[:, None] / 127.5 - 1.0

    # Execute
    x, y = data.load_central_testset("mnist", str(DATA_DIR)).tensors

    # Assert
    assert x.shape == (2000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert x.min().item() == -1.0
    assert x.max().item() == 1.0
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels[-2000:])


def test_offline_relative_and_absolute_dirs_share_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    rng = np.random.default_rng(1)
    write_idx(
        idx_dir / "t10k-images-idx3-ubyte",
        rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8),
    )
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.arange(60) % 10)
    monkeypatch.chdir(tmp_path)

    # Execute
    relative = data.load_central_testset("mnist", "idx", num_test=20)
    absolute = data.load_central_testset("mnist", str(idx_dir), num_test=20)

    # Assert
    assert len(relative) == 20
    torch.testing.assert_close(relative.tensors, absolute.tensors)


# --- tensors ----------------------------------------------------------------------


def test_images_to_tensor_moves_channels_first() -> None:
    # Prepare: channels hold 0, 10 and 255, so each one is recognisable.
    images = np.zeros((2, 3, 5, 3), dtype=np.uint8)
    images[..., 1] = 10
    images[..., 2] = 255
    mean, std = (0.0, 0.5, 0.5), (1.0, 0.5, 0.25)
    expected = np.stack(
        [
            np.full((3, 5), (v / 255 - m) / s)
            for v, m, s in zip((0, 10, 255), mean, std, strict=True)
        ]
    )

    # Execute
    tensor = data.images_to_tensor(images, mean, std)

    # Assert
    assert tensor.shape == (2, 3, 3, 5)
    np.testing.assert_allclose(tensor[1].numpy(), expected, rtol=1e-6)


def test_images_to_tensor_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        data.images_to_tensor(np.zeros((1, 2, 2)), (0.5,), (0.5,))


def test_images_to_tensor_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="3 entries"):
        data.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), (0.5,), (0.5,))


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_to_tensor_dataset_decodes_hf_images(name: str) -> None:
    # Prepare: the online path stores PIL images (Image feature).
    spec = data.get_dataset_spec(name)
    rng = np.random.default_rng(0)
    shape = (4, spec.image_size, spec.image_size, spec.in_channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    mode = "L" if spec.in_channels == 1 else "RGB"
    ds = datasets.Dataset.from_dict(
        {
            spec.image_key: [
                Image.fromarray(p.squeeze(-1) if mode == "L" else p) for p in pixels
            ],
            spec.label_key: [3, 1, 4, 1],
        },
        features=datasets.Features(
            {spec.image_key: datasets.Image(), spec.label_key: datasets.Value("int64")}
        ),
    )
    expected = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0

    # Execute
    x, y = data.to_tensor_dataset(ds, spec).tensors

    # Assert
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert y.tolist() == [3, 1, 4, 1]


def test_to_tensor_dataset_rejects_wrong_image_size() -> None:
    # Prepare
    spec = data.get_dataset_spec("mnist")
    ds = datasets.Dataset.from_dict(
        {"image": np.zeros((2, 8, 8), np.uint8).tolist(), "label": [0, 1]}
    )

    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(28, 28\)"):
        data.to_tensor_dataset(ds, spec)


# --- label histogram --------------------------------------------------------------


def test_label_histogram_counts_every_class() -> None:
    histogram = data.label_histogram(np.array([0, 2, 2, 4]), 5)
    assert histogram.tolist() == [1, 0, 2, 0, 1]


def test_label_histogram_rejects_out_of_range_label() -> None:
    with pytest.raises(ValueError, match=r"allowed: 0\.\.2"):
        data.label_histogram(np.array([0, 3]), 3)


# --- partitions -------------------------------------------------------------------


@requires_mnist
def test_partition_pool_is_deterministic_per_seed() -> None:
    # Prepare
    pool = _pool_dataset(data.load_idx(DATA_DIR)[1][:8000])

    # Execute
    first = _indices(
        data.partition_pool(pool, num_partitions=10, alpha=ALPHA, seed=1), 10
    )
    again = _indices(
        data.partition_pool(pool, num_partitions=10, alpha=ALPHA, seed=1), 10
    )
    other = _indices(
        data.partition_pool(pool, num_partitions=10, alpha=ALPHA, seed=2), 10
    )

    # Assert
    assert first == again
    assert first != other


@requires_mnist
def test_partitions_are_non_empty_disjoint_and_cover_the_pool() -> None:
    # Prepare
    pool = _pool_dataset(data.load_idx(DATA_DIR)[1][:8000])

    # Execute
    indices = _indices(
        data.partition_pool(pool, num_partitions=10, alpha=ALPHA, seed=SEED), 10
    )

    # Assert
    assert all(len(part) > 0 for part in indices)
    flat = [i for part in indices for i in part]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == list(range(8000))


# flwr-datasets warns on each Dirichlet redraw; redraws are expected here.
@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_small_pool_still_gives_every_partition_an_example() -> None:
    # Prepare: 30 examples for 10 partitions; very skewed alpha.
    pool = _pool_dataset(np.arange(30) % 3)

    # Execute
    partitioner = data.partition_pool(pool, num_partitions=10, alpha=0.3, seed=0)

    # Assert
    sizes = [len(partitioner.load_partition(i)) for i in range(10)]
    assert min(sizes) >= 1
    assert sum(sizes) == 30


def test_partition_pool_rejects_more_partitions_than_examples() -> None:
    with pytest.raises(ValueError, match=r"num-partitions=5.*allowed: 1\.\.4"):
        data.partition_pool(
            _pool_dataset(np.arange(4)), num_partitions=5, alpha=1.0, seed=0
        )


@requires_mnist
def test_load_partition_tensors_match_the_pool() -> None:
    # Prepare
    images, labels = data.load_idx(DATA_DIR)
    pool = data.images_to_tensor(images[:8000], (0.5,), (0.5,))
    expected = _row_counter(pool, torch.from_numpy(labels[:8000]))

    # Execute
    parts = [
        data.load_partition("mnist", str(DATA_DIR), NUM_PARTITIONS, pid, ALPHA, SEED)
        for pid in range(NUM_PARTITIONS)
    ]
    sizes = data.partition_sizes("mnist", str(DATA_DIR), NUM_PARTITIONS, ALPHA, SEED)

    # Assert
    assert [len(part) for part in parts] == sizes
    assert all(part.tensors[0].shape[1:] == (1, 28, 28) for part in parts)
    combined: Counter[tuple[bytes, int]] = Counter()
    for part in parts:
        combined.update(_row_counter(*part.tensors))
    assert combined == expected


@requires_mnist
def test_load_partition_is_reproducible_across_calls() -> None:
    # Execute
    first = data.load_partition("mnist", str(DATA_DIR), NUM_PARTITIONS, 3, ALPHA, SEED)
    again = data.load_partition("mnist", str(DATA_DIR), NUM_PARTITIONS, 3, ALPHA, SEED)

    # Assert
    torch.testing.assert_close(first.tensors, again.tensors)


@requires_mnist
def test_partitions_are_non_iid() -> None:
    # Prepare
    global_hist = np.bincount(data.load_idx(DATA_DIR)[1][:8000], minlength=10)
    global_dist = global_hist / global_hist.sum()

    # Execute
    distances = []
    for pid in range(NUM_PARTITIONS):
        labels = data.load_partition(
            "mnist", str(DATA_DIR), NUM_PARTITIONS, pid, ALPHA, SEED
        ).tensors[1]
        hist = data.label_histogram(labels.numpy(), 10)
        distances.append(0.5 * np.abs(hist / hist.sum() - global_dist).sum())

    # Assert: total-variation distance to the global label distribution.
    assert max(distances) > 0.2


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize("partition_id", [-1, NUM_PARTITIONS])
def test_load_partition_rejects_out_of_range_id(partition_id: int) -> None:
    with pytest.raises(ValueError, match=rf"partition-id={partition_id}.*\[0, 10\)"):
        data.load_partition(
            "mnist", str(DATA_DIR), NUM_PARTITIONS, partition_id, ALPHA, SEED
        )


def test_load_partition_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match="data-dir") as info:
        data.load_partition("mnist", str(missing), NUM_PARTITIONS, 0, ALPHA, SEED)
    assert str(missing) in str(info.value)


def test_cifar10_offline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cifar10.*allowed offline: mnist"):
        data.load_central_testset("cifar10", str(tmp_path))


def test_failed_download_names_cause_and_data_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a FederatedDataset whose download fails as it does without network.
    class OfflineFederatedDataset:
        def __init__(self, **_: object) -> None:
            pass

        def load_split(self, split: str) -> datasets.Dataset:
            raise ConnectionError(f"cannot reach huggingface.co for {split}")

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", OfflineFederatedDataset)

    # Execute / Assert
    with pytest.raises(
        RuntimeError, match=r"failed.*cannot reach huggingface\.co.*data-dir"
    ):
        data.load_central_testset("cifar10", "")
