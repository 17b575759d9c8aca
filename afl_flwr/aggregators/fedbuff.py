"""FedBuff: buffered asynchronous aggregation with an absolute staleness penalty.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, Algorithm 1: the server adds each client delta scaled by
``s(tau_i)`` to a buffer and, once ``K`` are in, applies ``eta_g`` times their
average. The average here weighs clients by their example counts (FedAvg's
``n_i / sum n``, i.e. ``1/K`` for equal clients), so at zero staleness the merge
is bit-identical to Flower's FedAvg.
"""

from typing import Any

from afl_flwr.aggregation import Params, fedbuff_update
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    AggregatorSettings,
    BufferedAggregator,
    bases_of,
)
from afl_flwr.staleness import StalenessFn, polynomial


@AGGREGATORS.register("fedbuff")
class FedBuff(BufferedAggregator):
    """``x <- x + eta_g sum_i n_i s(tau_i) (x_i - x_base_i) / sum_i n_i``.

    Parameters
    ----------
    buffer_size : int (default: 5)
        ``K``, updates per merge.
    server_lr : float (default: 1.0)
        ``eta_g``.
    staleness_fn : StalenessFn (default: polynomial with a = 0.5)
        ``tau -> s(tau)``.
    """

    name = "fedbuff"

    def __init__(
        self,
        *,
        buffer_size: int = 5,
        server_lr: float = 1.0,
        staleness_fn: StalenessFn = polynomial,
    ) -> None:
        super().__init__(buffer_size=buffer_size, staleness_fn=staleness_fn)
        if not server_lr > 0:
            raise ValueError(f"server_lr={server_lr} must be > 0 (eta_g)")
        self.server_lr = server_lr

    @classmethod
    def from_settings(cls, settings: AggregatorSettings) -> "FedBuff":
        """K, eta_g and s(tau) from the strategy."""
        return cls(
            buffer_size=settings.buffer_size,
            server_lr=settings.server_lr,
            staleness_fn=settings.staleness_fn,
        )

    def merge(self, current: Params) -> Params:
        """Apply the buffer's staleness-scaled, example-weighted mean delta."""
        buffer = self.take_buffer()
        return fedbuff_update(
            current,
            [u.params for u in buffer],
            bases_of(buffer),
            [u.num_examples for u in buffer],
            self.scales(buffer),
            self.server_lr,
        )

    def summary(self) -> str:
        """Name, K and eta_g."""
        return f"fedbuff (K={self.buffer_size}, server lr {self.server_lr})"

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """Stateless between merges (the buffer is empty after each one)."""
        return {}, {}
