"""FedBuff's server momentum: PyTorch's SGD on the merged delta, in every path.

The reference is ``torch.optim.SGD(momentum=beta)`` stepping a parameter whose
gradient is minus the merged delta (the convention of Flower's ``FedAvgM`` and
FLSim's asynchronous aggregators), run independently of the module.
"""

import numpy as np
import pytest
import torch
from conftest import (
    FakeGrid,
    checkpoint_round_trip,
    make_params,
    shift_by,
    to_record,
)

from afl_flwr import StalenessAwareAsyncStrategy
from afl_flwr.aggregation import momentum_step
from afl_flwr.aggregators import FedBuff, Update
from afl_flwr.config import AppConfig
from afl_flwr.privacy import DPFedBuff
from afl_flwr.settings import SettingError
from afl_flwr.staleness import make_staleness_fn


def _rounds(seed: int, merges: int = 4, k: int = 3):
    """Per merge: K updates (own random base, staleness, example count)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(merges):
        buffer = []
        for client in range(k):
            base = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
            base["b"] = rng.normal(size=3).astype(np.float32)
            params = {
                n: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
                for n, v in base.items()
            }
            tau, count = int(rng.integers(0, 4)), float(rng.integers(5, 50))
            buffer.append(Update(client, params, base, 0, tau, count))
        out.append(buffer)
    return out


def _torch_reference(x0, rounds, beta, lr, a=1.0):
    """x after each merge, by torch's SGD on the pseudo-gradient -d (float64)."""
    s = make_staleness_fn("polynomial", a, None)
    params = {n: torch.tensor(v, dtype=torch.float64) for n, v in x0.items()}
    for p in params.values():
        p.requires_grad_(False)
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=beta)
    out = []
    for buffer in rounds:
        total = sum(u.num_examples for u in buffer)
        for name, p in params.items():
            d = sum(
                u.num_examples
                / total
                * s(u.staleness)
                * (u.params[name].astype(np.float64) - u.base[name].astype(np.float64))
                for u in buffer
            )
            p.grad = -torch.tensor(d)
        opt.step()
        out.append({n: p.numpy().copy() for n, p in params.items()})
    return out


def _run(rule, x, rounds):
    states = []
    for buffer in rounds:
        for update in buffer:
            rule.add(update)
        x = rule.merge(x)
        states.append(x)
    return states


@pytest.mark.parametrize(("beta", "lr"), [(0.9, 0.1), (0.5, 0.7), (0.0, 0.3)])
def test_fedbuff_momentum_is_torch_sgd_on_the_merged_delta(beta, lr):
    # Prepare
    rounds = _rounds(seed=1)
    x0 = {
        "w": np.zeros((4, 3), np.float32),
        "b": np.ones(3, np.float32),
    }
    rule = FedBuff(buffer_size=3, server_lr=lr, server_momentum=beta)

    # Execute
    ours = _run(rule, x0, rounds)

    # Assert: every merge equals the reference (float32 model, float64 reference)
    for got, expected in zip(ours, _torch_reference(x0, rounds, beta, lr), strict=True):
        for name in expected:
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert bool(rule.velocity) == (beta > 0)


def test_momentum_moves_further_than_plain_fedbuff_on_a_steady_delta():
    # Prepare: the same delta every merge
    x = {"w": np.zeros(2, np.float32)}
    delta = {"w": np.full(2, 1.0, np.float32)}

    # Execute: three heavy-ball steps
    velocity: dict = {}
    for _ in range(3):
        x, velocity = momentum_step(x, delta, velocity, 0.5, 1.0)

    # Assert: steps 1, 1.5, 1.75 (v = 1 + 0.5 v)
    np.testing.assert_allclose(x["w"], [4.25, 4.25])
    np.testing.assert_allclose(velocity["w"], [1.75, 1.75])


def test_integer_weights_are_stepped_and_rounded_back():
    x = {"k": np.array([10, 20], np.int64)}
    new, velocity = momentum_step(
        x, {"k": np.array([1.4, -2.6])}, {"k": np.array([1.0, 1.0])}, 0.5, 1.0
    )

    assert new["k"].dtype == np.int64
    np.testing.assert_array_equal(new["k"], [12, 18])  # rint(10+1.9), rint(20-2.1)
    np.testing.assert_allclose(velocity["k"], [1.9, -2.1])


