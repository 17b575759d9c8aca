"""The scheduler as an object: tasks, the factory contract, the clock policy."""

from conftest import FakeGrid, make_params, shift_by, to_record
from flwr.app import Message, MessageType, RecordDict

from afl_flwr.clock import WallClock
from afl_flwr.selection import make_selector
from afl_flwr.strategy.scheduler import TRAIN, Scheduler, train_slots


class Factory:
    """A TaskFactory that records which tasks were started."""

    def __init__(self) -> None:
        self.built: list[int] = []
        self.started_nodes: list[int] = []

    def train_message(self, node_id: int, seq: int) -> tuple[Message, int]:
        self.built.append(node_id)
        content = RecordDict({"arrays": to_record(make_params(0))})
        return Message(content, dst_node_id=node_id, message_type=TRAIN), 0

    def started(self, task) -> None:
        self.started_nodes.append(task.node_id)


class RefusingGrid(FakeGrid):
    """Pushes to node 1 fail (the SuperLink returns no message id)."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        return [
            "" if m.metadata.dst_node_id == 1 else i
            for m, i in zip(messages, ids, strict=True)
        ]


def test_a_base_is_checked_out_only_for_a_successful_push():
    # Prepare: 3 nodes, 3 slots; pushes to node 1 fail
    grid = RefusingGrid(replies={n: shift_by(0.0) for n in (1, 2, 3)})
    scheduler = Scheduler(
        selector=make_selector("without-replacement", 0), concurrency=3
    )
    scheduler.refresh(grid, force=True)
    factory = Factory()

    # Execute
    started = scheduler.dispatch(grid, factory)

    # Assert: all three built, only the two pushed ones started and in flight
    assert sorted(factory.built) == [1, 2, 3]
    assert sorted(factory.started_nodes) == [2, 3]
    assert sorted(t.node_id for t in started) == [2, 3]
    assert scheduler.train_in_flight() == 2
    assert 1 not in scheduler.busy_nodes()


def test_train_slots_follow_fedavgs_sample_size():
    assert train_slots(10, 1.0, 2) == 10
    assert train_slots(10, 0.5, 2) == 5
    assert train_slots(10, 0.05, 2) == 2  # min_train_nodes floor
    assert train_slots(1, 0.5, 2) == 1  # never more than the nodes


def test_fraction_sized_slots_follow_the_connected_nodes():
    nodes = [1, 2]
    grid = FakeGrid(
        replies={n: shift_by(0.0) for n in range(1, 9)}, nodes_at=lambda tick: nodes
    )
    scheduler = Scheduler(
        selector=make_selector("with-replacement", 0), fraction_train=0.5
    )
    scheduler.refresh(grid, force=True)
    assert scheduler.slots == 2  # max(int(2 * 0.5), 2)
    nodes.extend(range(3, 9))
    scheduler.refresh(grid, force=True)
    assert scheduler.slots == 4  # int(8 * 0.5)
    assert isinstance(scheduler.clock, WallClock)
    assert MessageType.TRAIN == TRAIN
