"""Atomic server checkpoints: global weights plus a JSON state, in one ``.npz``.

The file is written to a temporary name in the same folder and renamed over the
target (``os.replace``), so a crash never leaves a half-written checkpoint. No
pickle is involved: arrays are stored as arrays, the state as a JSON string.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from afl_flwr.aggregation import Params

STATE_KEY = "__state__"
PARAM_PREFIX = "param/"
EXTRA_PREFIX = "extra/"


def save_checkpoint(
    path: Path,
    params: Mapping[str, np.ndarray],
    state: dict,
    extra: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> None:
    """Write ``params``, the JSON-serialisable ``state`` and ``extra`` arrays.

    ``extra`` holds named groups of arrays a component keeps (an aggregator's
    cache or moments); :func:`load_checkpoint` returns them in
    ``state["extra_arrays"]``. The file is replaced atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    arrays: dict[str, Any] = {
        f"{PARAM_PREFIX}{k}": np.asarray(v) for k, v in params.items()
    }
    for group, named in (extra or {}).items():
        for name, value in named.items():
            arrays[f"{EXTRA_PREFIX}{group}/{name}"] = np.asarray(value)
    arrays[STATE_KEY] = np.array(json.dumps(state))
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[Params, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message names ``resume-from``).
    ValueError
        If the file is not such a checkpoint.
    """
    if not path.is_file():
        raise FileNotFoundError(f"resume-from='{path}' does not exist")
    with np.load(path, allow_pickle=False) as data:
        if STATE_KEY not in data:
            raise ValueError(f"resume-from='{path}' is not an afl-flwr checkpoint")
        state = json.loads(str(data[STATE_KEY]))
        params = {
            k.removeprefix(PARAM_PREFIX): np.array(data[k])
            for k in data.files
            if k.startswith(PARAM_PREFIX)
        }
        extra: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            if key.startswith(EXTRA_PREFIX):
                group, name = key.removeprefix(EXTRA_PREFIX).split("/", 1)
                extra.setdefault(group, {})[name] = np.array(data[key])
    state["extra_arrays"] = extra
    order = state.get("param_order", list(params))
    return {k: params[k] for k in order}, state
