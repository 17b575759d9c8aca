"""Tests for the pure aggregation math: staleness, FedAsync mixing, FedBuff merge."""

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from afl_flwr.aggregation import (
    apply_deltas,
    fedbuff_update,
    mix_immediate,
    staleness,
    weighted_delta,
)

Params = dict[str, np.ndarray]
SHAPES = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "fc.weight": (2, 5)}


def _params(seed: int, dtype: type = np.float32) -> Params:
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(size=shape).astype(dtype) for name, shape in SHAPES.items()
    }


def _deep_copy(params: Params) -> Params:
    return {name: value.copy() for name, value in params.items()}


def _record(params: Params, num_examples: int) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {name: Array(value) for name, value in params.items()}
            ),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )


def _expected_buffered(
    current: Params,
    updates: list[Params],
    bases: list[Params],
    num_examples: list[float],
    server_lr: float,
    scales: list[float] | None = None,
) -> dict[str, np.ndarray]:
    """FedBuff: ``x + eta * sum_i n_i s_i (x_i - b_i) / sum_i n_i`` in float64."""
    scales = [1.0] * len(updates) if scales is None else scales
    total = float(sum(num_examples))
    out = {}
    for name, x in current.items():
        step = sum(
            (n / total) * s * (u[name].astype(np.float64) - b[name].astype(np.float64))
            for u, b, n, s in zip(updates, bases, num_examples, scales, strict=True)
        )
        out[name] = x.astype(np.float64) + server_lr * step
    return out


def _merge(current, updates, bases, num_examples, server_lr=1.0, scales=None):
    """FedBuff merge with no staleness penalty unless ``scales`` are given."""
    scales = [1.0] * len(num_examples) if scales is None else scales
    return fedbuff_update(current, updates, bases, num_examples, scales, server_lr)


# --- staleness ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "base", "expected"), [(0, 0, 0), (5, 2, 3), (7, 7, 0), (100, 1, 99)]
)
def test_staleness_is_versions_since_base(
    current: int, base: int, expected: int
) -> None:
    # Prepare / Execute
    tau = staleness(current, base)

    # Assert
    assert tau == expected


def test_staleness_rejects_base_from_the_future() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="newer"):
        staleness(3, 4)


# --- mix_immediate ------------------------------------------------------------


