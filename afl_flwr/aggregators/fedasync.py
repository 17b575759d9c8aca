"""FedAsync: every update is mixed into the global model the moment it arrives.

Xie et al., "Asynchronous Federated Optimization", 2019, Algorithm 1 with the
staleness-adaptive mixing weight of Sec. 5.2: ``x <- (1 - a s(tau)) x + a s(tau)
x_i``. The mixing is a convex combination, so it applies to state arrays
(BatchNorm statistics, counters) as well: they stay valid statistics.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from afl_flwr.aggregation import Params, mix_immediate
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    Aggregator,
    StalenessSettings,
    Update,
)
from afl_flwr.settings import SettingError, setting


@dataclass(frozen=True, kw_only=True)
class FedAsyncSettings(StalenessSettings):
    """FedAsync's settings: the mixing weight ``a`` and ``s(tau)``.

    Unset, the polynomial's exponent is 0.5, FedAsync's experiments' value
    (the function's own default, 1, was tuned for the buffered rules).
    """

    staleness_defaults: ClassVar[Mapping[str, Mapping[str, float]]] = MappingProxyType(
        {"polynomial": MappingProxyType({"a": 0.5})}
    )

    mixing_rate: float = setting(0.5, "a of FedAsync's mixing, in (0, 1]")

    def validate(self) -> None:
        """``0 < a <= 1``, plus the staleness checks."""
        super().validate()
        if isinstance(self.mixing_rate, bool) or not 0 < self.mixing_rate <= 1:
            raise SettingError("mixing_rate", self.mixing_rate, "must be in (0, 1]")


@AGGREGATORS.register("fedasync")
class FedAsync(Aggregator):
    """``x <- (1 - a s(tau)) x + a s(tau) x_i``, one version per update.

    Parameters
    ----------
    settings : FedAsyncSettings, optional (default: None)
        ``mixing_rate`` (``a``, default 0.5) and ``staleness_fn`` /
        ``staleness_a`` / ``staleness_b`` (default ``polynomial`` with
        ``a = 0.5``); also accepted as keywords.
    """

    name = "fedasync"
    needs_base = False
    Settings = FedAsyncSettings
    settings: FedAsyncSettings

    def __init__(
        self, settings: FedAsyncSettings | None = None, **overrides: Any
    ) -> None:
        super().__init__(settings, **overrides)
        self.staleness_fn = self.settings.make_staleness_fn()
        self._next: Update | None = None

    @property
    def mixing_rate(self) -> float:
        """``a``."""
        return self.settings.mixing_rate

    def weight(self, update: Update) -> float:
        """``a s(tau)``."""
        return self.mixing_rate * self.staleness_fn(update.staleness)

    def add(self, update: Update) -> bool:
        """Every update is merged at once."""
        self._next = update
        return True

    def merge(self, current: Params) -> Params:
        """Mix the update into ``current``, as fresh arrays (``current`` is kept)."""
        if self._next is None:
            raise ValueError("merge() called without an update")
        update, self._next = self._next, None
        return mix_immediate(current, update.params, self.weight(update))
