"""User-level central differential privacy for buffered asynchronous aggregation.

FedBuff with the Gaussian mechanism (as FLSim's DP reducer for its FedBuff
aggregator): each update's delta ``Delta_i = x_i - x_base_i`` (the reply minus
the exact model its task carried), over all weight arrays together, is clipped
on the server to L2 norm ``<= C``; every ``K`` updates the buffer releases

    r = (1/K) sum_i s(tau_i) clip(Delta_i) + N(0, (z C / K)^2 I),

and the model moves ``x <- x + eta_g r`` (with ``server_momentum = beta > 0``:
``v <- beta v + r``, ``x <- x + eta_g v``, post-processing of the releases, so
the guarantee is unchanged). Weights are equal (``1/K``), not
``n_i / sum n``: an example count is private and would make the sensitivity
data-dependent; ``s(tau) <= 1`` only shrinks a contribution. One client
contributes at most one update per release: under DP the buffer preference of
:class:`~afl_flwr.strategy.StalenessAwareAsyncStrategy` (``distinct_buffer``)
becomes a rule, so a node whose update waits in the buffer gets no new task
until the buffer is released, and ``K`` may not exceed the connected nodes.

Accounting composes one ``GaussianPrivacyEvent(noise_multiplier=z,
sample_size=K, population_size=N)`` per release in Flower's accountant (which,
like Flower's fixed-clipping wrappers, requires no-amplification accounting).
A release that would exceed ``max_epsilon`` is not made: the run ends cleanly
with the model of the last release and the stop reason "privacy budget
exhausted". State arrays (BatchNorm statistics, counters) are averaged with
equal weights and are **not** covered by the guarantee.
"""

import secrets
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Result

try:
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        PrivacySpent,
        SamplingMethod,
    )
except ImportError as err:  # pragma: no cover - Flower 1.40/1.41
    raise ImportError(
        "afl_flwr.privacy needs Flower's privacy accounting (Flower 1.42 or newer, "
        'with its dp extra: pip install "flwr[dp]>=1.42")'
    ) from err

from afl_flwr.aggregation import Params, momentum_step, warmup_lr
from afl_flwr.aggregators.base import (
    BufferedAggregator,
    MergeRefused,
    Update,
    bases_of,
)
from afl_flwr.aggregators.fedbuff import VELOCITY_GROUP, FedBuff, FedBuffSettings
from afl_flwr.callbacks.base import Callback, RunView, Stop
from afl_flwr.history import UpdateEvent
from afl_flwr.model_state import average_state

# A client-clipped delta may exceed C by float32 rounding of its re-sent weights.
CLIP_RTOL = 1e-4


def clip_delta(
    update: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    names: Sequence[str],
    clipping_norm: float,
) -> tuple[Params, float]:
    """``Delta = update - base`` over ``names``, scaled to L2 norm ``<= C``.

    Returns the clipped delta (at least float32; the norm is summed in float64)
    and the norm before clipping.
    """
    delta = {}
    for n in names:
        work = np.promote_types(np.asarray(update[n]).dtype, np.float32)
        delta[n] = np.subtract(update[n], base[n], dtype=work)
    norm = float(
        np.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta.values()))
    )
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    if scale < 1.0:
        for d in delta.values():
            d *= d.dtype.type(scale)
    return delta, norm


