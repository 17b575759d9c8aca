"""The aggregator interface: how one asynchronous aggregation rule plugs in.

An aggregator decides what an admitted update weighs, when a merge is due and
what the merge computes; it owns its own state (a buffer, a cache of client
updates, optimiser moments) and saves and restores it for checkpoints. The
strategy's event loop (:mod:`afl_flwr.strategy`) is written once and calls it:

1. ``add(update)`` for every admitted update; ``True`` means a merge is due;
2. ``merge(current)`` returns the next global model and empties the buffer.

A rule's settings are one frozen dataclass (:class:`RuleSettings`) in the rule's
module: the strategy accepts them as keywords and the run config as kebab-case
keys (:func:`setting_keyword`), both validated by the dataclass. Settings shared
by several rules (:data:`SHARED_SETTINGS`) keep their plain names
(``buffer_size``, ``server_lr``); the others carry the rule's name
(``fadas_tau_c``, run-config key ``fadas-tau-c``).

State arrays (:mod:`afl_flwr.model_state`: BatchNorm statistics, counters) are
never stepped: :class:`BufferedAggregator` merges them as the example-weighted
average of the buffer's client values, and a rule's :meth:`BufferedAggregator.step`
sees only the weights.

A new rule is one module defining an :class:`Aggregator` subclass and its
``Settings``, registered with ``@AGGREGATORS.register("name")``;
``StalenessAwareAsyncStrategy(aggregation="name")`` then uses it, or a caller
passes an instance directly.
"""

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from afl_flwr.aggregation import Params
from afl_flwr.model_state import average_state, default_is_state
from afl_flwr.registry import Registry
from afl_flwr.settings import SettingError, setting
from afl_flwr.staleness import (
    STALENESS_FUNCTIONS,
    StalenessFn,
    describe,
    make_staleness_fn,
    parameter_defaults,
)

# Settings several rules read, under the same keyword for all of them.
SHARED_SETTINGS = (
    "buffer_size",
    "server_lr",
    "mixing_rate",
    "staleness_fn",
    "staleness_a",
    "staleness_b",
)


class MergeRefused(RuntimeError):
    """A rule will not merge what waits (e.g. a privacy budget would be exceeded).

    The strategy ends the run cleanly with this message as its stop reason; the
    model stays the last merged version.
    """


@dataclass(frozen=True)
class Update:
    """One admitted client update, as an aggregator sees it.

    Parameters
    ----------
    client : int
        Stable client id (the data partition when known, else the node id).
    params : Params
        The client's model ``x_i`` (read-only views are allowed).
    base : Params or None
        The global model the client started from (``None`` when the aggregator
        does not need bases).
    base_version : int
        Version of ``base``.
    staleness : int
        ``tau``: global versions merged between dispatch and arrival.
    num_examples : float
        The client's example count ``n_i`` (``> 0``).
    metrics : Mapping[str, Any]
        The client's reported metrics.
    """

    client: int
    params: Params
    base: Params | None
    base_version: int
    staleness: int
    num_examples: float
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RuleSettings:
    """Base of a rule's settings: a frozen dataclass, each field a :func:`setting`.

    Subclasses add fields and override :meth:`validate`, raising
    :class:`~afl_flwr.settings.SettingError` with the field's name.
    """

    def validate(self) -> None:
        """Check every value (the base has none)."""


