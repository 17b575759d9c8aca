"""The strategy under Flower's own round loop and wrappers, with a plain ClientApp.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` drives the strategy
through ``configure_train``/``aggregate_train``; here with noise 0 and a
clipping norm that passes everything, so the wrapper must not change the
result. The ClientApp is a plain Flower app (numpy only, no afl_flwr import),
run in this process by :func:`~afl_flwr.experiments.scripted_grid.clientapp_replies`.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from afl_flwr.aggregators import AGGREGATORS
from afl_flwr.experiments.scripted_grid import ScriptedGrid, clientapp_replies
from afl_flwr.strategy import StalenessAwareAsyncStrategy

ROUNDS = 3
SHIFTS = {0: 1.0, 1: 3.0}  # partition -> what its client adds to every weight

plain_app = ClientApp()


@plain_app.train()
def _train(msg: Message, context: Context) -> Message:
    shift = SHIFTS[int(context.node_config["partition-id"])]
    arrays = msg.content["arrays"]
    reply = {}
    for name in arrays:
        value = arrays[name].numpy()
        if value.dtype.kind == "f":
            reply[name] = Array((value + shift).astype(value.dtype))
        else:  # a counter, as num_batches_tracked: both clients ran 2 steps
            reply[name] = Array(np.asarray(value + 2).astype(value.dtype))
    content = RecordDict(
        {
            "arrays": ArrayRecord(reply),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0}),
        }
    )
    return Message(content=content, reply_to=msg)


def _initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {
            "w": Array(rng.normal(size=(3, 2)).astype(np.float32)),
            "b": Array(rng.normal(size=(2,)).astype(np.float32)),
            "steps": Array(np.array(5, np.int64)),
        }
    )


def _run_wrapped(strategy: StalenessAwareAsyncStrategy, initial: ArrayRecord):
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        strategy, noise_multiplier=0.0, clipping_norm=1e9, num_sampled_clients=2
    )
    grid = ScriptedGrid(replies=clientapp_replies(plain_app, 2))
    return wrapper.start(grid=grid, initial_arrays=initial, num_rounds=ROUNDS)


@pytest.mark.parametrize(("buffer_size", "per_round"), [(2, 2.0), (1, 4.0)])
def test_every_reply_of_a_round_shares_the_rounds_base(buffer_size, per_round):
    # Prepare: two nodes reply base + 1 and base + 3; constant staleness
    initial = _initial()
    before = {k: bytes(a.data) for k, a in initial.items()}
    start = {k: a.numpy() for k, a in initial.items()}
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, buffer_size=buffer_size, staleness_fn="constant"
    )

    # Execute
    result = _run_wrapped(strategy, initial)

    # Assert: K = 2 averages the deltas (+2 a round); K = 1 applies each reply's
    # own delta against the round's base (+1 then +3: +4 a round)
    final = {k: a.numpy() for k, a in result.arrays.items()}
    for name in ("w", "b"):
        np.testing.assert_allclose(
            final[name], start[name] + ROUNDS * per_round, rtol=1e-6
        )
    # The int64 counter is state: the clients' average (5 + 2 a round), int64
    assert final["steps"].dtype == np.int64
    assert int(final["steps"]) == 5 + 2 * ROUNDS
    # The caller's arrays are bit-identical
    assert {k: bytes(a.data) for k, a in initial.items()} == before


@pytest.mark.parametrize("rule", sorted(AGGREGATORS.names()))
def test_no_rule_writes_the_callers_arrays_and_int64_survives(rule):
    # Prepare
    initial = _initial()
    before = {k: bytes(a.data) for k, a in initial.items()}
    strategy = StalenessAwareAsyncStrategy(concurrency=2, aggregation=rule)

    # Execute
    result = _run_wrapped(strategy, initial)

    # Assert: finite, dtypes kept, the model moved, the caller's bytes untouched
    final = {k: a.numpy() for k, a in result.arrays.items()}
    assert final["steps"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in final.values())
    assert not np.array_equal(final["w"], initial["w"].numpy())
    assert {k: bytes(a.data) for k, a in initial.items()} == before
