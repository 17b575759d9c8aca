"""ACED: every client's latest update in each merge, up to a delay bound.

Chang, Yao, Krishnamurthy, Shelton, Chakraborty, Swami, Oymak and
Roy-Chowdhury, "Mitigating Participation Imbalance Bias in Asynchronous
Federated Learning" (arXiv 2511.19066, 2025). Asynchrony lets fast clients
report more often, so under non-IID data the global model drifts towards their
data ("heterogeneity amplification"). ACE answers it by stepping, at every
arrival, along the mean of the *latest* update of *all* clients, cached on the
server; ACED, its delay-aware variant, keeps only the cached updates whose
model is at most ``tau_D`` versions old, trading client diversity against
staleness:

    h_i <- Delta_i = x_i - x_base_i   for every client i in the buffer,
    A   = {i cached : v - b_i <= tau_D},                 (v: current version,
    x   <- x + eta sum_{i in A} n_i h_i / sum_{i in A} n_i  b_i: h_i's base)

and no step when ``A`` is empty. Implemented from the first author's prototype
code (``xchang1121/AsyncFL``: ``algorithms/stalesgd.py``, the bounded-delay
aggregation "Alg 2, lines 6-8", and ``stalesgd_conceptual.py`` for ACE) and the
paper's abstract; the paper's algorithm box was not available where this was
written. Choices of this module, stated:

- clients send models, so ``h_i`` is the model delta of the client's local
  training (the prototype caches an averaged gradient and steps ``-eta u``);
- the mean weighs clients by their example counts ``n_i`` as every rule of
  this package does (the prototype weighs them equally): when the buffer holds
  every cached client, all fresh, the merge is FedAvg's;
- clients never heard from are not in the mean (the prototype first asks every
  client for an update at the initial model); the merge is buffered, ``K``
  updates per version (``K = 1``: ACED's immediate update at every arrival).

Memory: one float32 delta (float64 arrays stay float64) per client whose
cached update is at most ``tau_D`` versions old, at most ``N x parameters x 4``
bytes: an older entry can never enter a merge again (versions only grow) and is
forgotten. A merge costs one pass over the model per client in ``A``.
State arrays (BatchNorm statistics and counters, :mod:`afl_flwr.model_state`)
are not cached: they take the example-weighted average of the buffered
clients' values (:class:`~afl_flwr.aggregators.base.BufferedAggregator`), and a
non-floating array declared a weight moves by the rounded mean of the active
entries' deltas.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afl_flwr.aggregation import Params, weighted_average
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

ENTRY_GROUP = "aced-entry-{}"


def _work_dtype(x: np.ndarray) -> np.dtype:
    """float32, or wider where the array is (float64; integers take float64)."""
    return np.promote_types(x.dtype, np.float32)


def active_entries(
    base_versions: Mapping[int, int], version: int, max_delay: int
) -> list[int]:
    """The cached clients whose update's base is at most ``max_delay`` versions old.

    Parameters
    ----------
    base_versions : Mapping[int, int]
        Client -> the version its cached update was trained from (``b_i``).
    version : int
        The current global version ``v``.
    max_delay : int
        ``tau_D``: entries with ``v - b_i > tau_D`` are left out.

    Returns
    -------
    list[int]
        The clients of ``A``, sorted.
    """
    return sorted(c for c, b in base_versions.items() if version - b <= max_delay)


@dataclass(frozen=True, kw_only=True)
class ACEDSettings(BufferSettings):
    """ACED's settings: ``K``, ``eta`` and the delay bound ``tau_D``."""

    server_lr: float = setting(
        0.25,
        "eta, the server learning rate (each cached delta enters several merges: "
        "near K / N)",
    )
    max_delay: int = setting(
        10,
        "tau_D: a cached update enters the merge while its model is at most "
        "this many versions old",
    )

    def validate(self) -> None:
        """``eta > 0``; ``tau_D`` an integer ``>= 0``."""
        super().validate()
        positive("server_lr", self.server_lr)
        integer_at_least("max_delay", self.max_delay, 0)


@AGGREGATORS.register("aced")
class ACED(BufferedAggregator):
    """``x <- x + eta * (example-weighted mean of the cached deltas in A)``.

    Parameters
    ----------
    settings : ACEDSettings, optional (default: None)
        ``buffer_size`` (``K``, default 5), ``server_lr`` (``eta``, default 0.25)
        and ``max_delay`` (``tau_D``, default 10); also accepted as keywords.
    """

    name = "aced"
    Settings = ACEDSettings
    settings: ACEDSettings

    def __init__(self, settings: ACEDSettings | None = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self._entries: dict[int, Params] = {}
        self._bases: dict[int, int] = {}
        self._counts: dict[int, float] = {}

    def weight(self, update: Update) -> float:
        """``n_i``: the weight of the client's entry while it is in ``A``."""
        return update.num_examples

    def base_version(self, client: int) -> int | None:
        """``b_i``, the base version of client ``client``'s cached update."""
        return self._bases.get(client)

    def cached(self, client: int) -> Params:
        """Client ``client``'s cached delta ``h_i`` (a copy; ``KeyError`` if unseen)."""
        return {name: h.copy() for name, h in self._entries[client].items()}

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """Cache the buffer's deltas, then step along the active entries' mean."""
        for update, base in zip(buffer, bases_of(buffer), strict=True):
            self._entries[update.client] = {
                name: np.asarray(update.params[name], _work_dtype(x))
                - np.asarray(base[name], _work_dtype(x))
                for name, x in weights.items()
            }
            self._bases[update.client] = update.base_version
            self._counts[update.client] = update.num_examples
        version = max(u.base_version + u.staleness for u in buffer)
        clients = active_entries(self._bases, version, self.settings.max_delay)
        self._keep(clients)
        if not clients:
            return {name: x.copy() for name, x in weights.items()}
        mean = weighted_average(
            [self._entries[c] for c in clients],
            [self._counts[c] for c in clients],
            self._entries[clients[0]],
        )
        eta = self.settings.server_lr
        new: Params = {}
        for name, x in weights.items():
            moved = x.astype(np.float64) + eta * mean[name]
            if x.dtype.kind != "f":
                moved = np.rint(moved)
            new[name] = moved.astype(x.dtype)
        return new

    def _keep(self, clients: Sequence[int]) -> None:
        """Forget every entry but those of ``clients`` (the rest never enters again).

        Versions only grow, so an entry older than ``tau_D`` stays too old.
        """
        kept = set(clients)
        for client in [c for c in self._entries if c not in kept]:
            del self._entries[client], self._bases[client], self._counts[client]

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """The cached deltas (one group per client), their bases and counts."""
        clients = sorted(self._entries)
        meta: dict[str, Any] = {
            "clients": clients,
            "bases": [self._bases[c] for c in clients],
            "counts": [self._counts[c] for c in clients],
        }
        arrays = {ENTRY_GROUP.format(c): dict(self._entries[c]) for c in clients}
        return arrays, meta

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state`."""
        if not meta:
            return
        clients = [int(c) for c in meta["clients"]]
        self._entries = {
            c: {n: np.array(a) for n, a in arrays[ENTRY_GROUP.format(c)].items()}
            for c in clients
        }
        self._bases = dict(zip(clients, (int(b) for b in meta["bases"]), strict=True))
        self._counts = dict(
            zip(clients, (float(n) for n in meta["counts"]), strict=True)
        )
