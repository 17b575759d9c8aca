"""Model state (BatchNorm statistics, counters) through every rule: averaged.

Expected values are computed here with ``np.average`` from the clients' values;
the models are real torch ``state_dict``s sent as Flower ``ArrayRecord``s, as
Flower's quickstart-pytorch sends them.
"""

import numpy as np
import pytest
import torch
from conftest import FakeGrid, reply_content
from flwr.app import ArrayRecord

from afl_flwr.aggregators import AGGREGATORS, Update, make_aggregator
from afl_flwr.model_state import (
    average_state,
    default_is_state,
    state_names,
    torch_buffer_names,
)
from afl_flwr.models import ResNet20
from afl_flwr.replies import arrayrecord_to_params
from afl_flwr.strategy import StalenessAwareAsyncStrategy

RULES = sorted(AGGREGATORS.names())
# Every rule, plus FedBuff with server momentum (a second code path) and with
# a server learning-rate warm-up (a scaled step).
MOMENTUM = "fedbuff+momentum"
WARMUP = "fedbuff+warmup"
VARIANTS = [*RULES, MOMENTUM, WARMUP]


def _variant(variant: str) -> tuple[str, dict[str, float]]:
    """The rule's name and the settings that make the variant."""
    if variant == MOMENTUM:
        return "fedbuff", {"fedbuff_server_momentum": 0.9, "server_lr": 0.1}
    if variant == WARMUP:
        return "fedbuff", {"fedbuff_server_lr_warmup": 4, "server_lr": 1.5}
    return variant, {}


def _resnet_params(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    model = ResNet20(in_channels=1)
    return arrayrecord_to_params(ArrayRecord(model.state_dict()), writable=True)


def _client(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A client's reply: weights moved a little, its own BN statistics."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, x in base.items():
        if name.endswith("running_var"):
            out[name] = rng.uniform(0.05, 0.3, x.shape).astype(x.dtype)
        elif name.endswith("running_mean"):
            out[name] = rng.normal(0.0, 1.0, x.shape).astype(x.dtype)
        elif name.endswith("num_batches_tracked"):
            out[name] = np.array(int(x) + 13 + seed, x.dtype)
        else:
            out[name] = (x + rng.normal(0, 0.01, x.shape)).astype(x.dtype)
    return out


# ------------------------------------------------------------- detection
def test_default_detection_finds_exactly_a_torch_models_buffers():
    model = ResNet20(in_channels=1)
    params = arrayrecord_to_params(ArrayRecord(model.state_dict()))

    state = state_names(params)

    assert state == set(torch_buffer_names(model))
    assert {n for n in params if n not in state} == {
        n for n, _ in model.named_parameters()
    }
    assert params["bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("layer.running_mean", np.float32, True),
        ("layer.running_var", np.float64, True),
        ("steps", np.int64, True),
        ("mask", np.bool_, True),
        ("running_var_weight", np.float32, False),
        ("fc.weight", np.float32, False),
    ],
)
def test_default_is_state_by_name_and_dtype(name, dtype, expected):
    assert default_is_state(name, np.zeros(2, dtype)) is expected


def test_state_keys_as_names_predicate_and_bad_names():
    params = {"w": np.zeros(2, np.float32), "ema": np.zeros(2, np.float32)}
    assert state_names(params, ["ema"]) == {"ema"}
    assert state_names(params, lambda n, x: n == "w") == {"w"}
    with pytest.raises(ValueError, match=r"does not have.*'nope'"):
        state_names(params, ["nope"])
    with pytest.raises(ValueError, match="collection of names"):
        state_names(params, "ema")


def test_average_state_is_the_example_weighted_mean_rounded_for_integers():
    current = {"v": np.ones(3, np.float32), "n": np.array(5, np.int64)}
    clients = [
        {"v": np.array([1, 2, 3], np.float32), "n": np.array(10, np.int64)},
        {"v": np.array([3, 2, 1], np.float32), "n": np.array(13, np.int64)},
    ]

    merged = average_state(current, clients, [1.0, 3.0], {"v", "n"})

    np.testing.assert_allclose(merged["v"], [2.5, 2.0, 1.5])
    assert merged["n"].dtype == np.int64 and int(merged["n"]) == 12  # rint(12.25)


# ------------------------------------------------------ every rule, no loop
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rule_averages_state_and_steps_only_weights(variant):
    # Prepare: the global model moved on since the clients' (old) base; the
    # clients' BN variances are below the base's, so a delta step on them
    # (x + s * (x_i - base)) would drive them negative
    base = _resnet_params(0)
    current = {
        k: (v * 0.2 if k.endswith("running_var") else v) for k, v in base.items()
    }
    clients = [_client(base, seed) for seed in (1, 2, 3)]
    counts = [10.0, 30.0, 60.0]
    rule, extra = _variant(variant)
    sizes = {"buffer_size": 3} if rule != "fedasync" else {}
    aggregator = make_aggregator(rule, {**sizes, **extra})
    state = state_names(base)
    aggregator.bind_state(state)

    # Execute
    new = current
    for client, n in zip(clients, counts, strict=True):
        update = Update(0, client, base, 0, 5, n)
        if aggregator.add(update):
            new = aggregator.merge(new)

    # Assert
    assert list(new) == list(current)
    for name in state:
        values = np.stack([c[name] for c in clients]).astype(np.float64)
        if rule == "fedasync":  # each update mixed in, a convex combination
            expected = current[name].astype(np.float64)
            for client, _ in zip(clients, counts, strict=True):
                c = aggregator.weight(Update(0, client, None, 0, 5, 1.0))
                expected = (1 - c) * expected + c * client[name]
                if current[name].dtype.kind == "i":  # each merge keeps the dtype
                    expected = np.rint(expected)
        else:
            expected = np.average(values, axis=0, weights=counts)
        if new[name].dtype.kind == "i":
            expected = np.rint(expected)
        assert new[name].dtype == current[name].dtype
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-6)
        if name.endswith("running_var"):
            assert (new[name] > 0).all()
    weights = [n for n in current if n not in state]
    assert any(not np.array_equal(new[n], current[n]) for n in weights)
    assert all(np.isfinite(new[n]).all() for n in weights)


