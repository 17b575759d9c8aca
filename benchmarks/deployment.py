"""Deployment throughput: real SuperLink + SuperNodes vs the simulation, same work.

1. **Cold task, outside Flower** (fresh processes, ``--repeats`` each, medians):
   what a SuperNode's per-message ClientApp process pays before it trains:
   interpreter start, the Flower ClientApp runtime's imports, the app's imports,
   the node's partition (on-disk cache cold, then warm) and the model build.
   ``--baseline-src DIR`` (a checkout of an older commit) measures the same probe
   on that code and deploys that app too, for a before/after in one run.
2. **Deployment**: ``docker/run-local-deployment.sh --insecure`` (a SuperLink, N
   SuperNodes and ``flwr run`` on 127.0.0.1, bounded in time, every process
   stopped afterwards). Each SuperNode's ClientApp logs the split of every task
   (``Cold task timing``); ``events.csv`` gives each node's cycle (reply to
   reply), so cycle - training = the per-task fixed cost, and cycle - (process
   age + data + model + training) = Flower's own share (polls, transfers).
3. **Simulation, same work**: the in-process engine
   (:func:`afl_flwr.experiments.inprocess.run_inprocess`, the real ClientApp
   handlers in one process) with the same run config, once before and once
   after the deployment (a shared machine's load drifts). CPU seconds per update
   (all deployment processes, sampled from ``/proc``; the simulation's process)
   compare the work done independently of that load.

Both runs merge in arrival order (``clock='none'``), central evaluation only at
the end. Writes ``<out>/deployment.md`` and ``<out>/deployment.json``.

Usage::

    python benchmarks/deployment.py --data-dir ../shared/data/mnist
"""

import argparse
import contextlib
import csv
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from afl_flwr.experiments.inprocess import run_inprocess
from afl_flwr.experiments.runs import markdown_table
from afl_flwr.launch import flower_processes, stop_processes

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docker" / "run-local-deployment.sh"
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
from afl_flwr.config import AppConfig
t2 = time.time()
cfg = AppConfig.from_run_config(json.loads(sys.argv[2]))
app.client_trainset(cfg, 0)
t3 = time.time()
app.build_model(cfg)
t4 = time.time()
heavy = [m for m in ("datasets", "flwr_datasets", "matplotlib") if m in sys.modules]
print(json.dumps({"interpreter": t0 - spawned, "flwr imports": t1 - t0,
    "app imports": t2 - t1, "data": t3 - t2, "model": t4 - t3, "heavy": heavy}))
