"""The global model: its arrays, its version, and the bases of in-flight tasks."""

from flwr.app import ArrayRecord

from afl_flwr.aggregation import Params
from afl_flwr.replies import ArraySpec, model_spec, params_to_arrayrecord


class ModelStore:
    """Global arrays and version, plus the base models still referenced.

    A delta-based aggregator needs, for every reply, the global model its task
    started from. The store keeps version ``v`` while any in-flight task refers
    to it (:meth:`checkout` / :meth:`release`) and forgets it afterwards; an
    admitted update holds its base itself until it is merged.

    Parameters
    ----------
    keep_bases : bool (default: True)
        Keep the base of in-flight tasks (``Aggregator.needs_base``).
    """

    def __init__(self, *, keep_bases: bool = True) -> None:
        self.keep_bases = keep_bases
        self.version = 0
        self.params: Params = {}
        self.spec: dict[str, ArraySpec] = {}
        self._bases: dict[int, Params] = {}
        self._refs: dict[int, int] = {}
        self._record: ArrayRecord | None = None
        self._record_version = -1

    def reset(self, params: Params, version: int = 0) -> None:
        """Start from ``params`` at ``version``, with no base referenced."""
        self.params = params
        self.spec = model_spec(params)
        self.version = version
        self._bases.clear()
        self._refs.clear()
        self._record = None
        self._record_version = -1

    def record(self) -> ArrayRecord:
        """The global model as an ArrayRecord, serialised once per version."""
        if self._record is None or self._record_version != self.version:
            self._record = params_to_arrayrecord(self.params)
            self._record_version = self.version
        return self._record

    def checkout(self, version: int) -> None:
        """A task was sent the current ``version``: keep it until :meth:`release`."""
        if version != self.version:
            raise ValueError(
                f"checkout of version {version}, but the current version is "
                f"{self.version}"
            )
        if self.keep_bases:
            self._bases.setdefault(version, self.params)
            self._refs[version] = self._refs.get(version, 0) + 1

    def base(self, version: int) -> Params | None:
        """The model of ``version`` if still kept (``None`` without bases)."""
        if not self.keep_bases:
            return None
        if version == self.version:
            return self.params
        return self._bases.get(version)

    def release(self, version: int) -> None:
        """A task that started from ``version`` is done with it."""
        if version not in self._refs:
            return
        self._refs[version] -= 1
        if self._refs[version] <= 0:
            del self._refs[version]
            self._bases.pop(version, None)

    def advance(self, params: Params) -> int:
        """Install the next global model; return the new version."""
        self.params = params
        self.version += 1
        return self.version
