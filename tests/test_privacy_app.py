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


def test_a_dp_run_reports_epsilon_per_version_and_at_the_end(tmp_path, mnist_dir):
    outcome = run_inprocess(
        {
            **BASE,
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
        ({"aggregation": "ca2fl"}, "needs mode='async' and aggregation='fedbuff'"),
        ({"mode": "sync"}, "needs mode='async'"),
        ({"buffer-size": 9}, "buffer-size=9 exceeds num-clients=6"),
        ({"dp-target-delta": 1.0}, "dp-target-delta=1.0 is out of range"),
        ({"dp-clipping-norm": 0.0}, "dp-clipping-norm=0.0 must be > 0"),
    ],
)
def test_dp_keys_are_validated(overrides, fragment):
    with pytest.raises(
        ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")
    ):
        AppConfig.from_run_config({**BASE, **overrides})
