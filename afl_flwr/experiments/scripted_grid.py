"""An in-memory Flower ``Grid`` with scripted reply delays, for studies and tests.

Drives the real strategy (or the real ServerApp ``run``, or Flower's own round
loop) without Ray or a SuperLink: every ``push_messages`` calls the node's reply
function at once, and every ``pull_messages`` call is one *tick*; a reply to a
message pushed at tick ``t`` to node ``n`` is delivered at tick
``t + delays[n]``. ``send_and_receive`` (Flower's synchronous round loop, node
profile queries) answers at once. :func:`clientapp_replies` makes the reply
functions of a real Flower ``ClientApp``, called in this process.
"""

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from afl_flwr.constants import NUM_PARTITIONS, PARTITION_ID, QUERY_PROFILE
from afl_flwr.experiments.local_grid import LocalGrid

# (node id, the message sent to it) -> reply content, an Error, or None (no reply).
ReplyFn = Callable[[int, Message], RecordDict | Error | None]
# Error code of a reply whose ClientApp raised (Flower's ClientApp exception code).
CLIENT_APP_RAISED_EXCEPTION = 0


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Give this process the task identity a ServerApp process has.

    Creating a :class:`~flwr.app.Message` outside a Flower process needs it; the
    previous identity is restored on exit.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass
class ScriptedGrid(LocalGrid):
    """A Grid whose replies arrive after scripted numbers of polls ("ticks").

    Parameters
    ----------
    replies : Mapping[int, ReplyFn]
        Reply function per node id; the keys are the connected nodes (unless
        ``nodes_at`` says otherwise).
    delays : Mapping[int, int] (default: {})
        Ticks until a node's reply is delivered; 1 when missing.
    profiles : Mapping[int, ConfigRecord] (default: {})
        Answers to the strategy's ``query.profile`` messages (virtual clock);
        a node without one gets its reply function's answer.
    nodes_at : Callable[[int], Iterable[int]], optional (default: None)
        The connected nodes at a tick (nodes joining and leaving).
    """

    replies: Mapping[int, ReplyFn]
    delays: Mapping[int, int] = field(default_factory=dict)
    profiles: Mapping[int, ConfigRecord] = field(default_factory=dict)
    nodes_at: Callable[[int], Iterable[int]] | None = None
    tick: int = 0
    pushed: int = 0
    sent: list[Message] = field(default_factory=list)
    # Replies delivered at the next pull whatever was asked (unknown replies).
    extra_replies: list[Message] = field(default_factory=list)
    _pending: dict[str, tuple[int, Message]] = field(default_factory=dict)

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        if self.nodes_at is not None:
            return list(self.nodes_at(self.tick))
        return list(self.replies)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Compute each reply now; deliver it ``delays[node]`` ticks later."""
        ids = []
        for message in messages:
            message_id = self._assign_id(message)
            node = message.metadata.dst_node_id
            reply = self._reply(message)
            if reply is not None:
                ready = self.tick + self.delays.get(node, 1)
                self._pending[message_id] = (ready, reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Advance one tick and return the replies due by now."""
        self.tick += 1
        out = list(self.extra_replies)
        self.extra_replies.clear()
        for message_id in message_ids:
            pending = self._pending.get(message_id)
            if pending is not None and pending[0] <= self.tick:
                out.append(pending[1])
                del self._pending[message_id]
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Answer every message at once (profile queries from ``profiles``)."""
        out = []
        for message in messages:
            self._assign_id(message)
            reply = self._reply(message)
            if reply is not None:
                out.append(reply)
        return out

    def train_messages(self) -> list[Message]:
        """The ``train`` messages sent so far, in order."""
        return [m for m in self.sent if m.metadata.message_type == "train"]

    def _assign_id(self, message: Message) -> str:
        message_id = str(uuid4())
        message.metadata.__dict__["_message_id"] = message_id
        self.sent.append(message)
        self.pushed += 1
        return message_id

    def _reply(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == QUERY_PROFILE and node in self.profiles:
            content: RecordDict | Error | None = RecordDict(
                {"profile": self.profiles[node]}
            )
        elif message.metadata.message_type == QUERY_PROFILE and self.profiles:
            content = None
        else:
            content = self.replies[node](node, message)
        if content is None:
            return None
        return Message(content, reply_to=message)


def clientapp_replies(
    app: ClientApp,
    num_nodes: int,
    *,
    run_config: Mapping[str, Any] | None = None,
    first_node_id: int = 1,
) -> dict[int, ReplyFn]:
    """Reply functions that run a Flower ``ClientApp`` in this process.

    Node ``first_node_id + i`` serves partition ``i`` (``partition-id`` and
    ``num-partitions`` in its node config, as a simulated SuperNode has) and
    keeps one :class:`~flwr.app.Context` across messages. Each message is
    deep-copied before the ClientApp sees it and the reply's content after, as
    the wire would; a ClientApp that raises gives an error reply.
    """

    def make(partition: int) -> ReplyFn:
        context = Context(
            run_id=1,
            node_id=first_node_id + partition,
            node_config={PARTITION_ID: partition, NUM_PARTITIONS: num_nodes},
            state=RecordDict(),
            run_config=dict(run_config or {}),
        )

        def reply(node: int, message: Message) -> RecordDict | Error:
            try:
                answer = app(copy.deepcopy(message), context)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                return Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc))
            if answer.has_error():
                return answer.error
            return copy.deepcopy(answer.content)

        return reply

    return {first_node_id + p: make(p) for p in range(num_nodes)}
