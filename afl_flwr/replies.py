"""Validation of training replies, shared by the strategy's async and sync paths.

A reply is merged only if it carries exactly one ArrayRecord whose arrays match
the global model by name, shape and dtype, holds only finite values, and reports a
positive example count. Anything else is rejected with a one-line reason.
"""

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from afl_flwr.aggregation import Params


class RejectedReply(ValueError):
    """A reply that must not be merged; the message says why."""


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class TrainReply:
    """The parts of a valid training reply the strategy needs."""

    params: Params
    num_examples: float
    metrics: MetricRecord


def model_spec(params: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """Name -> (shape, dtype) of a model, the reference replies are checked against."""
    return {k: ArraySpec(tuple(v.shape), np.dtype(v.dtype)) for k, v in params.items()}


def array_view(array: Array) -> np.ndarray:
    """Zero-copy, read-only NumPy view of an ``Array``'s ``.npy`` payload.

    Flower's ``Array.numpy()`` copies through ``np.load`` and parses the header
    with ``literal_eval``; the server reads every reply once, so it maps the
    bytes after the header instead, using the dtype/shape the ``Array`` carries.
    Anything unusual (other serialisation, Fortran order, object dtype, a
    header that disagrees with the metadata) falls back to ``Array.numpy()``.
    """
    view = _npy_view(array)
    return array.numpy() if view is None else view


def _npy_view(array: Array) -> np.ndarray | None:
    """:func:`array_view` of a plain C-order payload, else ``None``."""
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return None
    if data[6] == 1:
        offset = 10 + int.from_bytes(data[8:10], "little")
    else:
        offset = 12 + int.from_bytes(data[8:12], "little")
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    count = math.prod(shape)
    header = data[10:offset]
    if (
        dtype.hasobject
        or b"'fortran_order': False" not in header
        or len(data) - offset != count * dtype.itemsize
    ):
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


class ViewedArray(Array):
    """An ``Array`` whose :meth:`numpy` decodes with :func:`array_view`.

    Flower's ``Array.numpy()`` parses the ``.npy`` header with
    ``ast.literal_eval``, and CPython 3.11's AST constructor keeps its recursion
    depth per interpreter, not per thread: two threads parsing at once can fail
    with ``SystemError: AST constructor recursion depth mismatch``
    (python/cpython#106905). The background evaluation thread hands user code
    these arrays, so it never parses while the loop (or an in-process client)
    does.
    """

    def numpy(self) -> np.ndarray:
        """A writable copy of the array, decoded without parsing the header."""
        view = _npy_view(self)
        return Array.numpy(self) if view is None else np.array(view)

    @classmethod
    def of(cls, array: Array) -> "ViewedArray":
        """The same bytes and metadata (no copy)."""
        return cls(
            dtype=array.dtype,
            shape=tuple(array.shape),
            stype=array.stype,
            data=array.data,
        )


def without_header_parsing(record: ArrayRecord) -> ArrayRecord:
    """``record`` with every array a :class:`ViewedArray` (same bytes, no copy)."""
    viewed = ArrayRecord()  # its dict constructor would rebuild plain Arrays
    for name, array in record.items():
        viewed[name] = ViewedArray.of(array)
    return viewed


def arrayrecord_to_params(record: ArrayRecord, *, writable: bool = False) -> Params:
    """Convert an ``ArrayRecord`` to ``Params`` (views, or copies if ``writable``)."""
    views = {name: array_view(array) for name, array in record.items()}
    if writable:
        return {name: np.array(view) for name, view in views.items()}
    return views


def params_to_arrayrecord(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Convert ``Params`` to an ``ArrayRecord`` (keeps the order of names)."""
    # np.ascontiguousarray would turn 0-d arrays (e.g. num_batches_tracked) to 1-d.
    return ArrayRecord(
        {
            name: Array(v if v.flags.c_contiguous else np.ascontiguousarray(v))
            for name, v in params.items()
        }
    )


def parse_train_reply(
    message: Message,
    spec: Mapping[str, ArraySpec],
    weighted_by_key: str = "num-examples",
    max_bytes: int | None = None,
) -> TrainReply:
    """Validate a training reply and return its arrays, weight and metrics.

    Parameters
    ----------
    message : Message
        The reply.
    spec : Mapping[str, ArraySpec]
        Expected names, shapes and dtypes (see :func:`model_spec`).
    weighted_by_key : str (default: "num-examples")
        Metric holding the client's example count.
    max_bytes : int, optional
        Reject replies whose arrays exceed this many bytes.

    Raises
    ------
    RejectedReply
        With the reason, when the reply must not be merged.
    """
    if message.has_error():
        raise RejectedReply(
            f"error reply (code {message.error.code}): {message.error.reason}"
        )
    content = message.content
    if len(content.array_records) != 1:
        raise RejectedReply(
            f"expected exactly one ArrayRecord, got {len(content.array_records)}"
        )
    record = next(iter(content.array_records.values()))
    if set(record) != set(spec):
        missing = sorted(set(spec) - set(record))
        extra = sorted(set(record) - set(spec))
        raise RejectedReply(
            f"array names differ: missing {missing}, unexpected {extra}"
        )
    if max_bytes is not None:
        size = sum(len(a.data) for a in record.values())
        if size > max_bytes:
            raise RejectedReply(f"reply arrays are {size} bytes, limit {max_bytes}")
    params: Params = {}
    with warnings.catch_warnings():
        # torch reads the read-only reply views without writing to them.
        warnings.simplefilter("ignore", UserWarning)
        for name, expected in spec.items():
            params[name] = _checked_array(name, record[name], expected)
    if len(content.metric_records) != 1:
        raise RejectedReply(
            f"expected exactly one MetricRecord, got {len(content.metric_records)}"
        )
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise RejectedReply(f"metric '{weighted_by_key}' missing or not a number")
    if not np.isfinite(weight) or weight <= 0:
        raise RejectedReply(f"metric '{weighted_by_key}'={weight} must be > 0")
    return TrainReply(params=params, num_examples=float(weight), metrics=metrics)


def _checked_array(name: str, array: Array, expected: ArraySpec) -> np.ndarray:
    """Decode one reply array, checking shape, dtype and finiteness."""
    if tuple(array.shape) != expected.shape or np.dtype(array.dtype) != expected.dtype:
        raise RejectedReply(
            f"array '{name}' is {array.dtype}{list(array.shape)}, expected "
            f"{expected.dtype}{list(expected.shape)}"
        )
    try:
        view = array_view(array)
    except (ValueError, TypeError) as err:
        raise RejectedReply(f"array '{name}' cannot be decoded: {err}") from err
    if view.shape != expected.shape or view.dtype != expected.dtype:
        raise RejectedReply(f"array '{name}' payload does not match its header")
    if view.dtype.kind == "f" and not _all_finite(view):
        raise RejectedReply(f"array '{name}' holds NaN or Inf")
    return view


def _all_finite(x: np.ndarray) -> bool:
    """True when no element is NaN/Inf; one read pass in the common case."""
    # A finite sum proves every element finite (NaN/Inf propagate); only a
    # non-finite sum (NaN/Inf present, or an overflow of huge finite values)
    # needs the element-wise check. torch's vectorised sum is ~2x NumPy's on
    # large arrays; NumPy has less call overhead on small ones.
    total = float(torch.from_numpy(x).sum() if x.size >= 1 << 16 else x.sum())
    if math.isfinite(total):
        return True
    return bool(np.isfinite(x).all())
