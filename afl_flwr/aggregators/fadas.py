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

* ``delay_rule="paper"`` (default): ``min(eta, 1 / tau_max)``, the paper's rule;
  it only bites when ``tau_max > 1 / eta`` (1000 versions at ``eta = 1e-3``);
* ``delay_rule="code"``: ``eta / tau_max``, what the official code runs (and
  so what its experiments measured);
* ``delay_rule="none"``: always ``eta`` (FADAS without delay adaptation).

``Delta`` is the unweighted buffer mean, as in the paper and code
(``weighted=True`` weighs by example counts ``n_j / sum n`` instead); no
staleness factor ``s(tau)`` is applied, so the strategy's ``staleness_fn`` is
not read. Integer arrays (batch norm's ``num_batches_tracked``) take no Adam
step: like the official code, they are set to the (rounded) buffer average of
the clients' values.

Learning rate. ``AggregatorSettings.server_lr`` defaults to 1.0, right for
FedBuff's plain step but far too large for an Adam-type step (about ``eta`` per
coordinate). :meth:`FADAS.from_settings` therefore uses :data:`DEFAULT_ETA`
(1e-3, the official README's delay-adaptive setting) when the strategy's
``server_lr`` is the default 1.0, and ``server_lr`` otherwise; to run FADAS at
``eta = 1.0``, pass an instance.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from afl_flwr.aggregation import Params
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    AggregatorSettings,
    BufferedAggregator,
    Update,
    bases_of,
)
from afl_flwr.staleness import constant

DEFAULT_ETA = 1e-3
DELAY_RULES = ("paper", "code", "none")
MOMENT_GROUPS = ("fadas-m", "fadas-v", "fadas-vhat")


def delay_adaptive_lr(eta: float, tau_max: int, tau_c: int, rule: str) -> float:
    """``eta_t`` for a buffer whose stalest update is ``tau_max`` versions old."""
    if rule == "none" or tau_max <= tau_c:
        return eta
    if rule == "paper":
        return min(eta, 1.0 / tau_max)
    return eta / tau_max


@AGGREGATORS.register("fadas")
class FADAS(BufferedAggregator):
    """AMSGrad on the buffer's mean delta with a delay-adaptive step size.

    Parameters
    ----------
    buffer_size : int (default: 5)
        ``M = K``, updates per merge.
    eta : float (default: 1e-3)
        Server learning rate ``eta``.
    beta1 : float (default: 0.9)
        First-moment decay ``b1`` in ``[0, 1)``.
    beta2 : float (default: 0.99)
        Second-moment decay ``b2`` in ``[0, 1)``.
    eps : float (default: 1e-8)
        ``eps > 0`` added to the denominator.
    tau_c : int (default: 1)
        Staleness up to which the step is not reduced.
    delay_rule : str (default: "paper")
        ``"paper"`` (``min(eta, 1/tau_max)``), ``"code"`` (``eta/tau_max``) or
        ``"none"``.
    bias_correction : bool (default: True)
        Adam's bias corrections, as the official code.
    weighted : bool (default: False)
        Weigh the buffer mean by example counts instead of ``1/M``.
    """

    name = "fadas"

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        *,
        buffer_size: int = 5,
        eta: float = DEFAULT_ETA,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-8,
        tau_c: int = 1,
        delay_rule: str = "paper",
        bias_correction: bool = True,
        weighted: bool = False,
    ) -> None:
        super().__init__(buffer_size=buffer_size, staleness_fn=constant)
        if not eta > 0:
            raise ValueError(f"eta={eta} must be > 0")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{label}={beta} must be in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps={eps} must be > 0")
        if tau_c < 0:
            raise ValueError(f"tau_c={tau_c} must be >= 0")
        if delay_rule not in DELAY_RULES:
            raise ValueError(
                f"delay_rule={delay_rule!r}; allowed: {', '.join(DELAY_RULES)}"
            )
        self.eta = eta
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.tau_c = tau_c
        self.delay_rule = delay_rule
        self.bias_correction = bias_correction
        self.weighted = weighted
        self.t = 0
        self._m: Params = {}
        self._v: Params = {}
        self._vhat: Params = {}

    @classmethod
    def from_settings(cls, settings: AggregatorSettings) -> "FADAS":
        """M from the strategy; ``eta = server_lr`` unless that is the default 1.0."""
        eta = DEFAULT_ETA if settings.server_lr == 1.0 else settings.server_lr
        return cls(buffer_size=settings.buffer_size, eta=eta)

    def weight(self, update: Update) -> float:
        """``n_j`` when ``weighted``, else 1 (the buffer mean is unweighted)."""
        return update.num_examples if self.weighted else 1.0

    def moments(self) -> tuple[Params, Params, Params]:
        """``m``, ``v`` and ``v_hat`` (the arrays themselves; empty before a merge)."""
        return self._m, self._v, self._vhat

    def merge(self, current: Params) -> Params:
        """One AMSGrad step on the buffer's mean delta."""
        buffer = self.take_buffer()
        bases = bases_of(buffer)
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
        new: Params = {}
        for name, x in current.items():
            if x.dtype.kind != "f":
                mean = sum(
                    f * np.asarray(u.params[name], np.float64)
                    for u, f in zip(buffer, factors, strict=True)
                )
                new[name] = np.asarray(np.rint(mean)).astype(x.dtype)
                continue
            work = np.promote_types(x.dtype, np.float32)
            delta = np.zeros(x.shape, work)
            for update, base, f in zip(buffer, bases, factors, strict=True):
                delta += work.type(f) * (
                    np.asarray(update.params[name], work) - np.asarray(base[name], work)
                )
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

    def summary(self) -> str:
        """Name, M, eta and the delay rule."""
        return (
            f"fadas (M={self.buffer_size}, eta {self.eta}, betas "
            f"({self.beta1}, {self.beta2}), eps {self.eps}, delay rule "
            f"{self.delay_rule} with tau_c={self.tau_c}, bias correction "
            f"{'on' if self.bias_correction else 'off'})"
        )

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
