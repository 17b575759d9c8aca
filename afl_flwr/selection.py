"""Client selection for the next dispatch: with or without replacement (seeded).

The paper (Sec. on client sampling) contrasts the two: sampling without
replacement lowers the variance of the aggregated update by the finite-population
factor ``(N - m) / (N - 1)``.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np


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


class WithReplacement(NodeSelector):
    """Uniform choice among the idle nodes, independently each time."""

    def select(self, all_nodes: Sequence[int], idle: Sequence[int]) -> int | None:
        """Return an idle node chosen uniformly at random."""
        if not idle:
            return None
        return int(idle[int(self.rng.integers(len(idle)))])


class WithoutReplacement(NodeSelector):
    """Walk a fresh random permutation of all nodes; each node once per pass.

    A pass never waits for a busy node: the first idle node left in the pass is
    taken, and when every node left in the pass is busy (or has left the
    federation) a new permutation starts. With all nodes idle this visits every
    node exactly once before any repeats.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._remaining: list[int] = []

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state, including the rest of the current pass."""
        return {**super().get_state(), "remaining": list(self._remaining)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state`."""
        super().set_state(state)
        self._remaining = [int(n) for n in state.get("remaining", [])]

    def select(self, all_nodes: Sequence[int], idle: Sequence[int]) -> int | None:
        """Return the next idle node of the current pass."""
        if not idle:
            return None
        idle_set = set(idle)
        alive = set(all_nodes)
        self._remaining = [n for n in self._remaining if n in alive]
        for attempt in range(2):
            for position, node in enumerate(self._remaining):
                if node in idle_set:
                    del self._remaining[position]
                    return int(node)
            if attempt == 0:
                # Permute positions, not ids: node ids are uint64 and NumPy
                # would turn a list of such large ints into (lossy) float64.
                order = self.rng.permutation(len(all_nodes))
                self._remaining = [int(all_nodes[i]) for i in order]
        return None  # pragma: no cover - a fresh pass always holds the idle nodes


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
