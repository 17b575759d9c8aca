"""What the buffer preference (``distinct-buffer``) costs or gains, per client.

The strategy runs on the in-memory :class:`ScriptedGrid` with synthetic replies
(the received model plus a client-specific shift), on the virtual clock, so
only scheduling is measured: merges per client (fastest vs slowest), mean
staleness, slot utilisation (busy client-seconds / (concurrency x simulated
time)) and merges per simulated second, with the preference on and off. No
learning is involved; the accuracy side of the rule is in benchmark v2.
Usage::

    python benchmarks/buffer_preference.py
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from afl_flwr import StalenessAwareAsyncStrategy, VirtualClock
from afl_flwr.clock import NodeProfile, speed_factors
from afl_flwr.experiments.runs import markdown_table
from afl_flwr.experiments.scripted_grid import ScriptedGrid, server_identity
from afl_flwr.experiments.stats import t_interval

SCENARIOS: dict[str, dict[str, Any]] = {
    "4 nodes, one 8x slower, concurrency 5, K 5 (defaults)": {
        "speeds": [8.0, 1.0, 1.0, 1.0],
        "concurrency": 5,
        "versions": 60,
    },
    "10 nodes, speeds 1-10x, concurrency 8, K 8": {
        "speeds": "log-uniform",
        "concurrency": 8,
        "versions": 40,
    },
    "10 nodes, speeds 1-10x, concurrency 5, K 5": {
        "speeds": "log-uniform",
        "concurrency": 5,
        "versions": 60,
    },
}


def _reply(node: int, message: Message) -> RecordDict:
    record = next(iter(message.content.array_records.values()))
    shifted = record["w"].numpy() + np.float32(0.01 * node)
    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(shifted)}),
            "metrics": MetricRecord({"num-examples": 64}),
        }
    )


def run_once(scenario: dict[str, Any], prefer: bool, seed: int) -> dict[str, Any]:
    """One run; returns per-client merges and the scheduling figures."""
    speeds = scenario["speeds"]
    if speeds == "log-uniform":
        speeds = list(speed_factors(10, spread=10.0, seed=seed))
    nodes = list(range(1, len(speeds) + 1))
    grid = ScriptedGrid(
        replies=dict.fromkeys(nodes, _reply),
        profiles={
            n: NodeProfile(n - 1, 64, float(speeds[n - 1]), 0.5).to_record()
            for n in nodes
        },
    )
    clock = VirtualClock(local_epochs=1, batch_size=64, step_time_s=1.0, seed=seed)
    strategy = StalenessAwareAsyncStrategy(
        concurrency=scenario["concurrency"],
        distinct_buffer=prefer,
        clock=clock,
        seed=seed,
        poll_interval=0.0,
    )
    with server_identity():
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
            num_rounds=scenario["versions"],
        )
    events = strategy.history.events
    merged = [e for e in events if e.merged_into is not None]
    per_client = {c: 0 for c in range(len(speeds))}
    for event in merged:
        per_client[event.client] += 1
    sim_end = max(e.sim_time for e in events)
    busy = sum(e.sim_duration for e in events)
    slowest = int(np.argmax(speeds))
    fastest = int(np.argmin(speeds))
    return {
        "merges_fastest": per_client[fastest],
        "merges_slowest": per_client[slowest],
        "per_client": per_client,
        "mean_staleness": float(np.mean([e.staleness for e in merged])),
        "utilisation": busy / (min(scenario["concurrency"], len(speeds)) * sim_end),
        "merges_per_sim_s": len(merged) / sim_end,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every scenario with the preference on and off over several seeds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rows, raw = [], {}
    keys = (
        "merges_fastest",
        "merges_slowest",
        "mean_staleness",
        "utilisation",
        "merges_per_sim_s",
    )
    for name, scenario in SCENARIOS.items():
        for prefer in (True, False):
            runs = [run_once(scenario, prefer, seed) for seed in range(args.seeds)]
            raw[f"{name} | prefer={prefer}"] = runs
            row = [name, "on" if prefer else "off"]
            row += [t_interval([r[key] for r in runs]).format() for key in keys]
            rows.append(row)
            print(row, flush=True)
    table = markdown_table(["scenario", "prefer fresh nodes", *keys], rows)
    note = (
        f"\nmean [95% t-interval] over seeds 0..{args.seeds - 1}; merges per client "
        "are of the fastest and the slowest client; synthetic replies on the "
        "virtual clock (scheduling only).\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "buffer_preference.md").write_text(table + note)
    (args.out / "buffer_preference.json").write_text(json.dumps(raw, indent=1))
    print(table + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
