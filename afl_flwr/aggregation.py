"""Pure aggregation math of asynchronous FL (arrays in, arrays out, no I/O).

A model is a ``Params`` mapping from array name to ``np.ndarray``. Floating-point
arrays are merged; integer arrays (e.g. batch norm's ``num_batches_tracked``) are
merged in float64 and rounded back, so every array keeps its dtype.
"""

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

Params = dict[str, np.ndarray]


def staleness(current_version: int, base_version: int) -> int:
    """Staleness ``tau`` of an update: global versions merged since its base."""
    if base_version > current_version:
        raise ValueError(
            f"base version {base_version} is newer than the current version "
            f"{current_version}"
        )
    return current_version - base_version


def mix_immediate(
    current: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], rate: float
) -> Params:
    """FedAsync merge: ``(1 - c) x + c x_i`` with ``c = a s(tau)``, as fresh arrays.

    Neither input is written (``current`` may be a read-only view of a Flower
    record). Floating-point arrays take one fused pass (``torch.lerp``);
    integer arrays are mixed in float64 and rounded back to their dtype.

    Parameters
    ----------
    current : Mapping[str, np.ndarray]
        Global model ``x``.
    update : Mapping[str, np.ndarray]
        The client's model ``x_i`` (same names, shapes and dtypes).
    rate : float
        Mixing weight ``c`` in ``[0, 1]``.

    Returns
    -------
    Params
        The mixed model, in ``current``'s order and dtypes.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"mixing rate must be in [0, 1], got {rate}")
    import torch  # here: the config imports this module and must not need torch

    new: Params = {}
    with warnings.catch_warnings():
        # Reply arrays are read-only views of the message bytes; lerp only
        # reads them, so torch's "not writable" warning does not apply.
        warnings.simplefilter("ignore", UserWarning)
        for name, x in current.items():
            x_i = np.asarray(update[name])
            if x.dtype.kind == "f":
                out = np.empty_like(x)
                torch.lerp(
                    torch.from_numpy(np.asarray(x)),
                    torch.from_numpy(x_i),
                    rate,
                    out=torch.from_numpy(out),
                )
                new[name] = out
            else:
                mixed = (1.0 - rate) * x.astype(np.float64) + rate * x_i
                new[name] = np.asarray(np.rint(mixed)).astype(x.dtype)
    return new


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    like: Mapping[str, np.ndarray],
) -> Params:
    """``sum_i w_i a_i / sum_i w_i`` per name of ``like``, in ``like``'s dtypes.

    The operations of Flower's ``aggregate_arrayrecords`` (factors ``w_i / sum
    w``, accumulated in order), so results are bit-identical to FedAvg's for
    floating arrays; integer arrays are rounded back to their dtype.
    """
    if not len(arrays) == len(weights) > 0:
        raise ValueError(
            f"need as many arrays ({len(arrays)}) as weights ({len(weights)}), "
            "at least one"
        )
    total = float(sum(weights))
    if not total > 0 or min(weights) <= 0:
        raise ValueError(f"weights must be > 0, got {list(weights)}")
    subset = [{name: a[name] for name in like} for a in arrays]
    return _cast_like(_weighted_sum(subset, [w / total for w in weights]), like)


def fedbuff_update(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    bases: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
    scales: Sequence[float],
    server_lr: float = 1.0,
) -> Params:
    """FedBuff's buffered merge with an absolute staleness penalty.

    ``x <- x + eta_g * sum_i n_i s(tau_i) (x_i - b_i) / sum_i n_i``, where ``b_i``
    is the global model client ``i`` started from (Nguyen et al., AISTATS 2022,
    Algorithm 1, which scales each delta by ``s(tau_i)`` and divides by ``K``;
    here the ``1/K`` becomes FedAvg's example weights ``n_i / sum n``, equal to
    ``1/K`` when clients hold equally many examples). The penalty is absolute: a
    buffer whose updates are all stale moves the model less than a fresh one, and
    with ``K = 1`` an update moves it by exactly ``eta_g s(tau)`` times its delta.

    With every ``s_i = 1``, every ``b_i`` holding ``current``'s very arrays (zero
    staleness) and ``eta_g = 1`` the result is bit-identical to Flower's FedAvg
    (``aggregate_arrayrecords``): the same factors, summed in the same order.

    Parameters
    ----------
    current : Mapping[str, np.ndarray]
        Global model ``x`` now (not modified); only its names are merged, so
        ``updates`` and ``bases`` may hold more arrays (e.g. state arrays,
        merged by :func:`~afl_flwr.model_state.average_state`).
    updates : Sequence[Mapping[str, np.ndarray]]
        Client models ``x_i``.
    bases : Sequence[Mapping[str, np.ndarray]]
        Global model each client started from; pass the same object for updates
        that share a base (it is then read once).
    num_examples : Sequence[float]
        Positive example counts ``n_i``.
    scales : Sequence[float]
        Staleness factors ``s(tau_i)`` in ``[0, 1]``.
    server_lr : float (default: 1.0)
        Server learning rate ``eta_g > 0``.

    Returns
    -------
    Params
        The new global model (fresh arrays).
    """
    if not len(updates) == len(bases) == len(num_examples) == len(scales) > 0:
        raise ValueError(
            f"need as many updates ({len(updates)}), bases ({len(bases)}), example "
            f"counts ({len(num_examples)}) and scales ({len(scales)}), at least one"
        )
    total = float(sum(num_examples))
    if not total > 0 or min(num_examples) <= 0:
        raise ValueError(f"example counts must be > 0, got {list(num_examples)}")
    if min(scales) < 0:
        raise ValueError(f"staleness scales must be >= 0, got {list(scales)}")
    fedavg = [n / total for n in num_examples]
    if (
        server_lr == 1.0
        and all(s == 1.0 for s in scales)
        and all(base[k] is x for base in bases for k, x in current.items())
    ):
        return weighted_average(updates, num_examples, current)
    factors = [f * s for f, s in zip(fedavg, scales, strict=True)]
    return apply_deltas(current, updates, bases, factors, server_lr)


def apply_deltas(
    current: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    bases: Sequence[Mapping[str, np.ndarray]],
    factors: Sequence[float],
    server_lr: float = 1.0,
) -> Params:
    """``x + eta * sum_i f_i (x_i - b_i)`` with the given factors (no normalising).

    Fused multiply-adds, one pass per term; a base shared by several updates
    (the same object) is read once with its summed factor. Integer arrays are
    computed in float64 and rounded back to their dtype.
    """
    if not len(updates) == len(bases) == len(factors) > 0:
        raise ValueError(
            f"need as many updates ({len(updates)}), bases ({len(bases)}) and "
            f"factors ({len(factors)}), at least one"
        )
    if not server_lr > 0:
        raise ValueError(f"server_lr={server_lr} must be > 0")
    base_factor: dict[int, float] = {}
    base_by_id: dict[int, Mapping[str, np.ndarray]] = {}
    for base, factor in zip(bases, factors, strict=True):
        base_factor[id(base)] = base_factor.get(id(base), 0.0) + factor
        base_by_id[id(base)] = base
    terms = list(zip(updates, factors, strict=True))
    terms += [(base_by_id[key], -c) for key, c in base_factor.items()]
    import torch  # here: the config imports this module and must not need torch

    new: Params = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only reply views
        for name, x in current.items():
            if not np.issubdtype(x.dtype, np.floating):
                delta = sum(f * np.asarray(t[name], np.float64) for t, f in terms)
                new[name] = np.asarray(np.rint(x + server_lr * delta)).astype(x.dtype)
                continue
            acc = torch.mul(
                torch.from_numpy(np.asarray(terms[0][0][name])), terms[0][1]
            )
            for params, factor in terms[1:]:
                acc.add_(torch.from_numpy(np.asarray(params[name])), alpha=factor)
            torch.add(torch.from_numpy(x), acc, alpha=server_lr, out=acc)
            new[name] = acc.numpy()
    return new


def warmup_lr(server_lr: float, merge: int, warmup: int) -> float:
    """Server learning rate of the ``merge``-th merge under a linear warm-up.

    ``eta_t = eta min(1, t / W)`` for merge ``t = 1, 2, ...``: a linear ramp by a
    constant step per merge, as in the gradual warm-up of Goyal et al. (2017,
    "Accurate, Large Minibatch SGD", Sec. 2.2), which ramps per iteration from
    the small-batch rate to ``k`` times it; this one ramps from ``eta / W`` to
    ``eta`` (FedBuff has no smaller reference rate). The first ``W - 1`` merges
    (whose buffers hold updates trained from the earliest versions) move the
    model by a growing fraction of ``eta``.
    ``W = 0`` (or 1) is no warm-up.

    Parameters
    ----------
    server_lr : float
        ``eta > 0``.
    merge : int
        ``t >= 1``: this merge's number in the run (1 for the first).
    warmup : int
        ``W >= 0`` merges.

    Returns
    -------
    float
        ``eta_t``.
    """
    if merge < 1:
        raise ValueError(f"merge={merge} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if warmup <= 1 or merge >= warmup:
        return server_lr
    return server_lr * merge / warmup


def momentum_step(
    current: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray],
    momentum: float,
    server_lr: float,
) -> tuple[Params, Params]:
    """Server SGD with heavy-ball momentum on a merged delta (FedAvgM's step).

    ``v <- beta v + d`` (``v = d`` for an array with no velocity yet), then
    ``x <- x + eta v``: PyTorch's ``SGD(momentum=beta)`` convention, as in
    Flower's ``FedAvgM`` and FLSim's asynchronous ``FedAvgWithLR`` aggregator,
    with the pseudo-gradient ``-d``. FedBuff (Nguyen et al., AISTATS 2022)
    leaves the server optimiser open; this is one choice for it.

    Parameters
    ----------
    current : Mapping[str, np.ndarray]
        Global model ``x`` (not modified); its names are stepped.
    delta : Mapping[str, np.ndarray]
        Merged delta ``d`` per name of ``current``, at least float32 (integer
        arrays: float64), as :func:`weighted_delta` returns it.
    velocity : Mapping[str, np.ndarray]
        ``v`` from the previous step (not modified); names missing start at ``d``.
    momentum : float
        ``beta`` in ``[0, 1)``.
    server_lr : float
        ``eta > 0``.

    Returns
    -------
    tuple[Params, Params]
        The new model (integer arrays rounded back to their dtype) and the new
        velocity (fresh arrays).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    if not server_lr > 0:
        raise ValueError(f"server_lr={server_lr} must be > 0")
    new: Params = {}
    new_velocity: Params = {}
    for name, x in current.items():
        d = np.asarray(delta[name])
        if name in velocity:
            v = np.asarray(velocity[name], d.dtype) * d.dtype.type(momentum)
            v += d
        else:
            v = np.array(d, copy=True)
        new_velocity[name] = v
        moved = x + d.dtype.type(server_lr) * v
        new[name] = (
            moved.astype(x.dtype, copy=False)
            if np.issubdtype(x.dtype, np.floating)
            else np.asarray(np.rint(moved)).astype(x.dtype)
        )
    return new, new_velocity


def weighted_delta(
    updates: Sequence[Mapping[str, np.ndarray]],
    bases: Sequence[Mapping[str, np.ndarray]],
    factors: Sequence[float],
    names: Sequence[str] | None = None,
) -> Params:
    """Pseudo-gradient ``sum_i f_i (x_i - b_i)`` per array (a fresh ``Params``).

    ``names`` (default: every array of the first update) selects the arrays.
    Floating-point arrays are accumulated in at least float32; integer arrays
    come back as float64 deltas.
    """
    if not len(updates) == len(bases) == len(factors) > 0:
        raise ValueError(
            f"need as many updates ({len(updates)}), bases ({len(bases)}) and "
            f"factors ({len(factors)}), at least one"
        )
    out: Params = {}
    for name in updates[0] if names is None else names:
        first = np.asarray(updates[0][name])
        dtype = (
            np.promote_types(first.dtype, np.float32)
            if first.dtype.kind == "f"
            else np.dtype(np.float64)
        )
        acc = np.zeros(first.shape, dtype=dtype)
        for update, base, factor in zip(updates, bases, factors, strict=True):
            acc += dtype.type(factor) * (
                np.asarray(update[name], dtype) - np.asarray(base[name], dtype)
            )
        out[name] = acc
    return out


def _weighted_sum(
    arrays: Sequence[Mapping[str, np.ndarray]], factors: Sequence[float]
) -> Params:
    """``sum_i f_i a_i`` per name, accumulated in order (float arrays keep dtype).

    The same operations, in the same order, as Flower's ``aggregate_arrayrecords``
    (``acc += a_i * f_i``), so results are bit-identical; a scratch buffer per
    array avoids allocating the product on every term.
    """
    out: Params = {}
    scratch: Params = {}
    for params, factor in zip(arrays, factors, strict=True):
        for name, value in params.items():
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float64)
            if name not in out:
                # A copy scaled in place stays an ndarray even for 0-d arrays.
                out[name] = np.array(value, copy=True)
                out[name] *= factor
                scratch[name] = np.empty_like(out[name])
            else:
                np.multiply(value, factor, out=scratch[name])
                out[name] += scratch[name]
    return out


def _cast_like(params: Params, like: Mapping[str, np.ndarray]) -> Params:
    """Cast integer arrays back to their original dtype (rounding)."""
    return {
        name: value
        if np.issubdtype(like[name].dtype, np.floating)
        else np.asarray(np.rint(value)).astype(like[name].dtype)
        for name, value in params.items()
    }
