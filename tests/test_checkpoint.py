"""Server checkpoints: atomic writes, and a resumed run continues the history."""

import numpy as np
import pytest
from conftest import FakeGrid, make_params, shift_by, to_record

from afl_flwr import StalenessAwareAsyncStrategy
from afl_flwr.checkpoint import load_checkpoint, save_checkpoint


def test_save_and_load_roundtrip_is_exact(tmp_path):
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7)}
    path = tmp_path / "ck.npz"

    save_checkpoint(path, params, {"version": 3, "param_order": ["w", "n"]})
    loaded, state = load_checkpoint(path)

    assert list(loaded) == ["w", "n"] and state["version"] == 3
    np.testing.assert_array_equal(loaded["w"], params["w"])
    assert loaded["n"].shape == () and loaded["n"] == 7
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume-from"):
        load_checkpoint(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not an afl-flwr checkpoint"):
        load_checkpoint(tmp_path / "other.npz")


@pytest.mark.parametrize("aggregation", ["buffered", "immediate"])
def test_resume_continues_history_without_gap_or_repeat(tmp_path, aggregation):
    # Prepare: a run stopped at version 4 with a checkpoint every 2 versions
    path = tmp_path / "checkpoint.npz"
    nodes = {n: shift_by(float(n)) for n in (1, 2, 3)}
    first = StalenessAwareAsyncStrategy(
        concurrency=2,
        aggregation=aggregation,  # K = concurrency = 2 for the buffered rule
        checkpoint_every=2,
        checkpoint_path=path,
        poll_interval=0.0,
    )
    first_result = first.start(
        grid=FakeGrid(replies=nodes, delays={1: 1, 2: 2, 3: 3}),
        initial_arrays=to_record(make_params(0)),
        num_rounds=4,
    )

    # Execute: a new server process resumes and runs to version 8
    second = StalenessAwareAsyncStrategy(
        concurrency=2,
        aggregation=aggregation,  # K = concurrency = 2 for the buffered rule
        checkpoint_every=2,
        checkpoint_path=tmp_path / "next.npz",
        poll_interval=0.0,
    )
    assert second.resume_from(path) == 4
    grid = FakeGrid(replies=nodes, delays={1: 1, 2: 2, 3: 3})
    result = second.start(
        grid=grid, initial_arrays=to_record(make_params(99)), num_rounds=8
    )

    # Assert: evaluations 0..8 once each; merged versions 1..8 without gaps
    versions = [p.version for p in second.history.evals]
    assert versions == list(range(9))
    merged = sorted({e.merged_into for e in second.history.events if e.merged_into})
    assert merged == list(range(1, 9))
    # The resumed run started from the checkpointed weights, not the new initial ones
    first_message = grid.train_messages()[0]
    sent = {k: v.numpy() for k, v in first_message.content["arrays"].items()}
    for name, value in first_result.arrays.items():
        np.testing.assert_array_equal(sent[name], value.numpy())
    assert first_message.content["config"]["base-version"] == 4
    assert set(result.train_metrics_clientapp) == {5, 6, 7, 8}


def test_checkpoint_needs_a_path():
    with pytest.raises(ValueError, match="checkpoint_path"):
        StalenessAwareAsyncStrategy(checkpoint_every=2)
