"""The callback protocol of the asynchronous loop (in the spirit of pfl-research).

The loop in :mod:`afl_flwr.strategy.strategy` is written once; central
evaluation, checkpoints, the time budget, early stopping, the progress log and
experiment trackers hook into it as :class:`Callback` objects, and so can a
user's own (``strategy.start(..., callbacks=[...])``). A callback reads the run
through a :class:`RunView`; it may end the run by returning a :class:`Stop`
from :meth:`Callback.on_poll`, :meth:`Callback.on_version` or
:meth:`Callback.on_evaluation`.

Order of calls: ``on_start`` once; ``on_poll`` at every loop iteration (before
dispatch); ``on_version`` after every new global version; ``on_evaluation`` for
every recorded evaluation (central or federated), in version order;
``on_flush`` before a checkpoint is written and once when the run ends (finish
pending work, such as a background evaluation, so the record is complete);
``on_stop`` once at the very end, after every evaluation was announced, also
when the run failed.
"""

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afl_flwr.history import RunHistory, UpdateEvent

if TYPE_CHECKING:
    from afl_flwr.clock import Clock
    from afl_flwr.history import Evaluation
    from afl_flwr.strategy.model_store import ModelStore
    from afl_flwr.strategy.run_state import RunState
    from afl_flwr.strategy.scheduler import Scheduler


@dataclass(frozen=True)
class Stop:
    """A callback's request to end the run, with the reason (recorded, logged)."""

    reason: str


@dataclass(frozen=True)
class RunView:
    """What a callback may read of the run in progress.

    Parameters
    ----------
    state : RunState
        The run's history, counters and Flower ``Result``.
    model : ModelStore
        The global model: ``model.version``, ``model.record()``.
    clock : Clock
        ``clock.now()`` (simulated with a virtual clock) and ``clock.wall()``.
    scheduler : Scheduler
        Connected nodes and tasks in flight.
    num_rounds : int
        Versions the run is to reach.
    checkpoint : callable
        ``checkpoint(path)`` writes a checkpoint of every component now.
    settings : Mapping[str, Any]
        The strategy's settings (rule, slots, staleness bound, clock), for
        trackers to log.
    """

    state: "RunState"
    model: "ModelStore"
    clock: "Clock"
    scheduler: "Scheduler"
    num_rounds: int
    checkpoint: Callable[[Path], None]
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> int:
        """The current global version."""
        return self.model.version

    @property
    def history(self) -> RunHistory:
        """Everything recorded so far."""
        return self.state.history


class Callback:
    """Base class of callbacks: every method is optional (a no-op here)."""

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Before the first dispatch (``resumed``: the run continues a checkpoint)."""

    def on_poll(self, run: RunView) -> Stop | None:
        """At every loop iteration; collect background work, or ask for a stop."""
        return None

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """After a new global version was installed from the ``merged`` updates."""
        return None

    def on_evaluation(self, run: RunView, evaluation: "Evaluation") -> Stop | None:
        """After an evaluation of a version was recorded."""
        return None

    def on_flush(self, run: RunView, final: bool) -> None:
        """Finish pending work: before a checkpoint, or (``final``) at the end."""

    def on_stop(self, run: RunView) -> None:
        """Once, when the run ends (completed, stopped, or failed)."""


class CallbackList(Callback):
    """Several callbacks as one: each event in order; the first ``Stop`` wins."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"{callback!r} is not an afl_flwr.callbacks.Callback (subclass it "
                    "and override the events it needs)"
                )

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Every callback's ``on_start``."""
        for callback in self.callbacks:
            callback.on_start(run, resumed)

    def on_poll(self, run: RunView) -> Stop | None:
        """Every callback's ``on_poll``; the first stop."""
        return _first([c.on_poll(run) for c in self.callbacks])

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """Every callback's ``on_version``; the first stop."""
        return _first([c.on_version(run, merged) for c in self.callbacks])

    def on_evaluation(self, run: RunView, evaluation: "Evaluation") -> Stop | None:
        """Every callback's ``on_evaluation``; the first stop."""
        return _first([c.on_evaluation(run, evaluation) for c in self.callbacks])

    def on_flush(self, run: RunView, final: bool) -> None:
        """Every callback's ``on_flush``."""
        for callback in self.callbacks:
            callback.on_flush(run, final)

    def on_stop(self, run: RunView) -> None:
        """Every callback's ``on_stop``, even if one raises (the first error wins)."""
        error: BaseException | None = None
        for callback in self.callbacks:
            try:
                callback.on_stop(run)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                error = error or exc
        if error is not None:
            raise error


def import_extra(module: str, extra: str) -> Any:
    """Import ``module``, or explain which optional extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this callback needs {module.split('.')[0]}: "
            f'pip install "afl-flwr[{extra}]"'
        ) from err


def _first(stops: list[Stop | None]) -> Stop | None:
    return next((s for s in stops if s is not None), None)
