"""The part of Flower's ``Grid`` API every in-memory grid shares.

Both in-memory grids (:class:`~afl_flwr.experiments.inprocess.InProcessGrid`,
:class:`~afl_flwr.experiments.scripted_grid.ScriptedGrid`) play one ServerApp
run without a SuperLink; they differ only in how messages are answered.
"""

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class LocalGrid(Grid):
    """A ``Grid`` that serves one run in this process, with no SuperLink."""

    def set_run(self, run: Run) -> None:
        """No runs to switch between: one grid serves one run."""

    @property
    def run(self) -> Run:
        """No SuperLink run object behind this grid."""
        raise NotImplementedError(f"{type(self).__name__} serves no SuperLink run")

    def create_message(  # pylint: disable=too-many-arguments,too-many-positional-arguments
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to ``dst_node_id`` (as Flower's grids build one)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
