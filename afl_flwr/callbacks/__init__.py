"""Callbacks of the asynchronous loop: built-in ones and experiment trackers.

``strategy.start(..., callbacks=[...])`` takes any :class:`Callback`; see
:mod:`afl_flwr.callbacks.base` for the protocol. Trackers need their optional
extras: ``pip install "afl-flwr[tensorboard]"`` or ``"afl-flwr[mlflow]"``.
"""

from afl_flwr.callbacks.base import Callback, CallbackList, RunView, Stop
from afl_flwr.callbacks.checkpoint import Checkpoint
from afl_flwr.callbacks.evaluation import CentralEvaluation
from afl_flwr.callbacks.limits import EarlyStopping, TimeBudget
from afl_flwr.callbacks.progress import ProgressLog

__all__ = [
    "Callback",
    "CallbackList",
    "CentralEvaluation",
    "Checkpoint",
    "EarlyStopping",
    "ProgressLog",
    "RunView",
    "Stop",
    "TimeBudget",
]
