"""Deployment throughput: the printed deployment command against the in-process engine.

One run measures, on the same machine and run config:

1. **Cold task, outside Flower** (fresh processes, ``--repeats`` each, medians):
   what a SuperNode's per-message ClientApp process pays before it trains
   (interpreter, Flower's ClientApp runtime imports, the app's imports, the
   partition from the on-disk cache, the model build).
2. **Deployments**: the runbook command exactly as ``docs/deployment.md`` prints
   it (TLS, node authentication, 3 SuperNodes on 127.0.0.1), with only where it
   runs appended (ports, work and results folders), once per variant:
   ``before`` (``--task-launcher flower`` and ``node-worker = "off"``: every
   task process starts cold and each train task imports torch, loads its
   partition and trains in its own process, as before the node worker),
   ``Flower's launcher`` (``--task-launcher flower``: as before the warm task
   launcher), ``Flower's SuperNode`` (``--node-pull-interval 3``: as before the
   SuperNode's 0.5-s idle pull), then every ``--depths`` value under the warm launcher
   (``node-queue-depth`` appended; at the default depth, the printed command
   itself: the ``as printed`` row).
   Each SuperNode's ClientApp logs the split of every task (``Cold task
   timing``); ``events.csv`` gives each node's cycle (reply to
   reply), its staleness and the accuracy.
3. **The in-process engine** (:func:`afl_flwr.experiments.inprocess.run_inprocess`,
   the real ClientApp handlers in one process, node queue depth 1) on the same
   run config, once before and once after the deployments (a machine's load
   drifts); the headline ratio is deployment seconds per merged update over
   the mean of the two.
4. **Staleness cost of queuing ahead at equal updates** (``--staleness-seeds``):
   the in-process engine at depth 1 against depth 2, paired by seed, on the
   same run config (under the virtual clock both see the same simulated
   timeline, so only the waiting tasks' older bases differ).

CPU seconds per update (all deployment processes, sampled from ``/proc``; the
in-process engine's process) compare the work done independently of the load.
Writes ``<out>/deployment.md`` and ``<out>/deployment.json``.

Usage (the data folder is the printed command's ``--data-dir``)::

    python benchmarks/deployment.py --depths 1 2 --repeats 3 --staleness-seeds
"""

import argparse
import contextlib
import csv
import itertools
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from afl_flwr.config import AppConfig
from afl_flwr.experiments.inprocess import run_inprocess
from afl_flwr.experiments.runs import markdown_table
from afl_flwr.experiments.stats import t_interval
from afl_flwr.launch import flower_processes, read_run_config, stop_processes

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docker" / "run-local-deployment.sh"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"
COLD_TASK = re.compile(
    r"Cold task timing: process age ([\d.]+) s \(cpu ([\d.]+) s\), data ([\d.]+) s, "
    r"model ([\d.]+) s, train ([\d.]+) s"
)
# What a SuperNode's task process does before the app's handler runs, minus the
# network: import Flower's ClientApp runtime, then the app, load data, build.
PROBE = """
import json, sys, time
spawned = float(sys.argv[1])
t0 = time.time()
import flwr.supernode.runtime.run_clientapp
t1 = time.time()
import afl_flwr.client_app as app
t2 = time.time()
light = "torch" not in sys.modules
import afl_flwr.client_task
from afl_flwr.config import AppConfig
t3 = time.time()
cfg = AppConfig.from_run_config(json.loads(sys.argv[2]))
app.client_trainset(cfg, 0)
t4 = time.time()
app.build_model(cfg)
t5 = time.time()
heavy = [m for m in ("datasets", "flwr_datasets", "matplotlib") if m in sys.modules]
print(json.dumps({"interpreter": t0 - spawned, "flwr imports": t1 - t0,
    "ClientApp imports": t2 - t1, "training imports": t3 - t2, "data": t4 - t3,
    "model": t5 - t4, "heavy": heavy, "ClientApp without torch": light}))
"""
PHASES = (
    "interpreter",
    "flwr imports",
    "ClientApp imports",
    "training imports",
    "data",
    "model",
)


