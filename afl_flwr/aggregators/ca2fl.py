"""CA2FL: buffered asynchronous aggregation calibrated by cached client updates.

Wang et al., "Tackling the Data Heterogeneity in Asynchronous Federated Learning
with Cached Update Calibration", ICLR 2024, Algorithm 2 (as reconstructed in the
project's research notes; no official code exists). The server keeps the latest
delta ``h_i`` of every client (0 until it reports) and their mean ``h_bar``
over all ``N`` clients. Each round buffers ``M = K`` updates and applies

    v = h_bar + (1/M) sum_{j in buffer} (Delta_j - h_j),    x <- x + eta v,

with ``h_j`` the cache *before* the round (a client twice in one buffer is
calibrated twice against that snapshot), then caches ``h_j = Delta_j`` (the
newest delta of each buffered client) and recomputes ``h_bar = (1/N) sum_i h_i``
(never-seen clients count as zero). ``Delta_j = x_j - x_base_j``. The first
round (empty cache) is FedBuff with ``s = 1`` and equal weights.

Like the paper, no staleness factor ``s(tau)`` and no example weights are
applied to the weights: the calibration is what corrects stale, heterogeneous
updates, so the rule has no staleness setting (passing ``staleness_fn`` with
``aggregation="ca2fl"`` is an error).

Memory. The cache is one delta per client. Deltas are stored in ``float16`` by
default, each array scaled by its largest magnitude (so neither overflow nor
the float16 subnormal range occur, whatever the deltas' scale), which costs
``N x (floating-point parameters) x 2`` bytes, e.g. 100 clients of an 11M
parameter ResNet-18 take 2.2 GB (``cache_dtype="float32"``: twice that). The sum
``sum_i h_i`` is kept in float32 and updated incrementally when an entry is
replaced (``+= new - old``, both dequantised), so it always equals the sum of
what is stored and ``h_bar`` costs one model-sized pass per merge, not ``N``.
How close the float16 cache stays to float32 is measured in ``docs/design.md``.

State arrays (BatchNorm statistics and counters, :mod:`afl_flwr.model_state`)
are neither cached nor calibrated: they take the example-weighted average of the
buffered clients' values (:class:`~afl_flwr.aggregators.base.BufferedAggregator`).
A non-floating array declared a weight moves by the rounded plain mean delta,
``x <- rint(x + eta (1/M) sum_j Delta_j)``.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afl_flwr.aggregation import Params
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    BufferedAggregator,
    BufferSettings,
    Update,
    bases_of,
    positive,
)
from afl_flwr.settings import SettingError, setting

CACHE_DTYPES = ("float16", "float32")
SUM_GROUP = "ca2fl-sum"
SCALES_GROUP = "ca2fl-scales"


def cache_group(client: int) -> str:
    """Checkpoint group of one client's cached delta."""
    return f"cache-{client}"


def quantise(delta: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, float]:
    """Store ``delta`` as ``dtype``: ``(q, scale)`` with ``delta ~ q * scale``.

    float16 is scaled by the largest magnitude, so ``|q| <= 1`` (no overflow)
    and small deltas keep float16's full relative precision; float32 is stored
    as is with scale 1.
    """
    if dtype == np.float32:
        return delta.astype(np.float32), 1.0
    peak = float(np.max(np.abs(delta))) if delta.size else 0.0
    scale = peak if peak > 0 else 1.0
    return (delta / np.float32(scale)).astype(dtype), scale


def dequantise(stored: np.ndarray, scale: float, dtype: np.dtype) -> np.ndarray:
    """The value a stored cache entry stands for, in ``dtype``."""
    value = stored.astype(dtype)
    if scale != 1.0:
        value *= dtype.type(scale)
    return value


def _work_dtype(x: np.ndarray) -> np.dtype:
    """float32, or the array's own dtype when it is wider."""
    return np.promote_types(x.dtype, np.float32)


@dataclass(frozen=True, kw_only=True)
class CA2FLSettings(BufferSettings):
    """CA2FL's settings: ``M = K``, ``eta`` and the cache's storage."""

    server_lr: float = setting(1.0, "eta, the server learning rate")
    cache_dtype: str = setting(
        "float16",
        "storage of the cached deltas: float16 (scaled per array) or float32",
    )

    def validate(self) -> None:
        """``eta > 0``; a known cache dtype."""
        super().validate()
        positive("server_lr", self.server_lr)
        if self.cache_dtype not in CACHE_DTYPES:
            raise SettingError(
                "cache_dtype",
                self.cache_dtype,
                f"is not allowed; allowed: {', '.join(CACHE_DTYPES)}",
            )


