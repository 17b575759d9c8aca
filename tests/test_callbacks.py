"""Public callbacks: events, stops, early stopping, trackers read back."""

import pytest
from conftest import FakeGrid, make_params, shift_by, to_record
from flwr.app import Error, MetricRecord

from afl_flwr.callbacks import (
    Callback,
    CallbackList,
    Checkpoint,
    EarlyStopping,
    Stop,
    TimeBudget,
)
from afl_flwr.callbacks.mlflow import MLflow
from afl_flwr.callbacks.tensorboard import TensorBoard
from afl_flwr.strategy import RunAbortedError, StalenessAwareAsyncStrategy

NODES = (1, 2, 3)


def _grid(**kwargs) -> FakeGrid:
    return FakeGrid(
        replies={n: shift_by(0.01) for n in NODES}, delays={1: 3, 2: 1, 3: 1}, **kwargs
    )


def _strategy(**kwargs) -> StalenessAwareAsyncStrategy:
    kwargs.setdefault("buffer_size", 2)  # K = concurrency: 2 updates per version
    return StalenessAwareAsyncStrategy(concurrency=2, poll_interval=0.0, **kwargs)


def _accuracy(version: int, arrays) -> MetricRecord:
    return MetricRecord({"acc": 0.5 + 0.01 * version})


