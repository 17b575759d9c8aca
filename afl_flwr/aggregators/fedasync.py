"""FedAsync: every update is mixed into the global model the moment it arrives.

Xie et al., "Asynchronous Federated Optimization", 2019, Algorithm 1 with the
staleness-adaptive mixing weight of Sec. 5.2: ``x <- (1 - a s(tau)) x + a s(tau)
x_i``.
"""

from afl_flwr.aggregation import Params, mix_immediate
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    Aggregator,
    AggregatorSettings,
    Update,
)
from afl_flwr.staleness import StalenessFn, polynomial


@AGGREGATORS.register("fedasync")
class FedAsync(Aggregator):
    """``x <- (1 - a s(tau)) x + a s(tau) x_i``, one version per update.

    Parameters
    ----------
    mixing_rate : float (default: 0.5)
        ``a`` in ``(0, 1]``.
    staleness_fn : StalenessFn (default: polynomial with a = 0.5)
        ``tau -> s(tau)``.
    """

    name = "fedasync"
    needs_base = False

    def __init__(
        self, *, mixing_rate: float = 0.5, staleness_fn: StalenessFn = polynomial
    ) -> None:
        if not 0 < mixing_rate <= 1:
            raise ValueError(f"mixing_rate={mixing_rate} must be in (0, 1]")
        self.mixing_rate = mixing_rate
        self.staleness_fn = staleness_fn
        self._next: Update | None = None

    @classmethod
    def from_settings(cls, settings: AggregatorSettings) -> "FedAsync":
        """``a`` and s(tau) from the strategy."""
        return cls(mixing_rate=settings.mixing_rate, staleness_fn=settings.staleness_fn)

    def weight(self, update: Update) -> float:
        """``a s(tau)``."""
        return self.mixing_rate * self.staleness_fn(update.staleness)

    def add(self, update: Update) -> bool:
        """Every update is merged at once."""
        self._next = update
        return True

    def merge(self, current: Params) -> Params:
        """Mix the update into ``current`` in place and return it."""
        if self._next is None:
            raise ValueError("merge() called without an update")
        update, self._next = self._next, None
        mix_immediate(current, update.params, self.weight(update))
        return current

    def summary(self) -> str:
        """Name and a."""
        return f"fedasync (mixing rate a={self.mixing_rate})"