def printed_command() -> list[str]:
    """The runbook's arguments exactly as docs/deployment.md prints them."""
    text = DEPLOYMENT_DOC.read_text()
    match = re.search(r"docker/run-local-deployment\.sh (.*?)\n```", text, re.S)
    if match is None:
        raise RuntimeError(f"no runbook command in {DEPLOYMENT_DOC}")
    return shlex.split(match.group(1).replace("\\\n", " "))


def option(args: list[str], name: str, default: str) -> str:
    """The last value of ``name`` in a runbook argument list."""
    values = [b for a, b in itertools.pairwise(args) if a == name]
    return values[-1] if values else default


def run_config(printed: list[str]) -> dict[str, Any]:
    """The run config the printed command gives its run, as the runbook builds it."""
    nodes = int(option(printed, "--nodes", "3"))
    config: dict[str, Any] = {"num-clients": nodes, "clients-per-round": nodes}
    data_dir = option(printed, "--data-dir", "")
    if data_dir:
        config["data-dir"] = str((REPO / data_dir).resolve())
    overrides = [b for a, b in itertools.pairwise(printed) if a == "--run-config"]
    return {**config, **read_run_config(overrides)}


@dataclass
class Variant:
    """One deployment: what is appended to the printed command."""

    label: str
    run_config: str = ""
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # runbook options


def variants(depths: list[int]) -> list[Variant]:
    """``before``, Flower's launcher, Flower's SuperNode, then one run per depth.

    ``before`` is the printed command as it was before the node worker and the
    warm launcher: every task process starts cold (``--task-launcher flower``)
    and every train task imports, loads and trains in its own process
    (``node-worker = "off"``), at depth 1. ``Flower's launcher`` is the printed
    command as it was before the warm launcher (node worker on). ``Flower's
    SuperNode`` is the printed command as it was before the SuperNode's idle
    pull interval (``--node-pull-interval 3``: Flower's ``flower-supernode``).
    Then the runbook's defaults at each depth; at the default depth, the
    printed command itself: the ``as printed`` row.
    """
    default = AppConfig().node_queue_depth
    flower_node = ["--node-pull-interval", "3"]
    flower = ["--task-launcher", "flower", *flower_node]
    out = [
        Variant(
            "before (Flower's launcher and SuperNode, node worker off, depth 1)",
            "node-worker='off'",
            args=flower,
        ),
        Variant(
            f"Flower's launcher and SuperNode (node worker, depth {default})",
            args=flower,
        ),
        Variant(
            f"Flower's SuperNode (warm launcher, node worker, depth {default})",
            args=flower_node,
        ),
    ]
    for depth in depths:
        if depth == default:
            out.append(
                Variant(
                    "as printed (warm launcher, 0.5-s node pull, node worker, "
                    f"depth {depth})"
                )
            )
        else:
            out.append(
                Variant(
                    f"warm launcher, 0.5-s node pull, node worker, depth {depth}",
                    f"node-queue-depth={depth}",
                )
            )
    return out


def probe(src: Path, config: dict[str, Any], cache: str) -> dict[str, Any]:
    """One cold task process on the code in ``src``; its phase timings (s)."""
    env = {**os.environ, "PYTHONPATH": str(src), "AFL_FLWR_CACHE_DIR": cache}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, repr(time.time()), json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,  # `python -c` puts the working directory first on sys.path
        timeout=300,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_task(
    src: Path, config: dict[str, Any], repeats: int
) -> dict[str, dict[str, Any]]:
    """Median phases of ``repeats`` task processes: cache cold, then warm."""
    with tempfile.TemporaryDirectory(prefix="afl-flwr-bench-cache-") as cache:
        first = probe(src, config, cache)
        warm = [probe(src, config, cache) for _ in range(repeats)]
    medians = {p: statistics.median(run[p] for run in warm) for p in PHASES}
    return {
        "cold cache": {
            **{p: first[p] for p in PHASES},
            "heavy": first["heavy"],
            "ClientApp without torch": first["ClientApp without torch"],
        },
        "warm cache": {
            **medians,
            "heavy": warm[0]["heavy"],
            "ClientApp without torch": warm[0]["ClientApp without torch"],
        },
    }