class DPFedBuff(BufferedAggregator):
    """FedBuff's merge as a Gaussian-mechanism release (see the module docstring).

    Parameters
    ----------
    settings : FedBuffSettings
        ``K``, ``eta_g`` and ``s(tau)``.
    noise_multiplier : float
        ``z >= 0``; 0 clips only (no privacy, for debugging).
    clipping_norm : float
        ``C > 0``.
    accountant : PrivacyAccountant, optional (default: None)
        Flower's accountant (e.g. ``RdpAccountant``); ``None`` accounts nothing.
    seed : int, optional (default: None)
        Seed of the noise; ``None`` draws one from :mod:`secrets`.
    expect_clipped : bool (default: False)
        Clients clip their own deltas (Flower's ``fixedclipping_mod``). The
        server still clips, a no-op for a clipped delta, so the bound holds
        whatever a client sends; a delta that arrives above ``C`` is counted
        in ``unclipped_arrivals`` and logged.
    """

    name = "fedbuff-dp"
    Settings = FedBuffSettings
    settings: FedBuffSettings
    distinct_clients = True

    def __init__(
        self,
        settings: FedBuffSettings,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        accountant: Any = None,
        seed: int | None = None,
        expect_clipped: bool = False,
    ) -> None:
        super().__init__(settings)
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0")
        if not clipping_norm > 0:
            raise ValueError(f"clipping_norm={clipping_norm} must be > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.accountant = accountant
        self.staleness_fn = settings.make_staleness_fn()
        self.rng = np.random.default_rng(
            seed if seed is not None else secrets.randbits(128)
        )
        self.releases = 0
        self.norms: list[float] = []
        self.expect_clipped = expect_clipped
        self.unclipped_arrivals = 0
        self._velocity: Params = {}

    @property
    def std(self) -> float:
        """Noise std of the released mean per coordinate: ``z C / K``."""
        return self.noise_multiplier * self.clipping_norm / self.buffer_size

    def weight(self, update: Update) -> float:
        """``s(tau_i) / K``: equal weights, scaled by the staleness factor."""
        return self.staleness_fn(update.staleness) / self.buffer_size

    def add(self, update: Update) -> bool:
        """Buffer the update; a client may not appear twice in one release."""
        if any(u.client == update.client for u in self.pending()):
            raise ValueError(
                f"client {update.client} is already in this buffer; under DP a "
                "client contributes at most one update per release"
            )
        return super().add(update)

    def check_population(self, num_nodes: int) -> None:
        """``K`` distinct clients must be able to fill a buffer."""
        if self.buffer_size > num_nodes:
            raise ValueError(
                f"under DP each release needs K={self.buffer_size} distinct clients, "
                f"but only {num_nodes} node(s) are connected; lower buffer_size"
            )

    def event(self, population: int) -> GaussianPrivacyEvent:
        """The privacy event of one release."""
        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_size=self.buffer_size,
            population_size=population,
        )

    def merge(self, current: Params) -> Params:
        """One release; refused (buffer kept) when it would exceed the budget."""
        if self.accountant is not None:
            event = self.event(self.accountant.config.population_size)
            limit = self.accountant.config.max_epsilon
            if limit is not None and self.accountant.would_exceed(event):
                spent = self.accountant.get_privacy_spent()
                raise MergeRefused(
                    f"privacy budget exhausted: the next release would exceed "
                    f"max_epsilon={limit} (epsilon {spent.epsilon:.4f} at delta "
                    f"{spent.delta:g} after {spent.num_releases} releases)"
                )
        buffer = self.take_buffer()
        state = self.state_names_of(current)
        names = [n for n, x in current.items() if n not in state]
        floats = [n for n in names if current[n].dtype.kind == "f"]
        release = {
            n: np.zeros(
                current[n].shape, np.promote_types(current[n].dtype, np.float32)
            )
            for n in floats
        }
        for update, base in zip(buffer, bases_of(buffer), strict=True):
            clipped, norm = clip_delta(update.params, base, floats, self.clipping_norm)
            self.norms.append(norm)
            if self.expect_clipped and norm > self.clipping_norm * (1 + CLIP_RTOL):
                self.unclipped_arrivals += 1
                log(
                    WARNING,
                    "Client %s sent a delta of norm %.4g > C=%s although clipping "
                    "is client-side (is fixedclipping_mod installed?); clipped on "
                    "the server",
                    update.client,
                    norm,
                    self.clipping_norm,
                )
            factor = self.staleness_fn(update.staleness) / self.buffer_size
            for n in floats:
                release[n] += release[n].dtype.type(factor) * clipped[n]
        lr = warmup_lr(
            self.settings.server_lr, self.releases + 1, self.settings.server_lr_warmup
        )
        new: Params = {}
        for n in floats:
            step = release[n]
            if self.std:
                noise = self.rng.standard_normal(step.shape, dtype=step.dtype)
                step += step.dtype.type(self.std) * noise
        if self.settings.server_momentum:  # post-processing of the release
            new, self._velocity = momentum_step(
                {n: current[n] for n in floats},
                release,
                self._velocity,
                self.settings.server_momentum,
                lr,
            )
        for n in [] if self.settings.server_momentum else floats:
            step = release[n]
            step *= step.dtype.type(lr)
            step += current[n]
            new[n] = step.astype(current[n].dtype, copy=False)
        for n in names:
            if n not in new:  # a non-floating weight: no release, kept
                new[n] = np.array(current[n])
        new.update(
            average_state(
                current, [u.params for u in buffer], [1.0] * len(buffer), state
            )
        )
        if self.accountant is not None:
            self.accountant.compose(self.event(self.accountant.config.population_size))
        self.releases += 1
        return {n: new[n] for n in current}

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """Not used: :meth:`merge` is the release."""
        raise NotImplementedError

    def epsilon(self) -> float | None:
        """Epsilon spent so far at the accountant's target delta."""
        if self.accountant is None:
            return None
        return float(self.accountant.get_privacy_spent().epsilon)

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """The accountant's state, the release count and the server momentum."""
        meta: dict[str, Any] = {"releases": self.releases}
        if self.accountant is not None:
            meta["accountant"] = self.accountant.state_dict()
        arrays = {VELOCITY_GROUP: dict(self._velocity)} if self._velocity else {}
        return arrays, meta

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (the accountant continues)."""
        if not meta:
            return
        self.releases = int(meta.get("releases", 0))
        self._velocity = {
            k: np.array(a) for k, a in arrays.get(VELOCITY_GROUP, {}).items()
        }
        if self.accountant is not None and "accountant" in meta:
            self.accountant.load_state_dict(meta["accountant"])

    def summary(self) -> str:
        """The rule and the DP parameters."""
        return (
            f"fedbuff with user-level DP (K={self.buffer_size}, server_lr="
            f"{self.settings.server_lr}, server_momentum="
            f"{self.settings.server_momentum}, server_lr_warmup="
            f"{self.settings.server_lr_warmup}, z={self.noise_multiplier}, "
            f"C={self.clipping_norm}, s(tau)={self.settings.describe_staleness()})"
        )


CLIPPING_SIDES = ("server", "client")


class AsyncDPFixedClipping:
    """User-level central DP with server-side fixed clipping, asynchronously.

    The arguments of Flower's ``DifferentialPrivacyServerSideFixedClipping``,
    without ``num_sampled_clients`` (the release size is the buffer size K).
    :meth:`start` runs the wrapped strategy's asynchronous loop with
    :class:`DPFedBuff` as its rule; it does not raise when the budget runs
    out, the run ends with "privacy budget exhausted".

    Parameters
    ----------
    strategy : StalenessAwareAsyncStrategy
        With ``aggregation="fedbuff"`` and ``buffer_size`` (K, the release
        size) or ``concurrency`` given, since K is fixed when the wrapper is
        built (``buffer_size=1`` gives one-update releases; FedAsync and the
        rules with a cache or moments, CA2FL and FADAS, are refused).
    noise_multiplier : float
        ``z``; 0 (with ``accountant=None``) clips only, for debugging.
    clipping_norm : float
        ``C``.
    accountant : PrivacyAccountant, optional (default: None)
        Flower's accountant; it needs ``SamplingMethod.NO_AMPLIFICATION``.
    seed : int, optional (default: None)
        Noise seed for tests; ``None`` draws one from :mod:`secrets`.
    clipping : {"server", "client"} (default: "server")
        ``"client"``: every training task carries Flower's
        ``KEY_CLIPPING_NORM`` so that clients with Flower's
        ``fixedclipping_mod`` clip their own deltas (as under Flower's
        ``DifferentialPrivacyClientSideFixedClipping``); the server clips as
        well, so the guarantee never rests on the clients.
    """

    def __init__(
        self,
        strategy: Any,
        noise_multiplier: float,
        clipping_norm: float,
        *,
        accountant: Any = None,
        seed: int | None = None,
        clipping: str = "server",
    ) -> None:
        if clipping not in CLIPPING_SIDES:
            raise ValueError(
                f"clipping={clipping!r}; allowed: {', '.join(CLIPPING_SIDES)}"
            )
        if accountant is not None:
            if not noise_multiplier > 0:
                raise ValueError(
                    "noise_multiplier must be > 0 when an accountant is given"
                )
            if accountant.config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
                raise ValueError(
                    "asynchronous DP accounting requires "
                    "sampling_method=SamplingMethod.NO_AMPLIFICATION (the releases' "
                    "clients are not sampled uniformly at random)"
                )
        rule = strategy.aggregator
        if not isinstance(rule, FedBuff):
            raise ValueError(
                f"AsyncDPFixedClipping needs aggregation='fedbuff', got "
                f"{strategy.aggregation!r}: FedAsync's releases are fedbuff with "
                "buffer_size=1; CA2FL's cache and FADAS's moments are not supported "
                "under DP"
            )
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.accountant = accountant
        self.rule = DPFedBuff(
            rule.settings,
            noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm,
            accountant=accountant,
            seed=seed,
            expect_clipped=clipping == "client",
        )
        self.clipping = clipping
        strategy.use_aggregator(self.rule)
        log(
            INFO,
            "User-level DP: z=%s, C=%s, noise std per coordinate %.4g x server_lr",
            noise_multiplier,
            clipping_norm,
            self.rule.std,
        )

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def start(
        self,
        grid: Any,
        initial_arrays: Any,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        **kwargs: Any,
    ) -> Result:
        """Run the wrapped strategy's asynchronous loop (its ``start``).

        Takes the strategy's ``start`` arguments; epsilon after every release is
        recorded in the run's history (``evals.csv``, ``summary.json``).
        """
        callbacks = [PrivacyLog(self.rule), *(kwargs.pop("callbacks", None) or ())]
        config = ConfigRecord(dict(train_config or {}))
        if self.clipping == "client":
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        return self.strategy.start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=config,
            callbacks=callbacks,
            **kwargs,
        )

    def privacy_spent(self) -> PrivacySpent | None:
        """Cumulative privacy expenditure (Flower's ``PrivacySpent``), if accounted."""
        if self.accountant is None:
            return None
        return self.accountant.get_privacy_spent()


class PrivacyLog(Callback):
    """Record and log the epsilon spent after every release."""

    def __init__(self, rule: DPFedBuff) -> None:
        self.rule = rule

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """Epsilon at the accountant's delta, for this version."""
        epsilon = self.rule.epsilon()
        if epsilon is not None:
            run.state.record_privacy(run.version, epsilon)
            log(INFO, "[version %d] privacy spent: epsilon=%.4f", run.version, epsilon)
        return None