@pytest.mark.parametrize("rule", RULES)
def test_declared_state_keys_override_the_default(rule):
    # Prepare: "ema" is a float buffer the default treats as a weight
    x = {"w": np.zeros(2, np.float32), "ema": np.zeros(2, np.float32)}
    client = {"w": np.ones(2, np.float32), "ema": np.full(2, 7.0, np.float32)}
    base = {"w": np.zeros(2, np.float32), "ema": np.full(2, 9.0, np.float32)}
    aggregator = make_aggregator(rule, {"buffer_size": 1} if rule != "fedasync" else {})
    aggregator.bind_state(["ema"])

    # Execute
    aggregator.add(Update(0, client, base, 0, 0, 4.0))
    new = aggregator.merge(x)

    # Assert: as state, ema takes the client's value (a single client's
    # average), not x + (7 - 9); FedAsync mixes it like everything else
    if rule == "fedasync":
        c = aggregator.weight(Update(0, client, None, 0, 0, 1.0))
        np.testing.assert_allclose(new["ema"], [7.0 * c] * 2)
    else:
        np.testing.assert_allclose(new["ema"], [7.0, 7.0])


# ----------------------------------------------------------- through the loop
def _bn_reply(offset: int):
    """A plain client: weights + 0.01, its BN variance 0.1 + offset/100."""

    def reply(node, message, params):
        out = {}
        for name, x in params.items():
            if name.endswith("running_var"):
                out[name] = np.full_like(x, 0.1 + offset / 100)
            elif name.endswith("num_batches_tracked"):
                out[name] = np.asarray(x + 13).astype(x.dtype)
            else:
                out[name] = (x + np.float32(0.01)).astype(x.dtype)
        return reply_content(out, num_examples=10.0 * (1 + offset))

    return reply


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_resnet20_comes_through_every_rule_without_nan(variant):
    # Prepare: 4 nodes, one slow (stale updates), the ResNet-20 state dict
    rule, extra = _variant(variant)
    torch.manual_seed(0)
    model = ResNet20(in_channels=1)
    initial = ArrayRecord(model.state_dict())
    before = {k: bytes(a.data) for k, a in initial.items()}
    grid = FakeGrid(
        replies={n: _bn_reply(n) for n in (1, 2, 3, 4)},
        delays={1: 5, 2: 1, 3: 1, 4: 2},
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=3, aggregation=rule, poll_interval=0.0, **extra
    )

    # Execute
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=6)

    # Assert: stale updates were merged, the model evaluates to finite outputs
    taus = [e.staleness for e in strategy.history.merged()]
    assert max(taus) > 0
    model.load_state_dict(result.arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 1, 28, 28))
    assert torch.isfinite(out).all()
    # Averaging rules: within the clients' values (0.11..0.14); FedAsync's
    # mixing: within those and the initial 1.0 (a convex combination)
    upper = 1.0 if rule == "fedasync" else 0.15
    state = result.arrays.to_torch_state_dict()
    for name, value in state.items():
        if name.endswith("running_var"):
            assert (value >= 0.11 - 1e-6).all() and (value <= upper).all(), name
    assert {k: bytes(a.data) for k, a in initial.items()} == before
