"""CA2FL and FADAS: each rule against a float64 re-implementation of its paper.

The references below are written from the update equations (CA2FL: ICLR 2024,
Algorithm 2; FADAS: ICML 2024, Algorithm 1 with the official code's bias
correction), on flattened float64 vectors, independently of the modules.
"""

import numpy as np
import pytest
from conftest import (
    FakeGrid,
    checkpoint_round_trip,
    make_params,
    shift_by,
    to_record,
)

from afl_flwr import StalenessAwareAsyncStrategy
from afl_flwr.aggregation import Params
from afl_flwr.aggregators import (
    AGGREGATORS,
    CA2FL,
    FADAS,
    Update,
    aggregation_names,
    make_aggregator,
)
from afl_flwr.checkpoint import load_checkpoint
from afl_flwr.config import AppConfig

SHAPES = {"w": (3, 2), "b": (2,)}

# A round is a list of (client, staleness, num_examples); clients repeat across
# rounds and client 1 twice within round 2.
ROUNDS = [
    [(0, 0, 10.0), (1, 1, 20.0), (2, 0, 30.0)],
    [(1, 4, 10.0), (3, 2, 40.0), (1, 0, 10.0)],
    [(0, 3, 25.0), (4, 3, 5.0), (2, 1, 15.0)],
    [(3, 0, 10.0), (3, 0, 10.0), (0, 0, 50.0)],
]


def _flat(params: Params) -> np.ndarray:
    return np.concatenate([np.asarray(params[k], np.float64).ravel() for k in params])


def _model(rng: np.random.Generator, scale: float = 1.0, shapes=SHAPES) -> Params:
    return {
        k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()
    }


