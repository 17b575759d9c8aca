"""The aggregator interface: how one asynchronous aggregation rule plugs in.

An aggregator decides what an admitted update weighs, when a merge is due and
what the merge computes; it owns its own state (a buffer, a cache of client
updates, optimiser moments) and saves and restores it for checkpoints. The
strategy's event loop (:mod:`afl_flwr.strategy`) is written once and calls it:

1. ``add(update)`` for every admitted update; ``True`` means a merge is due;
2. ``merge(current)`` returns the next global model and empties the buffer.

A new rule is one module defining an :class:`Aggregator` subclass, registered
with ``@AGGREGATORS.register("name")``; ``StalenessAwareAsyncStrategy(
aggregation="name")`` then uses it, or a caller passes an instance directly.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from afl_flwr.aggregation import Params
from afl_flwr.registry import Registry
from afl_flwr.staleness import StalenessFn, polynomial


@dataclass(frozen=True)
class Update:
    """One admitted client update, as an aggregator sees it.

    Parameters
    ----------
    client : int
        Stable client id (the data partition when known, else the node id).
    params : Params
        The client's model ``x_i`` (read-only views are allowed).
    base : Params or None
        The global model the client started from (``None`` when the aggregator
        does not need bases).
    base_version : int
        Version of ``base``.
    staleness : int
        ``tau``: global versions merged between dispatch and arrival.
    num_examples : float
        The client's example count ``n_i`` (``> 0``).
    metrics : Mapping[str, Any]
        The client's reported metrics.
    """

    client: int
    params: Params
    base: Params | None
    base_version: int
    staleness: int
    num_examples: float
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AggregatorSettings:
    """The strategy's keyword arguments an aggregator may read.

    Parameters
    ----------
    buffer_size : int (default: 5)
        Updates per buffered merge ``K``.
    server_lr : float (default: 1.0)
        Server learning rate ``eta_g``.
    mixing_rate : float (default: 0.5)
        FedAsync's mixing weight ``a``.
    staleness_fn : StalenessFn (default: polynomial with a = 0.5)
        ``tau -> s(tau)``.
    """

    buffer_size: int = 5
    server_lr: float = 1.0
    mixing_rate: float = 0.5
    staleness_fn: StalenessFn = polynomial


class Aggregator(ABC):
    """Base class of asynchronous aggregation rules.

    Subclasses implement :meth:`add`, :meth:`merge` and, when they keep state
    across merges, :meth:`state` / :meth:`load_state`. ``needs_base`` says
    whether updates must carry the model they started from (delta-based rules).
    """

    name: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings: AggregatorSettings) -> "Aggregator":
        """Build the rule from the strategy's settings (override to read more)."""
        return cls()

    @abstractmethod
    def weight(self, update: Update) -> float:
        """The weight the update gets (recorded in the run history)."""

    @abstractmethod
    def add(self, update: Update) -> bool:
        """Take one admitted update; return ``True`` when a merge is due."""

    @abstractmethod
    def merge(self, current: Params) -> Params:
        """Merge what is pending into ``current`` and return the next global model.

        Empties the buffer. ``current`` must not be modified unless
        ``needs_base`` is ``False`` (nothing else then refers to it).
        """

    def pending(self) -> Sequence[Update]:
        """Updates waiting for the next merge (none for immediate rules)."""
        return ()

    def observe_population(self, num_clients: int) -> None:
        """The number of clients in the federation, told before each merge.

        Rules that average over every client (CA2FL's cache mean) read it; the
        default ignores it.
        """
        return None

    def discard_pending(self) -> list[Update]:
        """Drop and return what waits (at the end of a run)."""
        return []

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """Arrays and JSON-ready metadata to checkpoint (none by default)."""
        return {}, {}

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (a no-op by default)."""
        return None

    def summary(self) -> str:
        """One line for the start-up log."""
        return self.name or type(self).__name__


class BufferedAggregator(Aggregator):
    """Common part of rules that merge every ``K`` updates (FedBuff and its kin).

    Parameters
    ----------
    buffer_size : int (default: 5)
        ``K``, updates per merge (``>= 1``).
    staleness_fn : StalenessFn (default: polynomial with a = 0.5)
        ``tau -> s(tau)``.
    """

    def __init__(
        self, *, buffer_size: int = 5, staleness_fn: StalenessFn = polynomial
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be >= 1 (K)")
        self.buffer_size = buffer_size
        self.staleness_fn = staleness_fn
        self._buffer: list[Update] = []

    def weight(self, update: Update) -> float:
        """``n_i s(tau_i)``."""
        return update.num_examples * self.staleness_fn(update.staleness)

    def add(self, update: Update) -> bool:
        """Buffer the update; a merge is due once ``K`` are in."""
        if update.base is None:
            raise ValueError(f"{type(self).__name__} needs each update's base model")
        self._buffer.append(update)
        return len(self._buffer) >= self.buffer_size

    def pending(self) -> Sequence[Update]:
        """The buffer."""
        return tuple(self._buffer)

    def discard_pending(self) -> list[Update]:
        """Empty the buffer and return it."""
        buffer, self._buffer = self._buffer, []
        return buffer

    def take_buffer(self) -> list[Update]:
        """Empty the buffer for a merge; raise if it is empty."""
        if not self._buffer:
            raise ValueError("merge() called with an empty buffer")
        return self.discard_pending()

    def scales(self, buffer: Sequence[Update]) -> list[float]:
        """``s(tau_i)`` of each buffered update."""
        return [self.staleness_fn(u.staleness) for u in buffer]

    def summary(self) -> str:
        """Name and K."""
        return f"{self.name} (K={self.buffer_size})"


def bases_of(buffer: Sequence[Update]) -> list[Params]:
    """The base model of each update (all present for buffered rules)."""
    bases = [u.base for u in buffer]
    if any(b is None for b in bases):
        raise ValueError("an update has no base model")
    return bases  # type: ignore[return-value]


AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregation")
