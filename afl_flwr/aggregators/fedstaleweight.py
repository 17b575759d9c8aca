"""FedStaleWeight: buffered aggregation, clients reweighted by their average staleness.

Ma, Tu, Chen and Janapa Reddi, "FedStaleWeight: Buffered Asynchronous Federated
Learning with Fair Aggregation via Staleness Reweighting" (arXiv 2406.02877).
Implemented from the authors' reference code (``afl-bench``,
``experiments/expected_staleness.py``) and the paper's abstract; the paper's
algorithm box was not available where this was written.
Asynchrony favours fast clients: a client ``r`` times slower than the rest
reports ``r`` times less often, so under non-IID data its classes are learned
less. Its updates also arrive about ``r`` times staler. FedStaleWeight weighs
each buffered update by its client's **average staleness** over the client's
last ``W`` updates, so a client's total weight per unit of time no longer
grows with its speed, and applies the weighted mean of the buffer's deltas:

    a_i = mean of (tau + 1) over client i's last W updates (this one included),
    x <- x + eta_g sum_i n_i a_i (x_i - x_base_i) / sum_i n_i a_i.

Two choices differ from the reference code and are this module's:

- staleness is counted from 1 (``tau + 1``, the versions between the update's
  base and the version it creates). The reference averages ``tau`` itself, so
  a buffer of fresh updates (``tau = 0``, e.g. the first merge) would get no
  weight at all and leave the model where it is;
- the weights carry the example counts ``n_i`` as every rule of this package
  does (FedAvg's ``n_i / sum n``): with equal average staleness the merge is
  FedAvg's, bit-identical at zero staleness and ``eta_g = 1``. The reference
  weighs clients equally.

The per-client windows are the reference's moving average of the last ``W``
stalenesses (default 5, as there; the reference's ``list.pop()`` drops the
newest entry once full, against its own comment "pop oldest", so here the
oldest goes); they are checkpointed with the run. There is no
staleness penalty ``s(tau)``: staleness raises a weight here, and the strategy's
``max-staleness`` still bounds it (an update staler than that is refused).

State arrays (BatchNorm statistics and counters, :mod:`afl_flwr.model_state`)
take the example-weighted average of the buffered clients' values
(:class:`~afl_flwr.aggregators.base.BufferedAggregator`).
"""

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afl_flwr.aggregation import Params, fedbuff_update
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    BufferedAggregator,
    BufferSettings,
    Update,
    bases_of,
    integer_at_least,
    positive,
)
from afl_flwr.settings import setting


def average_staleness(history: Sequence[int]) -> float:
    """``a = mean(tau + 1)`` over a client's recent stalenesses ``tau``.

    Parameters
    ----------
    history : Sequence[int]
        The client's stalenesses, at least one.

    Returns
    -------
    float
        The average staleness counted from 1 (``>= 1``).
    """
    if not history:
        raise ValueError("a client's staleness history is empty")
    return sum(tau + 1 for tau in history) / len(history)


@dataclass(frozen=True, kw_only=True)
class FedStaleWeightSettings(BufferSettings):
    """FedStaleWeight's settings: ``K``, ``eta_g`` and the window ``W``."""

    server_lr: float = setting(1.0, "eta_g, the server learning rate")
    window: int = setting(
        5,
        "W, how many of a client's latest updates its average staleness covers "
        "(this one included)",
    )

    def validate(self) -> None:
        """``eta_g > 0``, ``W >= 1``, plus the buffer check."""
        super().validate()
        positive("server_lr", self.server_lr)
        integer_at_least("window", self.window, 1)


@AGGREGATORS.register("fedstaleweight")
class FedStaleWeight(BufferedAggregator):
    """``x <- x + eta_g sum_i n_i a_i (x_i - x_base_i) / sum_i n_i a_i``.

    ``a_i`` is client ``i``'s average of ``tau + 1`` over its last ``W``
    admitted updates (:func:`average_staleness`), taken when the update is
    admitted.

    Parameters
    ----------
    settings : FedStaleWeightSettings, optional (default: None)
        ``buffer_size`` (``K``), ``server_lr`` (``eta_g``, default 1.0) and
        ``window`` (``W``, default 5; keyword ``fedstaleweight_window``).
    """

    name = "fedstaleweight"
    Settings = FedStaleWeightSettings
    settings: FedStaleWeightSettings

    def __init__(
        self, settings: FedStaleWeightSettings | None = None, **overrides: Any
    ) -> None:
        super().__init__(settings, **overrides)
        self._history: dict[int, deque[int]] = {}
        self._averages: list[float] = []  # a_i of each buffered update, in order
        self._merging: list[float] = []  # the a_i of the buffer being merged

    def _observe(self, update: Update) -> float:
        window = self._history.setdefault(
            update.client, deque(maxlen=self.settings.window)
        )
        window.append(int(update.staleness))
        return average_staleness(window)

    def average(self, client: int) -> float | None:
        """Client ``client``'s average staleness now (``None`` before its first)."""
        window = self._history.get(client)
        return average_staleness(window) if window else None

    def weight(self, update: Update) -> float:
        """``n_i a_i``, with the update counted in the client's window."""
        window = self._history.get(update.client, ())
        recent = [*window, int(update.staleness)][-self.settings.window :]
        return update.num_examples * average_staleness(recent)

    def add(self, update: Update) -> bool:
        """Record the update's staleness, then buffer it."""
        if update.base is None:
            raise ValueError(f"{type(self).__name__} needs each update's base model")
        self._averages.append(self._observe(update))
        return super().add(update)

    def discard_pending(self) -> list[Update]:
        """Empty the buffer (the clients' windows keep what they saw)."""
        self._averages = []
        return super().discard_pending()

    def take_buffer(self) -> list[Update]:
        """Empty the buffer for a merge, keeping the buffered ``a_i`` for it."""
        averages = self._averages
        buffer = super().take_buffer()
        self._merging = averages
        return buffer

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """Apply the buffer's deltas, weighted by ``n_i a_i``."""
        averages, self._merging = self._merging, []
        counts = [u.num_examples * a for u, a in zip(buffer, averages, strict=True)]
        params = [u.params for u in buffer]
        ones = [1.0] * len(buffer)
        return fedbuff_update(
            weights, params, bases_of(buffer), counts, ones, self.settings.server_lr
        )

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """Each client's window of stalenesses (metadata only)."""
        return {}, {"history": {str(c): list(w) for c, w in self._history.items()}}

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state`."""
        window = self.settings.window
        self._history = {
            int(c): deque((int(t) for t in w), maxlen=window)
            for c, w in dict(meta.get("history", {})).items()
        }
