"""Asynchronous aggregation rules, one module each, behind one registry.

``make_aggregator("fedbuff", {"server_lr": 0.5})`` builds a registered rule from
strategy keywords; the aliases ``buffered`` and ``immediate`` name FedBuff and
FedAsync. Registered: ``fedbuff``, ``fedasync``, ``ca2fl`` (cached update
calibration), ``fadas`` (AMSGrad server step with a delay-adaptive rate) and
``fedstaleweight`` (clients reweighted by their average staleness) and ``aced``
(every client's latest update, up to a delay bound).
"""

from collections.abc import Mapping
from typing import Any

from afl_flwr.aggregators.aced import ACED, ACEDSettings
from afl_flwr.aggregators.base import (
    AGGREGATORS,
    SHARED_SETTINGS,
    Aggregator,
    BufferedAggregator,
    BufferSettings,
    MergeRefused,
    RuleSettings,
    StalenessSettings,
    Update,
    setting_keyword,
)
from afl_flwr.aggregators.ca2fl import CA2FL, CA2FLSettings
from afl_flwr.aggregators.fadas import FADAS, FADASSettings
from afl_flwr.aggregators.fedasync import FedAsync, FedAsyncSettings
from afl_flwr.aggregators.fedbuff import FedBuff, FedBuffSettings
from afl_flwr.aggregators.fedstaleweight import FedStaleWeight, FedStaleWeightSettings
from afl_flwr.settings import SettingError

# Other names of fedbuff and fedasync, accepted as well.
ALIASES = {"buffered": "fedbuff", "immediate": "fedasync"}


def aggregation_names() -> list[str]:
    """Every name ``aggregation=`` accepts."""
    return sorted({*AGGREGATORS.names(), *ALIASES})


def rule_class(name: str) -> type[Aggregator]:
    """The registered rule ``name`` (or an alias)."""
    return AGGREGATORS.get(ALIASES.get(name, name))


def rule_keywords(name: str) -> dict[str, str]:
    """Strategy keyword -> settings field of rule ``name``.

    ``rule_keywords("fadas")["fadas_tau_c"] == "tau_c"``.
    """
    cls = rule_class(name)
    return {setting_keyword(cls.name, f.name): f.name for f in cls.setting_fields()}


def buffer_for_slots(slots: int) -> int:
    """The default buffer size ``K`` for ``slots`` training slots: half, at least 1.

    Chosen by benchmark v2's default tuning (tuning seeds only; see
    docs/benchmarks.md): K = slots / 2 beat K = slots there.
    """
    return max(1, slots // 2)


def make_aggregator(
    name: str,
    keywords: Mapping[str, Any] | None = None,
    *,
    default_buffer_size: int | None = None,
) -> Aggregator:
    """Build the registered rule ``name`` from strategy keywords.

    Parameters
    ----------
    name : str
        A registered rule or alias.
    keywords : Mapping[str, Any], optional (default: None)
        Settings by strategy keyword: shared ones plain (``server_lr``), the
        rule's own prefixed (``fadas_tau_c``); missing ones take the rule's
        defaults.
    default_buffer_size : int, optional (default: None)
        ``buffer_size`` of a buffered rule when ``keywords`` has none (the
        strategy passes its concurrency).

    Raises
    ------
    ValueError
        On an unknown rule, a keyword the rule has no setting for (naming the
        rule it belongs to, if any), or an invalid value (naming the keyword).
    """
    cls = rule_class(name)
    fields = rule_keywords(name)
    keywords = dict(keywords or {})
    for keyword in keywords:
        if keyword not in fields:
            owners = [r for r in AGGREGATORS if keyword in rule_keywords(r)]
            hint = f" (a setting of {', '.join(owners)})" if owners else ""
            raise ValueError(
                f"{keyword} is not a setting of aggregation '{cls.name}'{hint}; its "
                f"settings: {', '.join(fields)}"
            )
    values = {fields[k]: v for k, v in keywords.items()}
    if (
        "buffer_size" in fields.values()
        and "buffer_size" not in values
        and default_buffer_size is not None
    ):
        values["buffer_size"] = default_buffer_size
    try:
        return cls(**values)
    except SettingError as err:
        keyword = setting_keyword(cls.name, err.field)
        raise ValueError(err.message(keyword)) from None


__all__ = [
    "ACED",
    "AGGREGATORS",
    "ALIASES",
    "CA2FL",
    "FADAS",
    "SHARED_SETTINGS",
    "ACEDSettings",
    "Aggregator",
    "BufferSettings",
    "BufferedAggregator",
    "CA2FLSettings",
    "FADASSettings",
    "FedAsync",
    "FedAsyncSettings",
    "FedBuff",
    "FedBuffSettings",
    "FedStaleWeight",
    "FedStaleWeightSettings",
    "MergeRefused",
    "RuleSettings",
    "StalenessSettings",
    "Update",
    "aggregation_names",
    "make_aggregator",
    "rule_class",
    "rule_keywords",
    "setting_keyword",
]
