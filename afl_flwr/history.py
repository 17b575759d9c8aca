"""Run history: one event per client reply, one point per global evaluation.

Both the asynchronous strategy and the synchronous baseline fill the same
:class:`RunHistory`, so their results folders can be compared line by line.
"""

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# Statuses of a reply.
MERGED = "merged"  # merged into the global model (immediately or via the buffer)
DROPPED = "dropped"  # valid but staler than max-staleness
REJECTED = "rejected"  # invalid (error, NaN, wrong shapes, unknown message, ...)
TIMEOUT = "timeout"  # no reply within the task timeout; slot freed
PENDING = "pending"  # valid, buffered, but the run ended before the buffer flushed
STATUSES = (MERGED, DROPPED, REJECTED, TIMEOUT, PENDING)


@dataclass
class UpdateEvent:
    """What happened to one dispatched task.

    ``version`` is the global version when the reply was handled; ``merged_into``
    the version that first contains the update (a buffered update waits for its
    buffer's flush); ``staleness`` the number of versions merged between dispatch
    and arrival (None when unknown); ``sim_duration`` the task's simulated
    duration (0 without a virtual clock).
    """

    version: int
    node_id: int
    client: int
    status: str
    base_version: int | None = None
    staleness: int | None = None
    weight: float = 0.0
    num_examples: float = 0.0
    train_loss: float | None = None
    wall_time: float = 0.0
    sim_time: float = 0.0
    reason: str = ""
    merged_into: int | None = None
    sim_duration: float = 0.0


@dataclass(frozen=True)
class EvalPoint:
    """Central evaluation of the global model at one version."""

    version: int
    wall_time: float
    sim_time: float
    client_updates: int
    metrics: dict[str, float]
    eval_seconds: float = 0.0


# Kinds of evaluation.
CENTRAL = "central"  # evaluate_fn on the server
FEDERATED = "federated"  # aggregated from the clients' evaluate replies


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the global model, as callbacks are told of it.

    ``kind`` is :data:`CENTRAL` (``evaluate_fn`` on the server) or
    :data:`FEDERATED` (aggregated from the clients' ``evaluate`` replies).
    """

    kind: str
    point: EvalPoint


@dataclass
class RunHistory:
    """Everything a run reports besides the final weights."""

    events: list[UpdateEvent] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    federated: list[EvalPoint] = field(default_factory=list)  # on the clients
    abandoned: int = 0  # tasks still in flight when the run stopped
    stop_reason: str = ""  # why the run ended early ("" when it completed)
    # Wall seconds from the start to the first task (node profiles included).
    first_dispatch_wall: float = 0.0
    # Under DP: (version, epsilon spent after that version's release).
    privacy: list[tuple[int, float]] = field(default_factory=list)

    def epsilon_at(self, version: int) -> float | None:
        """Epsilon spent up to ``version`` (``None`` without DP accounting)."""
        spent = [eps for v, eps in self.privacy if v <= version]
        return spent[-1] if spent else (0.0 if self.privacy else None)

    def merged(self) -> list[UpdateEvent]:
        """Events whose update entered the global model."""
        return [e for e in self.events if e.merged_into is not None]

    def merged_between(self, after: int, upto: int) -> list[UpdateEvent]:
        """Events merged into a version in ``(after, upto]``."""
        return [
            e
            for e in self.events
            if e.merged_into is not None and after < e.merged_into <= upto
        ]

    def staleness_values(self) -> list[int]:
        """Measured staleness of every merged or dropped update."""
        return [
            e.staleness
            for e in self.events
            if e.status in (MERGED, DROPPED) and e.staleness is not None
        ]

    def client_counts(self) -> dict[int, dict[str, int]]:
        """Per client: how many updates were merged, dropped, rejected, timed out."""
        counts: dict[int, Counter[str]] = {}
        for event in self.events:
            counts.setdefault(event.client, Counter())[event.status] += 1
        return {
            client: {status: counter.get(status, 0) for status in STATUSES}
            for client, counter in sorted(counts.items())
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunHistory":
        """Inverse of :meth:`to_dict` (used to resume from a checkpoint)."""
        return cls(
            events=[UpdateEvent(**e) for e in data.get("events", [])],
            evals=[EvalPoint(**p) for p in data.get("evals", [])],
            federated=[EvalPoint(**p) for p in data.get("federated", [])],
            abandoned=int(data.get("abandoned", 0)),
            stop_reason=str(data.get("stop_reason", "")),
            first_dispatch_wall=float(data.get("first_dispatch_wall", 0.0)),
            privacy=[(int(v), float(e)) for v, e in data.get("privacy", [])],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "events": [asdict(e) for e in self.events],
            "evals": [asdict(p) for p in self.evals],
            "federated": [asdict(p) for p in self.federated],
            "client_counts": {str(k): v for k, v in self.client_counts().items()},
            "abandoned": self.abandoned,
            "stop_reason": self.stop_reason,
            "first_dispatch_wall": self.first_dispatch_wall,
            "privacy": [list(p) for p in self.privacy],
        }
