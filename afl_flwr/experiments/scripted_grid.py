"""An in-memory Flower ``Grid`` with scripted reply delays, for in-process studies.

Drives the real strategy (or the real ServerApp ``run``) without Ray or a
SuperLink: every ``push_messages`` calls the node's reply function at once, and
every ``pull_messages`` call is one *tick*; a reply to a message pushed at tick
``t`` to node ``n`` is delivered at tick ``t + delays[n]``. Node profile queries
(``send_and_receive``) are answered from ``profiles``.
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from afl_flwr.experiments.local_grid import LocalGrid

# (node id, the message sent to it) -> reply content, or None for no reply.
ReplyFn = Callable[[int, Message], RecordDict | None]


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
        Reply function per node id; the keys are the connected nodes.
    delays : Mapping[int, int] (default: {})
        Ticks until a node's reply is delivered; 1 when missing.
    profiles : Mapping[int, ConfigRecord] (default: {})
        Answers to the strategy's ``query.profile`` messages (virtual clock).
    """

    replies: Mapping[int, ReplyFn]
    delays: Mapping[int, int] = field(default_factory=dict)
    profiles: Mapping[int, ConfigRecord] = field(default_factory=dict)
    tick: int = 0
    pushed: int = 0
    _pending: dict[str, tuple[int, Message]] = field(default_factory=dict)

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        return list(self.replies)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Compute each reply now; deliver it ``delays[node]`` ticks later."""
        ids = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            content = self.replies[node](node, message)
            self.pushed += 1
            if content is not None:
                ready = self.tick + self.delays.get(node, 1)
                self._pending[message_id] = (ready, Message(content, reply_to=message))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Advance one tick and return the replies due by now."""
        self.tick += 1
        out = []
        for message_id in message_ids:
            pending = self._pending.get(message_id)
            if pending is not None and pending[0] <= self.tick:
                out.append(pending[1])
                del self._pending[message_id]
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Answer profile queries from ``profiles``; other queries get no reply."""
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            node = message.metadata.dst_node_id
            if node in self.profiles:
                content = RecordDict({"profile": self.profiles[node]})
                out.append(Message(content, reply_to=message))
        return out
