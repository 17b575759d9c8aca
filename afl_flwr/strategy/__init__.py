"""The asynchronous strategy and its parts (one module per responsibility).

* :mod:`~afl_flwr.strategy.strategy`: ``StalenessAwareAsyncStrategy``, the loop;
* :mod:`~afl_flwr.strategy.scheduler`: slots, dispatch, reply order, back-off;
* :mod:`~afl_flwr.strategy.admission`: reply -> update, or why not;
* :mod:`~afl_flwr.strategy.model_store`: global arrays, version, kept bases;
* :mod:`~afl_flwr.strategy.hooks`: evaluation, checkpoints, budget, progress.
"""

from afl_flwr.strategy.strategy import RunAbortedError, StalenessAwareAsyncStrategy

__all__ = ["RunAbortedError", "StalenessAwareAsyncStrategy"]
