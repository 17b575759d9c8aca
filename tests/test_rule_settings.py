"""Every rule's settings: reachable as strategy keywords and run-config keys, validated.

``OTHER_VALUES`` lists a non-default valid value for every setting of every
registered rule; a new setting without an entry fails
``test_every_setting_is_listed_here``.
"""

import dataclasses

import pytest

from afl_flwr.aggregators import (
    AGGREGATORS,
    FADAS,
    make_aggregator,
    rule_class,
    setting_keyword,
)
from afl_flwr.aggregators.fadas import delay_adaptive_lr
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.server_app import make_async_strategy
from afl_flwr.settings import kebab
from afl_flwr.strategy import StalenessAwareAsyncStrategy

OTHER_VALUES = {
    ("fedbuff", "buffer_size"): 3,
    ("fedbuff", "server_lr"): 0.5,
    ("fedbuff", "server_momentum"): 0.5,
    ("fedbuff", "server_lr_warmup"): 4,
    ("fedbuff", "staleness_fn"): "hinge",
    ("fedbuff", "staleness_a"): 2.0,
    ("fedbuff", "staleness_b"): 3.0,
    ("fedasync", "mixing_rate"): 0.25,
    ("fedasync", "staleness_fn"): "hinge",
    ("fedasync", "staleness_a"): 2.0,
    ("fedasync", "staleness_b"): 3.0,
    ("ca2fl", "buffer_size"): 3,
    ("ca2fl", "server_lr"): 0.3,
    ("ca2fl", "cache_dtype"): "float32",
    ("fadas", "buffer_size"): 3,
    ("fadas", "server_lr"): 0.01,
    ("fadas", "beta1"): 0.8,
    ("fadas", "beta2"): 0.999,
    ("fadas", "eps"): 1e-6,
    ("fadas", "tau_c"): 3,
    ("fadas", "delay_rule"): "paper",
    ("fadas", "bias_correction"): False,
    ("fadas", "weighted"): True,
    ("fedstaleweight", "buffer_size"): 3,
    ("fedstaleweight", "server_lr"): 0.5,
    ("fedstaleweight", "window"): 2,
    ("aced", "buffer_size"): 3,
    ("aced", "server_lr"): 0.5,
    ("aced", "max_delay"): 4,
}
SETTINGS = sorted(OTHER_VALUES)


def test_every_setting_is_listed_here():
    declared = {
        (rule, f.name)
        for rule in AGGREGATORS
        for f in rule_class(rule).setting_fields()
    }
    assert declared == set(OTHER_VALUES)


def _with_partner(rule: str, name: str) -> dict[str, object]:
    """The setting's value, plus what it needs to be valid (hinge for a and b)."""
    values = {name: OTHER_VALUES[(rule, name)]}
    if name in ("staleness_a", "staleness_b"):
        values["staleness_fn"] = "hinge"
    return values


@pytest.mark.parametrize(("rule", "name"), SETTINGS)
def test_each_setting_reaches_the_rule_as_a_strategy_keyword(rule, name):
    # Prepare
    values = _with_partner(rule, name)
    keywords = {setting_keyword(rule, k): v for k, v in values.items()}

    # Execute
    strategy = StalenessAwareAsyncStrategy(aggregation=rule, **keywords)

    # Assert
    for field_name, value in values.items():
        assert getattr(strategy.aggregator.settings, field_name) == value


@pytest.mark.parametrize(("rule", "name"), SETTINGS)
def test_each_setting_reaches_the_rule_as_a_run_config_key(rule, name):
    # Prepare
    values = _with_partner(rule, name)
    run_config = {kebab(setting_keyword(rule, k)): v for k, v in values.items()}
    cfg = AppConfig.from_run_config({"aggregation": rule, **run_config})

    # Execute
    strategy = make_async_strategy(cfg, None)

    # Assert
    for field_name, value in values.items():
        assert getattr(strategy.aggregator.settings, field_name) == value
    assert cfg.to_run_config().items() >= run_config.items()