def _make_rounds(
    seed: int, rounds=ROUNDS, scale: float = 1.0, shapes=SHAPES
) -> list[list[tuple[Update, np.ndarray]]]:
    """Updates with their own (random) bases, and each one's float64 delta."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in rounds:
        buffer = []
        for client, tau, n in spec:
            base = _model(rng, scale, shapes)
            params = {
                k: (v + 0.1 * scale * rng.normal(size=v.shape)).astype(np.float32)
                for k, v in base.items()
            }
            update = Update(
                client=client,
                params=params,
                base=base,
                base_version=0,
                staleness=tau,
                num_examples=n,
            )
            buffer.append((update, _flat(params) - _flat(base)))
        out.append(buffer)
    return out


def _run(rule, x: Params, rounds, population: int | None = None) -> Params:
    for buffer in rounds:
        dues = [rule.add(u) for u, _ in buffer]
        assert dues[-1] and not any(dues[:-1])
        if population is not None:
            rule.observe_population(population)
        x = rule.merge(x)
    return x


# ------------------------------------------------------------------- CA2FL
def _ca2fl_reference(x0, rounds, eta: float, population: int) -> np.ndarray:
    """Algorithm 2: v = h_t + (1/M) sum (D_j - h_t^j); x += eta v; refresh h."""
    x = _flat(x0)
    cache: dict[int, np.ndarray] = {}
    h_mean = np.zeros_like(x)
    for buffer in rounds:
        snapshot = dict(cache)
        calibration = [d - snapshot.get(u.client, 0.0) for u, d in buffer]
        x = x + eta * (h_mean + np.mean(calibration, axis=0))
        for u, d in buffer:  # in arrival order: the newest delta stays
            cache[u.client] = d
        h_mean = sum(cache.values()) / max(population, len(cache))
    return x


@pytest.mark.parametrize("population", [5, 8, 2])
@pytest.mark.parametrize("server_lr", [1.0, 0.3])
def test_ca2fl_matches_algorithm_2_over_several_merges(population, server_lr):
    # Prepare: float32 cache (exact storage); N = 2 is below the 5 cached clients
    rounds = _make_rounds(seed=1)
    x0 = make_params(0)
    rule = CA2FL(buffer_size=3, server_lr=server_lr, cache_dtype="float32")

    # Execute
    x = _run(rule, x0, rounds, population)

    # Assert
    expected = _ca2fl_reference(x0, rounds, server_lr, population)
    np.testing.assert_allclose(_flat(x), expected, rtol=1e-5, atol=1e-6)
    assert all(x[k].dtype == np.float32 for k in x)


def test_ca2fl_first_merge_is_the_plain_buffer_mean_and_the_cache_holds_newest():
    # Prepare
    rounds = _make_rounds(seed=2)[:2]
    x0 = make_params(0)
    rule = CA2FL(buffer_size=3, cache_dtype="float32")

    # Execute: round 1 (empty cache), then round 2 where client 1 comes twice
    x1 = _run(rule, x0, rounds[:1], population=5)
    _run(rule, x1, rounds[1:], population=5)

    # Assert: x1 = x0 + mean delta; client 1's cache is its last delta of round 2
    mean = np.mean([d for _, d in rounds[0]], axis=0)
    np.testing.assert_allclose(_flat(x1), _flat(x0) + mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _flat(rule.cached(1)), rounds[1][2][1], rtol=1e-6, atol=1e-7
    )
    assert _flat(rule.cached(9)).tolist() == [0.0] * 8  # never seen: zero
    assert rule.num_cached == 4


def test_ca2fl_running_sum_equals_the_sum_of_the_stored_cache():
    # Prepare: float16 cache, many merges with clients replaced over and over
    spec = [[(c % 6, 0, 1.0) for c in range(r, r + 4)] for r in range(25)]
    rounds = _make_rounds(seed=3, rounds=spec)
    rule = CA2FL(buffer_size=4)

    # Execute
    _run(rule, make_params(0), rounds, population=6)

    # Assert: the incremental sum is the sum of what is stored (dequantised)
    fresh = sum(_flat(rule.cached(c)) for c in range(6))
    np.testing.assert_allclose(_flat(rule.cache_sum()), fresh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
def test_ca2fl_float16_cache_stays_close_to_float32(scale):
    # Prepare: 10 clients, a 1000-parameter model, 6 merges of K = 4
    shapes = {"w": (40, 20), "b": (200,)}
    rng = np.random.default_rng(7)
    spec = [
        [(int(c), 0, 1.0) for c in rng.choice(10, size=4, replace=False)]
        for _ in range(6)
    ]
    rounds = _make_rounds(seed=4, rounds=spec, scale=scale, shapes=shapes)
    x0 = _model(np.random.default_rng(5), scale, shapes)
    results = {}

    # Execute: the same updates through a float16 and a float32 cache
    for dtype in ("float16", "float32"):
        rule = CA2FL(buffer_size=4, cache_dtype=dtype)
        results[dtype] = _flat(_run(rule, x0, rounds, population=10))

    # Assert: relative to how far the model moved
    moved = np.linalg.norm(results["float32"] - _flat(x0))
    error = np.linalg.norm(results["float16"] - results["float32"]) / moved
    print(f"scale {scale:g}: float16 cache relative error {error:.2e}")
    assert error < 5e-4


def _counter_buffer(rule, n1: float = 1.0, n2: float = 1.0):
    for client, steps, n in ((0, 10, n1), (1, 13, n2)):
        base = {"w": np.zeros(2, np.float32), "n": np.array(90, np.int64)}
        params = {"w": np.ones(2, np.float32), "n": np.array(90 + steps, np.int64)}
        rule.add(Update(client, params, base, 0, 0, n))


def test_ca2fl_integer_state_is_the_example_weighted_client_average():
    # Prepare: a batch-norm counter beside a float array; clients hold 1 and 3
    x0 = {"n": np.array(100, np.int64), "w": np.zeros(2, np.float32)}
    rule = CA2FL(buffer_size=2, server_lr=1.0)
    _counter_buffer(rule, n1=1.0, n2=3.0)

    # Execute
    x1 = rule.merge(x0)

    # Assert: rint((1 * 100 + 3 * 103) / 4) = rint(102.25) = 102, int64, no
    # delta step (which would give 100 + rint(11.5) = 112); array order kept
    assert list(x1) == ["n", "w"]
    assert x1["n"].dtype == np.int64 and int(x1["n"]) == 102
    np.testing.assert_allclose(x1["w"], [1.0, 1.0])


def test_ca2fl_an_integer_array_declared_a_weight_moves_by_the_rounded_mean_delta():
    # Prepare: the user declares no state at all
    x0 = {"n": np.array(100, np.int64), "w": np.zeros(2, np.float32)}
    rule = CA2FL(buffer_size=2, server_lr=1.0)
    rule.bind_state(())
    _counter_buffer(rule)

    # Execute
    x1 = rule.merge(x0)

    # Assert: 100 + rint((10 + 13) / 2) = 112
    assert x1["n"].dtype == np.int64 and int(x1["n"]) == 112


def test_ca2fl_rejects_unknown_cache_dtype():
    with pytest.raises(ValueError, match="allowed: float16, float32"):
        CA2FL(cache_dtype="int8")


# ------------------------------------------------------------------- FADAS
def _fadas_reference(
    x0, rounds, *, eta, b1, b2, eps, tau_c, rule, bias, weighted
) -> np.ndarray:
    """AMSGrad on the buffer mean; eta_t by the paper's or the code's delay rule."""
    x = _flat(x0)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    v_hat = np.zeros_like(x)
    for t, buffer in enumerate(rounds, start=1):
        deltas = np.array([d for _, d in buffer])
        ns = np.array([u.num_examples for u, _ in buffer])
        mean = np.average(deltas, axis=0, weights=ns if weighted else None)
        m = b1 * m + (1 - b1) * mean
        v = b2 * v + (1 - b2) * mean**2
        v_hat = np.maximum(v_hat, v)
        tau_max = max(u.staleness for u, _ in buffer)
        lr = eta
        if tau_max > tau_c and rule == "paper":
            lr = min(eta, 1 / tau_max)
        elif tau_max > tau_c and rule == "code":
            lr = eta / tau_max
        if bias:
            m_hat = m / (1 - b1**t)
            x = x + lr * m_hat / (np.sqrt(v_hat / (1 - b2**t)) + eps)
        else:
            x = x + lr * m / (np.sqrt(v_hat) + eps)
    return x


@pytest.mark.parametrize("delay_rule", ["paper", "code", "none"])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_fadas_matches_amsgrad_with_delay_adaptive_rate(
    delay_rule, bias_correction, weighted
):
    # Prepare: eta = 0.5 so that the paper's min(eta, 1/tau_max) bites at tau 3, 4
    rounds = _make_rounds(seed=11)
    x0 = make_params(0)
    knobs = {"eta": 0.5, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "tau_c": 1}
    rule = FADAS(
        buffer_size=3,
        server_lr=knobs["eta"],
        beta1=knobs["b1"],
        beta2=knobs["b2"],
        eps=knobs["eps"],
        tau_c=knobs["tau_c"],
        delay_rule=delay_rule,
        bias_correction=bias_correction,
        weighted=weighted,
    )

    # Execute
    x = _run(rule, x0, rounds)

    # Assert
    expected = _fadas_reference(
        x0, rounds, **knobs, rule=delay_rule, bias=bias_correction, weighted=weighted
    )
    np.testing.assert_allclose(_flat(x), expected, rtol=1e-5, atol=1e-6)
    assert rule.t == len(rounds)


def test_fadas_delay_rules_differ_on_a_stale_buffer():
    # Prepare: one buffer 4 versions stale, eta = 0.5 > 1/4
    rounds = _make_rounds(seed=12, rounds=[[(0, 4, 1.0), (1, 2, 1.0)]])
    x0 = make_params(0)
    moved = {}

    # Execute
    for delay_rule in ("none", "paper", "code"):
        rule = FADAS(buffer_size=2, server_lr=0.5, delay_rule=delay_rule)
        moved[delay_rule] = _flat(_run(rule, x0, rounds)) - _flat(x0)

    # Assert: the first bias-corrected AMSGrad step is lr * sign(mean delta)
    sign = np.sign(np.mean([d for _, d in rounds[0]], axis=0))
    for delay_rule, lr in (("none", 0.5), ("paper", 0.25), ("code", 0.125)):
        np.testing.assert_allclose(moved[delay_rule], lr * sign, rtol=1e-5)


def test_fadas_sets_integer_arrays_to_the_clients_average():
    x0 = {"n": np.array(100, np.int64), "w": np.zeros(2, np.float32)}
    rule = FADAS(buffer_size=2, server_lr=0.1)
    for client, count in ((0, 110), (1, 113)):
        base = {"w": np.zeros(2, np.float32), "n": np.array(90, np.int64)}
        params = {"w": np.ones(2, np.float32), "n": np.array(count, np.int64)}
        rule.add(Update(client, params, base, 0, 0, 1.0))

    x1 = rule.merge(x0)

    assert list(x1) == ["n", "w"]
    assert x1["n"].dtype == np.int64 and int(x1["n"]) == 112  # rint(111.5)
    np.testing.assert_allclose(x1["w"], [0.1, 0.1], rtol=1e-5)


def test_fadas_takes_its_own_eta_unless_the_strategy_sets_server_lr():
    default = make_aggregator("fadas", {"buffer_size": 4})
    chosen = make_aggregator("fadas", {"buffer_size": 4, "server_lr": 0.05})

    assert isinstance(default, FADAS) and isinstance(chosen, FADAS)
    assert (default.buffer_size, default.eta) == (4, 1e-3)
    assert chosen.eta == 0.05
    assert (default.beta1, default.beta2, default.eps, default.tau_c) == (
        0.9,
        0.99,
        1e-8,
        1,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delay_rule": "fast"}, "allowed: code, paper, none"),
        ({"beta2": 1.0}, "beta2"),
        ({"server_lr": 0.0}, "server_lr"),
    ],
)
def test_fadas_rejects_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FADAS(**kwargs)


# ------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    "make_rule",
    [
        lambda: CA2FL(buffer_size=3, server_lr=0.7),
        lambda: CA2FL(buffer_size=3, cache_dtype="float32"),
        lambda: FADAS(buffer_size=3, server_lr=0.05, delay_rule="code"),
    ],
    ids=["ca2fl-float16", "ca2fl-float32", "fadas"],
)
def test_merging_after_a_checkpoint_round_trip_is_bit_identical(tmp_path, make_rule):
    # Prepare: two merges, then a checkpoint written to and read from a file
    rounds = _make_rounds(seed=21)
    rule = make_rule()
    x = _run(rule, make_params(0), rounds[:2], population=6)
    loaded, restored = checkpoint_round_trip(rule, x, tmp_path / "ck.npz", make_rule)

    # Execute: the remaining merges, with and without the round trip
    straight = _run(rule, x, rounds[2:], population=6)
    resumed = _run(restored, loaded, rounds[2:], population=6)

    # Assert
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])


def test_ca2fl_checkpoint_holds_one_group_per_cached_client(tmp_path):
    rule = CA2FL(buffer_size=3)
    _run(rule, make_params(0), _make_rounds(seed=22)[:2], population=5)

    arrays, meta = rule.state()

    assert {g for g in arrays if g.startswith("cache-")} == {
        f"cache-{c}" for c in (0, 1, 2, 3)
    }
    assert all("/" not in g for g in arrays)
    assert meta["clients"] == [0, 1, 2, 3] and meta["mean_over"] == 5
    assert arrays["cache-1"]["w"].dtype == np.float16
    with pytest.raises(ValueError, match="float16"):
        CA2FL(cache_dtype="float32").load_state(arrays, meta)


# --------------------------------------------------- registry, config, loop
def test_registered_and_accepted_by_the_run_config():
    assert {"ca2fl", "fadas"} <= set(AGGREGATORS.names())
    assert {"ca2fl", "fadas"} <= set(aggregation_names())
    ca2fl = make_aggregator("ca2fl", {"buffer_size": 3, "server_lr": 0.5})
    assert isinstance(ca2fl, CA2FL)
    assert (ca2fl.buffer_size, ca2fl.server_lr) == (3, 0.5)
    for name in ("ca2fl", "fadas"):
        assert AppConfig.from_run_config({"aggregation": name}).aggregation == name


@pytest.mark.parametrize("aggregation", ["ca2fl", "fadas", "fedstaleweight", "aced"])
def test_the_async_loop_runs_each_rule_and_resumes_from_its_checkpoint(
    tmp_path, aggregation
):
    # Prepare: 4 nodes pushing the model up by 0.01; node 1 slow
    nodes = {n: shift_by(0.01) for n in (1, 2, 3, 4)}
    delays = {1: 4, 2: 1, 3: 1, 4: 2}
    path = tmp_path / "ck.npz"
    first = StalenessAwareAsyncStrategy(
        concurrency=3,
        buffer_size=3,
        aggregation=aggregation,
        server_lr=0.5,
        checkpoint_every=2,
        checkpoint_path=path,
        poll_interval=0.0,
    )

    # Execute: 4 versions, then a new server resumes to version 6
    result = first.start(
        grid=FakeGrid(replies=nodes, delays=delays),
        initial_arrays=to_record(make_params(0)),
        num_rounds=4,
    )
    second = StalenessAwareAsyncStrategy(
        concurrency=3,
        buffer_size=3,
        aggregation=aggregation,
        server_lr=0.5,
        poll_interval=0.0,
    )
    assert second.resume_from(path) == 4
    resumed = second.start(
        grid=FakeGrid(replies=nodes, delays=delays),
        initial_arrays=to_record(make_params(99)),
        num_rounds=6,
    )

    # Assert: every version merged, the model moved up, the rule's state saved
    assert first.version == 4 and second.version == 6
    start = make_params(0)
    after = {k: v.numpy() for k, v in result.arrays.items()}
    final = {k: v.numpy() for k, v in resumed.arrays.items()}
    assert all(np.all(after[k] > start[k]) for k in start)
    assert all(np.all(final[k] > after[k]) for k in start)
    _, state = load_checkpoint(path)
    if aggregation == "ca2fl":
        assert {f"cache-{n}" for n in nodes} <= set(state["extra_arrays"])
        assert state["aggregator"]["mean_over"] == 4
    elif aggregation == "fedstaleweight":
        # Every client's staleness window, newest last, at most W = 5 long; the
        # resumed run's windows continue from the saved ones.
        history = state["aggregator"]["history"]
        assert set(history) <= {str(n) for n in nodes} and history
        assert all(1 <= len(w) <= 5 for w in history.values())
        assert max(max(w) for w in history.values()) >= 1  # node 1 is slow
        resumed_history = second.aggregator.state()[1]["history"]
        assert sum(map(len, resumed_history.values())) >= sum(
            map(len, history.values())
        )
    elif aggregation == "aced":
        # Every node's latest delta and its base version, as saved; the
        # resumed rule continues from them.
        saved = state["aggregator"]
        assert saved["clients"] == sorted(saved["clients"]) and saved["clients"]
        assert {f"aced-entry-{c}" for c in saved["clients"]} == set(
            state["extra_arrays"]
        )
        assert max(saved["bases"]) <= 4
        assert set(second.aggregator.state()[1]["clients"]) >= set(saved["clients"])
    else:
        assert state["aggregator"]["t"] == 4
        assert set(state["extra_arrays"]) == {"fadas-m", "fadas-v", "fadas-vhat"}
