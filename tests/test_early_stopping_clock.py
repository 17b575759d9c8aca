"""Early stopping on real MNIST, and the virtual clock charging what really ran.

The real ClientApp's ``train`` runs in-process behind the fake Grid (no Ray), on
the shipped MNIST files.
"""

import pytest
from conftest import FakeGrid, to_record
from flwr.app import Context, RecordDict

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.client_app import build_model, node_profile, train
from afl_flwr.config import AppConfig
from afl_flwr.history import MERGED

LOCAL_EPOCHS = 6


@pytest.mark.timeout(300)
def test_early_stopping_ends_jobs_early_and_the_clock_charges_steps_run(mnist_dir):
    # Prepare: 2 real clients, 6 planned epochs, stop when an epoch cuts the train
    # loss by less than 60% (fires within a few epochs on ~800 images)
    cfg = AppConfig.from_run_config(
        {
            "data-dir": str(mnist_dir),
            "model": "small-cnn",
            "num-clients": 10,
            "local-epochs": LOCAL_EPOCHS,
            "patience": 1,
            "early-stop-delta": 0.6,
            "max-delay-s": 0.0,  # durations are then steps x step time x speed
        }
    )
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": node - 1, "num-partitions": 10},
            state=RecordDict(),
            run_config={},
        )
        for node in (1, 2)
    }
    steps_reported: list[int] = []

    def client(node, message, params):
        reply = train(message, contexts[node], cfg).content
        steps_reported.append(int(reply["metrics"]["steps"]))
        return reply

    grid = FakeGrid(replies={1: client, 2: client})
    grid.profiles = {
        n: node_profile(contexts[n], cfg, n - 1).to_record() for n in (1, 2)
    }
    clock = VirtualClock(
        local_epochs=LOCAL_EPOCHS,
        batch_size=cfg.batch_size,
        step_time_s=0.01,
        seed=0,
        min_epochs=cfg.patience + 1,
    )
    strategy = StalenessAwareAsyncStrategy(
        concurrency=2, buffer_size=2, clock=clock, poll_interval=0.0
    )
    initial = {k: v.numpy() for k, v in build_model(cfg).state_dict().items()}

    # Execute
    strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=1)

    # Assert: jobs stopped before their planned steps ...
    merged = [e for e in strategy.history.events if e.status == MERGED]
    planned = {
        n: LOCAL_EPOCHS * -(-node_profile(contexts[n], cfg, n - 1).num_examples // 64)
        for n in (1, 2)
    }
    assert len(merged) == 2
    assert any(s < planned[1] and s < planned[2] for s in steps_reported)
    # ... and each merged task was charged its reported steps, not its plan
    for event in merged:
        profile = clock.profiles[event.node_id]
        charged_steps = round(event.sim_duration / (0.01 * profile.speed_factor))
        assert charged_steps in steps_reported
        full = planned[event.node_id] * 0.01 * profile.speed_factor
        if charged_steps < planned[event.node_id]:
            assert event.sim_duration < full


@pytest.mark.parametrize("patience", [1, 3])
def test_clock_lower_bound_follows_patience(patience):
    clock = VirtualClock(
        local_epochs=10, batch_size=10, step_time_s=1.0, min_epochs=patience + 1
    )
    timing = clock.plan(1)  # unknown node: one batch per epoch
    assert timing.min_steps == patience + 1
    assert timing.planned_steps == 10
