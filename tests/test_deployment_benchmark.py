"""benchmarks/deployment.py's arithmetic: start-up against steady state, node cycles."""

import importlib.util
import math
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    path = REPO / "benchmarks" / "deployment.py"
    spec = importlib.util.spec_from_file_location("deployment_bench_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _events(*rows):
    """events.csv rows from (node, status, wall time) triples."""
    keys = ("node_id", "status", "wall_time")
    return [dict(zip(keys, map(str, row), strict=True)) for row in rows]


def test_phases_split_the_loop_at_the_first_merge(bench):
    # Prepare: merges at 4, 6, 9 and 10 s of a 10 s loop; 30 CPU s in 20 s
    events = _events(
        (1, "merged", 6.0), (2, "merged", 4.0), (1, "timeout", 7.0), (2, "merged", 9.0)
    ) + _events((3, "merged", 10.0))
    run = {
        "summary": {"wall_time": 10.0, "first_dispatch_wall": 1.5},
        "merge_walls": bench.merge_walls(events),
        "cpu_s": {"a": 10.0, "b": 20.0},
        "wall_s": 20.0,
    }

    # Execute
    out = bench.run_phases(run)

    # Assert: (10 - 4) / 3 further merges
    assert run["merge_walls"] == [4.0, 6.0, 9.0, 10.0]
    assert out == {
        "first dispatch s": 1.5,
        "first merge s": 4.0,
        "after it, s per update": 2.0,
        "cores busy": 1.5,
    }


def test_phases_of_a_run_with_one_merge_leave_the_rate_undefined(bench):
    run = {
        "summary": {"wall_time": 3.0},
        "merge_walls": [2.0],
        "cpu_s": {},
        "wall_s": 4,
    }

    out = bench.run_phases(run)

    assert out["first merge s"] == 2.0
    assert math.isnan(out["after it, s per update"])
    assert math.isnan(out["first dispatch s"])


def test_node_cycles_are_reply_to_reply_per_node(bench):
    events = _events((1, "merged", 1.0), (1, "dropped", 4.0), (2, "merged", 2.0))
    events += _events((1, "timeout", 9.0), (1, "merged", 6.5), (2, "merged", 5.0))

    assert sorted(bench.node_cycles(events)) == [2.5, 3.0, 3.0]


class _Proc:
    def __init__(self, cmdline, parents=()):
        self._cmdline, self._parents = cmdline, list(parents)

    def cmdline(self):
        return self._cmdline

    def parents(self):
        return self._parents


def test_warm_launcher_processes_are_told_apart_by_their_ancestors(bench):
    shell = _Proc(["bash", "run-local-deployment.sh"])
    launcher = _Proc(["python", "-m", "afl_flwr.warm_exec", "--", "flower-supernode"])
    template = _Proc(launcher.cmdline(), [launcher, shell])
    task = _Proc(launcher.cmdline(), [template, launcher, shell])
    launcher._parents = [shell]
    roles = [bench.warm_exec_role(p) for p in (launcher, template, task)]
    assert roles == ["warm SuperExec", "warm template", "flwr-clientapp (forked)"]


def test_variants_compare_flowers_launcher_and_supernode_with_the_printed_one(bench):
    plan = bench.variants([1, 2])
    flower_node = ["--node-pull-interval", "3"]
    flower = ["--task-launcher", "flower", *flower_node]
    assert [v.args for v in plan] == [flower, flower, flower_node, [], []]
    assert plan[0].run_config == "node-worker='off'"
    assert plan[1].run_config == plan[2].run_config == ""
    assert plan[3].label.startswith("as printed") and plan[3].run_config == ""
    assert plan[4].run_config == "node-queue-depth=2"
