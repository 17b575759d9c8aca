"""How the strategy talks to a SuperLink: node queue depth and off-loop pulls.

Two things only matter when the Grid is a real SuperLink (a deployment), not
Flower's in-memory simulation grid:

* **Queue depth.** A Flower SuperNode sleeps 3 s whenever its pull finds no
  message, and processes one message at a time; a message already waiting for
  it is taken right after its previous reply. Keeping ``D`` train tasks per
  busy node (one running, ``D - 1`` waiting at the SuperLink) removes that
  sleep from every cycle. :func:`check_queue_depth` refuses ``D > 1`` where
  Flower would run a node's waiting tasks at the same time.
* **Pulls off the loop.** ``HttpGrid.pull_messages`` can block (a reply is
  registered before its objects are uploaded, and the object pull backs off for
  1 s, doubling). :class:`ReplyPuller` pulls on its own thread, so one node's
  slow upload never stalls dispatch to the others.
"""

import threading
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

# Seconds between pulls that bring nothing, at least, on a SuperLink's grid: each
# pull is a request the SuperLink serves, and the strategy's in-memory poll
# interval (0.02 s) would cost it a large share of a core.
MIN_REMOTE_PULL_INTERVAL_S = 0.1


def _grid_classes(*paths: tuple[str, str]) -> tuple[type, ...]:
    """The Grid classes among ``(module, name)`` that this Flower has."""
    found = []
    for module, name in paths:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


# Flower 1.42: HttpGrid (a ServerApp process talking to its SuperLink) and
# InMemoryGrid (`flwr run` simulations and `run_simulation`); older releases
# named the first GrpcGrid and kept both under flwr.server.grid.
_SUPERLINK_GRIDS = _grid_classes(
    ("flwr.superlink.grid.http_grid", "HttpGrid"),
    ("flwr.server.grid.grpc_grid", "GrpcGrid"),
)
_SIMULATION_GRIDS = _grid_classes(
    ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid"),
    ("flwr.server.grid.inmemory_grid", "InMemoryGrid"),
)


def is_superlink_grid(grid: Grid) -> bool:
    """Whether ``grid`` talks to a SuperLink over the network (a deployment)."""
    return bool(_SUPERLINK_GRIDS) and isinstance(grid, _SUPERLINK_GRIDS)


def is_simulation_grid(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's in-memory simulation grid."""
    return bool(_SIMULATION_GRIDS) and isinstance(grid, _SIMULATION_GRIDS)


def check_queue_depth(depth: int, grid: Grid) -> int:
    """``depth`` when this grid can run it.

    Raises
    ------
    ValueError
        When ``depth < 1``, or ``depth > 1`` on Flower's simulation grid: its
        engine hands a node's waiting messages to different actors, which then
        run them at the same time, so one node would train two tasks at once.
    """
    if depth < 1:
        raise ValueError(f"node_queue_depth={depth} must be >= 1")
    if depth > 1 and is_simulation_grid(grid):
        raise ValueError(
            f"node_queue_depth={depth} cannot run in Flower's simulation: its "
            "engine gives a node's waiting messages to different actors, which "
            "run them at the same time (one node would train two tasks at once). "
            "Use node_queue_depth=1 (run config node-queue-depth = 1); queuing "
            "ahead only serves a deployment, where a SuperNode sleeps after an "
            "empty pull."
        )
    return depth


class ReplyPuller:
    """Pull replies of the awaited messages on a background thread.

    The loop states which message ids it awaits (:meth:`want`) and takes what
    came in (:meth:`take`); the thread pulls them with ``grid.pull_messages``
    and waits ``interval`` seconds after a pull that brought nothing. An error
    raised by a pull is raised again by the next :meth:`take`.

    Parameters
    ----------
    grid : Grid
        Where replies are pulled from (its client must accept calls from two
        threads, as Flower's HttpGrid's httpx client does).
    interval : float
        Seconds between pulls that bring nothing (at least
        :data:`MIN_REMOTE_PULL_INTERVAL_S`).
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self.grid = grid
        self.interval = max(interval, MIN_REMOTE_PULL_INTERVAL_S)
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._delivered: set[str] = set()  # pulled, maybe not yet taken
        self._replies: list[Message] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="afl-flwr-reply-puller", daemon=True
        )
        self._thread.start()

    def want(self, message_ids: Iterable[str]) -> None:
        """Await these message ids from now on (those already pulled excepted).

        A reply is pulled once: an id whose reply came in stays out of the pulls
        even while the caller, not having taken it yet, still lists it.
        """
        ids = set(message_ids)
        with self._lock:
            self._delivered &= ids
            self._wanted = ids - self._delivered

    def take(self) -> list[Message]:
        """The replies pulled since the last call (raises a pull's error)."""
        with self._lock:
            replies, self._replies = self._replies, []
            error, self._error = self._error, None
        if error is not None:
            raise error
        return replies

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (a pull under way is waited for, ``timeout`` at most)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log(WARNING, "The reply puller did not stop within %.0f s", timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                wanted = sorted(self._wanted)
            replies: list[Message] = []
            if wanted:
                try:
                    replies = list(self.grid.pull_messages(wanted))
                except Exception as error:  # pylint: disable=broad-exception-caught
                    with self._lock:
                        self._error = error  # raised again in the loop's thread
            if replies:
                answered = {r.metadata.reply_to_message_id for r in replies}
                with self._lock:
                    self._replies.extend(replies)
                    self._wanted -= answered
                    self._delivered |= answered
            else:
                self._stop.wait(self.interval)


__all__ = [
    "MIN_REMOTE_PULL_INTERVAL_S",
    "ReplyPuller",
    "check_queue_depth",
    "is_simulation_grid",
    "is_superlink_grid",
]