def _read_only(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only copies, as Flower's record views are."""
    out = {}
    for name, value in params.items():
        copy = np.array(value)
        copy.flags.writeable = False
        out[name] = copy
    return out


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_mix_immediate_returns_fresh_arrays(rate: float) -> None:
    # Prepare: read-only inputs, as the caller's (Flower's) arrays are
    current, update = _read_only(_params(0)), _read_only(_params(1))
    before = _deep_copy(current)
    expected = {
        name: (1.0 - rate) * before[name].astype(np.float64)
        + rate * update[name].astype(np.float64)
        for name in current
    }

    # Execute
    result = mix_immediate(current, update, rate)

    # Assert: a new model; the inputs untouched, bit for bit
    assert list(result) == list(current)
    for name, value in result.items():
        assert value is not current[name]
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(current[name], before[name])


def test_mix_immediate_does_not_touch_update() -> None:
    # Prepare
    current, update = _params(0), _params(1)
    update_before = _deep_copy(update)

    # Execute
    mix_immediate(current, update, 0.4)

    # Assert
    for name, value in update.items():
        np.testing.assert_array_equal(value, update_before[name])


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_mix_immediate_keeps_integer_dtype(dtype: type) -> None:
    # Prepare: 0.75 * [10, 0, 40] + 0.25 * [14, 7, 0] = [11, 1.75, 30].
    current = _read_only({"bn.num_batches_tracked": np.array([10, 0, 40], dtype=dtype)})
    update = {"bn.num_batches_tracked": np.array([14, 7, 0], dtype=dtype)}

    # Execute
    result = mix_immediate(current, update, 0.25)

    # Assert
    mixed = result["bn.num_batches_tracked"]
    assert mixed.dtype == dtype
    np.testing.assert_array_equal(mixed, np.array([11, 2, 30], dtype=dtype))


@pytest.mark.parametrize("rate", [-0.01, 1.01, 2.0])
def test_mix_immediate_rejects_rate_outside_unit_interval(rate: float) -> None:
    # Prepare
    current, update = _params(0), _params(1)

    # Execute / Assert
    with pytest.raises(ValueError, match="mixing rate"):
        mix_immediate(current, update, rate)


# --- buffered_update ----------------------------------------------------------


@pytest.mark.parametrize(
    "num_examples", [[10, 30, 5], [1, 1], [7], [60000, 3, 999, 12]]
)
def test_buffered_zero_staleness_equals_flower_fedavg_bit_for_bit(
    num_examples: list[int],
) -> None:
    # Prepare
    current = _params(0)
    updates = [_params(seed) for seed in range(1, len(num_examples) + 1)]
    records = [_record(u, n) for u, n in zip(updates, num_examples, strict=True)]
    flower = aggregate_arrayrecords(records, "num-examples")

    # Execute
    new = _merge(
        current, updates, [current] * len(updates), num_examples, server_lr=1.0
    )

    # Assert
    assert sorted(new) == sorted(flower)
    for name, value in new.items():
        reference = flower[name].numpy()
        assert value.dtype == reference.dtype
        np.testing.assert_array_equal(value, reference)


@pytest.mark.parametrize("server_lr", [1.0, 0.7, 2.0])
def test_buffered_general_case_matches_float64_formula(server_lr: float) -> None:
    # Prepare: three updates on two older global versions.
    current = _params(0)
    base_a, base_b = _params(10), _params(11)
    updates = [_params(1), _params(2), _params(3)]
    bases = [base_a, base_b, base_a]
    weights = [2.0, 1.0, 0.5]
    expected = _expected_buffered(current, updates, bases, weights, server_lr)

    # Execute
    new = _merge(current, updates, bases, weights, server_lr=server_lr)

    # Assert
    assert sorted(new) == sorted(current)
    for name, value in new.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_buffered_zero_staleness_with_server_lr_matches_formula() -> None:
    # Prepare: base is the current model, but eta != 1 takes the general path.
    current = _params(0)
    updates = [_params(1), _params(2)]
    weights = [3.0, 1.0]
    expected = _expected_buffered(current, updates, [current, current], weights, 0.5)

    # Execute
    new = _merge(current, updates, [current, current], weights, 0.5)

    # Assert
    for name, value in new.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("server_lr", [1.0, 0.3])
def test_buffered_shared_bases_equal_distinct_copies(server_lr: float) -> None:
    # Prepare
    current = _params(0)
    base = _params(10)
    updates = [_params(1), _params(2), _params(3), _params(4)]
    weights = [5.0, 1.0, 2.0, 4.0]
    shared = [base, base, current, current]
    distinct = [
        copy.deepcopy(base),
        copy.deepcopy(base),
        _deep_copy(current),
        _deep_copy(current),
    ]

    # Execute
    from_shared = _merge(current, updates, shared, weights, server_lr)
    from_copies = _merge(current, updates, distinct, weights, server_lr)

    # Assert
    for name in current:
        np.testing.assert_allclose(
            from_shared[name], from_copies[name], rtol=1e-6, atol=1e-7
        )


def test_buffered_fast_path_equals_general_path() -> None:
    # Prepare: `current` itself as every base vs. copies of it (no shortcut).
    current = _params(0)
    updates = [_params(1), _params(2), _params(3)]
    weights = [1.0, 2.0, 3.0]
    copies = [_deep_copy(current) for _ in updates]

    # Execute
    fast = _merge(current, updates, [current] * 3, weights, 1.0)
    general = _merge(current, updates, copies, weights, 1.0)

    # Assert
    for name in current:
        np.testing.assert_allclose(fast[name], general[name], rtol=1e-6, atol=1e-6)


def test_buffered_does_not_modify_inputs() -> None:
    # Prepare
    current = _params(0)
    base = _params(10)
    updates = [_params(1), _params(2)]
    snapshots = [_deep_copy(p) for p in (current, base, *updates)]

    # Execute
    for bases, lr in (([current, current], 1.0), ([base, current], 0.5)):
        new = _merge(current, updates, bases, [1.0, 2.0], lr)
        for name in current:
            assert not np.shares_memory(new[name], current[name])

    # Assert
    for params, snapshot in zip((current, base, *updates), snapshots, strict=True):
        for name, value in params.items():
            np.testing.assert_array_equal(value, snapshot[name])


@pytest.mark.parametrize("server_lr", [1.0, 0.4])
def test_buffered_keeps_integer_dtype(server_lr: float) -> None:
    # Prepare: deltas 10 and 20 with equal weights average to 15.
    name = "bn.num_batches_tracked"
    current = {name: np.array(100, dtype=np.int64)}
    base = {name: np.array(100, dtype=np.int64)}
    updates = [{name: np.array(110, dtype=np.int64)}, {name: np.array(120)}]
    expected = 100 + server_lr * 15

    # Execute
    new = _merge(current, updates, [base, base], [1.0, 1.0], server_lr)

    # Assert
    assert new[name].dtype == np.int64
    assert new[name] == np.rint(expected)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_buffered_returns_ndarrays_for_zero_dim_params(server_lr: float) -> None:
    # Prepare: a ResNet's BatchNorm counter and a 0-d float parameter.
    current = {
        "bn.num_batches_tracked": np.array(100, dtype=np.int64),
        "scale": np.array(1.0, dtype=np.float32),
    }
    updates = [
        {
            "bn.num_batches_tracked": np.array(110, dtype=np.int64),
            "scale": np.array(3.0, dtype=np.float32),
        }
    ]

    # Execute
    new = _merge(current, updates, [current], [1.0], server_lr)

    # Assert
    for name, value in new.items():
        assert isinstance(value, np.ndarray), (name, type(value))
        assert value.shape == ()
        assert value.dtype == current[name].dtype


def test_mix_immediate_zero_dim_arrays() -> None:
    # Prepare
    current = _read_only(
        {
            "bn.num_batches_tracked": np.array(100, dtype=np.int64),
            "scale": np.array(1.0, dtype=np.float32),
        }
    )
    update = {
        "bn.num_batches_tracked": np.array(110, dtype=np.int64),
        "scale": np.array(3.0, dtype=np.float32),
    }

    # Execute
    result = mix_immediate(current, update, 0.2)

    # Assert: 0.8 * 100 + 0.2 * 110 = 102 and 0.8 * 1 + 0.2 * 3 = 1.4.
    counter, scale = result["bn.num_batches_tracked"], result["scale"]
    assert int(current["bn.num_batches_tracked"]) == 100
    assert counter.dtype == np.int64 and counter.shape == ()
    assert counter == 102
    assert scale.dtype == np.float32 and scale.shape == ()
    assert float(scale) == pytest.approx(1.4, rel=1e-6)


def test_buffered_zero_scale_update_does_not_move_the_model() -> None:
    # Prepare: the second update's staleness factor is 0; it still counts in
    # sum n_i (the penalty is absolute), so the first moves x by half its delta.
    current = _params(0)
    base = _params(10)
    updates = [_params(1), _params(2)]
    expected = _expected_buffered(current, updates[:1], [base], [2.0], 1.0, [0.5])

    # Execute
    new = _merge(current, updates, [base, base], [1.0, 1.0], 1.0, [1.0, 0.0])

    # Assert
    for name, value in new.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("num_updates", "num_bases", "num_weights"),
    [(2, 1, 2), (2, 2, 1), (0, 0, 0)],
)
def test_buffered_rejects_mismatched_lengths(
    num_updates: int, num_bases: int, num_weights: int
) -> None:
    # Prepare
    current = _params(0)
    updates = [_params(1)] * num_updates
    bases = [current] * num_bases
    weights = [1.0] * num_weights

    # Execute / Assert
    with pytest.raises(ValueError, match="as many updates"):
        _merge(current, updates, bases, weights)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [0, 0], [2.0, -1.0], [-1.0, -1.0]])
