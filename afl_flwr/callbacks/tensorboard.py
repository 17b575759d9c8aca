"""TensorBoard tracker: the run's scalars through ``torch.utils.tensorboard``.

Needs the ``tensorboard`` package (``pip install "afl-flwr[tensorboard]"``).
Per version: merged updates, mean and max staleness, simulated time and the
clients' aggregated train metrics (``train/<metric>``); per evaluation:
``central/<metric>`` or ``federated/<metric>``. The step is the version.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afl_flwr.callbacks.base import Callback, RunView, Stop, import_extra
from afl_flwr.history import Evaluation, UpdateEvent


class TensorBoard(Callback):
    """Write scalars of every version and evaluation to a TensorBoard log dir.

    Parameters
    ----------
    log_dir : str or Path
        Where the event files go (``tensorboard --logdir <log_dir>``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Open the writer (and record the strategy's settings as text)."""
        import_extra("tensorboard", "tensorboard")
        writer = import_extra("torch.utils.tensorboard", "tensorboard")
        self._writer = writer.SummaryWriter(log_dir=str(self.log_dir))
        settings = "\n".join(f"{k}: {v}" for k, v in run.settings.items())
        self._writer.add_text("settings", settings, 0)

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """Updates merged, staleness, simulated time, train metrics."""
        step = run.version
        taus = [e.staleness for e in merged if e.staleness is not None]
        self._writer.add_scalar("version/merged-updates", len(merged), step)
        if taus:
            self._writer.add_scalar(
                "version/staleness-mean", sum(taus) / len(taus), step
            )
            self._writer.add_scalar("version/staleness-max", max(taus), step)
        self._writer.add_scalar("version/sim-time", run.clock.now(), step)
        for key, value in run.state.result.train_metrics_clientapp.get(
            step, {}
        ).items():
            self._writer.add_scalar(f"train/{key}", float(value), step)  # type: ignore[arg-type]
        return None

    def on_evaluation(self, run: RunView, evaluation: Evaluation) -> Stop | None:
        """Every metric of the evaluation, at its version."""
        point = evaluation.point
        for key, value in point.metrics.items():
            self._writer.add_scalar(f"{evaluation.kind}/{key}", value, point.version)
        return None

    def on_stop(self, run: RunView) -> None:
        """Flush and close."""
        if self._writer is not None:
            self._writer.add_text(
                "stop-reason", run.state.stop_reason or "completed", run.version
            )
            self._writer.close()
            self._writer = None