"""
PHASES = ("interpreter", "flwr imports", "app imports", "data", "model")


def run_config(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    """The run config both the deployment and the simulation get."""
    return {
        "model": "small-cnn",
        "local-epochs": 1,
        "num-clients": args.nodes,
        "clients-per-round": args.nodes,
        "num-server-rounds": args.versions,
        "eval-every": args.versions,
        "clock": "none",
        "data-dir": data_dir,
    }


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
        "cold cache": {**{p: first[p] for p in PHASES}, "heavy": first["heavy"]},
        "warm cache": {**medians, "heavy": warm[0]["heavy"]},
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
        if proc.environ().get("FLWR_HOME") != self.work:
            return None
        cmdline = " ".join(proc.cmdline())
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
    args: argparse.Namespace, config: dict[str, Any], work: Path, app: Path
) -> dict[str, Any]:
    """Run the runbook on ``app``; return its wall time, summary and task data."""
    port = free_port_block(1)
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    command = [
        "bash",
        str(RUNBOOK),
        "--insecure",
        "--nodes",
        str(args.nodes),
        "--port",
        str(port),
        "--node-base-port",
        str(free_port_block(args.nodes)),
        "--work-dir",
        str(work),
        "--results-dir",
        str(work / "results"),
        "--run-config",
        overrides,
    ]
    command += ["--app", str(app)]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AFL_FLWR_CACHE_DIR": str(work / "cache"),
    }
    work.parent.mkdir(parents=True, exist_ok=True)
    log = work.parent / "runbook.log"
    sampler = CpuSampler(work)
    sampler.start()
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
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
            f"deployment failed (rc {proc.returncode}):\n{log.read_text()[-4000:]}"
        )
    [folder] = (work / "results").glob("async-*")
    tasks = [
        [float(x) for x in match]
        for i in range(args.nodes)
        for match in COLD_TASK.findall(
            (work / "logs" / f"supernode-{i}.log").read_text()
        )
    ]
    with (folder / "events.csv").open(newline="") as handle:
        events = list(csv.DictReader(handle))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "summary": json.loads((folder / "summary.json").read_text()),
        "tasks": tasks,
        "cycles": node_cycles(events),
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


def simulate(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """The same run on the in-process engine."""
    started, cpu = time.time(), time.process_time()
    outcome = run_inprocess(
        {**config, "results-dir": str(out / "simulation")},
        torch_threads=os.cpu_count() or 1,
    )
    wall, cpu = time.time() - started, time.process_time() - cpu
    summary = json.loads((outcome.results_path / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": {"in-process engine": cpu}, "summary": summary}


def per_update(summary: dict[str, Any]) -> float:
    """Loop wall seconds per merged update."""
    return summary["wall_time"] / max(1, summary["updates"]["merged"])


def tables(result: dict[str, Any]) -> str:
    """The markdown report."""
    cold = result["cold_task"]
    rows = []
    for label, phases in cold.items():
        total = sum(phases[p] for p in PHASES)
        rows.append([label, *(phases[p] for p in PHASES), total, phases["heavy"]])
    probe_table = markdown_table(["code, cache", *PHASES, "total s", "heavy"], rows)

    dep, sims = result["deployment"], result["simulation"]
    tasks = dep["tasks"]
    age, cpu, data, model, train = (
        statistics.median(t[i] for t in tasks) for i in range(5)
    )
    cycle = statistics.median(dep["cycles"])
    fixed = cycle - train
    split = markdown_table(
        [f"per task (median of {len(tasks)} tasks)", "s"],
        [
            ["process start, imports, FAB install, task pull (process age)", age],
            ["  of which CPU time of the task process", cpu],
            ["data (partition cache)", data],
            ["model build + load weights", model],
            ["training (1 local epoch)", train],
            [
                "Flower polls and transfers (cycle - the above)",
                fixed - age - data - model,
            ],
            ["node cycle, reply to reply", cycle],
            ["**fixed cost per task** (cycle - training)", fixed],
            *(
                [["baseline app: node cycle", statistics.median(base["cycles"])]]
                if (base := result.get("baseline_deployment"))
                else []
            ),
        ],
    )
    sim_update = statistics.mean(per_update(run["summary"]) for run in sims)
    runs = [
        (f"simulation {i + 1} (in-process engine)", run) for i, run in enumerate(sims)
    ]
    runs.insert(1, (f"deployment ({result['nodes']} SuperNodes, insecure)", dep))
    if "baseline_deployment" in result:
        runs.insert(
            2, ("deployment of the baseline app", result["baseline_deployment"])
        )
    throughput = markdown_table(
        [
            "run",
            "versions",
            "merged updates",
            "end-to-end s",
            "loop s",
            "s per update",
            "x simulation",
            "CPU s per update",
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
                run["summary"]["final_test_acc"],
            ]
            for label, run in runs
        ],
    )
    merged = dep["summary"]["updates"]["merged"]
    cpu_table = markdown_table(
        ["deployment process", "CPU s", "CPU s per update"],
        [[kind, cpu, cpu / merged] for kind, cpu in sorted(dep["cpu_s"].items())],
    )
    return (
        "Cold task process outside Flower (medians of "
        f"{result['repeats']} warm runs; s):\n\n{probe_table}\n"
        f"Deployment, per task:\n\n{split}\n"
        "Throughput, same work (x simulation: against the mean of the two "
        f"simulations, run before and after the deployment):\n\n{throughput}\n"
        f"Deployment CPU by process (sampled every 0.2 s):\n\n{cpu_table}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--versions", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=420.0)
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="an older checkout: its cold task probe, and its app deployed too",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    for name in ("nodes", "versions", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.versions < 2:
        parser.error("--versions must be >= 2 (a node cycle needs two replies)")
    data_dir = str(Path(args.data_dir).resolve())
    config = run_config(args, data_dir)
    args.out.mkdir(parents=True, exist_ok=True)

    print("[1/4] cold task processes ...", flush=True)
    cold = {
        f"this tree, {k}": v for k, v in cold_task(REPO, config, args.repeats).items()
    }
    if args.baseline_src:
        base = cold_task(args.baseline_src.resolve(), config, args.repeats)
        cold = {"baseline": base["warm cache"], **cold}
    simulation = []
    with tempfile.TemporaryDirectory(prefix="afl-flwr-bench-") as tmp:
        print("[2/4] simulation ...", flush=True)
        simulation.append(simulate(config, Path(tmp) / "sim-1"))
        print("[3/4] deployment ...", flush=True)
        deployment = deploy(args, config, Path(tmp) / "deployment" / "work", REPO)
        if args.baseline_src:
            print("[3/4] deployment of the baseline app ...", flush=True)
            baseline = deploy(
                args, config, Path(tmp) / "baseline" / "work", args.baseline_src
            )
        print("[4/4] simulation again ...", flush=True)
        simulation.append(simulate(config, Path(tmp) / "sim-2"))
    result = {
        "nodes": args.nodes,
        "repeats": args.repeats,
        "run_config": {k: v for k, v in config.items() if k != "data-dir"},
        "cold_task": cold,
        "deployment": deployment,
        "simulation": simulation,
    }
    if args.baseline_src:
        result["baseline_deployment"] = baseline
    (args.out / "deployment.json").write_text(json.dumps(result, indent=1) + "\n")
    report = tables(result)
    (args.out / "deployment.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