@pytest.mark.parametrize("beta", [1.0, -0.1, True, 1.5])
def test_momentum_outside_zero_to_one_is_refused(beta):
    with pytest.raises(SettingError, match="server_momentum"):
        FedBuff(server_momentum=beta)
    with pytest.raises(ValueError, match="momentum"):
        momentum_step({"w": np.zeros(1)}, {"w": np.zeros(1)}, {}, float(beta), 1.0)


def test_merging_after_a_checkpoint_round_trip_is_bit_identical(tmp_path):
    # Prepare: two merges, then the rule's state through a checkpoint file
    rounds = _rounds(seed=2)
    make = lambda: FedBuff(buffer_size=3, server_lr=0.2, server_momentum=0.9)  # noqa: E731
    rule = make()
    x = _run(
        rule,
        {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)},
        rounds[:2],
    )[-1]
    arrays, _ = rule.state()
    loaded, restored = checkpoint_round_trip(rule, x, tmp_path / "ck.npz", make)

    # Execute
    straight = _run(rule, x, rounds[2:])[-1]
    resumed = _run(restored, loaded, rounds[2:])[-1]

    # Assert: the velocity came back, so the merges agree bit for bit
    assert set(arrays) == {"fedbuff-velocity"}
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    without = make()  # a fresh rule (no velocity) would differ
    fresh = _run(without, loaded, rounds[2:])[-1]
    assert not np.array_equal(fresh["w"], straight["w"])


def test_dp_release_with_momentum_equals_fedbuff_momentum_without_noise():
    # Prepare: equal example counts (DP weighs 1/K), no noise, a bound no
    # delta reaches: the DP release is then FedBuff's merged delta
    rounds = [
        [Update(u.client, u.params, u.base, 0, u.staleness, 10.0) for u in buffer]
        for buffer in _rounds(seed=3)
    ]
    settings = FedBuff(buffer_size=3, server_lr=0.3, server_momentum=0.8).settings
    dp = DPFedBuff(settings, noise_multiplier=0.0, clipping_norm=1e6)
    plain = FedBuff(settings)
    x0 = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}

    # Execute
    ours = _run(dp, x0, rounds)
    theirs = _run(plain, x0, rounds)

    # Assert
    for a, b in zip(ours, theirs, strict=True):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
    arrays, _ = dp.state()
    assert set(arrays) == {"fedbuff-velocity"}


def test_run_config_key_reaches_the_rule_and_the_loop_resumes_with_it(tmp_path):
    # Prepare
    config = AppConfig.from_run_config(
        {"aggregation": "fedbuff", "fedbuff-server-momentum": 0.9, "server-lr": 0.1}
    )
    keywords = config.strategy_keywords()
    assert keywords["fedbuff_server_momentum"] == 0.9
    rule = StalenessAwareAsyncStrategy(**keywords).aggregator
    assert (rule.settings.server_momentum, rule.settings.server_lr) == (0.9, 0.1)
    nodes = {n: shift_by(0.01) for n in (1, 2, 3)}
    path = tmp_path / "ck.npz"

    def strategy(**extra):
        return StalenessAwareAsyncStrategy(
            concurrency=3,
            buffer_size=2,
            server_lr=0.1,
            fedbuff_server_momentum=0.9,
            poll_interval=0.0,
            **extra,
        )

    first = strategy(checkpoint_every=2, checkpoint_path=path)

    # Execute: 4 versions, then a new server resumes to 6
    first.start(
        grid=FakeGrid(replies=nodes, delays={1: 3, 2: 1, 3: 1}),
        initial_arrays=to_record(make_params(0)),
        num_rounds=4,
    )
    second = strategy()
    assert second.resume_from(path) == 4
    loaded = []
    original = second.aggregator.load_state
    second.aggregator.load_state = lambda arrays, meta: (  # type: ignore[method-assign]
        loaded.append({k: np.array(v) for k, v in arrays["fedbuff-velocity"].items()}),
        original(arrays, meta),
    )
    second.start(
        grid=FakeGrid(replies=nodes, delays={1: 3, 2: 1, 3: 1}),
        initial_arrays=to_record(make_params(99)),
        num_rounds=6,
    )

    # Assert: the resumed server started from the first one's velocity
    assert second.version == 6
    assert len(loaded) == 1
    for name, value in first.aggregator.velocity.items():
        np.testing.assert_array_equal(loaded[0][name], value)