def free_port_block(size: int) -> int:
    """First of ``size`` consecutive loopback ports free right now."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        if base + size > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports")


def flower_pids(work: Path) -> list[int]:
    """Live processes whose FLWR_HOME lies under ``work``."""
    return [p.pid for p in flower_processes(work)]


# The warm launcher's module: its SuperExec, its template and the task processes
# forked from that template all run under this command line.
WARM_EXEC = "afl_flwr.warm_exec"
# Flower's SuperNode run with its idle pull interval set.
SUPERNODE = "afl_flwr.supernode"
WARM_ROLES = ("warm SuperExec", "warm template", "flwr-clientapp (forked)")


def warm_exec_role(proc: psutil.Process) -> str:
    """Which of the warm launcher's processes ``proc`` is, by its ancestors."""
    above = sum(
        1 for parent in proc.parents() if WARM_EXEC in " ".join(parent.cmdline())
    )
    return WARM_ROLES[min(above, len(WARM_ROLES) - 1)]


class CpuSampler(threading.Thread):
    """CPU seconds of the processes under ``work``, by kind, sampled every 0.2 s.

    A process's CPU after its last sample (at most 0.2 s of it) is missed.
    """

    KINDS = (
        "flwr-clientapp",
        "flwr-serverapp",
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "afl_flwr.node_worker",
    )

    def __init__(self, work: Path) -> None:
        super().__init__(daemon=True)
        self.work = str(work)
        self.seen: dict[int, str | None] = {}  # pid -> kind (None: not ours)
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for proc in psutil.process_iter(["pid"]):
                with contextlib.suppress(psutil.Error):
                    if proc.pid not in self.seen:
                        self.seen[proc.pid] = self._kind(proc)
                    if self.seen[proc.pid] is not None:
                        times = proc.cpu_times()
                        self.cpu[proc.pid] = times.user + times.system

    def _kind(self, proc: psutil.Process) -> str | None:
        home = proc.environ().get("FLWR_HOME")
        if not home or not (home == self.work or home.startswith(self.work + os.sep)):
            return None
        cmdline = " ".join(proc.cmdline())
        if WARM_EXEC in cmdline:
            return warm_exec_role(proc)
        if SUPERNODE in cmdline:  # Flower's SuperNode, idle pull interval set
            return "flower-supernode"
        return next((k for k in self.KINDS if k in cmdline), "other")

    def stop(self) -> dict[str, float]:
        """Stop sampling; CPU seconds per process kind."""
        self.done.set()
        self.join()
        per_kind: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            kind = self.seen[pid] or "other"
            per_kind[kind] = per_kind.get(kind, 0.0) + seconds
        return per_kind


