"""afl-flwr: asynchronous, staleness-aware federated learning as a Flower app.

Import the strategy like Flower's own, and swap it for ``FedAvg``::

    from afl_flwr import StalenessAwareAsyncStrategy

The names below are imported on first use (PEP 562), so importing a submodule,
e.g. the ClientApp in every task process of a SuperNode, does not import the
server side.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afl_flwr.aggregators import Aggregator, RuleSettings, Update
    from afl_flwr.callbacks import (
        Callback,
        Checkpoint,
        EarlyStopping,
        RunView,
        Stop,
        TimeBudget,
    )
    from afl_flwr.clock import NodeProfile, VirtualClock, WallClock
    from afl_flwr.strategy import RunAbortedError, StalenessAwareAsyncStrategy
    from afl_flwr.sync_baseline import ClockedFedAvg

_EXPORTS = {
    "Aggregator": "afl_flwr.aggregators",
    "Callback": "afl_flwr.callbacks",
    "Checkpoint": "afl_flwr.callbacks",
    "ClockedFedAvg": "afl_flwr.sync_baseline",
    "EarlyStopping": "afl_flwr.callbacks",
    "NodeProfile": "afl_flwr.clock",
    "RuleSettings": "afl_flwr.aggregators",
    "RunAbortedError": "afl_flwr.strategy",
    "RunView": "afl_flwr.callbacks",
    "StalenessAwareAsyncStrategy": "afl_flwr.strategy",
    "Stop": "afl_flwr.callbacks",
    "TimeBudget": "afl_flwr.callbacks",
    "Update": "afl_flwr.aggregators",
    "VirtualClock": "afl_flwr.clock",
    "WallClock": "afl_flwr.clock",
}

__all__ = [
    "Aggregator",
    "Callback",
    "Checkpoint",
    "ClockedFedAvg",
    "EarlyStopping",
    "NodeProfile",
    "RuleSettings",
    "RunAbortedError",
    "RunView",
    "StalenessAwareAsyncStrategy",
    "Stop",
    "TimeBudget",
    "Update",
    "VirtualClock",
    "WallClock",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'afl_flwr' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
