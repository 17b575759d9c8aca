"""Which arrays of a model are *state*, not weights, and how state is merged.

A torch ``state_dict`` sent as an ``ArrayRecord`` (as Flower's quickstart-pytorch
does) holds trainable parameters and buffers side by side. Buffers such as
BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked`` are
statistics of the data a client saw, not points in weight space: adding a
(stale) delta to ``running_var`` can make it negative (NaN at evaluation), and
an optimiser step on it (FADAS) leaves it near its initial value. Every
aggregation rule therefore merges state arrays as the example-weighted average
of the clients' values (:func:`average_state`); FedAsync mixes them with its own
mixing weight, which is also a convex combination. Only weights take delta or
optimiser steps.

Detection works from names and dtypes alone, so no change to a ClientApp is
needed: :func:`default_is_state` marks every non-floating array (integer
counters, boolean masks) and every array whose last name component is a
BatchNorm/InstanceNorm buffer name. Users override it with a list of names or a
predicate (``StalenessAwareAsyncStrategy(state_keys=...)``);
:func:`torch_buffer_names` lists exactly the buffers of a torch model. Keeping
BatchNorm statistics local to each client (FedBN) is not offered.
"""

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np

from afl_flwr.aggregation import Params, weighted_average

# Buffers of torch.nn.BatchNorm*/InstanceNorm*/SyncBatchNorm (track_running_stats).
NORM_BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})

StatePredicate = Callable[[str, np.ndarray], bool]
StateKeys = Collection[str] | StatePredicate


def default_is_state(name: str, array: np.ndarray) -> bool:
    """Whether array ``name`` is state under the default rule.

    Non-floating arrays (integer counters, booleans) and normalisation-layer
    running statistics (``*.running_mean``, ``*.running_var``,
    ``*.num_batches_tracked``) are state; every other floating array is a weight.
    """
    if np.dtype(array.dtype).kind != "f":
        return True
    return name.rsplit(".", 1)[-1] in NORM_BUFFER_NAMES


def state_names(
    params: Mapping[str, np.ndarray], keys: StateKeys | None = None
) -> frozenset[str]:
    """The names of the state arrays of ``params``.

    Parameters
    ----------
    params : Mapping[str, np.ndarray]
        The model's arrays.
    keys : Collection[str] or callable, optional (default: None)
        ``None``: :func:`default_is_state`. A collection: exactly these names
        (each must exist in ``params``). A callable ``(name, array) -> bool``:
        the arrays it accepts.

    Raises
    ------
    ValueError
        When a listed name is not an array of the model.
    """
    if keys is None:
        return frozenset(n for n, x in params.items() if default_is_state(n, x))
    if callable(keys):
        return frozenset(n for n, x in params.items() if keys(n, x))
    if isinstance(keys, str):
        raise ValueError(
            f"state_keys={keys!r} must be a collection of names, not a str"
        )
    missing = sorted(set(keys) - set(params))
    if missing:
        raise ValueError(
            f"state_keys names arrays the model does not have: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return frozenset(keys)


def torch_buffer_names(model: object) -> list[str]:
    """Names of a torch module's buffers, as they appear in its ``state_dict``.

    Pass them as ``state_keys`` to treat exactly the model's buffers as state.
    """
    named_buffers = getattr(model, "named_buffers", None)
    if named_buffers is None:
        raise TypeError(
            f"{type(model).__name__} has no named_buffers(); not a torch module"
        )
    return [name for name, _ in named_buffers()]


def average_state(
    current: Mapping[str, np.ndarray],
    clients: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
    names: Collection[str],
) -> Params:
    """``sum_i n_i x_i / sum_i n_i`` for each state array in ``names``.

    The same operations, in the same order, as Flower's FedAvg, so a merge of
    fresh updates stays bit-identical to it; integer arrays are rounded back to
    their dtype (``current`` gives the dtypes).
    """
    if not names:
        return {}
    ordered = [n for n in current if n in names]
    return weighted_average(
        [{n: client[n] for n in ordered} for client in clients],
        num_examples,
        {n: current[n] for n in ordered},
    )