class Recorder(Callback):
    """Logs every event it sees."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_start(self, run, resumed):
        self.events.append(("start", run.version, resumed))

    def on_version(self, run, merged):
        self.events.append(("version", run.version, len(merged)))
        if run.version == self.stop_at:
            return Stop(f"enough at {run.version}")
        return None

    def on_evaluation(self, run, evaluation):
        self.events.append((evaluation.kind, evaluation.point.version))
        return None

    def on_stop(self, run):
        self.events.append(("stop", run.version, run.state.stop_reason))


def test_a_callback_sees_every_event_in_order():
    # Prepare
    recorder = Recorder()
    strategy = _strategy(fraction_evaluate=0.0)

    # Execute
    strategy.start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=4,
        evaluate_fn=_accuracy,
        callbacks=[recorder],
    )

    # Assert: start, then versions 1..4 (2 updates each) interleaved with the
    # central evaluations of versions 0..4, then stop
    kinds = [e[0] for e in recorder.events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    assert [e for e in recorder.events if e[0] == "version"] == [
        ("version", v, 2) for v in (1, 2, 3, 4)
    ]
    assert [e[1] for e in recorder.events if e[0] == "central"] == [0, 1, 2, 3, 4]
    assert recorder.events[-1] == ("stop", 4, "")


def test_federated_evaluations_are_announced_too():
    recorder = Recorder()
    _strategy(fraction_evaluate=1.0).start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=3,
        callbacks=[recorder],
    )
    assert [e[1] for e in recorder.events if e[0] == "federated"] == [1, 2, 3]


def test_a_callback_can_stop_the_run():
    # Prepare
    recorder = Recorder(stop_at=2)
    strategy = _strategy()

    # Execute
    strategy.start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=10,
        callbacks=[recorder],
    )

    # Assert: it stopped at version 2, with the reason recorded and told
    assert strategy.version == 2
    assert strategy.history.stop_reason == "enough at 2"
    assert recorder.events[-1] == ("stop", 2, "enough at 2")


def test_on_stop_runs_when_the_run_fails():
    def crash(node, message, params):
        return Error(code=1, reason="boom")

    recorder = Recorder()
    strategy = _strategy(max_consecutive_failures=4)
    with pytest.raises(RunAbortedError):
        strategy.start(
            grid=FakeGrid(replies={n: crash for n in NODES}),
            initial_arrays=to_record(make_params(0)),
            num_rounds=3,
            callbacks=[recorder],
        )
    assert recorder.events[-1][0] == "stop"
    assert "boom" in recorder.events[-1][2]


def test_early_stopping_on_a_metric_that_stops_improving():
    # Prepare: accuracy rises to version 3, then falls
    def evaluate(version, arrays):
        return MetricRecord({"acc": 0.9 - 0.1 * abs(version - 3)})

    # inline evaluation: the stop takes effect at the evaluated version itself
    strategy = _strategy(background_evaluation=False)

    # Execute
    strategy.start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=20,
        evaluate_fn=evaluate,
        callbacks=[EarlyStopping("acc", patience=2)],
    )

    # Assert: versions 4 and 5 did not improve on version 3: stop at 5
    assert strategy.version == 5
    assert "acc did not improve for 2 evaluation(s)" in strategy.history.stop_reason
    assert "best 0.9000 at version 3" in strategy.history.stop_reason


def test_time_budget_and_checkpoint_are_plain_callbacks(tmp_path):
    # A checkpoint every 2 versions, resumable
    path = tmp_path / "ck.npz"
    strategy = _strategy()
    strategy.start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=4,
        callbacks=[Checkpoint(path, every=2)],
    )
    assert _strategy().resume_from(path) == 4
    # A budget already spent stops the run before any version
    strategy.start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=50,
        callbacks=[TimeBudget(1e-9)],
    )
    assert strategy.version == 0
    assert "time budget" in strategy.history.stop_reason


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EarlyStopping(patience=0), "patience"),
        (lambda: EarlyStopping(mode="up"), "mode"),
        (lambda: TimeBudget(0.0), "max_time"),
        (lambda: Checkpoint("x.npz", every=0), "every"),
        (lambda: CallbackList([object()]), "not an afl_flwr.callbacks.Callback"),
    ],
)
def test_bad_callback_arguments_are_refused(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# ------------------------------------------------------------------ trackers
def _tracked_run(callback, **kwargs):
    strategy = _strategy(fraction_evaluate=1.0, **kwargs)
    strategy.start(
        grid=_grid(),
        initial_arrays=to_record(make_params(0)),
        num_rounds=4,
        evaluate_fn=_accuracy,
        callbacks=[callback],
    )
    return strategy


def test_tensorboard_writes_what_the_run_recorded(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    # Execute
    strategy = _tracked_run(TensorBoard(tmp_path / "tb"))

    # Assert: read the event file back
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    central = {s.step: s.value for s in events.Scalars("central/acc")}
    assert central == pytest.approx(
        {p.version: p.metrics["acc"] for p in strategy.history.evals}
    )
    merged = [s.value for s in events.Scalars("version/merged-updates")]
    assert merged == [2.0] * 4
    federated = [s.step for s in events.Scalars("federated/train-loss")]
    assert federated == [1, 2, 3, 4]
    assert "train/train-loss" in events.Tags()["scalars"]


def test_mlflow_logs_params_metrics_and_the_final_status(tmp_path):
    from mlflow.tracking import MlflowClient

    # Execute
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflow(uri, experiment="test", run_name="afl", params={"note": "x"})
    strategy = _tracked_run(tracker)

    # Assert: read the run back from the store
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["aggregation"] == "fedbuff"
    assert run.data.params["note"] == "x"
    history = client.get_metric_history(tracker.run_id, "central/acc")
    assert {m.step: m.value for m in history} == pytest.approx(
        {p.version: p.metrics["acc"] for p in strategy.history.evals}
    )
    steps = [
        m.step
        for m in client.get_metric_history(tracker.run_id, "version/merged-updates")
    ]
    assert sorted(steps) == [1, 2, 3, 4]


def test_mlflow_marks_a_failed_run_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    def crash(node, message, params):
        return Error(code=1, reason="boom")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflow(uri)
    with pytest.raises(RunAbortedError):
        _strategy(max_consecutive_failures=3).start(
            grid=FakeGrid(replies={n: crash for n in NODES}),
            initial_arrays=to_record(make_params(0)),
            num_rounds=2,
            callbacks=[tracker],
        )
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "boom" in run.data.tags["stop-reason"]


def test_a_tracker_without_its_extra_says_which_to_install():
    from afl_flwr.callbacks.base import import_extra

    with pytest.raises(ImportError, match=r'pip install "afl-flwr\[tensorboard\]"'):
        import_extra("surely_not_installed_module", "tensorboard")
