"""The scale benchmark's strategy-alone part at tiny N (structure, never timing)."""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scale() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("scale", BENCHMARKS / "scale.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_rule_clock_and_n_gets_a_row_with_the_requested_updates(scale):
    rows = scale.strategy_rows(
        [10, 50],
        rules=("fedbuff", "ca2fl"),
        clocks=("arrival", "virtual", "virtual-lazy"),
        updates=20,
        concurrency=5,
        repeats=2,
    )

    assert [(r["rule"], r["clock"], r["nodes"]) for r in rows] == [
        (rule, clock, n)
        for rule in ("fedbuff", "ca2fl")
        for clock in ("arrival", "virtual", "virtual-lazy")
        for n in (10, 50)
    ]
    for row in rows:
        assert len(row["repeats"]) == 2
        assert all(run["updates"] == 20 for run in row["repeats"])
        assert row["traced_run"]["updates"] == 20
        assert row["traced_peak_mib"] > 0
        assert 0 < row["distinct_clients"] <= row["nodes"]
        queries = [run["profile_queries"] for run in row["repeats"]]
        if row["clock"] == "virtual":  # every node, on join
            assert queries == [row["nodes"]] * 2
        elif row["clock"] == "virtual-lazy":  # only nodes that got work
            assert all(0 < q <= row["nodes"] for q in queries)
        else:
            assert queries == [0, 0]


def test_the_table_compares_each_n_with_the_smallest(scale):
    def row(nodes: int, ms: float) -> dict:
        return {
            "rule": "fedbuff",
            "clock": "arrival",
            "nodes": nodes,
            "startup_s": 0.1,
            "ms_per_update": ms,
            "strategy_ms_per_update": ms / 2,
            "traced_peak_mib": 1.0,
            "rss_growth_mib": None,
            "distinct_clients": 5,
        }

    table = scale.strategy_table([row(10, 2.0), row(1000, 5.0)])

    lines = table.splitlines()
    assert lines[2].split(" | ")[6] == "1.00"
    assert lines[3].split(" | ")[6] == "2.50"
