"""FedBuff: buffered asynchronous aggregation with an absolute staleness penalty.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, Algorithm 1: the server adds each client delta scaled by
``s(tau_i)`` to a buffer and, once ``K`` are in, applies ``eta_g`` times their
average. The average here weighs clients by their example counts (FedAvg's
``n_i / sum n``, i.e. ``1/K`` for equal clients), so at zero staleness the merge
is bit-identical to Flower's FedAvg. The default ``s(tau) = 1/sqrt(1 + tau)`` is
FLSim's polynomial staleness weight with exponent 0.5.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from afl_flwr.aggregation import Params, fedbuff_update
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    BufferedAggregator,
    BufferSettings,
    StalenessSettings,
    Update,
    bases_of,
    positive,
)
from afl_flwr.settings import setting


@dataclass(frozen=True, kw_only=True)
class FedBuffSettings(StalenessSettings, BufferSettings):
    """FedBuff's settings: ``K``, ``eta_g`` and ``s(tau)``."""

    server_lr: float = setting(1.0, "eta_g, the server learning rate")

    def validate(self) -> None:
        """``eta_g > 0``, plus the buffer and staleness checks."""
        super().validate()
        positive("server_lr", self.server_lr)


@AGGREGATORS.register("fedbuff")
class FedBuff(BufferedAggregator):
    """``x <- x + eta_g sum_i n_i s(tau_i) (x_i - x_base_i) / sum_i n_i``.

    Parameters
    ----------
    settings : FedBuffSettings, optional (default: None)
        ``buffer_size`` (``K``, default 5), ``server_lr`` (``eta_g``, default
        1.0), ``staleness_fn`` / ``staleness_a`` / ``staleness_b`` (default
        ``polynomial`` with ``a = 1``); also accepted as keywords.
    """

    name = "fedbuff"
    Settings = FedBuffSettings
    settings: FedBuffSettings

    def __init__(
        self, settings: FedBuffSettings | None = None, **overrides: Any
    ) -> None:
        super().__init__(settings, **overrides)
        self.staleness_fn = self.settings.make_staleness_fn()

    @property
    def server_lr(self) -> float:
        """``eta_g``."""
        return self.settings.server_lr

    def weight(self, update: Update) -> float:
        """``n_i s(tau_i)``."""
        return update.num_examples * self.staleness_fn(update.staleness)

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """Apply the buffer's staleness-scaled, example-weighted mean delta."""
        return fedbuff_update(
            weights,
            [u.params for u in buffer],
            bases_of(buffer),
            [u.num_examples for u in buffer],
            [self.staleness_fn(u.staleness) for u in buffer],
            self.server_lr,
        )
