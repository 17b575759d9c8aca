"""Reply admission: one outcome in, an admitted update or a reason out."""

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Message
from flwr.common.constant import ErrorCode

from afl_flwr.history import DROPPED, REJECTED, TIMEOUT
from afl_flwr.replies import ArraySpec, RejectedReply, TrainReply, parse_train_reply

# Error codes the SuperLink puts in replies it makes up for tasks that expired
# (TTL) or whose node is offline: a timeout, not a bad reply.
UNAVAILABLE_CODES = (
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
)


@dataclass(frozen=True)
class Refusal:
    """Why an outcome is not merged.

    ``status`` is :data:`~afl_flwr.history.TIMEOUT`, ``REJECTED`` or ``DROPPED``;
    ``failure`` says whether it counts against the node (a dropped, too-stale
    update is the server's choice, not the node's fault).
    """

    status: str
    reason: str
    reply: TrainReply | None = None

    @property
    def failure(self) -> bool:
        """Whether the node failed (timeout or invalid reply)."""
        return self.status != DROPPED


def admit(
    reply: Message | None,
    *,
    staleness: int,
    spec: Mapping[str, ArraySpec],
    timeout: float,
    weighted_by_key: str = "num-examples",
    max_bytes: int | None = None,
    max_staleness: int | None = None,
) -> TrainReply | Refusal:
    """Validate one outcome against the global model and the staleness bound.

    Parameters
    ----------
    reply : Message or None
        The reply, or ``None`` when none came within ``timeout``.
    staleness : int
        ``tau`` of the update, measured by the caller.
    spec : Mapping[str, ArraySpec]
        Expected array names, shapes and dtypes.
    timeout : float
        The task timeout (for the message).
    weighted_by_key : str (default: "num-examples")
        Metric holding the example count.
    max_bytes : int, optional
        Refuse replies whose arrays exceed this size.
    max_staleness : int, optional
        ``tau_max``; staler valid updates are dropped.

    Returns
    -------
    TrainReply or Refusal
        The parsed reply, or why it is not merged.
    """
    if reply is None:
        return Refusal(TIMEOUT, f"no reply within {timeout}s")
    if reply.has_error() and reply.error.code in UNAVAILABLE_CODES:
        return Refusal(TIMEOUT, reply.error.reason or "reply unavailable")
    try:
        parsed = parse_train_reply(reply, spec, weighted_by_key, max_bytes)
    except RejectedReply as err:
        return Refusal(REJECTED, str(err))
    if max_staleness is not None and staleness > max_staleness:
        return Refusal(DROPPED, f"staleness {staleness} > {max_staleness}", parsed)
    return parsed
