"""Client selection for the next dispatch: with or without replacement (seeded).

The paper (Sec. on client sampling) contrasts the two: sampling without
replacement lowers the variance of the aggregated update by the finite-population
factor ``(N - m) / (N - 1)``.

Both selectors answer two questions with the same rule: :meth:`NodeSelector.select`
takes the idle nodes as a list (simple callers), :meth:`NodeSelector.pick` takes
the few nodes that may *not* be chosen (busy, backed off, ...) and costs
``O(len(excluded))`` amortised per pick however many nodes there are, which keeps
the asynchronous strategy's dispatch flat as the federation grows.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

# WithReplacement.pick draws uniformly from all nodes and redraws an excluded
# one while at least this fraction of the nodes is eligible (at most 1/fraction
# draws expected); below it, it lists the eligible nodes (then few: O(excluded)).
REJECTION_MIN_ELIGIBLE = 0.5


class NodeSelector(ABC):
    """Choose the next node to receive work among the idle ones.

    Parameters
    ----------
    seed : int (default: 0)
        Seed of the selector's random generator.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state (for checkpoints)."""
        return {"rng": self.rng.bit_generator.state}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`."""
        self.rng.bit_generator.state = state["rng"]

    @abstractmethod
    def select(self, all_nodes: Sequence[int], idle: Sequence[int]) -> int | None:
        """Return one idle node, or ``None`` when none is idle.

        ``all_nodes`` and ``idle`` must be given in a stable order (the caller
        sorts them) so that a seed reproduces the same choices.
        """

    def upcoming(self, limit: int) -> list[int]:
        """Up to ``limit`` nodes this selector will offer next, if it knows.

        Lets a caller prepare them (e.g. ask their profiles in one batch). The
        default knows nothing in advance.
        """
        del limit
        return []

    def pick(
        self,
        all_nodes: Sequence[int],
        excluded: Collection[int],
        alive: Collection[int] | None = None,
    ) -> int | None:
        """Return a node of ``all_nodes`` not in ``excluded``, or ``None``.

        Same rule as :meth:`select` with ``idle`` = ``all_nodes`` minus
        ``excluded``, at a cost that does not grow with ``len(all_nodes)``.

        Parameters
        ----------
        all_nodes : Sequence[int]
            Every connected node, in a stable order.
        excluded : Collection[int]
            Nodes that may not be chosen now (a set: membership is tested).
        alive : Collection[int], optional (default: None)
            ``set(all_nodes)`` if the caller keeps one (saves building it).
        """
        alive = set(all_nodes) if alive is None else alive
        eligible = len(all_nodes) - sum(1 for n in excluded if n in alive)
        if eligible <= 0:
            return None
        return self._pick(all_nodes, excluded, alive, eligible)

    @abstractmethod
    def _pick(
        self,
        all_nodes: Sequence[int],
        excluded: Collection[int],
        alive: Collection[int],
        eligible: int,
    ) -> int:
        """:meth:`pick` once ``eligible`` (> 0) nodes are known to qualify."""


class WithReplacement(NodeSelector):
    """Uniform choice among the idle nodes, independently each time."""

    def select(self, all_nodes: Sequence[int], idle: Sequence[int]) -> int | None:
        """Return an idle node chosen uniformly at random."""
        if not idle:
            return None
        return int(idle[int(self.rng.integers(len(idle)))])

    def _pick(
        self,
        all_nodes: Sequence[int],
        excluded: Collection[int],
        alive: Collection[int],
        eligible: int,
    ) -> int:
        """Uniform over the eligible nodes, by rejection while they are many."""
        if eligible >= REJECTION_MIN_ELIGIBLE * len(all_nodes):
            while True:  # uniform over all, conditioned on eligible: uniform
                node = all_nodes[int(self.rng.integers(len(all_nodes)))]
                if node not in excluded:
                    return int(node)
        chosen = self.select(all_nodes, [n for n in all_nodes if n not in excluded])
        assert chosen is not None  # eligible > 0
        return chosen


class WithoutReplacement(NodeSelector):
    """Walk a fresh random permutation of all nodes; each node once per pass.

    A pass never waits for a busy node: the first idle node left in the pass is
    taken, and when every node left in the pass is busy (or has left the
    federation) a new permutation starts. With all nodes idle this visits every
    node exactly once before any repeats.

    The pass is a list in which taken positions are skipped through
    "next untaken position" links (union-find with path compression), so a pick
    scans only the untaken nodes it may not take (busy, ...): its cost grows
    with those, not with N.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._pass: list[int] = []
        self._skip: dict[int, int] = {}  # taken position -> a later position

    @property
    def _remaining(self) -> list[int]:
        """Nodes of the current pass not yet taken, in pass order."""
        return [n for pos, n in enumerate(self._pass) if pos not in self._skip]

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state, including the rest of the current pass."""
        return {**super().get_state(), "remaining": self._remaining}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`."""
        super().set_state(state)
        self._pass = [int(n) for n in state.get("remaining", [])]
        self._skip = {}

    def select(self, all_nodes: Sequence[int], idle: Sequence[int]) -> int | None:
        """Return the next idle node of the current pass."""
        if not idle:
            return None
        idle_set = set(idle)
        return self._next(all_nodes, idle_set.__contains__, set(all_nodes))

    def _pick(
        self,
        all_nodes: Sequence[int],
        excluded: Collection[int],
        alive: Collection[int],
        eligible: int,
    ) -> int:
        """The next node of the current pass that is not excluded."""
        node = self._next(all_nodes, lambda n: n not in excluded, alive)
        assert node is not None  # eligible > 0: a fresh pass holds one
        return node

    def _next(
        self,
        all_nodes: Sequence[int],
        eligible: Callable[[int], bool],
        alive: Collection[int],
    ) -> int | None:
        for attempt in range(2):
            pos = self._untaken(0)
            while pos < len(self._pass):
                node = self._pass[pos]
                if node in alive and eligible(node):
                    self._skip[pos] = pos + 1
                    return node
                pos = self._untaken(pos + 1)
            if attempt == 0:
                # Permute positions, not ids: node ids are uint64 and NumPy
                # would turn a list of such large ints into (lossy) float64.
                order = self.rng.permutation(len(all_nodes))
                self._pass = [int(all_nodes[i]) for i in order]
                self._skip = {}
        return None  # pragma: no cover - a fresh pass always holds the idle nodes

    def upcoming(self, limit: int) -> list[int]:
        """The next ``limit`` untaken nodes of the current pass, in pass order."""
        out: list[int] = []
        pos = self._untaken(0)
        while pos < len(self._pass) and len(out) < limit:
            out.append(self._pass[pos])
            pos = self._untaken(pos + 1)
        return out

    def _untaken(self, pos: int) -> int:
        """First position at or after ``pos`` not taken in this pass."""
        root = pos
        while root in self._skip:
            root = self._skip[root]
        while pos != root:  # path compression
            self._skip[pos], pos = root, self._skip[pos]
        return root


SELECTIONS: dict[str, type[NodeSelector]] = {
    "with-replacement": WithReplacement,
    "without-replacement": WithoutReplacement,
}


def make_selector(name: str, seed: int) -> NodeSelector:
    """Build a registered selector by name (``with-replacement``/``without-...``)."""
    if name not in SELECTIONS:
        allowed = ", ".join(sorted(SELECTIONS))
        raise ValueError(f"Unknown selection '{name}'; allowed: {allowed}")
    return SELECTIONS[name](seed)