def test_buffered_rejects_bad_example_counts(weights: list[float]) -> None:
    # Prepare
    current = _params(0)
    updates = [_params(1), _params(2)]

    # Execute / Assert
    with pytest.raises(ValueError, match="example counts"):
        _merge(current, updates, [current, current], weights)


def test_buffered_rejects_negative_scales() -> None:
    current = _params(0)
    with pytest.raises(ValueError, match="scales"):
        _merge(current, [_params(1)], [current], [1.0], 1.0, [-0.5])


# --- the absolute staleness penalty (FedBuff, Nguyen et al. 2022, Alg. 1) -----


@pytest.mark.parametrize("tau_scale", [1.0, 0.5, 0.11, 0.0])
def test_buffer_of_one_moves_by_exactly_s_tau_times_delta(tau_scale: float) -> None:
    # Prepare: K = 1, delta = x_i - b (independent of the current model x).
    current = _params(0)
    base = _params(10)
    update = _params(1)

    # Execute
    new = _merge(current, [update], [base], [37.0], 1.0, [tau_scale])

    # Assert: x + s * (x_i - b), computed here in float64
    for name, value in new.items():
        expected = current[name].astype(np.float64) + tau_scale * (
            update[name].astype(np.float64) - base[name].astype(np.float64)
        )
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_buffer_sharing_one_staleness_takes_a_scaled_step() -> None:
    # Prepare: every update equally stale -> the fresh step times s (no renormalising)
    current = _params(0)
    base = _params(10)
    updates = [_params(1), _params(2), _params(3)]
    n = [5.0, 20.0, 75.0]
    fresh = _merge(current, updates, [base] * 3, n, 1.0, [1.0] * 3)

    # Execute
    stale = _merge(current, updates, [base] * 3, n, 1.0, [0.25] * 3)

    # Assert: stale - x == 0.25 * (fresh - x)
    for name in current:
        x = current[name].astype(np.float64)
        np.testing.assert_allclose(
            stale[name] - x, 0.25 * (fresh[name] - x), rtol=1e-4, atol=1e-6
        )


def test_mixed_buffer_matches_fedbuff_formula() -> None:
    # Prepare: mixed staleness factors and bases.
    current = _params(0)
    bases = [_params(10), _params(11), current]
    updates = [_params(1), _params(2), _params(3)]
    n, scales = [10.0, 30.0, 60.0], [0.5, 1 / 3, 1.0]
    expected = _expected_buffered(current, updates, bases, n, 0.8, scales)

    # Execute
    new = _merge(current, updates, bases, n, 0.8, scales)

    # Assert
    for name, value in new.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_weighted_delta_and_apply_deltas_agree() -> None:
    # Prepare
    current = _params(0)
    bases = [_params(10), _params(11)]
    updates = [_params(1), _params(2)]
    factors = [0.3, 0.2]

    # Execute
    delta = weighted_delta(updates, bases, factors)
    applied = apply_deltas(current, updates, bases, factors, 0.5)

    # Assert
    for name, x in current.items():
        expected = 0.3 * (updates[0][name].astype(np.float64) - bases[0][name])
        expected += 0.2 * (updates[1][name].astype(np.float64) - bases[1][name])
        np.testing.assert_allclose(delta[name], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            applied[name], x + 0.5 * expected, rtol=1e-5, atol=1e-6
        )