@pytest.mark.parametrize(
    ("rule", "key", "value", "fragment"),
    [
        ("fadas", "fadas-beta1", 1.0, "fadas-beta1=1.0 must be in [0, 1)"),
        ("fadas", "fadas-tau-c", -1, "fadas-tau-c=-1 must be an integer >= 0"),
        ("fadas", "fadas-delay-rule", "fast", "fadas-delay-rule='fast' is not allowed"),
        ("fadas", "fadas-eps", 0.0, "fadas-eps=0.0 must be > 0"),
        (
            "ca2fl",
            "ca2fl-cache-dtype",
            "int8",
            "ca2fl-cache-dtype='int8' is not allowed",
        ),
        ("fedbuff", "staleness-b", 2.0, "staleness-b=2.0 is not a parameter"),
        ("fedasync", "mixing-rate", 1.5, "mixing-rate=1.5 is out of range"),
        (
            "fedbuff",
            "fadas-tau-c",
            3,
            "fadas-tau-c=3 is a setting of aggregation 'fadas'",
        ),
        ("ca2fl", "staleness-fn", "inverse", "staleness-fn='inverse' has no effect"),
        ("fedbuff", "mixing-rate", 0.3, "mixing-rate=0.3 has no effect"),
        ("fadas", "fadas-tau-c", 1.5, "fadas-tau-c=1.5 must be an integer"),
        ("aced", "aced-max-delay", -1, "aced-max-delay=-1 must be an integer >= 0"),
        ("aced", "aced-max-delay", 2.5, "aced-max-delay=2.5 must be an integer"),
        ("aced", "server-lr", -0.1, "server-lr=-0.1 must be >= 0"),
        (
            "fedstaleweight",
            "fedstaleweight-window",
            0,
            "fedstaleweight-window=0 must be an integer >= 1",
        ),
        (
            "fedbuff",
            "fedbuff-server-lr-warmup",
            -2,
            "fedbuff-server-lr-warmup=-2 must be an integer >= 0",
        ),
        ("fedasync", "staleness-a", -0.5, "staleness-a=-0.5 must be >= 0"),
    ],
)
def test_a_bad_run_config_value_is_refused_naming_the_key(rule, key, value, fragment):
    with pytest.raises(ConfigError) as excinfo:
        AppConfig.from_run_config({"aggregation": rule, key: value})
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"aggregation": "fadas", "fadas_beta2": 1.0}, "fadas_beta2=1.0 must be in"),
        ({"aggregation": "fadas", "fadas_tau_c": -2}, "fadas_tau_c=-2 must be"),
        ({"aggregation": "fedbuff", "fadas_tau_c": 2}, "a setting of fadas"),
        ({"aggregation": "ca2fl", "staleness_fn": "inverse"}, "not a setting of"),
        ({"aggregation": "fedasync", "buffer_size": 2}, "buffer_size is not a setting"),
        ({"aggregation": "fedbuff", "fedbuff_magic": 1}, "fedbuff_magic is not a"),
        ({"aggregation": "ca2fl", "ca2fl_cache_dtype": "x"}, "ca2fl_cache_dtype='x'"),
        ({"aggregation": FADAS(), "server_lr": 0.1}, "own settings apply"),
        ({"aggregation": FADAS(), "fadas_tau_c": 2}, "own settings apply"),
    ],
)
def test_a_bad_keyword_is_refused_naming_it(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        StalenessAwareAsyncStrategy(**kwargs)


def test_an_instance_keeps_its_own_settings_and_summary_prints_them():
    rule = FADAS(buffer_size=7, server_lr=0.02, tau_c=4)
    strategy = StalenessAwareAsyncStrategy(aggregation=rule)

    assert strategy.aggregator is rule
    summary = rule.summary()
    assert "buffer_size=7" in summary and "server_lr=0.02" in summary
    assert "tau_c=4" in summary


def test_unknown_instance_setting_is_a_type_error():
    with pytest.raises(TypeError, match="has no setting 'eta'"):
        FADAS(eta=0.1)


# ----------------------------------------------------------- FADAS delay rule
def test_fadas_delay_adaptation_acts_at_the_staleness_the_app_sees():
    # Prepare: the app's defaults with aggregation='fadas'
    cfg = AppConfig.from_run_config({"aggregation": "fadas"})
    rule = make_async_strategy(cfg, None).aggregator
    assert isinstance(rule, FADAS)

    # Execute: eta_t for every staleness the app admits
    rates = {
        tau: delay_adaptive_lr(rule.eta, tau, rule.tau_c, rule.delay_rule)
        for tau in range(cfg.max_staleness + 1)
    }

    # Assert: fresh buffers take eta; every admitted stale one a smaller step
    assert rates[0] == rates[rule.tau_c] == rule.eta
    for tau in range(rule.tau_c + 1, cfg.max_staleness + 1):
        assert rates[tau] == pytest.approx(rule.eta / tau)


def test_the_papers_rule_is_selectable_and_needs_staleness_above_one_over_eta():
    eta = 1e-3
    assert delay_adaptive_lr(eta, 20, 1, "paper") == eta  # cannot act at tau <= 1000
    assert delay_adaptive_lr(eta, 2000, 1, "paper") == pytest.approx(1 / 2000)
    assert delay_adaptive_lr(0.5, 4, 1, "paper") == 0.25
    assert delay_adaptive_lr(0.5, 4, 1, "code") == 0.125
    assert delay_adaptive_lr(0.5, 4, 1, "none") == 0.5
    rule = make_aggregator("fadas", {"fadas_delay_rule": "paper"})
    assert rule.settings.delay_rule == "paper"


# -------------------------------------------------------------- staleness
def test_each_staleness_function_brings_its_own_default_parameters():
    inverse = StalenessAwareAsyncStrategy(staleness_fn="inverse").aggregator
    hinge = StalenessAwareAsyncStrategy(staleness_fn="hinge").aggregator
    assert inverse.staleness_fn(20) == pytest.approx(1 / (1 + 0.05 * 20))
    assert hinge.staleness_fn(5) == pytest.approx(1 / (10 * 1 + 1))
    cfg = AppConfig.from_run_config({"staleness-fn": "inverse"})
    rule = make_async_strategy(cfg, None).aggregator
    assert rule.staleness_fn(20) == pytest.approx(0.5)


def test_settings_dataclasses_are_frozen():
    rule = FADAS()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.settings.tau_c = 5  # type: ignore[misc]
