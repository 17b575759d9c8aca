"""Typed, validated run configuration.

The run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden with
``flwr run . --run-config "key=value ..."``) is parsed once, at the edge, into the
frozen :class:`AppConfig`; everything downstream receives that object.

Every field is documented where it is declared (:func:`~afl_flwr.settings.setting`)
and the reference table in ``docs/configuration.md`` is generated from them and
from the aggregation rules' own settings (:mod:`afl_flwr.reference`). A rule's
own settings (``fadas-tau-c``, ``ca2fl-cache-dtype``, ...) are declared once, in
the rule's module; the run config accepts them under their kebab-case keys.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from afl_flwr.aggregators import (
    AGGREGATORS,
    SHARED_SETTINGS,
    aggregation_names,
    buffer_for_slots,
    rule_class,
    rule_keywords,
    setting_keyword,
)
from afl_flwr.clock import PROFILE_QUERIES
from afl_flwr.constants import MODEL_NAMES, NODE_WORKER_MODES
from afl_flwr.data import DATASETS
from afl_flwr.selection import SELECTIONS
from afl_flwr.settings import ConfigError, SettingError, coerce, kebab, setting
from afl_flwr.staleness import STALENESS_FUNCTIONS

MODES = ("async", "sync")
DP_CLIPPING_SIDES = ("server", "client")
# How FedAvg (mode='sync') samples a round's nodes: the project's `selection`
# policy (as the async strategy), or Flower's own sampler.
SYNC_SELECTIONS = ("selector", "flower")
CLOCKS = ("virtual", "real", "none")
# Run-config values that mean "the component's own default" (TOML has no null).
RULE_DEFAULT_LR = 0.0
FUNCTION_DEFAULT = -1.0

__all__ = ["AppConfig", "ConfigError", "rule_setting_keys"]


def rule_setting_keys() -> dict[str, tuple[str, str]]:
    """Run-config key -> (rule, settings field) of every rule's own settings.

    Shared settings (``buffer-size``, ``server-lr``, ...) are :class:`AppConfig`
    fields; these are the rest (``fadas-tau-c`` -> ``("fadas", "tau_c")``).
    """
    keys: dict[str, tuple[str, str]] = {}
    for rule in AGGREGATORS:
        for keyword, name in rule_keywords(rule).items():
            if keyword not in SHARED_SETTINGS:
                keys[kebab(keyword)] = (rule, name)
    return keys


def _rule_defaults() -> tuple[tuple[str, Any], ...]:
    defaults = []
    for key, (rule, name) in rule_setting_keys().items():
        default = next(
            f.default for f in rule_class(rule).setting_fields() if f.name == name
        )
        defaults.append((key, default))
    return tuple(sorted(defaults))


@dataclass(frozen=True, kw_only=True)
class AppConfig:
    """Every tunable of the app; field ``foo_bar`` is run-config key ``foo-bar``.

    The defaults are a run that reaches >= 97% MNIST test accuracy within a few
    minutes on 2 CPU cores: the paper's federation (10 clients, 5 kept busy,
    batch 64, Adam lr 1e-3, delay alpha 0.01, Dirichlet alpha 0.5) with the small
    CNN, 3 local epochs and early stopping that can act (patience 1, an epoch
    must cut the train loss by 20%). The paper's exact settings (paper CNN, 10
    local epochs, patience 10, 40 versions) ship as ``presets/paper-mnist.toml``.
    ``rule_settings`` holds every aggregation rule's own settings by run-config
    key (``fadas-tau-c``); read them with :meth:`strategy_keywords`.
    """

    # What to train.
    mode: str = setting(
        "async", "`async` (this project's strategy) or `sync` (Flower's FedAvg)"
    )
    dataset: str = setting("mnist", "`mnist` or `cifar10`")
    model: str = setting(
        "small-cnn",
        "`small-cnn` (quickstart-style 2-conv CNN), `paper-cnn` (the paper's 3-conv "
        "CNN, learns slowly), `resnet20` (the paper's CIFAR-10 model, BatchNorm), "
        "`mlp` (2 hidden layers)",
    )
    data_dir: str = setting(
        "", 'MNIST IDX folder for offline runs; `""` downloads (Hugging Face)'
    )
    num_test: int = setting(2000, "offline: size of the held-out central test set")
    # Federation and schedule.
    num_clients: int = setting(
        10, "data partitions = SuperNodes (a node's `partition-id` must be below it)"
    )
    clients_per_round: int = setting(
        5, "async: nodes kept busy (concurrency); sync: clients per round"
    )
    num_server_rounds: int = setting(
        75, "global model updates (versions); sync: rounds"
    )
    eval_every: int = setting(
        2,
        "evaluation (central and/or federated) every this many versions, and at "
        "the end",
    )
    server_eval: bool = setting(
        True,
        "evaluate centrally on the held-out test set; `false` for a deployment "
        "without central data (async only)",
    )
    fraction_evaluate: float = setting(
        0.0,
        "async: fraction of nodes asked to evaluate the global model on their data "
        "at each evaluation",
    )
    seed: int = setting(
        42, "seeds partitioning, selection, delays, task seeds, initial model"
    )
    # Local training (the paper's client rule).
    local_epochs: int = setting(3, "local epochs E (early stopping may stop sooner)")
    batch_size: int = setting(64, "local batch size B")
    learning_rate: float = setting(0.001, "Adam `lr0` of the clients")
    lr_delay_alpha: float = setting(
        0.01, "`alpha` in `lr_e = lr0 / (sqrt(e+1) (1 + alpha tau))`"
    )
    patience: int = setting(
        1, "early stopping: epochs without enough train-loss improvement"
    )
    early_stop_delta: float = setting(
        0.2,
        "early stopping: an epoch must cut the best train loss by this fraction, "
        "in [0, 1)",
    )
    dirichlet_alpha: float = setting(0.5, "non-IID label skew (smaller = more skewed)")
    # Asynchronous aggregation.
    aggregation: str = setting(
        "fedbuff",
        "the rule: `fedbuff`, `fedasync`, `ca2fl`, `fadas`, `fedstaleweight`, `aced` "
        "(see docs/strategy.md)",
    )
    buffer_size: int = setting(
        0, "K updates per buffered merge; `0` = half of `clients-per-round`, at least 1"
    )
    server_lr: float = setting(
        RULE_DEFAULT_LR,
        "server learning rate of buffered rules; `0` = the rule's own default "
        "(fedbuff, ca2fl, fedstaleweight 1.0; aced 0.25; fadas 0.001)",
    )
    mixing_rate: float = setting(0.5, "fedasync: `a` of the mixing, in (0, 1]")
    staleness_fn: str = setting(
        "polynomial",
        "fedbuff, fedasync: `constant`, `polynomial`, `hinge`, `exponential`, "
        "`inverse`",
    )
    staleness_a: float = setting(
        FUNCTION_DEFAULT,
        "parameter `a` of the staleness function; `-1` = the rule's default for "
        "the function (fedasync's polynomial: 0.5), else the function's own",
    )
    staleness_b: float = setting(
        FUNCTION_DEFAULT,
        "parameter `b` of the staleness function; `-1` = the function's own default",
    )
    max_staleness: int = setting(
        20, "`tau_max`: staler updates are dropped (and counted)"
    )
    selection: str = setting(
        "without-replacement",
        "client selection: `with-replacement` or `without-replacement`",
    )
    sync_selection: str = setting(
        "selector",
        "how FedAvg samples a round: `selector` (the `selection` policy, seeded) or "
        "`flower` (Flower's `random.sample`)",
    )
    distinct_buffer: bool = setting(
        True,
        "buffered rules: prefer idle clients whose update is not waiting in the "
        "buffer (a preference, never a cap on busy slots)",
    )
    task_timeout: float = setting(
        600.0,
        "seconds a task may take before it counts as failed (also the message TTL)",
    )
    max_consecutive_failures: int = setting(
        0,
        "stop after this many failed tasks in a row with no update admitted; `0` = "
        "`max(30, 3 x clients-per-round)`",
    )
    node_queue_depth: int = setting(
        1,
        "async: train tasks kept per busy node once no node is idle (one runs, the "
        "rest wait at the SuperLink: no SuperNode sleep between tasks, more "
        "staleness); above 1 is refused in Flower's simulation",
    )
    node_worker: str = setting(
        "auto",
        "deployments: where a SuperNode's train tasks run. `on`: a long-lived "
        "worker per node keeps torch, the partition and warm kernels between tasks "
        "(a task process then imports no torch); `off`: every task in its own "
        "process; `auto`: `on` in Flower's per-message `flwr-clientapp` processes",
    )
    # Heterogeneous clients and the simulation clock.
    clock: str = setting(
        "virtual",
        "`virtual` (simulated time, reproducible), `real` (clients sleep their "
        "delay), `none` (arrival order)",
    )
    profile_query: str = setting(
        "on-join",
        "when the virtual clock asks a node for its profile: `on-join` or "
        "`first-dispatch` (no start-up barrier, for thousands of nodes)",
    )
    speed_spread: float = setting(
        10.0, "client speed factors log-uniform over `[1, speed-spread]`"
    )
    straggler_fraction: float = setting(
        0.0, "fraction of clients made `straggler-slowdown` times slower"
    )
    straggler_slowdown: float = setting(10.0, "slowdown of stragglers")
    max_delay_s: float = setting(
        2.0, "network delay per task ~ U(0, max-delay-s), as in the paper's code"
    )
    step_time_s: float = setting(
        0.01, "simulated seconds per optimizer step on the fastest client"
    )
    # User-level differential privacy (async: afl_flwr.privacy; sync: Flower's).
    dp_noise_multiplier: float = setting(
        0.0,
        "z of the Gaussian mechanism on every release; `0` = DP off. async: "
        "fedbuff only, K = buffer size; sync: Flower's "
        "DifferentialPrivacyServerSideFixedClipping, K = clients-per-round",
    )
    dp_clipping_norm: float = setting(
        1.0, "C: each update's delta (all weight arrays) is clipped to L2 norm C"
    )
    dp_clipping: str = setting(
        "server",
        "`server`: the server clips every delta; `client`: clients clip their own "
        "with Flower's fixedclipping_mod (the server still clips, a no-op then)",
    )
    dp_target_delta: float = setting(
        1e-5, "delta at which epsilon is reported (population = `num-clients`)"
    )
    dp_max_epsilon: float = setting(
        0.0, "end the run before a release would exceed this epsilon; `0` = no limit"
    )
    # Output and fault tolerance.
    results_dir: str = setting("results", "where results folders are written")
    checkpoint_every: int = setting(
        0, "write a checkpoint every this many versions (async); `0` = never"
    )
    resume_from: str = setting(
        "", 'a checkpoint to resume from (async); `""` = a fresh run'
    )
    # Every rule's own settings, by run-config key (not a key itself).
    rule_settings: tuple[tuple[str, Any], ...] = field(
        default_factory=_rule_defaults, metadata={"doc": "", "internal": True}
    )

    @property
    def effective_buffer_size(self) -> int:
        """Buffer size K; ``buffer-size = 0`` means half of ``clients-per-round``."""
        return self.buffer_size or buffer_for_slots(self.clients_per_round)

    @classmethod
    def run_config_fields(cls) -> dict[str, Any]:
        """Run-config key -> dataclass field, for the fields that are keys."""
        return {kebab(f.name): f for f in fields(cls) if not f.metadata.get("internal")}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AppConfig":
        """Parse and validate a Flower run config (kebab-case keys).

        Missing keys take their defaults, so a ``run_simulation`` caller may pass
        only what it changes.

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or an invalid value; the
            message names the key and what is allowed.
        """
        known = cls.run_config_fields()
        rule_keys = rule_setting_keys()
        unknown = sorted(set(run_config) - set(known) - set(rule_keys))
        if unknown:
            raise ConfigError(
                f"Unknown run-config key(s) {unknown}; allowed: "
                f"{sorted({*known, *rule_keys})}"
            )
        values: dict[str, Any] = {}
        rules = dict(_rule_defaults())
        for key, value in run_config.items():
            if key in known:
                values[known[key].name] = coerce(key, value, known[key].type)
            else:
                rule, name = rule_keys[key]
                annotation = next(
                    f.type for f in rule_class(rule).setting_fields() if f.name == name
                )
                rules[key] = coerce(key, value, annotation)
        config = cls(**values, rule_settings=tuple(sorted(rules.items())))
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """Return the kebab-case run-config dictionary of this configuration."""
        out = {
            key: getattr(self, f.name) for key, f in self.run_config_fields().items()
        }
        out.update(dict(self.rule_settings))
        return out

    def strategy_keywords(self) -> dict[str, Any]:
        """The chosen rule's settings as strategy keywords (sentinels resolved).

        Shared settings the rule reads, with the run config's "rule default"
        sentinels (``server-lr = 0``, ``staleness-a = -1``) left out, then the
        rule's own settings (``fadas_tau_c``, ...). ``buffer_size`` resolves
        ``0`` to ``clients-per-round``.
        """
        accepted = rule_keywords(self.aggregation)
        shared: dict[str, Any] = {
            "buffer_size": self.effective_buffer_size,
            "server_lr": None if self.server_lr == RULE_DEFAULT_LR else self.server_lr,
            "mixing_rate": self.mixing_rate,
            "staleness_fn": self.staleness_fn,
            "staleness_a": None
            if self.staleness_a == FUNCTION_DEFAULT
            else self.staleness_a,
            "staleness_b": None
            if self.staleness_b == FUNCTION_DEFAULT
            else self.staleness_b,
        }
        keywords = {k: v for k, v in shared.items() if k in accepted and v is not None}
        rule = rule_class(self.aggregation).name
        for key, value in self.rule_settings:
            owner, name = rule_setting_keys()[key]
            if owner == rule:
                keywords[setting_keyword(rule, name)] = value
        return keywords

    def check_simulation(self) -> None:
        """Refuse what Flower's simulation cannot run (before anything starts).

        Raises
        ------
        ConfigError
            When ``node-queue-depth`` is above 1: the simulation engine gives a
            node's waiting messages to different actors, which would run them at
            the same time.
        """
        if self.node_queue_depth > 1:
            raise ConfigError(
                f"node-queue-depth={self.node_queue_depth} cannot run in Flower's "
                "simulation: its engine would train a node's waiting tasks at the "
                "same time. It serves deployments (docker/run-local-deployment.sh); "
                "use node-queue-depth = 1 here."
            )

    def validate(self) -> None:
        """Check every value; raise :class:`ConfigError` naming the first bad key."""
        _choice("mode", self.mode, MODES)
        _choice("dataset", self.dataset, sorted(DATASETS))
        _choice("model", self.model, MODEL_NAMES)
        _choice("aggregation", self.aggregation, aggregation_names())
        _choice("staleness-fn", self.staleness_fn, sorted(STALENESS_FUNCTIONS))
        _choice("selection", self.selection, sorted(SELECTIONS))
        _choice("sync-selection", self.sync_selection, SYNC_SELECTIONS)
        _choice("clock", self.clock, CLOCKS)
        _choice("node-worker", self.node_worker, NODE_WORKER_MODES)
        _choice("profile-query", self.profile_query, PROFILE_QUERIES)
        for key in (
            "num-clients",
            "clients-per-round",
            "num-server-rounds",
            "eval-every",
            "local-epochs",
            "batch-size",
            "patience",
            "num-test",
            "node-queue-depth",
        ):
            _positive(key, getattr(self, key.replace("-", "_")))
        for key in ("learning-rate", "dirichlet-alpha", "task-timeout"):
            _positive(key, getattr(self, key.replace("-", "_")))
        for key in (
            "lr-delay-alpha",
            "server-lr",
            "max-staleness",
            "buffer-size",
            "max-delay-s",
            "step-time-s",
            "checkpoint-every",
            "max-consecutive-failures",
        ):
            _non_negative(key, getattr(self, key.replace("-", "_")))
        for key in ("staleness-a", "staleness-b"):
            value = getattr(self, key.replace("-", "_"))
            if value != FUNCTION_DEFAULT and not value >= 0:
                raise ConfigError(
                    f"{key}={value!r} must be >= 0, or -1 for the function's default"
                )
        if self.resume_from and self.mode != "async":
            raise ConfigError(
                f"resume-from={self.resume_from!r} needs mode='async' (FedAvg runs "
                "are not checkpointed)"
            )
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} exceeds "
                f"num-clients={self.num_clients}; allowed: 1..{self.num_clients}"
            )
        if not 0.0 <= self.early_stop_delta < 1.0:
            raise ConfigError(
                f"early-stop-delta={self.early_stop_delta} is out of range; "
                "allowed: [0, 1)"
            )
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(
                f"fraction-evaluate={self.fraction_evaluate} is out of range; "
                "allowed: [0, 1]"
            )
        if not self.server_eval and self.mode == "sync":
            raise ConfigError(
                "server-eval=false needs mode='async' (the FedAvg baseline is "
                "compared on the central test set)"
            )
        if not 0.0 < self.mixing_rate <= 1.0:
            raise ConfigError(
                f"mixing-rate={self.mixing_rate} is out of range; allowed: (0, 1]"
            )
        if self.speed_spread < 1.0 or self.straggler_slowdown < 1.0:
            raise ConfigError(
                f"speed-spread={self.speed_spread} and straggler-slowdown="
                f"{self.straggler_slowdown} must both be >= 1 (1 = no slowdown)"
            )
        if not 0.0 <= self.straggler_fraction <= 1.0:
            raise ConfigError(
                f"straggler-fraction={self.straggler_fraction} is out of range; "
                "allowed: [0, 1]"
            )
        self._validate_rule_settings()
        self._validate_privacy()

    @property
    def dp_enabled(self) -> bool:
        """Whether the run is differentially private (``dp-noise-multiplier > 0``)."""
        return self.dp_noise_multiplier > 0

    def _validate_privacy(self) -> None:
        _non_negative("dp-noise-multiplier", self.dp_noise_multiplier)
        _positive("dp-clipping-norm", self.dp_clipping_norm)
        _choice("dp-clipping", self.dp_clipping, DP_CLIPPING_SIDES)
        _non_negative("dp-max-epsilon", self.dp_max_epsilon)
        if not 0.0 < self.dp_target_delta < 1.0:
            raise ConfigError(
                f"dp-target-delta={self.dp_target_delta} is out of range; "
                "allowed: (0, 1)"
            )
        if not self.dp_enabled:
            return
        if self.mode == "sync":
            if self.clients_per_round > self.num_clients:
                raise ConfigError(
                    f"clients-per-round={self.clients_per_round} exceeds num-clients="
                    f"{self.num_clients}: under DP every round releases exactly "
                    "that many distinct clients"
                )
            return
        if rule_class(self.aggregation).name != "fedbuff":
            raise ConfigError(
                f"dp-noise-multiplier={self.dp_noise_multiplier} with mode='async' "
                f"needs aggregation='fedbuff' (got {self.aggregation!r})"
            )
        if self.effective_buffer_size > self.num_clients:
            raise ConfigError(
                f"buffer-size={self.effective_buffer_size} exceeds num-clients="
                f"{self.num_clients}: under DP a release needs that many distinct "
                "clients"
            )

    def _validate_rule_settings(self) -> None:
        """Each rule's own settings pass its checks; none is set for another rule."""
        defaults = dict(_rule_defaults())
        chosen = rule_class(self.aggregation).name
        by_rule: dict[str, dict[str, Any]] = {}
        for key, value in self.rule_settings:
            rule, name = rule_setting_keys()[key]
            by_rule.setdefault(rule, {})[name] = value
            if rule != chosen and value != defaults[key]:
                raise ConfigError(
                    f"{key}={value!r} is a setting of aggregation '{rule}', but "
                    f"aggregation={self.aggregation!r}; remove it or choose '{rule}'"
                )
        for rule, values in by_rule.items():
            try:
                rule_class(rule).Settings(**values).validate()
            except SettingError as err:
                raise ConfigError(
                    err.message(kebab(setting_keyword(rule, err.field)))
                ) from None
        if self.mode != "async":
            return
        shared = {
            "server-lr": self.server_lr != RULE_DEFAULT_LR,
            "mixing-rate": self.mixing_rate != 0.5,
            "staleness-fn": self.staleness_fn != "polynomial",
            "staleness-a": self.staleness_a != FUNCTION_DEFAULT,
            "staleness-b": self.staleness_b != FUNCTION_DEFAULT,
        }
        accepted = rule_keywords(self.aggregation)
        for key, is_set in shared.items():
            if is_set and key.replace("-", "_") not in accepted:
                raise ConfigError(
                    f"{key}={getattr(self, key.replace('-', '_'))!r} has no effect "
                    f"with aggregation={self.aggregation!r} (its settings: "
                    f"{', '.join(kebab(k) for k in accepted)})"
                )
        try:
            rule_class(self.aggregation).Settings(
                **{
                    rule_keywords(self.aggregation)[k]: v
                    for k, v in self.strategy_keywords().items()
                }
            ).validate()
        except SettingError as err:
            raise ConfigError(
                err.message(kebab(setting_keyword(chosen, err.field)))
            ) from None


def _choice(key: str, value: str, allowed: "list[str] | tuple[str, ...]") -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}"
        )


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value!r} must be > 0")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key}={value!r} must be >= 0")
