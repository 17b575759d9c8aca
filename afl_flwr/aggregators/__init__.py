"""Asynchronous aggregation rules, one module each, behind one registry.

``make_aggregator("fedbuff", settings)`` builds a registered rule; the aliases
``buffered`` and ``immediate`` name FedBuff and FedAsync. Registered: ``fedbuff``,
``fedasync``, ``ca2fl`` (cached update calibration) and ``fadas`` (AMSGrad server
step with a delay-adaptive rate).
"""

from afl_flwr.aggregators.base import (
    AGGREGATORS,
    Aggregator,
    AggregatorSettings,
    BufferedAggregator,
    Update,
)
from afl_flwr.aggregators.ca2fl import CA2FL
from afl_flwr.aggregators.fadas import FADAS
from afl_flwr.aggregators.fedasync import FedAsync
from afl_flwr.aggregators.fedbuff import FedBuff

# Names of the first release, kept as aliases.
ALIASES = {"buffered": "fedbuff", "immediate": "fedasync"}


def aggregation_names() -> list[str]:
    """Every name ``aggregation=`` accepts."""
    return sorted({*AGGREGATORS.names(), *ALIASES})


def make_aggregator(name: str, settings: AggregatorSettings) -> Aggregator:
    """Build the registered aggregator ``name`` (or an alias) from ``settings``."""
    return AGGREGATORS.get(ALIASES.get(name, name)).from_settings(settings)


__all__ = [
    "AGGREGATORS",
    "ALIASES",
    "CA2FL",
    "FADAS",
    "Aggregator",
    "AggregatorSettings",
    "BufferedAggregator",
    "FedAsync",
    "FedBuff",
    "Update",
    "aggregation_names",
    "make_aggregator",
]
