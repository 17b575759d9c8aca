"""User-level DP for buffered asynchronous aggregation, checked independently.

Clipping by norms, noise by the sample standard deviation over many
coordinates, epsilon by Google's dp-accounting directly.
"""

from collections import defaultdict

import numpy as np
import pytest
from conftest import FakeGrid, make_params, reply_content, shift_by, to_record
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as ReferenceRdp
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from afl_flwr.privacy import AsyncDPFixedClipping, clip_delta
from afl_flwr.strategy import StalenessAwareAsyncStrategy

DELTA = 1e-5
POPULATION = 100


def _accountant(max_epsilon=None, sampling=SamplingMethod.NO_AMPLIFICATION):
    return RdpAccountant(
        PrivacyConfig(
            target_delta=DELTA,
            population_size=POPULATION,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=sampling,
            max_epsilon=max_epsilon,
        )
    )


def _reference_epsilon(z: float, releases: int) -> float:
    reference = ReferenceRdp()
    reference.compose(dp_event.GaussianDpEvent(z), releases)
    return reference.get_epsilon(DELTA)


def _strategy(**kwargs) -> StalenessAwareAsyncStrategy:
    kwargs.setdefault("fraction_evaluate", 0.0)
    return StalenessAwareAsyncStrategy(poll_interval=0.0, **kwargs)


def _grid(n: int = 4, delta: float = 0.01) -> FakeGrid:
    return FakeGrid(
        replies={i: shift_by(delta) for i in range(1, n + 1)},
        delays={i: 1 + i % 3 for i in range(1, n + 1)},
    )


def test_clip_delta_bounds_the_norm_exactly():
    base = {"a": np.zeros(3), "b": np.zeros(4)}
    update = {"a": np.full(3, 3.0), "b": np.full(4, 4.0)}
    clipped, norm = clip_delta(update, base, ["a", "b"], 2.0)
    assert norm == pytest.approx(np.sqrt(3 * 9 + 4 * 16))
    total = np.sqrt(sum(np.sum(v**2) for v in clipped.values()))
    assert total == pytest.approx(2.0, rel=1e-12)
    small, _ = clip_delta(update, base, ["a", "b"], 100.0)
    np.testing.assert_array_equal(small["a"], update["a"])  # under C: unchanged


def test_a_release_moves_the_model_by_at_most_the_clipping_norm():
    # Prepare: K = 1, no noise, updates of norm 28 clipped to 0.5; s = 1
    strategy = _strategy(concurrency=1, buffer_size=1, staleness_fn="constant")
    dp = AsyncDPFixedClipping(strategy, noise_multiplier=0.0, clipping_norm=0.5)
    x0 = make_params(0)

    # Execute
    result = dp.start(
        grid=_grid(2, delta=10.0), initial_arrays=to_record(x0), num_rounds=1
    )

    # Assert: the model moved by exactly C, along the client's direction
    x1 = {k: a.numpy() for k, a in result.arrays.items()}
    moved = np.concatenate([(x1[k] - x0[k]).ravel() for k in x0])
    assert np.linalg.norm(moved) == pytest.approx(0.5, rel=1e-5)
    assert (moved > 0).all()


def test_the_noise_has_std_eta_z_c_over_k_and_is_fresh_every_release():
    # Prepare: clients return the model unchanged (zero deltas): what moves the
    # model is the noise alone; 200,000 coordinates
    big = {"w": np.zeros(200_000, np.float32)}

    def same(node, message, params):
        return reply_content(params, 10.0)

    grid = FakeGrid(replies={n: same for n in range(1, 5)})
    strategy = _strategy(concurrency=4, buffer_size=4, server_lr=0.5)
    dp = AsyncDPFixedClipping(strategy, noise_multiplier=1.0, clipping_norm=2.0, seed=7)
    steps = []

    class Track:
        def __init__(self):
            self.previous = big["w"].astype(np.float64)

    from afl_flwr.callbacks import Callback

    class Steps(Callback):
        def on_version(self, run, merged):
            now = run.model.params["w"].astype(np.float64)
            steps.append(now - track.previous)
            track.previous = now

    track = Track()

    # Execute: two releases
    dp.start(
        grid=grid, initial_arrays=to_record(big), num_rounds=2, callbacks=[Steps()]
    )

    # Assert: per-coordinate std = eta z C / K = 0.5 * 1 * 2 / 4 = 0.25 (the
    # sample std of 200k draws is within 1%), mean 0, and the two releases'
    # noises are uncorrelated
    expected = 0.5 * 1.0 * 2.0 / 4
    for step in steps:
        assert np.std(step, ddof=1) == pytest.approx(expected, rel=0.01)
        assert abs(np.mean(step)) < 5 * expected / np.sqrt(step.size)
    assert abs(np.corrcoef(steps[0], steps[1])[0, 1]) < 0.02


