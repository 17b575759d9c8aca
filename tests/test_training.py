"""Tests for the client rule: delay-aware lr, early stopping, training, evaluation."""

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from afl_flwr.training import EarlyStopping, delay_aware_lr, evaluate, train_local

CPU = torch.device("cpu")


def _separable_loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    """Two Gaussian blobs in 2-D, far apart, labels 0/1, fixed order."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centers = torch.tensor([[-3.0, -3.0], [3.0, 3.0]])[labels]
    points = centers + 0.5 * torch.randn(n, 2, generator=gen)
    return DataLoader(TensorDataset(points, labels), batch_size=batch_size)


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 2), nn.LogSoftmax(dim=1))


def _stop_epoch(stopper: EarlyStopping, losses: list[float]) -> int | None:
    """1-based epoch after which ``stopper`` asks to stop, or None."""
    for epoch, loss in enumerate(losses, start=1):
        if stopper.step(loss):
            return epoch
    return None


@pytest.fixture
def recorded_lrs() -> Iterator[list[float]]:
    """Learning rate of every optimizer step taken while the test runs."""
    lrs: list[float] = []

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        lrs.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(hook)
    yield lrs
    handle.remove()


# --- delay_aware_lr -----------------------------------------------------------


@pytest.mark.parametrize(
    ("lr0", "epoch", "alpha", "tau", "expected"),
    [
        (0.1, 0, 0.0, 0.0, 0.1),  # 0.1 / (1 * 1)
        (0.1, 3, 0.0, 0.0, 0.05),  # 0.1 / (sqrt(4) * 1)
        (0.1, 0, 0.5, 2.0, 0.05),  # 0.1 / (1 * (1 + 1))
        (1.0, 8, 0.25, 4.0, 1.0 / 6.0),  # 1 / (3 * 2)
        (0.001, 15, 0.01, 20.0, 0.001 / 4.8),  # 0.001 / (4 * 1.2)
        (0.3, 1, 1.0, 0.0, 0.3 / math.sqrt(2.0)),
    ],
)
def test_delay_aware_lr_hand_values(
    lr0: float, epoch: int, alpha: float, tau: float, expected: float
) -> None:
    # Prepare / Execute
    lr = delay_aware_lr(lr0, epoch, alpha, tau)

    # Assert
    assert lr == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("epoch", "tau"), [(-1, 0.0), (0, -1.0), (-2, -0.5)])
def test_delay_aware_lr_rejects_negative_arguments(epoch: int, tau: float) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=r"must be >= 0"):
        delay_aware_lr(0.1, epoch, 0.01, tau)


# --- EarlyStopping ------------------------------------------------------------


@pytest.mark.parametrize(
    ("patience", "min_delta", "losses", "expected_stop"),
    [
        (2, 0.0, [1.0, 0.9, 0.95, 0.97], 4),
        (2, 0.0, [1.0, 0.9, 0.95, 0.8, 0.85, 0.85], 6),  # improvement resets
        (1, 0.0, [1.0, 1.0], 2),  # equal is not an improvement
        (3, 0.0, [0.5, 0.6, 0.7, 0.8, 0.1], 4),
        (1, 0.1, [1.0, 0.95], 2),  # improvement below min_delta
        (1, 0.1, [1.0, 0.85, 0.7], None),
        (1, 0.0, [1.0, 0.9, 0.8, 0.7, 0.6], None),  # always improving
        (4, 0.0, [1.0, 2.0, 3.0, 4.0, 5.0], 5),
        (5, 0.0, [1.0, 2.0, 3.0, 4.0, 5.0], None),
    ],
)
def test_early_stopping_stops_at_scripted_epoch(
    patience: int, min_delta: float, losses: list[float], expected_stop: int | None
) -> None:
    # Prepare
    stopper = EarlyStopping(patience, min_delta=min_delta)

    # Execute
    stop = _stop_epoch(stopper, losses)

    # Assert
    assert stop == expected_stop


def test_early_stopping_never_stops_on_strictly_improving_losses() -> None:
    # Prepare
    stopper = EarlyStopping(1)
    losses = [1.0 / (k + 1) for k in range(100)]

    # Execute
    stop = _stop_epoch(stopper, losses)

    # Assert
    assert stop is None
    assert stopper.best == losses[-1]


@pytest.mark.parametrize("patience", [0, -1])
def test_early_stopping_rejects_non_positive_patience(patience: int) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience)


# --- train_local --------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs"), [(10, 4, 3), (8, 4, 2), (7, 8, 4)]
)
def test_train_local_runs_all_epochs_without_early_stop(
    n: int, batch_size: int, epochs: int
) -> None:
    # Prepare: patience == epochs can never trigger (epoch 1 always improves).
    loader = _separable_loader(n, batch_size)
    model = _tiny_model()

    # Execute
    result = train_local(
        model,
        loader,
        epochs=epochs,
        lr0=0.05,
        alpha=0.01,
        tau=2.0,
        patience=epochs,
        device=CPU,
    )

    # Assert
    assert result.epochs_run == epochs
    assert result.steps == epochs * math.ceil(n / batch_size)
    assert len(result.epoch_losses) == epochs
    assert result.mean_loss == result.epoch_losses[-1]


def test_train_local_learns_separable_problem() -> None:
    # Prepare
    loader = _separable_loader(32, 8)
    model = _tiny_model()
    initial_loss, _ = evaluate(model, loader, CPU)

    # Execute
    result = train_local(
        model, loader, epochs=20, lr0=0.1, alpha=0.0, tau=0.0, patience=20, device=CPU
    )
    final_loss, accuracy = evaluate(model, loader, CPU)

    # Assert
    assert final_loss < 0.5 * initial_loss
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert accuracy == 1.0


def test_train_local_stops_early_when_loss_cannot_improve() -> None:
    # Prepare: lr0 = 0 leaves the weights, hence every epoch's loss, unchanged.
    n, batch_size = 10, 4
    loader = _separable_loader(n, batch_size)
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]

    # Execute
    result = train_local(
        model, loader, epochs=10, lr0=0.0, alpha=0.0, tau=0.0, patience=1, device=CPU
    )

    # Assert: epoch 1 sets the best loss, epoch 2 repeats it and stops.
    assert result.epochs_run == 2
    assert result.steps == 2 * math.ceil(n / batch_size)
    assert result.epoch_losses[0] == result.epoch_losses[1]
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)


def test_train_local_epoch_loss_is_example_weighted_mean() -> None:
    # Prepare: lr0 = 0, so the epoch loss is the model's loss on the data set.
    loader = _separable_loader(10, 4)  # batches of 4, 4, 2
    model = _tiny_model()
    points, labels = loader.dataset.tensors
    with torch.no_grad():
        log_probs = model(points).numpy().astype(np.float64)
    expected = -log_probs[np.arange(10), labels.numpy()].mean()

    # Execute
    result = train_local(
        model, loader, epochs=1, lr0=0.0, alpha=0.0, tau=0.0, patience=1, device=CPU
    )

    # Assert
    assert result.mean_loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("alpha", "tau"), [(0.0, 0.0), (0.5, 3.0), (0.01, 20.0)])
def test_train_local_uses_delay_aware_lr_each_epoch(
    alpha: float, tau: float, recorded_lrs: list[float]
) -> None:
    # Prepare
    lr0, epochs, n, batch_size = 0.02, 4, 10, 4
    steps_per_epoch = math.ceil(n / batch_size)
    loader = _separable_loader(n, batch_size)
    model = _tiny_model()
    expected = [
        lr0 / (math.sqrt(epoch + 1) * (1.0 + alpha * tau))
        for epoch in range(epochs)
        for _ in range(steps_per_epoch)
    ]

    # Execute
    train_local(
        model,
        loader,
        epochs=epochs,
        lr0=lr0,
        alpha=alpha,
        tau=tau,
        patience=epochs,
        device=CPU,
    )

    # Assert
    assert recorded_lrs == pytest.approx(expected, rel=1e-12)


# --- evaluate -----------------------------------------------------------------


def test_evaluate_matches_hand_computation() -> None:
    # Prepare: fixed linear model, 5 examples in uneven batches (2, 2, 1).
    weight = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    bias = np.array([0.0, -0.5, 0.25])
    points = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [2.0, -1.0], [0.3, 0.3]])
    labels = np.array([0, 1, 2, 2, 0])
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
    model = nn.Sequential(linear, nn.LogSoftmax(dim=1))
    loader = DataLoader(
        TensorDataset(
            torch.from_numpy(points).float(), torch.from_numpy(labels).long()
        ),
        batch_size=2,
    )
    logits = points @ weight.T + bias
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(len(labels)), labels].mean()
    expected_accuracy = np.mean(logits.argmax(axis=1) == labels)

    # Execute
    loss, accuracy = evaluate(model, loader, CPU)

    # Assert: predictions are [0, 1, 2, 0, 1], so 3 of 5 are right.
    assert expected_accuracy == pytest.approx(0.6)
    assert accuracy == pytest.approx(expected_accuracy)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_evaluate_leaves_weights_unchanged() -> None:
    # Prepare
    loader = _separable_loader(6, 4)
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]

    # Execute
    evaluate(model, loader, CPU)

    # Assert
    assert not model.training
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)


def test_evaluate_rejects_empty_loader() -> None:
    # Prepare
    empty = DataLoader(
        TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="empty"):
        evaluate(_tiny_model(), empty, CPU)
