"""Callbacks that end a run: a time budget, early stopping on an evaluation metric."""

import math

from afl_flwr.callbacks.base import Callback, RunView, Stop
from afl_flwr.history import CENTRAL, Evaluation


class TimeBudget(Callback):
    """Stop once ``max_time`` seconds passed (simulated with a virtual clock).

    Parameters
    ----------
    max_time : float
        The budget in seconds (``> 0``).
    """

    def __init__(self, max_time: float) -> None:
        if not max_time > 0:
            raise ValueError(f"max_time={max_time} must be > 0")
        self.max_time = max_time

    def on_poll(self, run: RunView) -> Stop | None:
        """The budget is spent."""
        if run.clock.now() >= self.max_time:
            return Stop(f"time budget of {self.max_time:.1f}s reached")
        return None


class EarlyStopping(Callback):
    """Stop when an evaluation metric has not improved for ``patience`` evaluations.

    With background central evaluation (the strategy's default) the loop keeps
    training while a version is evaluated, so the run may stop a version or two
    after the one whose evaluation asked for it.

    Parameters
    ----------
    metric : str (default: "test-acc")
        The metric to watch (a key of the evaluation's metrics).
    patience : int (default: 5)
        Evaluations without improvement tolerated (``>= 1``).
    mode : str (default: "max")
        ``"max"`` (accuracy) or ``"min"`` (loss).
    min_delta : float (default: 0.0)
        An improvement smaller than this does not count.
    kind : str (default: "central")
        Watch central (``"central"``) or federated (``"federated"``) evaluations.
    """

    def __init__(
        self,
        metric: str = "test-acc",
        *,
        patience: int = 5,
        mode: str = "max",
        min_delta: float = 0.0,
        kind: str = CENTRAL,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1")
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r}; allowed: max, min")
        if not min_delta >= 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0")
        self.metric = metric
        self.patience = patience
        self.sign = 1.0 if mode == "max" else -1.0
        self.min_delta = min_delta
        self.kind = kind
        self.best = -math.inf
        self.best_version = -1
        self.bad = 0

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Forget the previous run."""
        self.best, self.best_version, self.bad = -math.inf, -1, 0

    def on_evaluation(self, run: RunView, evaluation: Evaluation) -> Stop | None:
        """Count evaluations without improvement; stop after ``patience``."""
        if evaluation.kind != self.kind or self.metric not in evaluation.point.metrics:
            return None
        value = self.sign * evaluation.point.metrics[self.metric]
        if value > self.best + self.min_delta:
            self.best, self.best_version, self.bad = value, evaluation.point.version, 0
            return None
        self.bad += 1
        if self.bad < self.patience:
            return None
        return Stop(
            f"early stopping: {self.metric} did not improve for {self.patience} "
            f"evaluation(s) (best {self.sign * self.best:.4f} at version "
            f"{self.best_version})"
        )
