"""The asynchronous strategy and its parts (one module per responsibility).

* :mod:`~afl_flwr.strategy.strategy`: ``StalenessAwareAsyncStrategy``, the loop;
* :mod:`~afl_flwr.strategy.scheduler`: slots, dispatch, reply order, back-off;
* :mod:`~afl_flwr.strategy.admission`: reply -> update, or why not;
* :mod:`~afl_flwr.strategy.model_store`: global arrays, version, kept bases;
* :mod:`~afl_flwr.strategy.run_state`: the run's history and counters;
* :mod:`~afl_flwr.strategy.federated`: federated evaluation as scheduler tasks;
* :mod:`~afl_flwr.strategy.sync_adapter`: Flower's round-loop methods.
"""

from afl_flwr.strategy.run_state import RunAbortedError, RunState
from afl_flwr.strategy.strategy import StalenessAwareAsyncStrategy

__all__ = ["RunAbortedError", "RunState", "StalenessAwareAsyncStrategy"]
