"""FADAS: an AMSGrad server step on each buffered pseudo-gradient, delay-adaptive.

Wang, Wang, Lu, Chen, "FADAS: Towards Federated Adaptive Asynchronous
Optimization", ICML 2024 (arXiv 2407.18365), Algorithm 1 with the
delay-adaptive learning rate, checked against the authors' code
(``yujiaw98/FADAS``, ``g_delay_adaptive.py`` and ``update.py``). Every ``M = K``
updates, with ``Delta = (1/M) sum_j (x_j - x_base_j)`` and ``t`` the merge count:

    m = b1 m + (1 - b1) Delta,   v = b2 v + (1 - b2) Delta^2,   v_hat = max(v_hat, v)
    x <- x + (eta_t / (1 - b1^t)) m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)

The bias corrections ``1 - b^t`` and the ``eps`` placement (added after the
corrected square root) are the official code's; the paper's form,
``x + eta_t m / (sqrt(v_hat) + eps)``, is ``bias_correction=False``. The step
size ``eta_t`` adapts to the buffer's largest staleness ``tau_max``:
``eta_t = eta`` when ``tau_max <= tau_c``, else

* ``delay_rule="code"`` (default): ``eta / tau_max``, what the official code
  runs (``lr_lambda = 1/max(delay)`` times ``args.lr``), so what its
  experiments measured; it acts at every ``tau_max > tau_c``;
* ``delay_rule="paper"``: ``min(eta, 1 / tau_max)``, the paper's rule. It only
  acts when ``tau_max > 1 / eta``: 1000 versions at the official ``eta =
  1e-3``, far beyond any staleness a run admits (the app drops updates staler
  than ``max-staleness = 20``), which is why it is not the default;
* ``delay_rule="none"``: always ``eta`` (FADAS without delay adaptation).

``Delta`` is the unweighted buffer mean, as in the paper and code
(``weighted=True`` weighs by example counts ``n_j / sum n`` instead); no
staleness factor ``s(tau)`` is applied, so the rule has no staleness setting.
State arrays (BatchNorm statistics, counters) take no Adam step: like the
official code, which loads the clients' average state dict and then steps only
``model.parameters()``, they are set to the buffered clients' average (here
example-weighted, as every rule does;
:class:`~afl_flwr.aggregators.base.BufferedAggregator`).

Learning rate. ``eta`` (the strategy's ``server_lr``) defaults to 1e-3, the
official README's delay-adaptive setting for ResNet on CIFAR-10; an Adam-type
step moves every coordinate by about ``eta`` per merge, so FedBuff's 1.0 would
be far too large.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afl_flwr.aggregation import Params, weighted_delta
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    BufferedAggregator,
    BufferSettings,
    Update,
    bases_of,
    positive,
)
from afl_flwr.settings import SettingError, setting

DELAY_RULES = ("code", "paper", "none")
MOMENT_GROUPS = ("fadas-m", "fadas-v", "fadas-vhat")


def delay_adaptive_lr(eta: float, tau_max: int, tau_c: int, rule: str) -> float:
    """``eta_t`` for a buffer whose stalest update is ``tau_max`` versions old."""
    if rule == "none" or tau_max <= tau_c:
        return eta
    if rule == "paper":
        return min(eta, 1.0 / tau_max)
    return eta / tau_max


@dataclass(frozen=True, kw_only=True)
class FADASSettings(BufferSettings):
    """FADAS's settings: ``M = K``, ``eta``, AMSGrad's constants, the delay rule."""

    server_lr: float = setting(1e-3, "eta, the server (AMSGrad) learning rate")
    beta1: float = setting(0.9, "first-moment decay b1, in [0, 1)")
    beta2: float = setting(0.99, "second-moment decay b2, in [0, 1)")
    eps: float = setting(1e-8, "eps > 0 added to the denominator")
    tau_c: int = setting(1, "staleness up to which the step is not reduced")
    delay_rule: str = setting(
        "code",
        "eta_t when tau_max > tau_c: code (eta/tau_max), paper (min(eta, 1/tau_max))"
        " or none",
    )
    bias_correction: bool = setting(
        True, "Adam's bias corrections, as the official code"
    )
    weighted: bool = setting(
        False, "weigh the buffer's mean delta by example counts instead of 1/M"
    )

    def validate(self) -> None:
        """Ranges of every constant; a known delay rule."""
        super().validate()
        positive("server_lr", self.server_lr)
        for name in ("beta1", "beta2"):
            beta = getattr(self, name)
            if isinstance(beta, bool) or not 0 <= beta < 1:
                raise SettingError(name, beta, "must be in [0, 1)")
        positive("eps", self.eps)
        if isinstance(self.tau_c, bool) or not (
            isinstance(self.tau_c, int) and self.tau_c >= 0
        ):
            raise SettingError("tau_c", self.tau_c, "must be an integer >= 0")
        if self.delay_rule not in DELAY_RULES:
            raise SettingError(
                "delay_rule",
                self.delay_rule,
                f"is not allowed; allowed: {', '.join(DELAY_RULES)}",
            )


@AGGREGATORS.register("fadas")
class FADAS(BufferedAggregator):
    """AMSGrad on the buffer's mean delta with a delay-adaptive step size.

    Parameters
    ----------
    settings : FADASSettings, optional (default: None)
        ``buffer_size`` (``M``, default 5), ``server_lr`` (``eta``, default
        1e-3), ``beta1`` (0.9), ``beta2`` (0.99), ``eps`` (1e-8), ``tau_c`` (1),
        ``delay_rule`` (``"code"``), ``bias_correction`` (True), ``weighted``
        (False); also accepted as keywords.
    """

    name = "fadas"
    Settings = FADASSettings
    settings: FADASSettings

    def __init__(self, settings: FADASSettings | None = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        config = self.settings
        self.eta = config.server_lr
        self.beta1 = config.beta1
        self.beta2 = config.beta2
        self.eps = config.eps
        self.tau_c = config.tau_c
        self.delay_rule = config.delay_rule
        self.bias_correction = config.bias_correction
        self.weighted = config.weighted
        self.t = 0
        self._m: Params = {}
        self._v: Params = {}
        self._vhat: Params = {}

    def weight(self, update: Update) -> float:
        """``n_j`` when ``weighted``, else 1 (the buffer mean is unweighted)."""
        return update.num_examples if self.weighted else 1.0

    def moments(self) -> tuple[Params, Params, Params]:
        """``m``, ``v`` and ``v_hat`` (the arrays themselves; empty before a merge)."""
        return self._m, self._v, self._vhat

    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """One AMSGrad step on the buffer's mean delta."""
        if self.weighted:
            total = float(sum(u.num_examples for u in buffer))
            factors = [u.num_examples / total for u in buffer]
        else:
            factors = [1.0 / len(buffer)] * len(buffer)
        self.t += 1
        eta_t = delay_adaptive_lr(
            self.eta, max(u.staleness for u in buffer), self.tau_c, self.delay_rule
        )
        if self.bias_correction:
            step_size = eta_t / (1.0 - self.beta1**self.t)
            denom_scale = 1.0 / np.sqrt(1.0 - self.beta2**self.t)
        else:
            step_size, denom_scale = eta_t, 1.0
        floats = [n for n, x in weights.items() if x.dtype.kind == "f"]
        deltas = weighted_delta(
            [u.params for u in buffer], bases_of(buffer), factors, floats
        )
        new: Params = {}
        for name, x in weights.items():
            if name not in deltas:  # a non-floating weight: the clients' mean
                mean = sum(
                    f * np.asarray(u.params[name], np.float64)
                    for u, f in zip(buffer, factors, strict=True)
                )
                new[name] = np.asarray(np.rint(mean)).astype(x.dtype)
                continue
            delta = deltas[name]
            work = delta.dtype
            m, v, vhat = self._moments_of(name, x.shape, work)
            m *= work.type(self.beta1)
            m += work.type(1.0 - self.beta1) * delta
            v *= work.type(self.beta2)
            v += work.type(1.0 - self.beta2) * delta * delta
            np.maximum(vhat, v, out=vhat)
            denom = np.sqrt(vhat)
            denom *= work.type(denom_scale)
            denom += work.type(self.eps)
            moved = m / denom
            moved *= work.type(step_size)
            moved += x
            new[name] = moved.astype(x.dtype, copy=False)
        return new

    def _moments_of(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The moments of one array, zeros at the first merge (``v_hat_0 = 0``)."""
        if name not in self._m:
            self._m[name] = np.zeros(shape, dtype)
            self._v[name] = np.zeros(shape, dtype)
            self._vhat[name] = np.zeros(shape, dtype)
        return self._m[name], self._v[name], self._vhat[name]

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """``m``, ``v``, ``v_hat`` as three groups, and the step count ``t``."""
        meta = {"t": self.t}
        if not self._m:
            return {}, meta
        groups = dict(zip(MOMENT_GROUPS, self.moments(), strict=True))
        return {g: dict(arrays) for g, arrays in groups.items()}, meta

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state`."""
        if not meta:
            return
        self.t = int(meta["t"])
        m, v, vhat = (
            {k: np.array(a) for k, a in arrays.get(g, {}).items()}
            for g in MOMENT_GROUPS
        )
        self._m, self._v, self._vhat = m, v, vhat