def deploy(
    args: argparse.Namespace, printed: list[str], variant: Variant, work: Path
) -> dict[str, Any]:
    """Run the printed command plus ``variant``; wall time, summary and task data."""
    nodes = int(option(printed, "--nodes", "3"))
    command = ["bash", str(RUNBOOK), *printed]
    command += ["--port", str(free_port_block(1))]
    command += ["--node-base-port", str(free_port_block(nodes))]
    command += ["--work-dir", str(work), "--results-dir", str(work / "results")]
    if variant.run_config:
        command += ["--run-config", variant.run_config]
    command += variant.args
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AFL_FLWR_CACHE_DIR": str(work.parent / "cache"),
        **variant.env,
    }
    work.parent.mkdir(parents=True, exist_ok=True)
    log = work.parent / f"runbook-{work.name}.log"
    sampler = CpuSampler(work)
    sampler.start()
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,  # the printed command's relative paths
            start_new_session=True,
        )
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the runbook's trap stops its nodes
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stop_processes(flower_pids(work), grace_s=10.0)
        cpu = sampler.stop()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"deployment {variant.label!r} failed (rc {proc.returncode}):\n"
            f"{log.read_text()[-4000:]}"
        )
    [folder] = (work / "results").glob("async-*")
    tasks = [
        [float(x) for x in match]
        for i in range(nodes)
        for match in COLD_TASK.findall(
            (work / "logs" / f"supernode-{i}.log").read_text()
        )
    ]
    with (folder / "events.csv").open(newline="") as handle:
        events = list(csv.DictReader(handle))
    return {
        "label": variant.label,
        "appended_run_config": variant.run_config,
        "appended_args": variant.args,
        "env": variant.env,
        "wall_s": wall,
        "cpu_s": cpu,
        "summary": json.loads((folder / "summary.json").read_text()),
        "tasks": tasks,
        "cycles": node_cycles(events),
        "merge_walls": merge_walls(events),
        "mean_staleness": mean_staleness(events),
    }


def mean_staleness(events: list[dict[str, str]]) -> float:
    """Mean staleness of the merged updates."""
    values = [float(e["staleness"]) for e in events if e["status"] == "merged"]
    return statistics.fmean(values) if values else float("nan")


def merge_walls(events: list[dict[str, str]]) -> list[float]:
    """Loop wall seconds at which each merged update was merged, in order."""
    return sorted(float(e["wall_time"]) for e in events if e["status"] == "merged")


def run_phases(run: dict[str, Any]) -> dict[str, float]:
    """Start-up against steady state: where a run's loop time goes.

    ``first merge s``: loop seconds to the first merged update (profiles, the
    first tasks, cold processes); ``after it, s per update``: the rest of the
    loop per further merged update; ``cores busy``: CPU seconds of every process
    over the end-to-end wall time.
    """
    walls = run.get("merge_walls") or []
    first = walls[0] if walls else float("nan")
    rest = (
        (run["summary"]["wall_time"] - first) / (len(walls) - 1)
        if len(walls) > 1
        else float("nan")
    )
    return {
        "first dispatch s": run["summary"].get("first_dispatch_wall", float("nan")),
        "first merge s": first,
        "after it, s per update": rest,
        "cores busy": sum(run["cpu_s"].values()) / run["wall_s"],
    }


def node_cycles(events: list[dict[str, str]]) -> list[float]:
    """Seconds between consecutive replies of each node (its first excluded)."""
    arrivals: dict[str, list[float]] = {}
    for event in events:
        if event["status"] != "timeout":
            arrivals.setdefault(event["node_id"], []).append(float(event["wall_time"]))
    cycles = []
    for times in arrivals.values():
        times.sort()
        cycles += [b - a for a, b in itertools.pairwise(times)]
    return cycles


def simulate(config: dict[str, Any], out: Path, **extra: Any) -> dict[str, Any]:
    """The same run on the in-process engine."""
    started, cpu = time.time(), time.process_time()
    outcome = run_inprocess(
        {**config, **extra, "results-dir": str(out)},
        torch_threads=os.cpu_count() or 1,
    )
    wall, cpu = time.time() - started, time.process_time() - cpu
    summary = json.loads((outcome.results_path / "summary.json").read_text())
    with (outcome.results_path / "events.csv").open(newline="") as handle:
        events = list(csv.DictReader(handle))
    return {
        "wall_s": wall,
        "cpu_s": {"in-process engine": cpu},
        "summary": summary,
        "merge_walls": merge_walls(events),
        "mean_staleness": mean_staleness(events),
    }


def per_update(summary: dict[str, Any]) -> float:
    """Loop wall seconds per merged update."""
    return summary["wall_time"] / max(1, summary["updates"]["merged"])


