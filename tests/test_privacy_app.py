"""DP through the app: run-config keys, epsilon in evals.csv and summary.json."""

import csv
import json

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as ReferenceRdp

from afl_flwr.config import AppConfig, ConfigError
from afl_flwr.experiments.inprocess import run_inprocess

BASE = {
    "model": "mlp",
    "num-clients": 6,
    "clients-per-round": 4,
    "buffer-size": 3,
    "local-epochs": 1,
    "eval-every": 1,
    "dp-noise-multiplier": 2.0,
    "dp-clipping-norm": 1.0,
}


def _epsilon(z: float, releases: int, delta: float = 1e-5) -> float:
    reference = ReferenceRdp()
    reference.compose(dp_event.GaussianDpEvent(z), releases)
    return reference.get_epsilon(delta)


SYNC = {**BASE, "mode": "sync", "clients-per-round": 3, "sync-selection": "selector"}


@pytest.mark.parametrize("base", [BASE, SYNC], ids=["async", "sync-flower-wrapper"])
def test_a_dp_run_reports_epsilon_per_version_and_at_the_end(tmp_path, mnist_dir, base):
    """Async (K = buffer size) and FedAvg under Flower's wrapper (K = cohort)."""
    outcome = run_inprocess(
        {
            **base,
            "data-dir": str(mnist_dir),
            "num-server-rounds": 3,
            "results-dir": str(tmp_path),
        }
    )

    summary = json.loads((outcome.results_path / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(_epsilon(2.0, 3), rel=1e-9)
    with (outcome.results_path / "evals.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["version"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[0]["epsilon"]) == 0.0
    for row in rows[1:]:
        expected = _epsilon(2.0, int(row["version"]))
        assert float(row["epsilon"]) == pytest.approx(expected, rel=1e-9)
    k = AppConfig.from_run_config(base).effective_buffer_size
    if base is SYNC:
        k = base["clients-per-round"]
    assert summary["updates"]["merged"] == 3 * k


def test_the_budget_ends_the_run_cleanly_with_its_results(tmp_path, mnist_dir):
    limit = (_epsilon(2.0, 2) + _epsilon(2.0, 3)) / 2
    outcome = run_inprocess(
        {
            **BASE,
            "data-dir": str(mnist_dir),
            "num-server-rounds": 20,
            "dp-max-epsilon": limit,
            "results-dir": str(tmp_path),
        }
    )
    summary = json.loads((outcome.results_path / "summary.json").read_text())
    assert summary["versions"] == 2
    assert outcome.history.stop_reason.startswith("privacy budget exhausted")
    assert summary["epsilon"] <= limit


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"aggregation": "ca2fl"}, "mode='async' needs aggregation='fedbuff'"),
        ({"mode": "sync", "clients-per-round": 7}, "clients-per-round=7 exceeds"),
        ({"buffer-size": 9}, "buffer-size=9 exceeds num-clients=6"),
        ({"dp-target-delta": 1.0}, "dp-target-delta=1.0 is out of range"),
        ({"dp-clipping-norm": 0.0}, "dp-clipping-norm=0.0 must be > 0"),
        ({"dp-clipping": "both"}, "dp-clipping"),
    ],
)
def test_dp_keys_are_validated(overrides, fragment):
    with pytest.raises(
        ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")
    ):
        AppConfig.from_run_config({**BASE, **overrides})


def test_fedavg_under_dp_stops_cleanly_at_the_budget(tmp_path, mnist_dir):
    limit = (_epsilon(2.0, 2) + _epsilon(2.0, 3)) / 2
    outcome = run_inprocess(
        {
            **SYNC,
            "data-dir": str(mnist_dir),
            "num-server-rounds": 20,
            "eval-every": 5,
            "dp-max-epsilon": limit,
            "results-dir": str(tmp_path),
        }
    )
    assert outcome.history.stop_reason.startswith("privacy budget exhausted")
    summary = json.loads((outcome.results_path / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(_epsilon(2.0, 2), rel=1e-9)
    # The last release (round 2) is evaluated, and it is the result's model.
    assert outcome.history.evals[-1].version == 2
    assert summary["final_test_acc"] == outcome.history.evals[-1].metrics["test-acc"]


def test_fedavg_under_dp_refuses_a_model_with_state_arrays(tmp_path, mnist_dir):
    with pytest.raises(ConfigError, match="state arrays"):
        run_inprocess(
            {
                **SYNC,
                "model": "resnet20",
                "data-dir": str(mnist_dir),
                "num-server-rounds": 1,
                "results-dir": str(tmp_path),
            }
        )


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_client_side_clipping_runs_flowers_mod_in_the_apps_client(
    tmp_path, mnist_dir, mode, caplog
):
    base = BASE if mode == "async" else SYNC
    outcome = run_inprocess(
        {
            **base,
            "dp-clipping": "client",
            "dp-clipping-norm": 0.01,
            "data-dir": str(mnist_dir),
            "num-server-rounds": 2,
            "results-dir": str(tmp_path),
        }
    )
    summary = json.loads((outcome.results_path / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(_epsilon(2.0, 2), rel=1e-9)
    clipped = [r for r in caplog.records if "fixedclipping_mod" in r.getMessage()]
    # Every training task went through the mod (async: tasks in flight too)
    assert len(clipped) >= summary["updates"]["merged"] > 0
    assert not [r for r in caplog.records if "although clipping" in r.getMessage()]