@AGGREGATORS.register("ca2fl")
class CA2FL(BufferedAggregator):
    """``x <- x + eta (h_bar + (1/M) sum_j (Delta_j - h_j))``, cache refreshed after.

    Parameters
    ----------
    settings : CA2FLSettings, optional (default: None)
        ``buffer_size`` (``M = K``, default 5), ``server_lr`` (``eta``, default
        1.0) and ``cache_dtype`` (``"float16"``, scaled per array, or
        ``"float32"``); also accepted as keywords.
    """

    name = "ca2fl"
    Settings = CA2FLSettings
    settings: CA2FLSettings

    def __init__(self, settings: CA2FLSettings | None = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.server_lr = self.settings.server_lr
        self.cache_dtype = self.settings.cache_dtype
        self._dtype = np.dtype(self.cache_dtype)
        self._cache: dict[int, Params] = {}
        self._scales: dict[int, np.ndarray] = {}
        self._sum: Params = {}
        self._names: list[str] = []
        self._population = 0
        self._mean_over = 0

    def weight(self, update: Update) -> float:
        """1: every buffered update counts equally, whatever ``n_i`` and ``tau``."""
        return 1.0

    def observe_population(self, num_clients: int) -> None:
        """``N``, the clients ``h_bar`` averages over (at least those cached)."""
        self._population = num_clients

    @property
    def num_cached(self) -> int:
        """Clients with a cached delta."""
        return len(self._cache)

    def cached(self, client: int) -> Params:
        """Client ``client``'s cached delta ``h_i``, dequantised (zeros if unseen)."""
        if client not in self._cache:
            return {name: np.zeros_like(s) for name, s in self._sum.items()}
        return {
            name: self._stored(client, k, self._sum[name].dtype)
            for k, name in enumerate(self._names)
        }

    def cache_sum(self) -> Params:
        """The running ``sum_i h_i`` (float32 copies)."""
        return {name: s.copy() for name, s in self._sum.items()}

    def _stored(self, client: int, index: int, dtype: np.dtype) -> np.ndarray:
        name = self._names[index]
        scale = float(self._scales[client][index])
        return dequantise(self._cache[client][name], scale, dtype)

    def _start(self, weights: Mapping[str, np.ndarray]) -> None:
        """Fix the cached array names and allocate ``sum_i h_i`` at the first merge."""
        if self._names:
            return
        self._names = [n for n, x in weights.items() if x.dtype.kind == "f"]
        self._sum = {
            n: np.zeros(weights[n].shape, _work_dtype(weights[n])) for n in self._names
        }

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """Apply the calibrated buffer mean, then refresh the cache and ``h_bar``."""
        bases = bases_of(buffer)
        current = weights
        self._start(current)
        inv_m = 1.0 / len(buffer)
        inv_n = 1.0 / self._mean_over if self._mean_over else 0.0
        newest = {u.client: i for i, u in enumerate(buffer)}
        staged: dict[int, Params] = {c: {} for c in newest}
        staged_scales = {c: np.ones(len(self._names), np.float32) for c in newest}
        new: Params = {}
        for k, name in enumerate(self._names):
            x = current[name]
            work = self._sum[name].dtype
            acc = np.zeros(x.shape, work)
            for i, (update, base) in enumerate(zip(buffer, bases, strict=True)):
                delta = np.asarray(update.params[name], work) - np.asarray(
                    base[name], work
                )
                acc += delta
                if update.client in self._cache:  # the round's snapshot h_j
                    acc -= self._stored(update.client, k, work)
                if newest[update.client] == i:
                    stored, scale = quantise(delta, self._dtype)
                    staged[update.client][name] = stored
                    staged_scales[update.client][k] = scale
            acc *= work.type(inv_m)
            if inv_n:
                acc += self._sum[name] * work.type(inv_n)
            acc *= work.type(self.server_lr)
            acc += x
            new[name] = acc.astype(x.dtype, copy=False)
        self._commit(staged, staged_scales)
        return {
            name: new[name]
            if name in new
            else _integer_step(x, name, buffer, bases, self.server_lr)
            for name, x in current.items()
        }

    def _commit(self, staged: dict[int, Params], scales: dict[int, np.ndarray]) -> None:
        """Replace cache entries, keeping ``sum_i h_i`` equal to what is stored."""
        for client, entry in staged.items():
            for k, name in enumerate(self._names):
                total = self._sum[name]
                if client in self._cache:
                    total -= self._stored(client, k, total.dtype)
                total += dequantise(entry[name], float(scales[client][k]), total.dtype)
            self._cache[client] = entry
            self._scales[client] = scales[client]
        self._mean_over = max(self._population, len(self._cache))

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """The cache (one group per client), its scales and ``sum_i h_i``."""
        meta: dict[str, Any] = {
            "cache_dtype": self.cache_dtype,
            "names": list(self._names),
            "clients": sorted(self._cache),
            "population": self._population,
            "mean_over": self._mean_over,
        }
        if not self._names:
            return {}, meta
        arrays: dict[str, Params] = {
            cache_group(c): dict(entry) for c, entry in self._cache.items()
        }
        arrays[SCALES_GROUP] = {str(c): s for c, s in self._scales.items()}
        arrays[SUM_GROUP] = dict(self._sum)
        return arrays, meta

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (saved with the same ``cache_dtype``)."""
        if not meta:
            return
        if meta["cache_dtype"] != self.cache_dtype:
            raise ValueError(
                f"checkpoint caches deltas as {meta['cache_dtype']}, this rule "
                f"as cache_dtype={self.cache_dtype!r}"
            )
        self._names = list(meta["names"])
        self._population = int(meta["population"])
        self._mean_over = int(meta["mean_over"])
        clients = [int(c) for c in meta["clients"]]
        if not self._names:
            self._cache, self._scales, self._sum = {}, {}, {}
            return
        self._sum = {n: np.array(arrays[SUM_GROUP][n]) for n in self._names}
        self._cache, self._scales = {}, {}
        for c in clients:
            group = arrays[cache_group(c)]
            self._cache[c] = {n: np.array(group[n], self._dtype) for n in self._names}
            self._scales[c] = np.array(arrays[SCALES_GROUP][str(c)], np.float32)


def _integer_step(
    x: np.ndarray,
    name: str,
    buffer: Sequence[Update],
    bases: Sequence[Mapping[str, np.ndarray]],
    server_lr: float,
) -> np.ndarray:
    """``rint(x + eta * mean_j Delta_j)`` for an integer array (no calibration)."""
    mean = np.zeros(x.shape, np.float64)
    for update, base in zip(buffer, bases, strict=True):
        mean += np.asarray(update.params[name], np.float64) - np.asarray(
            base[name], np.float64
        )
    mean /= len(buffer)
    return np.asarray(np.rint(x + server_lr * mean)).astype(x.dtype)