def test_epsilon_equals_dp_accountings_for_the_releases_made():
    accountant = _accountant()
    strategy = _strategy(concurrency=3, buffer_size=3)
    dp = AsyncDPFixedClipping(strategy, 1.1, 1.0, accountant=accountant, seed=1)

    dp.start(grid=_grid(4), initial_arrays=to_record(make_params(0)), num_rounds=5)

    spent = dp.privacy_spent()
    assert spent.num_releases == strategy.version == 5
    assert spent.epsilon == pytest.approx(_reference_epsilon(1.1, 5), rel=1e-9)


def test_the_run_stops_exactly_at_the_budget_without_raising():
    # Prepare: a budget between epsilon(6) and epsilon(7) releases
    z = 1.3
    limit = (_reference_epsilon(z, 6) + _reference_epsilon(z, 7)) / 2
    strategy = _strategy(concurrency=3, buffer_size=3)
    dp = AsyncDPFixedClipping(strategy, z, 1.0, accountant=_accountant(limit), seed=1)

    # Execute
    result = dp.start(
        grid=_grid(4), initial_arrays=to_record(make_params(0)), num_rounds=50
    )

    # Assert: 6 releases, then a clean stop; the result is the 6th release's model
    assert strategy.version == 6
    assert dp.privacy_spent().num_releases == 6
    assert dp.privacy_spent().epsilon <= limit
    assert strategy.history.stop_reason.startswith("privacy budget exhausted")
    np.testing.assert_array_equal(
        result.arrays["w"].numpy(), strategy.store.params["w"]
    )


def test_resume_continues_the_accountant(tmp_path):
    z, path = 1.0, tmp_path / "dp.npz"
    first = _strategy(
        concurrency=3, buffer_size=3, checkpoint_every=2, checkpoint_path=path
    )
    AsyncDPFixedClipping(first, z, 1.0, accountant=_accountant(), seed=1).start(
        grid=_grid(4), initial_arrays=to_record(make_params(0)), num_rounds=4
    )

    second = _strategy(concurrency=3, buffer_size=3)
    dp = AsyncDPFixedClipping(second, z, 1.0, accountant=_accountant(), seed=2)
    assert second.resume_from(path) == 4
    dp.start(grid=_grid(4), initial_arrays=to_record(make_params(9)), num_rounds=7)

    assert second.version == 7
    assert dp.privacy_spent().num_releases == 7
    assert dp.privacy_spent().epsilon == pytest.approx(
        _reference_epsilon(z, 7), rel=1e-9
    )


def test_a_client_contributes_at_most_once_per_release():
    # Prepare: node 1 is 10x faster than the others; K = 3 of 4 nodes
    grid = FakeGrid(
        replies={n: shift_by(0.01) for n in range(1, 5)},
        delays={1: 1, 2: 10, 3: 10, 4: 10},
    )
    strategy = _strategy(concurrency=4, buffer_size=3)
    AsyncDPFixedClipping(strategy, 0.5, 1.0, seed=3).start(
        grid=grid, initial_arrays=to_record(make_params(0)), num_rounds=6
    )

    # Assert: every release holds 3 distinct clients
    releases = defaultdict(list)
    for event in strategy.history.merged():
        releases[event.merged_into].append(event.client)
    assert len(releases) == 6
    assert all(len(set(c)) == len(c) == 3 for c in releases.values())


