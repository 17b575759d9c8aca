"""afl-flwr: asynchronous, staleness-aware federated learning as a Flower app.

Import the strategy like Flower's own::

    from afl_flwr import StalenessAwareAsyncStrategy

The names below are imported on first use (PEP 562), so importing a submodule,
e.g. the ClientApp in every task process of a SuperNode, does not import the
server side.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afl_flwr.clock import NodeProfile, VirtualClock
    from afl_flwr.strategy import StalenessAwareAsyncStrategy
    from afl_flwr.sync_baseline import ClockedFedAvg

_EXPORTS = {
    "ClockedFedAvg": "afl_flwr.sync_baseline",
    "NodeProfile": "afl_flwr.clock",
    "StalenessAwareAsyncStrategy": "afl_flwr.strategy",
    "VirtualClock": "afl_flwr.clock",
}

__all__ = [
    "ClockedFedAvg",
    "NodeProfile",
    "StalenessAwareAsyncStrategy",
    "VirtualClock",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'afl_flwr' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
