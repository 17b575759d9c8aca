"""Checkpoints every few versions, written atomically (:mod:`afl_flwr.checkpoint`)."""

from collections.abc import Sequence
from pathlib import Path

from afl_flwr.callbacks.base import Callback, RunView, Stop
from afl_flwr.history import UpdateEvent


class Checkpoint(Callback):
    """Write a checkpoint of every component every ``every`` versions.

    Resume with ``strategy.resume_from(path)`` (run config: ``resume-from``).

    Parameters
    ----------
    path : str or Path
        The checkpoint file, replaced atomically each time.
    every : int (default: 1)
        Versions between checkpoints (``>= 1``).
    """

    def __init__(self, path: str | Path, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.path = Path(path)
        self.every = every

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """Checkpoint on schedule."""
        if run.version % self.every == 0:
            run.checkpoint(self.path)
        return None