def staleness_cost(
    config: dict[str, Any], seeds: list[int], out: Path
) -> dict[str, Any]:
    """In-process runs at depth 1 and 2 per seed: staleness and accuracy."""
    rows = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for depth in (1, 2):
            print(f"  seed {seed}, depth {depth} ...", flush=True)
            run = simulate(
                config,
                out / f"s{seed}-d{depth}",
                seed=seed,
                **{"node-queue-depth": depth},
            )
            row[f"depth {depth}"] = {
                "mean_staleness": run["mean_staleness"],
                "final_acc": run["summary"]["final_test_acc"],
                "best_acc": run["summary"]["best_test_acc"],
                "merged": run["summary"]["updates"]["merged"],
            }
        rows.append(row)
    return {"seeds": seeds, "runs": rows}


def split_table(run: dict[str, Any]) -> list[Any]:
    """Median per-task split of one deployment, as a table row."""
    tasks = run["tasks"]
    age, cpu, data, model, train = (
        statistics.median(t[i] for t in tasks) for i in range(5)
    )
    cycle = statistics.median(run["cycles"]) if run["cycles"] else float("nan")
    fixed = cycle - train
    return [
        run["label"],
        len(tasks),
        age,
        cpu,
        data + model,
        train,
        fixed - age - data - model,
        cycle,
        fixed,
    ]


