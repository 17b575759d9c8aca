"""afl-flwr: asynchronous, staleness-aware federated learning as a Flower app.

Import the strategy like Flower's own::

    from afl_flwr import StalenessAwareAsyncStrategy
"""

from afl_flwr.clock import NodeProfile, VirtualClock
from afl_flwr.strategy import StalenessAwareAsyncStrategy
from afl_flwr.sync_baseline import ClockedFedAvg

__all__ = [
    "ClockedFedAvg",
    "NodeProfile",
    "StalenessAwareAsyncStrategy",
    "VirtualClock",
]