@pytest.mark.parametrize(
    ("kwargs", "dp_kwargs", "match"),
    [
        ({"aggregation": "fedasync"}, {}, "buffer_size=1"),
        ({"aggregation": "ca2fl"}, {}, "not supported under DP"),
        ({"aggregation": "fadas"}, {}, "not supported under DP"),
        ({}, {"accountant": "zero-noise"}, "noise_multiplier must be > 0"),
        ({}, {"accountant": "poisson"}, "NO_AMPLIFICATION"),
    ],
)
def test_what_dp_cannot_do_is_refused_clearly(kwargs, dp_kwargs, match):
    noise = 1.0
    if dp_kwargs.get("accountant") == "zero-noise":
        dp_kwargs = {"accountant": _accountant()}
        noise = 0.0
    elif dp_kwargs.get("accountant") == "poisson":
        dp_kwargs = {"accountant": _accountant(sampling=SamplingMethod.POISSON)}
    with pytest.raises(ValueError, match=match):
        AsyncDPFixedClipping(_strategy(**kwargs), noise, 1.0, **dp_kwargs)


def test_a_buffer_larger_than_the_nodes_is_refused_at_start():
    strategy = _strategy(concurrency=2, buffer_size=5)
    dp = AsyncDPFixedClipping(strategy, 1.0, 1.0)
    with pytest.raises(ValueError, match="K=5 distinct clients"):
        dp.start(grid=_grid(3), initial_arrays=to_record(make_params(0)), num_rounds=2)


def _plain_app(with_mod: bool):
    """A foreign ClientApp whose update moves every weight by +1 (norm >> C)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    app = ClientApp(mods=[fixedclipping_mod] if with_mod else [])

    @app.train()
    def train(msg, context):
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        keys = list(msg.content.array_records["arrays"].keys())
        moved = ArrayRecord(
            {k: Array(a + 1.0) for k, a in zip(keys, arrays, strict=True)}
        )
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": moved, "metrics": metrics}), reply_to=msg)

    return app


@pytest.mark.parametrize("with_mod", [True, False])
def test_client_side_clipping_with_flowers_mod_and_the_server_check(with_mod):
    from afl_flwr.experiments.scripted_grid import ScriptedGrid, clientapp_replies

    # Prepare: a plain ClientApp with (or without) Flower's fixedclipping_mod
    replies = clientapp_replies(_plain_app(with_mod), 3)
    grid = ScriptedGrid(replies=replies, delays={1: 1, 2: 2, 3: 3})
    strategy = _strategy(concurrency=3, buffer_size=2, staleness_fn="constant")
    dp = AsyncDPFixedClipping(
        strategy, noise_multiplier=0.0, clipping_norm=0.5, clipping="client"
    )
    x0 = make_params(0)

    # Execute
    result = dp.start(grid=grid, initial_arrays=to_record(x0), num_rounds=3)

    # Assert: with the mod every delta arrives clipped (norm <= C); without it
    # the server counts and clips them, so the model moves by <= C per release
    norms = np.array(dp.rule.norms)
    assert len(norms) == 6
    if with_mod:
        assert (norms <= 0.5 * (1 + 1e-4)).all()
        assert dp.rule.unclipped_arrivals == 0
    else:
        assert (norms > 1.0).all()
        assert dp.rule.unclipped_arrivals == 6
    x3 = {k: a.numpy() for k, a in result.arrays.items()}
    moved = np.sqrt(sum(np.sum((x3[k] - x0[k]) ** 2) for k in x0))
    assert moved <= 3 * 0.5 * (1 + 1e-4)
    assert moved > 0.5


def test_an_unknown_clipping_side_is_refused():
    with pytest.raises(ValueError, match="clipping='both'"):
        AsyncDPFixedClipping(
            _strategy(buffer_size=2), 1.0, 1.0, accountant=None, clipping="both"
        )
