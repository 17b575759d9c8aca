"""FedAvg (ClockedFedAvg) sampling its rounds with the project's seeded selector."""

import pytest
from conftest import FakeGrid, make_params, shift_by, to_record
from flwr.app import ConfigRecord

from afl_flwr.clock import NodeProfile, VirtualClock
from afl_flwr.selection import make_selector
from afl_flwr.sync_baseline import ClockedFedAvg

NODES = [101, 205, 333, 412, 578, 690, 777, 881]
PER_ROUND = 4


def _strategy(seed: int, selection: str | None, clock=None) -> ClockedFedAvg:
    return ClockedFedAvg(
        seed=seed,
        selection=selection,
        clock=clock,
        fraction_train=PER_ROUND / len(NODES),
        fraction_evaluate=0.0,
        min_train_nodes=PER_ROUND,
        min_evaluate_nodes=0,
        min_available_nodes=PER_ROUND,
    )


def _rounds(strategy: ClockedFedAvg, grid: FakeGrid, count: int) -> list[list[int]]:
    arrays = to_record(make_params())
    return [
        [
            m.metadata.dst_node_id
            for m in strategy.configure_train(r, arrays, ConfigRecord(), grid)
        ]
        for r in range(1, count + 1)
    ]


def test_rounds_walk_the_selectors_passes():
    # Prepare
    grid = FakeGrid(replies={n: shift_by(0.1) for n in NODES})
    strategy = _strategy(seed=3, selection="without-replacement")
    reference = make_selector("without-replacement", 3)

    # Execute
    rounds = _rounds(strategy, grid, 4)

    # Assert: every two rounds visit each node exactly once (one pass), and the
    # picks are the selector's own, drawn one at a time among unpicked nodes
    for first, second in ((0, 1), (2, 3)):
        assert sorted(rounds[first] + rounds[second]) == NODES
    expected = []
    for _ in range(4):
        chosen: list[int] = []
        for _ in range(PER_ROUND):
            idle = [n for n in NODES if n not in chosen]
            chosen.append(reference.select(NODES, idle))
        expected.append(chosen)
    assert rounds == expected


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_selection_is_seeded_and_follows_partition_order(seed):
    # Prepare: the same partitions behind two different sets of node ids
    ids_a, ids_b = NODES, [n * 7 + 3 for n in reversed(NODES)]

    def grid_and_clock(ids):
        grid = FakeGrid(replies={n: shift_by(0.1) for n in ids})
        grid.profiles = {
            n: NodeProfile(pid, 64).to_record() for pid, n in enumerate(ids)
        }
        clock = VirtualClock(local_epochs=1, batch_size=64, step_time_s=0.01)
        return grid, clock

    grid_a, clock_a = grid_and_clock(ids_a)
    grid_b, clock_b = grid_and_clock(ids_b)

    # Execute
    rounds_a = _rounds(_strategy(seed, "without-replacement", clock_a), grid_a, 3)
    rounds_b = _rounds(_strategy(seed, "without-replacement", clock_b), grid_b, 3)

    # Assert: the same partitions are chosen, whatever the node ids
    as_partitions_a = [[clock_a.label(n) for n in r] for r in rounds_a]
    as_partitions_b = [[clock_b.label(n) for n in r] for r in rounds_b]
    assert as_partitions_a == as_partitions_b
    assert all(len(set(r)) == PER_ROUND for r in rounds_a)


def test_without_selection_flower_sampler_is_kept():
    # Prepare
    grid = FakeGrid(replies={n: shift_by(0.1) for n in NODES})
    strategy = _strategy(seed=0, selection=None)

    # Execute
    rounds = _rounds(strategy, grid, 2)

    # Assert
    assert strategy.selector is None
    assert all(len(set(r)) == PER_ROUND and set(r) <= set(NODES) for r in rounds)


def test_a_runner_that_does_not_wrap_the_strategy_is_refused():
    strategy = _strategy(0, None)
    other = _strategy(1, None)
    wrapper = type("Wrapper", (), {"strategy": other})()
    with pytest.raises(ValueError, match="runner must wrap this strategy"):
        strategy.start(grid=None, initial_arrays=None, runner=wrapper)