@dataclass(frozen=True, kw_only=True)
class StalenessSettings(RuleSettings):
    """The staleness function ``s(tau)`` a rule applies (:mod:`afl_flwr.staleness`).

    A parameter left unset takes the rule's own default for the function
    (:attr:`staleness_defaults`), else the function's.
    """

    # A rule's defaults for a function's parameters where they differ from the
    # function's own (``{"polynomial": {"a": 0.5}}``); a value set wins.
    staleness_defaults: ClassVar[Mapping[str, Mapping[str, float]]] = {}

    staleness_fn: str | StalenessFn = setting(
        "polynomial",
        "staleness function s(tau): constant, polynomial, hinge, exponential, "
        "inverse (or, from Python, any callable tau -> s(tau) in [0, 1])",
    )
    staleness_a: float | None = setting(
        None,
        "parameter a of the staleness function; unset: the rule's default for the "
        "function, else the function's",
    )
    staleness_b: float | None = setting(
        None, "parameter b of the staleness function; unset: the function's default"
    )

    def validate(self) -> None:
        """Known function; parameters it uses, ``>= 0``."""
        super().validate()
        if callable(self.staleness_fn):
            for name in ("a", "b"):
                if getattr(self, f"staleness_{name}") is not None:
                    raise SettingError(
                        f"staleness_{name}",
                        getattr(self, f"staleness_{name}"),
                        "applies to a named staleness function, not a callable",
                    )
            return
        if self.staleness_fn not in STALENESS_FUNCTIONS:
            raise SettingError(
                "staleness_fn",
                self.staleness_fn,
                f"is not allowed; allowed: {', '.join(sorted(STALENESS_FUNCTIONS))}",
            )
        uses = parameter_defaults(self.staleness_fn)
        for name in ("a", "b"):
            value = getattr(self, f"staleness_{name}")
            if value is None:
                continue
            if name not in uses:
                raise SettingError(
                    f"staleness_{name}",
                    value,
                    f"is not a parameter of staleness function '{self.staleness_fn}' "
                    f"(it uses {', '.join(uses) or 'none'})",
                )
            if not value >= 0:
                raise SettingError(f"staleness_{name}", value, "must be >= 0")

    def staleness_parameters(self) -> tuple[float | None, float | None]:
        """``(a, b)`` to bind.

        Each is the value set, else the rule's default for the function, else
        ``None`` (the function's own default).
        """
        if callable(self.staleness_fn):
            return None, None
        rule = self.staleness_defaults.get(self.staleness_fn, {})
        a = self.staleness_a if self.staleness_a is not None else rule.get("a")
        b = self.staleness_b if self.staleness_b is not None else rule.get("b")
        return a, b

    def make_staleness_fn(self) -> StalenessFn:
        """``tau -> s(tau)`` with these parameters."""
        if callable(self.staleness_fn):
            return self.staleness_fn
        return make_staleness_fn(self.staleness_fn, *self.staleness_parameters())

    def describe_staleness(self) -> str:
        """``polynomial(a=1.0)``: the function and the parameters in effect."""
        if callable(self.staleness_fn):
            return getattr(self.staleness_fn, "__name__", repr(self.staleness_fn))
        return describe(self.staleness_fn, *self.staleness_parameters())


@dataclass(frozen=True, kw_only=True)
class BufferSettings(RuleSettings):
    """The buffer size of a buffered rule."""

    buffer_size: int = setting(
        5,
        "K, updates per buffered merge (the strategy's default: half the training "
        "slots, at least 1)",
    )

    def validate(self) -> None:
        """``K >= 1``."""
        super().validate()
        if isinstance(self.buffer_size, bool) or not (
            isinstance(self.buffer_size, int) and self.buffer_size >= 1
        ):
            raise SettingError(
                "buffer_size", self.buffer_size, "must be an integer >= 1 (K)"
            )


def positive(name: str, value: float) -> None:
    """Raise :class:`SettingError` unless ``value > 0``."""
    if isinstance(value, bool) or not value > 0:
        raise SettingError(name, value, "must be > 0")


