"""Aggregation rules tested without the event loop, on mock updates."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_params

from afl_flwr.aggregation import Params
from afl_flwr.aggregators import (
    AGGREGATORS,
    Aggregator,
    FedAsync,
    FedBuff,
    Update,
    aggregation_names,
    make_aggregator,
)
from afl_flwr.config import AppConfig
from afl_flwr.staleness import make_staleness_fn
from afl_flwr.strategy import StalenessAwareAsyncStrategy

POLY = make_staleness_fn("polynomial", 0.5)


def _update(params: Params, base: Params | None, tau: int, n: float = 10.0) -> Update:
    return Update(
        client=0,
        params=params,
        base=base,
        base_version=0,
        staleness=tau,
        num_examples=n,
    )


def _shifted(params: Params, delta: float) -> Params:
    return {k: (v + np.float32(delta)).astype(v.dtype) for k, v in params.items()}


def _step_size(before: Params, after: Params, delta: Params) -> float:
    """Least-squares factor c with after - before = c * delta."""
    moved = np.concatenate([(after[k] - before[k]).ravel() for k in before])
    full = np.concatenate([delta[k].ravel() for k in before])
    return float(moved @ full / (full @ full))


# ----------------------------------------------------------------- FedBuff
@pytest.mark.parametrize("tau", [0, 1, 3, 81])
def test_fedbuff_k1_moves_by_exactly_s_tau_times_delta(tau):
    # Prepare: the update's delta is relative to its (old) base, not to x
    x = make_params(0)
    base = make_params(1)
    client = _shifted(base, 0.5)
    rule = FedBuff(buffer_size=1, staleness_fn=POLY)

    # Execute
    due = rule.add(_update(client, base, tau))
    new = rule.merge(x)

    # Assert: x + (1 + tau)^-0.5 * (x_i - base), computed in float64
    assert due
    expected_scale = (1.0 + tau) ** -0.5
    for name in x:
        delta = client[name].astype(np.float64) - base[name]
        np.testing.assert_allclose(
            new[name], x[name] + expected_scale * delta, rtol=1e-5, atol=1e-6
        )
    if tau == 81:  # the example: s(81) = 0.11, not a full step
        assert expected_scale == pytest.approx(0.110, abs=1e-3)


def test_same_update_merged_at_larger_staleness_moves_the_model_less():
    # Property: for every staleness pair, the staler merge is a shorter step.
    x = make_params(0)
    base = make_params(3)
    client = _shifted(base, 1.0)
    delta = {k: client[k].astype(np.float64) - base[k] for k in x}
    steps = []
    for tau in range(0, 30, 3):
        rule = FedBuff(buffer_size=1, staleness_fn=POLY)
        rule.add(_update(client, base, tau))
        steps.append(_step_size(x, rule.merge(x), delta))
    assert all(a > b for a, b in itertools.pairwise(steps))
    assert steps[0] == pytest.approx(1.0, rel=1e-5)


def test_fedbuff_buffer_sharing_one_staleness_is_penalised_absolutely():
    # Prepare: K = 3, all three updates 8 versions stale (s = 1/3 for a = 0.5)
    x = make_params(0)
    base = make_params(1)
    clients = [_shifted(base, d) for d in (1.0, 2.0, 3.0)]
    ns = [10.0, 20.0, 30.0]
    rule = FedBuff(buffer_size=3, staleness_fn=POLY)

    # Execute
    dues = [rule.add(_update(c, base, 8, n)) for c, n in zip(clients, ns, strict=True)]
    new = rule.merge(x)

    # Assert: step = s(8) * example-weighted mean delta = (1/3) * (10+40+90)/60
    assert dues == [False, False, True]
    expected = (1.0 / 3.0) * (10 * 1.0 + 20 * 2.0 + 30 * 3.0) / 60
    for name in x:
        np.testing.assert_allclose(new[name], x[name] + expected, rtol=1e-5, atol=1e-5)
    assert rule.pending() == ()


def test_fedbuff_mixed_buffer_weights_each_update_by_n_and_s():
    # Prepare: one fresh, one stale update from different bases
    x = make_params(0)
    base_old, base_new = make_params(1), x
    fresh = _shifted(base_new, 2.0)
    stale = _shifted(base_old, -1.0)
    rule = FedBuff(buffer_size=2, server_lr=0.5, staleness_fn=POLY)

    # Execute
    rule.add(_update(fresh, base_new, 0, 30.0))
    rule.add(_update(stale, base_old, 3, 10.0))
    new = rule.merge(x)

    # Assert: x + 0.5 * (30 * 1 * 2 + 10 * 0.5 * (-1)) / 40
    step = 0.5 * (30 * 1.0 * 2.0 + 10 * 0.5 * -1.0) / 40
    for name in x:
        np.testing.assert_allclose(new[name], x[name] + step, rtol=1e-5, atol=1e-5)


def test_fedbuff_needs_bases_and_a_non_empty_buffer():
    rule = FedBuff(buffer_size=2)
    with pytest.raises(ValueError, match="base"):
        rule.add(_update(make_params(1), None, 0))
    with pytest.raises(ValueError, match="empty"):
        rule.merge(make_params(0))


# ---------------------------------------------------------------- FedAsync
@pytest.mark.parametrize("tau", [0, 2, 15])
def test_fedasync_mixes_with_a_times_s_tau(tau):
    # Prepare
    x = make_params(0)
    expected_before = {k: v.astype(np.float64) for k, v in x.items()}
    client = make_params(5)
    rule = FedAsync(mixing_rate=0.6, staleness_fn=POLY)

    # Execute
    assert rule.add(_update(client, None, tau))
    new = rule.merge(x)

    # Assert
    c = 0.6 * (1.0 + tau) ** -0.5
    assert rule.weight(_update(client, None, tau)) == pytest.approx(c)
    for name in x:
        expected = (1 - c) * expected_before[name] + c * client[name]
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0, 3, 15])
def test_fedasync_default_polynomial_exponent_is_its_papers_half(tau):
    # FedAsync's experiments use (1 + tau)^-0.5; the function's own default
    # (a = 1) still holds for FedBuff, and a value set wins.
    assert FedAsync().weight(_update(make_params(1), None, tau)) == pytest.approx(
        0.5 / math.sqrt(1.0 + tau)
    )
    assert FedAsync(staleness_a=1.0).weight(
        _update(make_params(1), None, tau)
    ) == pytest.approx(0.5 / (1.0 + tau))
    assert FedBuff().staleness_fn(tau) == pytest.approx(1.0 / (1.0 + tau))
    assert FedAsync().settings.describe_staleness() == "polynomial(a=0.5)"


def test_fedasync_rule_default_applies_to_the_polynomial_only():
    # Hinge keeps its own a = 10, b = 4; exponential uses no a, so none is bound.
    hinge = FedAsync(staleness_fn="hinge").staleness_fn
    assert hinge(4) == 1.0
    assert hinge(6) == pytest.approx(1.0 / (10.0 * 2 + 1.0))
    exponential = FedAsync(staleness_fn="exponential").staleness_fn
    assert exponential(2) == pytest.approx(math.exp(-0.5 * 2))


def test_run_config_sentinel_gives_the_rules_default_and_a_value_overrides_it():
    unset = AppConfig.from_run_config({"aggregation": "fedasync"})
    assert FedAsync(**unset.strategy_keywords()).staleness_fn(3) == pytest.approx(0.5)
    set_one = AppConfig.from_run_config({"aggregation": "fedasync", "staleness-a": 1.0})
    assert FedAsync(**set_one.strategy_keywords()).staleness_fn(3) == pytest.approx(
        0.25
    )


# ---------------------------------------------------------------- registry
def test_registry_names_and_aliases():
    assert {"fedbuff", "fedasync"} <= set(AGGREGATORS.names())
    assert {"buffered", "immediate"} <= set(aggregation_names())
    rule = make_aggregator("buffered", {"buffer_size": 3, "server_lr": 0.7})
    assert isinstance(rule, FedBuff)
    assert (rule.buffer_size, rule.server_lr) == (3, 0.7)
    assert isinstance(make_aggregator("immediate", {"mixing_rate": 0.3}), FedAsync)


def test_unknown_aggregation_names_what_is_allowed():
    with pytest.raises(ValueError, match=r"allowed: .*fedasync.*fedbuff"):
        make_aggregator("fedmagic")


def test_a_new_rule_is_one_class_plus_its_registration():
    # A user's own rule: merge the newest update only (no loop changes needed)
    @AGGREGATORS.register("test-newest")
    class Newest(Aggregator):
        name = "test-newest"
        needs_base = False

        def __init__(self) -> None:
            super().__init__()
            self.last: Update | None = None

        def weight(self, update: Update) -> float:
            return 1.0

        def add(self, update: Update) -> bool:
            self.last = update
            return True

        def merge(self, current: Params) -> Params:
            assert self.last is not None
            return {k: np.array(v) for k, v in self.last.params.items()}

    try:
        rule = make_aggregator("test-newest")
        client = make_params(9)
        rule.add(_update(client, None, 4))
        new = rule.merge(make_params(0))
        for name in client:
            np.testing.assert_array_equal(new[name], client[name])
    finally:
        AGGREGATORS._entries.pop("test-newest")


def test_the_documented_rule_example_registers_and_takes_its_settings():
    # Prepare: docs/strategy.md's "Adding an aggregation rule" code, as written
    doc = Path(__file__).resolve().parents[1] / "docs" / "strategy.md"
    code = doc.read_text().split("# my_project/newest.py\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/strategy.md", "exec"), namespace)
    try:
        # Execute: as a strategy keyword (prefixed) and as an instance
        strategy = StalenessAwareAsyncStrategy(
            aggregation="damped-newest", damped_newest_damping=0.3
        )
        rule = strategy.aggregator
        x, client = make_params(0), make_params(1)
        rule.add(_update(client, None, 3))
        new = rule.merge(x)

        # Assert: damping 0.3 times s(3) = 1 / (1 + 3) of the way to the client
        assert rule.settings.damping == 0.3
        for name in x:
            expected = x[name] + 0.3 * 0.25 * (client[name] - x[name])
            np.testing.assert_allclose(new[name], expected, rtol=1e-5)
        with pytest.raises(ValueError, match="damped_newest_damping=0"):
            StalenessAwareAsyncStrategy(
                aggregation="damped-newest", damped_newest_damping=0.0
            )
    finally:
        AGGREGATORS._entries.pop("damped-newest")
