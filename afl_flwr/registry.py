"""One registry helper for every pluggable concept (aggregators, ...).

In the spirit of torchvision's ``register_model`` / ``get_model`` /
``list_models``: a named table, a decorator to add to it, and one error message
that names the unknown value and what is allowed.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table for one kind of component.

    Parameters
    ----------
    kind : str
        What the entries are, used in error messages (e.g. ``"aggregation"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding an entry under ``name`` (names are unique)."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises
        ------
        ValueError
            If ``name`` is unknown; the message lists the allowed names.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"Unknown {self.kind} '{name}'; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
