"""FedBuff: buffered asynchronous aggregation with an absolute staleness penalty.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, Algorithm 1: the server adds each client delta scaled by
``s(tau_i)`` to a buffer and, once ``K`` are in, applies ``eta_g`` times their
average. The average here weighs clients by their example counts (FedAvg's
``n_i / sum n``, i.e. ``1/K`` for equal clients), so at zero staleness the merge
is bit-identical to Flower's FedAvg. The default ``s(tau) = 1 / (1 + tau)`` is
FLSim's polynomial staleness weight with exponent 1 (chosen by the default
tuning; FLSim's and the paper's ``1/sqrt(1 + tau)`` is exponent 0.5).

``server_momentum`` (``beta``, default 0) turns the server step into SGD with
heavy-ball momentum on the merged delta. The paper leaves the server optimiser
open (FedBuff is "agnostic to the choice of optimizer"); this one is FLSim's
asynchronous ``FedAvgWithLR`` aggregator with momentum, in PyTorch's
convention, as Flower's ``FedAvgM``: ``v <- beta v + d``, ``x <- x + eta_g v``.
The velocity ``v`` is checkpointed with the run.

``server_lr_warmup`` (``W`` merges, default 0: off) scales ``eta_g`` by
``min(1, t / W)`` at merge ``t`` (:func:`~afl_flwr.aggregation.warmup_lr`,
a linear ramp from ``eta_g / W`` as in Goyal et al.'s gradual warm-up, which
ramps from the small-batch rate): the first buffers, filled with updates trained
from the earliest versions, move the model less. The merge count is checkpointed.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afl_flwr.aggregation import (
    Params,
    fedbuff_update,
    momentum_step,
    warmup_lr,
    weighted_delta,
)
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    BufferedAggregator,
    BufferSettings,
    StalenessSettings,
    Update,
    bases_of,
    integer_at_least,
    positive,
)
from afl_flwr.settings import SettingError, setting

# Checkpoint group of the server momentum.
VELOCITY_GROUP = "fedbuff-velocity"


@dataclass(frozen=True, kw_only=True)
class FedBuffSettings(StalenessSettings, BufferSettings):
    """FedBuff's settings: ``K``, ``eta_g`` and ``s(tau)``."""

    server_lr: float = setting(1.0, "eta_g, the server learning rate")
    server_momentum: float = setting(
        0.0,
        "beta, server momentum: SGD with heavy-ball momentum on the merged delta "
        "(v = beta v + d, x = x + eta_g v); 0: plain FedBuff",
    )
    server_lr_warmup: int = setting(
        0,
        "W, server learning-rate warm-up in merges: merge t uses "
        "eta_g min(1, t / W); 0: none",
    )

    def validate(self) -> None:
        """``eta_g > 0``, ``0 <= beta < 1``, plus the buffer and staleness checks."""
        super().validate()
        positive("server_lr", self.server_lr)
        beta = self.server_momentum
        if isinstance(beta, bool) or not 0.0 <= beta < 1.0:
            raise SettingError("server_momentum", beta, "must be in [0, 1)")
        integer_at_least("server_lr_warmup", self.server_lr_warmup, 0)


@AGGREGATORS.register("fedbuff")
class FedBuff(BufferedAggregator):
    """``x <- x + eta_g sum_i n_i s(tau_i) (x_i - x_base_i) / sum_i n_i``.

    With ``server_momentum = beta > 0`` the merged delta ``d`` (the sum above
    without ``eta_g``) drives a heavy-ball step: ``v <- beta v + d``,
    ``x <- x + eta_g v``. With ``server_lr_warmup = W > 1`` merge ``t`` uses
    ``eta_g min(1, t / W)`` instead of ``eta_g``.

    Parameters
    ----------
    settings : FedBuffSettings, optional (default: None)
        ``buffer_size`` (``K``, default 5), ``server_lr`` (``eta_g``, default
        1.0), ``server_momentum`` (``beta``, default 0), ``server_lr_warmup``
        (``W``, default 0), ``staleness_fn`` /
        ``staleness_a`` / ``staleness_b`` (default ``polynomial`` with
        ``a = 1``); also accepted as keywords.
    """

    name = "fedbuff"
    Settings = FedBuffSettings
    settings: FedBuffSettings

    def __init__(
        self, settings: FedBuffSettings | None = None, **overrides: Any
    ) -> None:
        super().__init__(settings, **overrides)
        self.staleness_fn = self.settings.make_staleness_fn()
        self._velocity: Params = {}
        self.merges = 0

    @property
    def server_lr(self) -> float:
        """``eta_g`` (before any warm-up)."""
        return self.settings.server_lr

    def weight(self, update: Update) -> float:
        """``n_i s(tau_i)``."""
        return update.num_examples * self.staleness_fn(update.staleness)

    @property
    def velocity(self) -> Params:
        """The server momentum ``v`` (empty before the first merge or at beta = 0)."""
        return self._velocity

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """Apply the buffer's staleness-scaled, example-weighted mean delta."""
        params = [u.params for u in buffer]
        counts = [u.num_examples for u in buffer]
        scales = [self.staleness_fn(u.staleness) for u in buffer]
        beta = self.settings.server_momentum
        self.merges += 1
        lr = warmup_lr(self.server_lr, self.merges, self.settings.server_lr_warmup)
        if not beta:
            return fedbuff_update(weights, params, bases_of(buffer), counts, scales, lr)
        total = float(sum(counts))
        factors = [n / total * s for n, s in zip(counts, scales, strict=True)]
        delta = weighted_delta(params, bases_of(buffer), factors, list(weights))
        new, self._velocity = momentum_step(weights, delta, self._velocity, beta, lr)
        return new

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """The server momentum ``v`` (one group; none at beta = 0), the merge count."""
        meta: dict[str, Any] = {"merges": self.merges}
        if not self._velocity:
            return {}, meta
        return {VELOCITY_GROUP: dict(self._velocity)}, {**meta, "momentum": True}

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state`."""
        self._velocity = {
            k: np.array(a) for k, a in arrays.get(VELOCITY_GROUP, {}).items()
        }
        self.merges = int(meta.get("merges", 0))