def tables(result: dict[str, Any]) -> str:
    """The markdown report."""
    cold = result["cold_task"]
    rows = []
    for label, phases in cold.items():
        total = sum(phases[p] for p in PHASES)
        rows.append(
            [
                label,
                *(phases[p] for p in PHASES),
                total,
                phases["heavy"],
                phases["ClientApp without torch"],
            ]
        )
    probe_table = markdown_table(
        ["code, cache", *PHASES, "total s", "heavy", "ClientApp without torch"], rows
    )

    deployments, sims = result["deployments"], result["simulation"]
    split = markdown_table(
        [
            "deployment",
            "tasks",
            "process age s",
            "of it CPU s",
            "data + model s",
            "training s",
            "Flower polls, transfers, waits s",
            "node cycle s",
            "fixed cost per task s",
        ],
        [split_table(run) for run in deployments],
    )
    sim_update = statistics.mean(per_update(run["summary"]) for run in sims)
    runs = [("in-process engine, before", sims[0])]
    runs += [(f"deployment: {run['label']}", run) for run in deployments]
    runs += [("in-process engine, after", sims[1])]
    throughput = markdown_table(
        [
            "run",
            "versions",
            "merged updates",
            "end-to-end s",
            "loop s",
            "s per update",
            "x in-process",
            "CPU s per update",
            "mean staleness",
            "best acc",
            "final acc",
        ],
        [
            [
                label,
                run["summary"]["versions"],
                run["summary"]["updates"]["merged"],
                run["wall_s"],
                run["summary"]["wall_time"],
                per_update(run["summary"]),
                per_update(run["summary"]) / sim_update,
                sum(run["cpu_s"].values()) / run["summary"]["updates"]["merged"],
                run["mean_staleness"],
                run["summary"]["best_test_acc"],
                run["summary"]["final_test_acc"],
            ]
            for label, run in runs
        ],
    )
    kinds = sorted({k for run in deployments for k in run["cpu_s"]})
    cpu_table = markdown_table(
        ["CPU s per update", *(run["label"] for run in deployments)],
        [
            [
                kind,
                *(
                    run["cpu_s"].get(kind, 0.0) / run["summary"]["updates"]["merged"]
                    for run in deployments
                ),
            ]
            for kind in kinds
        ],
    )
    steady = statistics.mean(run_phases(run)["after it, s per update"] for run in sims)
    phase_keys = list(run_phases(sims[0]))
    phase_table = markdown_table(
        ["run", *phase_keys, "after it, x in-process"],
        [
            [
                label,
                *(run_phases(run)[k] for k in phase_keys),
                run_phases(run)["after it, s per update"] / steady,
            ]
            for label, run in runs
        ],
    )
    report = (
        f"Printed command: `docker/run-local-deployment.sh "
        f"{shlex.join(result['printed_command'])}`\n\n"
        "Cold task process outside Flower (medians of "
        f"{result['repeats']} warm runs; s):\n\n{probe_table}\n"
        f"Deployment node cycle, per task (medians):\n\n{split}\n"
        "Throughput, same run config (x in-process: against the mean of the two "
        f"in-process runs, before and after the deployments):\n\n{throughput}\n"
        f"Deployment CPU by process (sampled every 0.2 s):\n\n{cpu_table}\n"
        "Start-up against steady state (loop seconds; cores busy: CPU seconds of "
        f"every process over the end-to-end time):\n\n{phase_table}"
    )
    cost = result.get("staleness_cost")
    if cost:
        rows = []
        diffs: dict[str, list[float]] = {
            "mean_staleness": [],
            "best_acc": [],
            "final_acc": [],
        }
        for row in cost["runs"]:
            one, two = row["depth 1"], row["depth 2"]
            rows.append(
                [
                    row["seed"],
                    one["merged"],
                    one["mean_staleness"],
                    two["mean_staleness"],
                    one["best_acc"],
                    two["best_acc"],
                    one["final_acc"],
                    two["final_acc"],
                ]
            )
            for key in diffs:
                diffs[key].append(two[key] - one[key])
        per_seed = markdown_table(
            [
                "seed",
                "merged updates",
                "staleness d=1",
                "staleness d=2",
                "best acc d=1",
                "best acc d=2",
                "final acc d=1",
                "final acc d=2",
            ],
            rows,
        )
        summary = markdown_table(
            ["depth 2 - depth 1 (paired, 95% t-interval)", "value"],
            [[key, t_interval(values).format(3)] for key, values in diffs.items()],
        )
        report += (
            "\nStaleness cost of queuing ahead, in-process engine, equal updates "
            f"(seeds {cost['seeds']}):\n\n{per_seed}\n{summary}"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--staleness-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.repeats < 1 or any(d < 1 for d in args.depths):
        parser.error("--repeats and --depths must be >= 1")
    printed = printed_command()
    config = run_config(printed)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = variants(args.depths)

    print("[1/5] cold task processes ...", flush=True)
    cold = {
        f"this tree, {k}": v for k, v in cold_task(REPO, config, args.repeats).items()
    }
    simulation, deployments = [], []
    with tempfile.TemporaryDirectory(prefix="afl-flwr-bench-") as tmp:
        print("[2/5] in-process engine ...", flush=True)
        simulation.append(simulate(config, Path(tmp) / "sim-1"))
        for i, variant in enumerate(plan):
            print(
                f"[3/5] deployment {i + 1}/{len(plan)}: {variant.label} ...", flush=True
            )
            deployments.append(
                deploy(args, printed, variant, Path(tmp) / "deployment" / f"d{i}")
            )
        print("[4/5] in-process engine again ...", flush=True)
        simulation.append(simulate(config, Path(tmp) / "sim-2"))
        print("[5/5] staleness cost, in-process ...", flush=True)
        cost = (
            staleness_cost(config, args.staleness_seeds, Path(tmp) / "cost")
            if args.staleness_seeds
            else None
        )
    result = {
        "printed_command": printed,
        "repeats": args.repeats,
        "run_config": {k: v for k, v in config.items() if k != "data-dir"},
        "cold_task": cold,
        "deployments": deployments,
        "simulation": simulation,
        "staleness_cost": cost,
        "x_in_process": {
            run["label"]: per_update(run["summary"])
            / statistics.mean(per_update(r["summary"]) for r in simulation)
            for run in deployments
        },
    }
    (args.out / "deployment.json").write_text(json.dumps(result, indent=1) + "\n")
    report = tables(result)
    (args.out / "deployment.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
