"""An in-process Flower ``Grid``: N virtual nodes served by the real ClientApp code.

Under the virtual clock a run's outcome does not depend on how fast replies
arrive, only on what they contain and on their simulated durations, so the
benchmark can skip Ray: :class:`InProcessGrid` answers each message by calling
the ClientApp's own handlers (:func:`~afl_flwr.client_app.train`,
:func:`~afl_flwr.client_app.query_profile`,
:func:`~afl_flwr.client_app.evaluate_local`) in the server's process, with one
:class:`flwr.app.Context` per node (``partition-id``/``num-partitions`` in its
node config, as ``flwr run`` gives a simulated SuperNode). A train reply is
computed when it is pulled, so a run costs its training and nothing else.

The strategies drive it through Flower's ``Grid`` API exactly as they drive the
simulation engine; :func:`run_inprocess` goes through
:func:`afl_flwr.server_app.run`, results folder included.
"""

from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any
from uuid import UUID

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.logger import log
from flwr.supercore.task_identity import TaskIdentity

from afl_flwr.client_app import evaluate_local, query_profile, train
from afl_flwr.config import AppConfig
from afl_flwr.constants import NUM_PARTITIONS, PARTITION_ID, QUERY_PROFILE
from afl_flwr.experiments.local_grid import LocalGrid
from afl_flwr.server_app import RunOutcome, run

# Node ids of the virtual nodes start here (Flower's simulation uses large
# random ids; the strategies order nodes by partition id, never by node id).
FIRST_NODE_ID = 1001
# Error code of a reply whose handler raised (Flower's ClientApp exception code).
CLIENT_APP_RAISED_EXCEPTION = 0


class InProcessGrid(LocalGrid):
    """A ``Grid`` whose nodes are the ClientApp's handlers, called in this process.

    Parameters
    ----------
    cfg : AppConfig
        The run config every node sees (as ``flwr run`` passes one to all).
    num_nodes : int, optional (default: None)
        Virtual nodes; ``None`` means ``cfg.num_clients``. Node ``i`` serves
        partition ``i``.
    """

    def __init__(self, cfg: AppConfig, *, num_nodes: int | None = None) -> None:
        self.cfg = cfg
        count = cfg.num_clients if num_nodes is None else num_nodes
        self.contexts = {
            FIRST_NODE_ID + pid: Context(
                run_id=1,
                node_id=FIRST_NODE_ID + pid,
                node_config={PARTITION_ID: pid, NUM_PARTITIONS: cfg.num_clients},
                state=RecordDict(),
                run_config=dict(cfg.to_run_config()),
            )
            for pid in range(count)
        }
        self._pending: dict[str, Message] = {}
        self._next_id = 0
        self.handled: list[tuple[int, str]] = []
        _ensure_task_identity()

    def get_node_ids(self) -> Iterable[int]:
        """The virtual nodes' ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Accept messages; each is answered when its reply is pulled."""
        ids = []
        for message in messages:
            message_id = self._assign_id(message)
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Compute and return the replies to the given pushed messages."""
        replies = []
        for message_id in list(message_ids):
            message = self._pending.pop(message_id, None)
            if message is not None:
                replies.append(self.handle(message))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push and answer at once."""
        out = []
        for message in messages:
            self._assign_id(message)
            out.append(self.handle(message))
        return out

    # ---------------------------------------------------------------- nodes
    def handle(self, message: Message) -> Message:
        """The reply of the destination node's ClientApp handler to ``message``.

        A handler that raises gives an error reply, as a ClientApp crash does in
        the simulation engine.
        """
        node = message.metadata.dst_node_id
        kind = message.metadata.message_type
        self.handled.append((node, kind))
        context = self.contexts[node]
        try:
            if kind == "train":
                return train(message, context, self.cfg)
            if kind == "evaluate":
                return evaluate_local(message, context, self.cfg)
            if kind == QUERY_PROFILE:
                return query_profile(message, context, self.cfg)
            raise ValueError(f"message type '{kind}' has no handler")
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log(WARNING, "Node %s failed a '%s' message: %r", node, kind, exc)
            error = Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc))
            return Message(error, reply_to=message)

    def _assign_id(self, message: Message) -> str:
        # Deterministic ids, so two runs of one config are identical throughout.
        message_id = str(UUID(int=self._next_id))
        self._next_id += 1
        message.metadata.__dict__["_message_id"] = message_id
        return message_id


def _ensure_task_identity() -> None:
    """Give this process the identity of a ServerApp task if it has none.

    Creating a ``Message`` needs one; ``flwr run`` sets it for the ServerApp
    process, and the in-process engine plays that process.
    """
    try:
        _ = TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def run_inprocess(
    overrides: Mapping[str, Any], *, torch_threads: int | None = 1
) -> RunOutcome:
    """Run one experiment on an :class:`InProcessGrid` through ``server_app.run``.

    Parameters
    ----------
    overrides : Mapping[str, Any]
        Run-config values (kebab-case), as for ``flwr run --run-config``.
    torch_threads : int, optional (default: 1)
        ``torch.set_num_threads`` for this process (one per worker when runs
        go in parallel); ``None`` leaves it.
    """
    cfg = AppConfig.from_run_config(overrides)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return run(InProcessGrid(cfg), cfg)
