"""FedBuff's server learning-rate warm-up: merge t moves by eta min(1, t / W).

Expected models are computed here from the buffers directly (the FedBuff step
written out in float64), not with the module's helpers.
"""

import numpy as np
import pytest
from conftest import checkpoint_round_trip
from test_server_momentum import _rounds, _run

from afl_flwr import StalenessAwareAsyncStrategy
from afl_flwr.aggregation import warmup_lr
from afl_flwr.aggregators import FedBuff, Update
from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.privacy import DPFedBuff
from afl_flwr.settings import SettingError


def _expected(x0, rounds, lr, warmup):
    """x after each merge: x += eta_t sum_i n_i/(sum n) s(tau_i) (x_i - b_i)."""
    x = {n: v.astype(np.float64) for n, v in x0.items()}
    out = []
    for t, buffer in enumerate(rounds, start=1):
        eta = lr * (min(1.0, t / warmup) if warmup > 1 else 1.0)
        total = sum(u.num_examples for u in buffer)
        for name in x:
            x[name] = x[name] + eta * sum(
                u.num_examples
                / total
                / (1.0 + u.staleness)  # s = 1/(1 + tau)
                * (u.params[name].astype(np.float64) - u.base[name])
                for u in buffer
            )
        out.append({n: v.copy() for n, v in x.items()})
    return out


def _x0():
    return {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.mark.parametrize(("lr", "warmup"), [(1.0, 3), (1.5, 4), (0.5, 0), (2.0, 1)])
def test_each_merge_moves_by_the_warmed_up_rate(lr, warmup):
    # Prepare
    rounds = _rounds(seed=7, merges=6)
    rule = FedBuff(buffer_size=3, server_lr=lr, server_lr_warmup=warmup)

    # Execute
    ours = _run(rule, _x0(), rounds)

    # Assert
    for got, want in zip(ours, _expected(_x0(), rounds, lr, warmup), strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert rule.merges == 6


def test_first_merge_moves_one_wth_of_the_plain_step():
    # Prepare: the same buffer, with and without a warm-up of W = 4
    buffer = _rounds(seed=8, merges=1)[0]

    # Execute
    warm = _run(FedBuff(buffer_size=3, server_lr_warmup=4), _x0(), [buffer])[0]
    plain = _run(FedBuff(buffer_size=3), _x0(), [buffer])[0]

    # Assert: x0 = 0, so the model is the step itself
    for name in plain:
        np.testing.assert_allclose(warm[name], plain[name] / 4, rtol=1e-6)


def test_warmup_lr_values():
    assert [warmup_lr(2.0, t, 4) for t in (1, 2, 3, 4, 5, 100)] == [
        0.5,
        1.0,
        1.5,
        2.0,
        2.0,
        2.0,
    ]
    assert warmup_lr(0.3, 1, 0) == warmup_lr(0.3, 1, 1) == 0.3
    with pytest.raises(ValueError, match="merge"):
        warmup_lr(1.0, 0, 3)
    with pytest.raises(ValueError, match="warmup"):
        warmup_lr(1.0, 1, -1)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_invalid_warmup_is_refused_naming_the_setting(bad):
    with pytest.raises(SettingError, match="server_lr_warmup"):
        FedBuff(server_lr_warmup=bad)


def test_run_config_key_reaches_the_rule_and_is_refused_for_other_rules():
    config = AppConfig.from_run_config(
        {"aggregation": "fedbuff", "fedbuff-server-lr-warmup": 5, "server-lr": 1.5}
    )
    rule = StalenessAwareAsyncStrategy(**config.strategy_keywords()).aggregator
    assert (rule.settings.server_lr_warmup, rule.settings.server_lr) == (5, 1.5)
    with pytest.raises(ConfigError, match="fedbuff-server-lr-warmup"):
        AppConfig.from_run_config(
            {"aggregation": "ca2fl", "fedbuff-server-lr-warmup": 5}
        ).strategy_keywords()


def test_resumed_rule_continues_the_warmup_where_it_stopped(tmp_path):
    # Prepare: two of five warm-up merges, then a checkpoint round trip
    rounds = _rounds(seed=9, merges=5)
    make = lambda: FedBuff(buffer_size=3, server_lr=1.5, server_lr_warmup=5)  # noqa: E731
    rule = make()
    x = _run(rule, _x0(), rounds[:2])[-1]
    loaded, restored = checkpoint_round_trip(rule, x, tmp_path / "ck.npz", make)

    # Execute
    straight = _run(rule, x, rounds[2:])[-1]
    resumed = _run(restored, loaded, rounds[2:])[-1]

    # Assert: bit-identical, and a rule that forgot the count would differ
    assert restored.merges == 5
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    fresh = _run(make(), loaded, rounds[2:])[-1]
    assert not np.allclose(fresh["w"], straight["w"])


def test_dp_release_warms_up_like_fedbuff_without_noise():
    # Prepare: equal example counts (DP weighs 1/K), no noise, no clipping
    rounds = [
        [Update(u.client, u.params, u.base, 0, u.staleness, 10.0) for u in buffer]
        for buffer in _rounds(seed=10, merges=4)
    ]
    settings = FedBuff(buffer_size=3, server_lr=1.2, server_lr_warmup=3).settings
    dp = DPFedBuff(settings, noise_multiplier=0.0, clipping_norm=1e6)

    # Execute
    ours = _run(dp, _x0(), rounds)

    # Assert
    for got, want in zip(ours, _expected(_x0(), rounds, 1.2, 3), strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
