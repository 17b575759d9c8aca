"""Flower's quickstart-pytorch task, offline: its LeNet on the shipped MNIST files.

The model and the training loop are those of Flower's quickstart-pytorch example
(``Net``: two 5x5 convolutions, three linear layers; SGD with momentum 0.9 and
cross-entropy). The data are the real MNIST test images shipped beside the
repository (no download), padded to 3 x 32 x 32 for the CIFAR-sized network and
split IID over the nodes. Nothing here imports afl_flwr.
"""

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DATA_DIR = Path(
    os.environ.get(
        "QUICKSTART_MNIST", Path(__file__).resolve().parents[3] / "shared/data/mnist"
    )
)
TRAIN_PER_NODE = 500
NUM_TEST = 1000


class Net(nn.Module):
    """The quickstart's model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _idx(name: str) -> np.ndarray:
    raw = gzip.decompress((DATA_DIR / name).read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=1)
def _all() -> tuple[torch.Tensor, torch.Tensor]:
    images = _idx("t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = _idx("t10k-labels-idx1-ubyte.gz").astype(np.int64)
    x = torch.from_numpy(images).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # 3 x 32 x 32
    x = (x - 0.5) / 0.5
    return x, torch.from_numpy(labels)


def load_data(partition_id: int, num_partitions: int, batch_size: int) -> DataLoader:
    """The node's IID share of the training images (the first 9,000 images)."""
    x, y = _all()
    pool = len(x) - NUM_TEST
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(0))
    share = order[partition_id::num_partitions][:TRAIN_PER_NODE]
    return DataLoader(
        TensorDataset(x[share], y[share]), batch_size=batch_size, shuffle=True
    )


def load_centralized_dataset() -> DataLoader:
    """The last 1,000 images, never trained on."""
    x, y = _all()
    return DataLoader(TensorDataset(x[-NUM_TEST:], y[-NUM_TEST:]), batch_size=256)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """The quickstart's local training: SGD with momentum 0.9."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running = 0.0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running += loss.item()
    return running / (epochs * len(loader))


def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy."""
    criterion = nn.CrossEntropyLoss()
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in loader:
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(loader), correct / len(loader.dataset)