def integer_at_least(name: str, value: int, low: int) -> None:
    """Raise :class:`SettingError` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingError(name, value, f"must be an integer >= {low}")


def setting_keyword(rule: str, name: str) -> str:
    """The strategy keyword of a rule's setting: shared ones plain, others prefixed.

    ``setting_keyword("fadas", "tau_c") == "fadas_tau_c"``;
    ``setting_keyword("fadas", "server_lr") == "server_lr"``.
    """
    return name if name in SHARED_SETTINGS else f"{rule.replace('-', '_')}_{name}"


class Aggregator(ABC):
    """Base class of asynchronous aggregation rules.

    Subclasses set ``name``, ``Settings`` (their :class:`RuleSettings`
    dataclass) and implement :meth:`weight`, :meth:`add`, :meth:`merge` and,
    when they keep state across merges, :meth:`state` / :meth:`load_state`.
    ``needs_base`` says whether updates must carry the model they started from
    (delta-based rules).

    Parameters
    ----------
    settings : RuleSettings, optional (default: None)
        The rule's settings; ``None`` means its defaults.
    **overrides
        Individual settings by field name, applied over ``settings``.
    """

    name: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True
    Settings: ClassVar[type[RuleSettings]] = RuleSettings
    # Whether a client may appear at most once per merge (a rule, not a
    # preference: the scheduler then sends no task to a node whose update waits).
    distinct_clients: ClassVar[bool] = False

    def __init__(self, settings: RuleSettings | None = None, **overrides: Any) -> None:
        base = self.Settings() if settings is None else settings
        if not isinstance(base, self.Settings):
            raise TypeError(
                f"{type(self).__name__} takes {self.Settings.__name__}, got "
                f"{type(base).__name__}"
            )
        known = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no setting {unknown[0]!r}; its settings: "
                f"{', '.join(sorted(known))}"
            )
        self.settings = dataclasses.replace(base, **overrides)
        self.settings.validate()
        self._state_names: frozenset[str] | None = None

    @property
    def updates_per_merge(self) -> int:
        """Admitted updates per new version (1 for immediate rules)."""
        return 1

    @classmethod
    def setting_fields(cls) -> list[dataclasses.Field]:
        """The fields of the rule's settings, in declaration order."""
        return list(dataclasses.fields(cls.Settings))

    def bind_state(self, names: Collection[str]) -> None:
        """Which arrays of the model are state (told once per run by the strategy)."""
        self._state_names = frozenset(names)

    def state_names_of(self, current: Mapping[str, np.ndarray]) -> frozenset[str]:
        """The state arrays of ``current``: as bound, else the default rule."""
        if self._state_names is not None:
            return self._state_names
        return frozenset(n for n, x in current.items() if default_is_state(n, x))

    @abstractmethod
    def weight(self, update: Update) -> float:
        """The weight the update gets (recorded in the run history)."""

    @abstractmethod
    def add(self, update: Update) -> bool:
        """Take one admitted update; return ``True`` when a merge is due."""

    @abstractmethod
    def merge(self, current: Params) -> Params:
        """Merge what is pending into ``current`` and return the next global model.

        Empties the buffer. Never writes ``current`` or any update's arrays: they
        may be read-only views of Flower's records, or bases still in use.
        """

    def pending(self) -> Sequence[Update]:
        """Updates waiting for the next merge (none for immediate rules)."""
        return ()

    def check_population(self, num_nodes: int) -> None:
        """Raise ``ValueError`` when ``num_nodes`` cannot serve this rule (no-op)."""
        return None

    def observe_population(self, num_clients: int) -> None:
        """The number of clients in the federation, told before each merge.

        Rules that average over every client (CA2FL's cache mean) read it; the
        default ignores it.
        """
        return None

    def discard_pending(self) -> list[Update]:
        """Drop and return what waits (at the end of a run)."""
        return []

    def state(self) -> tuple[dict[str, Params], dict[str, Any]]:
        """Arrays and JSON-ready metadata to checkpoint (none by default)."""
        return {}, {}

    def load_state(self, arrays: Mapping[str, Params], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (a no-op by default)."""
        return None

    def summary(self) -> str:
        """One line for the start-up log: the name and every setting in effect."""
        values = ", ".join(
            f"{f.name}={getattr(self.settings, f.name)}"
            for f in dataclasses.fields(self.settings)
            if not f.name.startswith("staleness_")
        )
        staleness = (
            f", s(tau)={self.settings.describe_staleness()}"
            if isinstance(self.settings, StalenessSettings)
            else ""
        )
        return f"{self.name or type(self).__name__} ({values}{staleness})"


class BufferedAggregator(Aggregator):
    """Common part of rules that merge every ``K`` updates (FedBuff and its kin).

    :meth:`merge` is written once: it takes the buffer, lets the rule's
    :meth:`step` compute the new weights from the weights alone, and sets every
    state array to the example-weighted average of the buffered clients' values.
    The rule's settings must include :class:`BufferSettings`.
    """

    Settings: ClassVar[type[RuleSettings]] = BufferSettings

    def __init__(self, settings: RuleSettings | None = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self._buffer: list[Update] = []

    @property
    def buffer_size(self) -> int:
        """``K``."""
        return int(self.settings.buffer_size)  # type: ignore[attr-defined]

    @property
    def updates_per_merge(self) -> int:
        """``K``."""
        return self.buffer_size

    def weight(self, update: Update) -> float:
        """``n_i`` (rules with a staleness penalty multiply by ``s(tau_i)``)."""
        return update.num_examples

    def add(self, update: Update) -> bool:
        """Buffer the update; a merge is due once ``K`` are in."""
        if update.base is None:
            raise ValueError(f"{type(self).__name__} needs each update's base model")
        self._buffer.append(update)
        return len(self._buffer) >= self.buffer_size

    def pending(self) -> Sequence[Update]:
        """The buffer."""
        return tuple(self._buffer)

    def discard_pending(self) -> list[Update]:
        """Empty the buffer and return it."""
        buffer, self._buffer = self._buffer, []
        return buffer

    def take_buffer(self) -> list[Update]:
        """Empty the buffer for a merge; raise if it is empty."""
        if not self._buffer:
            raise ValueError("merge() called with an empty buffer")
        return self.discard_pending()

    def merge(self, current: Params) -> Params:
        """The rule's :meth:`step` on the weights; state arrays averaged."""
        buffer = self.take_buffer()
        state = self.state_names_of(current)
        weights = {k: x for k, x in current.items() if k not in state}
        new = self.step(weights, buffer) if weights else {}
        new.update(
            average_state(
                current,
                [u.params for u in buffer],
                [u.num_examples for u in buffer],
                state,
            )
        )
        return {name: new[name] for name in current}

    @abstractmethod
    def step(self, weights: Params, buffer: Sequence[Update]) -> Params:
        """The new value of every array of ``weights`` (the model's weights).

        ``weights`` holds the current global weights (state arrays excluded);
        each update's ``params`` and ``base`` hold the whole model.
        """


def bases_of(buffer: Sequence[Update]) -> list[Params]:
    """The base model of each update (all present for buffered rules)."""
    bases = [u.base for u in buffer]
    if any(b is None for b in bases):
        raise ValueError("an update has no base model")
    return bases  # type: ignore[return-value]


AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregation")
