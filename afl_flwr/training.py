"""The paper's client-side rule, and evaluation.

Adam with a delay-aware, decaying learning rate, and early stopping on the
epoch's mean training loss.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader


def delay_aware_lr(lr0: float, epoch: int, alpha: float, tau: float) -> float:
    """``lr_e = lr0 / (sqrt(e + 1) * (1 + alpha * tau))`` for 0-based epoch ``e``.

    The paper's delay-aware client learning rate: it decays with the local epoch
    and shrinks for clients whose updates arrive ``tau`` versions late.
    """
    if epoch < 0 or tau < 0:
        raise ValueError(f"epoch ({epoch}) and tau ({tau}) must be >= 0")
    return lr0 / (math.sqrt(epoch + 1) * (1.0 + alpha * tau))


@dataclass
class EarlyStopping:
    """Stop when the epoch loss has not improved for ``patience`` epochs in a row.

    Parameters
    ----------
    patience : int
        Epochs without improvement tolerated before stopping (``>= 1``).
    min_delta : float (default: 0.0)
        Improvement smaller than this (absolute) does not count.
    min_rel_delta : float (default: 0.0)
        Improvement smaller than this fraction of the best loss does not count
        (scale-free: 0.05 asks each epoch to cut the loss by 5%).
    """

    patience: int
    min_delta: float = 0.0
    min_rel_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience={self.patience} must be >= 1")
        if not 0.0 <= self.min_rel_delta < 1.0:
            raise ValueError(f"min_rel_delta={self.min_rel_delta} must be in [0, 1)")

    def step(self, loss: float) -> bool:
        """Record one epoch's loss; return True when training should stop."""
        threshold = self.best - self.min_delta
        if math.isfinite(self.best):
            threshold = min(threshold, self.best * (1.0 - self.min_rel_delta))
        if loss < threshold:
            self.best = loss
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one local training job."""

    mean_loss: float
    epochs_run: int
    steps: int
    epoch_losses: tuple[float, ...]


def train_local(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr0: float,
    alpha: float,
    tau: float,
    patience: int,
    device: torch.device,
    min_rel_delta: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place with the paper's local rule.

    Adam on the NLL loss; epoch ``e`` uses :func:`delay_aware_lr` (applied through
    a ``LambdaLR`` schedule so Adam's moments carry across epochs), and training
    stops early per :class:`EarlyStopping`.

    Returns
    -------
    TrainResult
        Mean training loss of the last epoch run, epochs run, optimizer steps.
    """
    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr0)
    schedule = LambdaLR(optimizer, lambda e: delay_aware_lr(1.0, e, alpha, tau))
    stopper = EarlyStopping(patience, min_rel_delta=min_rel_delta)
    criterion = nn.NLLLoss()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            total += loss.item() * len(labels)
            count += len(labels)
        losses.append(total / max(count, 1))
        schedule.step()
        if stopper.step(losses[-1]):
            break
    return TrainResult(
        mean_loss=losses[-1] if losses else math.nan,
        epochs_run=len(losses),
        steps=steps,
        epoch_losses=tuple(losses),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[float, float]:
    """Return mean NLL loss and accuracy of ``model`` over ``loader``."""
    model.to(device)
    model.eval()
    criterion = nn.NLLLoss(reduction="sum")
    loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        output = model(images)
        loss += criterion(output, labels).item()
        correct += (output.argmax(dim=1) == labels).sum().item()
        count += len(labels)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return loss / count, correct / count


def get_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
