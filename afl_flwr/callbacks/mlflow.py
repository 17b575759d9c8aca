"""MLflow tracker: one MLflow run per strategy run, metrics stepped by version.

Needs ``mlflow-skinny`` (``pip install "afl-flwr[mlflow]"``). The default
tracking store is a local SQLite file (``sqlite:///mlflow.db``); MLflow 3's
plain file store (``file:./mlruns``) works too once ``MLFLOW_ALLOW_FILE_STORE``
is ``true``. It logs the strategy's settings as parameters, per version the
merged updates, mean staleness, simulated time and the clients' aggregated train
metrics (``train/<metric>``), per evaluation ``central/<metric>`` or
``federated/<metric>``, and ends the MLflow run as ``FINISHED`` or, when the
strategy's run failed, ``FAILED``.
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any

from afl_flwr.callbacks.base import Callback, RunView, Stop, import_extra
from afl_flwr.history import Evaluation, UpdateEvent


class MLflow(Callback):
    """Track the run in MLflow through ``MlflowClient`` (no global MLflow state).

    Parameters
    ----------
    tracking_uri : str (default: "sqlite:///mlflow.db")
        The tracking store.
    experiment : str (default: "afl-flwr")
        Experiment name (created if missing).
    run_name : str, optional (default: None)
        Name of the MLflow run.
    params : Mapping[str, Any], optional (default: None)
        Extra parameters to log (e.g. the app's run config).
    """

    def __init__(
        self,
        tracking_uri: str = "sqlite:///mlflow.db",
        *,
        experiment: str = "afl-flwr",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params or {})
        self.run_id: str | None = None
        self._client: Any = None

    def on_start(self, run: RunView, resumed: bool) -> None:
        """Create the MLflow run and log the parameters."""
        tracking = import_extra("mlflow.tracking", "mlflow")
        self._client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self._client.create_experiment(self.experiment)
        )
        created = self._client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = created.info.run_id
        for key, value in {**run.settings, **self.params}.items():
            self._client.log_param(self.run_id, key, str(value)[:6000])

    def _log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step) for k, v in values.items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def on_version(self, run: RunView, merged: Sequence[UpdateEvent]) -> Stop | None:
        """Updates merged, mean staleness, simulated time, train metrics."""
        taus = [e.staleness for e in merged if e.staleness is not None]
        values = {"version/merged-updates": float(len(merged))}
        values["version/sim-time"] = run.clock.now()
        if taus:
            values["version/staleness-mean"] = sum(taus) / len(taus)
        train: Mapping[str, Any] = run.state.result.train_metrics_clientapp.get(
            run.version, {}
        )
        values.update({f"train/{k}": float(v) for k, v in train.items()})  # type: ignore[arg-type]
        self._log(values, run.version)
        return None

    def on_evaluation(self, run: RunView, evaluation: Evaluation) -> Stop | None:
        """Every metric of the evaluation, at its version."""
        point = evaluation.point
        self._log(
            {f"{evaluation.kind}/{k}": v for k, v in point.metrics.items()},
            point.version,
        )
        return None

    def on_stop(self, run: RunView) -> None:
        """End the MLflow run: FINISHED, or FAILED when the strategy's run failed."""
        if self._client is None or self.run_id is None:
            return
        if run.state.stop_reason:
            self._client.set_tag(
                self.run_id, "stop-reason", run.state.stop_reason[:5000]
            )
        status = "FAILED" if run.state.failed else "FINISHED"
        self._client.set_terminated(self.run_id, status=status)
