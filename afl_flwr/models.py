"""Model registry: the paper's MNIST CNN, its CIFAR-10 ResNet-20, a small CNN, an MLP.

Every model maps images ``(N, C, H, W)`` to log-probabilities ``(N, num_classes)``
(log-softmax output), matching the paper's NLL training loss.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ModelBuilder = Callable[[int, int], nn.Module]


class PaperCNN(nn.Module):
    """The paper's MNIST CNN.

    Three 3x3 convolutions (stride 1, padding 1, 32 channels, ReLU), adaptive average
    pooling to 1x1 and one linear layer, with Xavier-uniform weights and zero biases.

    Parameters
    ----------
    in_channels : int (default: 1)
        Number of input image channels.
    num_classes : int (default: 10)
        Number of output classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(32, 32, kernel_size=3, stride=1, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class log-probabilities."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = torch.flatten(self.pool(x), 1)
        return F.log_softmax(self.fc(x), dim=1)


class SmallCNN(nn.Module):
    """A standard small CNN (two conv + max-pool stages, two linear layers).

    The layout of Flower's ``quickstart-pytorch`` model; it reaches ~99% on MNIST
    where the paper's CNN learns slowly.

    Parameters
    ----------
    in_channels : int (default: 1)
        Number of input image channels.
    num_classes : int (default: 10)
        Number of output classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        # Adaptive pooling makes the head independent of 28x28 vs 32x32 inputs.
        self.squeeze = nn.AdaptiveAvgPool2d(7)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class log-probabilities."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(self.squeeze(x), 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + batch norm, identity or 1x1 shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_planes, planes, 3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The paper's CIFAR-10 ResNet-20 (He et al. 2016, Sec. 4.2).

    BasicBlock x [3, 3, 3] with 16/32/64 channels, batch norm, 1x1 convolution
    shortcuts where the shape changes, global average pooling and a linear layer.

    Parameters
    ----------
    in_channels : int (default: 3)
        Number of input image channels.
    num_classes : int (default: 10)
        Number of output classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(3):
                stages.append(
                    BasicBlock(in_planes, planes, stride if block == 0 else 1)
                )
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class log-probabilities."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.flatten(self.pool(self.layers(x)), 1)
        return F.log_softmax(self.fc(x), dim=1)


class MLP(nn.Module):
    """The "2NN" of McMahan et al. (2017): two hidden layers of 200 ReLU units.

    Inputs are average-pooled to 28 x 28 first, so MNIST and CIFAR-10 both fit.
    About 50x cheaper per example than :class:`SmallCNN`: the benchmark's quick
    size uses it on a 2-core machine.

    Parameters
    ----------
    in_channels : int (default: 1)
        Number of input image channels.
    num_classes : int (default: 10)
        Number of output classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(28)
        self.fc1 = nn.Linear(in_channels * 28 * 28, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class log-probabilities."""
        x = torch.flatten(self.squeeze(x), 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


MODELS: dict[str, ModelBuilder] = {
    "paper-cnn": PaperCNN,
    "small-cnn": SmallCNN,
    "resnet20": ResNet20,
    "mlp": MLP,
}


def get_model(name: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Build a registered model by name.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    in_channels : int (default: 1)
        Number of input image channels (1 for MNIST, 3 for CIFAR-10).
    num_classes : int (default: 10)
        Number of output classes.

    Returns
    -------
    nn.Module
        A freshly initialised model.

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    """
    if name not in MODELS:
        raise ValueError(
            f"Unknown model '{name}' (key 'model'); "
            f"allowed: {', '.join(sorted(MODELS))}"
        )
    return MODELS[name](in_channels, num_classes)
