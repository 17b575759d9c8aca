"""The strategy as a Flower user meets it: their own plain ClientApp, Ray simulation.

``tests/foreign_app`` is a separate small Flower app whose ClientApp imports
nothing from afl_flwr; its ServerApp uses ``StalenessAwareAsyncStrategy()`` with
its defaults (FedAvg's: every connected node kept busy, federated evaluation on
every node; FedBuff with K = the slots), like Flower's own ``FedAvg``.
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_bounded

APP = Path(__file__).parent / "foreign_app"
TIMEOUT_S = 240

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]


def _simulate(num_nodes: int, num_rounds: int, **env: str) -> dict:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(APP), os.environ.get("PYTHONPATH", "")]),
        "RAY_DEDUP_LOGS": "0",
        **env,
    }
    proc = run_bounded(
        [sys.executable, str(APP / "run.py"), str(num_nodes), str(num_rounds)],
        timeout=TIMEOUT_S,
        env=environment,
        cwd=APP,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    line = next(
        ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("SUMMARY ")
    )
    return json.loads(line.removeprefix("SUMMARY "))


def test_slow_and_failing_nodes_under_the_defaults():
    # Prepare / Execute: 5 nodes; partition 0 is 8x slower, partition 4 always fails
    summary = _simulate(
        5, 12, FOREIGN_SLOW_PARTITION="0", FOREIGN_FAILING_PARTITIONS="4"
    )

    # Assert: the run ended with all versions, and asynchrony shows
    assert summary["aborted"] == ""
    assert summary["version"] == 12
    events = summary["events"]
    merged = Counter(e["node"] for e in events if e["status"] == "merged")
    failed = Counter(e["node"] for e in events if e["status"] == "rejected")
    assert len(failed) == 1  # only the failing node's tasks were rejected
    (bad_node,) = failed
    assert bad_node not in merged
    slow_node = min(merged, key=merged.get)
    fast = [n for n in merged if n != slow_node]
    assert len(fast) == 3 and all(merged[n] > merged[slow_node] for n in fast)
    taus = [e["staleness"] for e in events if e["status"] == "merged"]
    assert max(taus) > 0  # staleness measured from reply_to_message_id
    # the failing node was backed off: it got fewer tasks than any fast node
    assert failed[bad_node] < min(merged[n] for n in fast)


def test_a_federation_whose_clients_all_fail_ends_by_itself():
    summary = _simulate(3, 5, FOREIGN_FAILING_PARTITIONS="0,1,2")

    assert "cannot load its data" in summary["aborted"]
    assert summary["version"] == 0
    assert len(summary["events"]) <= 30 + 5
