"""Flower's multi-node Ray path: `afl-flwr run` attached to an existing Ray cluster.

Starts a Ray head and a second Ray node on this machine (``ray start``, one CPU
each, a private ``--temp-dir``), runs a short simulation with ``RAY_ADDRESS``
naming the head, and checks that the run finished and that its ClientApp actors
ran on both nodes of *that* cluster (its GCS actor and job tables, and each
node's own worker logs). A Flower that started a private Ray instead would leave
both empty. Everything the test started is stopped by pid (never ``ray stop``,
which stops every Ray on the machine).

Loopback only: Ray turns ``--node-ip-address=127.0.0.1`` into the machine's
address and then binds its gRPC servers to all interfaces. Ray keeps a node on
127.0.0.1 (and binds its servers there) only under
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which also refuses
``ray start --address``; the second node is therefore started through a small
wrapper that lifts that refusal in its own process (Ray internals of Ray 2.55,
the version Flower pins). Every process that connects (the simulation's driver,
the state query) needs the same variable, or Ray resolves 127.0.0.1 to the
machine's address, where nothing listens.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import kill_group, run_bounded
from test_flwr_run import free_port, leftovers

from afl_flwr.launch import stop_processes, superlink_pids

pytestmark = [pytest.mark.process, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TAG = "AFL_FLWR_TEST_RAY_CLUSTER"  # marks the processes of our `ray start`s
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# `ray start --address ...` for a node that stays on 127.0.0.1 (see above).
JOIN_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services
ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.exit(main())
"""

# What the cluster's GCS knows: alive nodes, actors (dead ones included), jobs.
CLUSTER_STATE = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="error",
         log_to_driver=False)
print(json.dumps({
    "nodes": {n["NodeID"]: n["Resources"].get("CPU", 0)
              for n in ray.nodes() if n["Alive"]},
    "actors": [[a["ActorClassName"], a["Address"]["NodeID"]]
               for a in state.actors().values()],
    "jobs": [j["Entrypoint"] for j in state.state.job_table()],
}))
"""


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """Our Ray processes: tagged by environment or naming ``temp_dir``, and children.

    Ray's agents have neither (the raylet starts them with a clean environment
    and a renamed command line): they are found as the raylets' children.
    """
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            words = proc.info["cmdline"] or []
            if proc.environ().get(TAG) == str(temp_dir) or any(
                str(temp_dir) in w for w in words
            ):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def stop_cluster(temp_dir: Path) -> list[int]:
    """SIGTERM, then SIGKILL our Ray processes; a few rounds, for late children.

    Returns the pids still alive afterwards.
    """
    for _ in range(3):
        procs = cluster_processes(temp_dir)
        if not procs:
            break
        stop_processes([p.pid for p in procs], grace_s=5)
    return [p.pid for p in cluster_processes(temp_dir)]


def non_loopback_listeners(procs: list[psutil.Process]) -> list[str]:
    bad = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections("inet"):
                ip = conn.laddr.ip.removeprefix("::ffff:")
                if conn.status == psutil.CONN_LISTEN and ip not in {"127.0.0.1", "::1"}:
                    bad.append(f"{proc.name()} ({proc.pid}) on {ip}:{conn.laddr.port}")
    return bad


def ray_start(args: list[str], env: dict[str, str], *, join: bool) -> None:
    command = (
        [sys.executable, "-c", JOIN_ON_LOOPBACK, "start"]
        if join
        else [str(BIN / "ray"), "start"]
    )
    # Own session: the daemons it leaves behind are not in pytest's process group.
    proc = subprocess.run(
        [*command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def cluster_state(address: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CLUSTER_STATE, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def actor_logs(node_temp_dir: Path) -> list[Path]:
    """This node's worker logs of ClientApp actors (Ray names the actor in them)."""
    logs = node_temp_dir / "session_latest" / "logs"
    return [
        f
        for f in logs.glob("worker-*.out")
        if ":actor_name:ClientAppActor" in f.read_text(errors="replace")
    ]


@pytest.fixture
def ray_cluster():
    """A Ray head and a second node, 1 CPU each, on 127.0.0.1; stopped by pid."""
    # Short path: Ray's unix sockets live below it (107-character limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        **LOOPBACK,
        TAG: str(temp_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]
    try:
        ray_start(
            [
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={free_port()}",  # default 10001
                "--include-dashboard=false",
                f"--temp-dir={temp_dir / 'head'}",
                *common,
            ],
            env,
            join=False,
        )
        ray_start(
            [f"--address={address}", f"--temp-dir={temp_dir / 'node'}", *common],
            env,
            join=True,
        )
        yield address, temp_dir, env
    finally:
        left = stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def test_afl_flwr_run_attaches_to_an_existing_two_node_ray_cluster(
    ray_cluster, tmp_path, mnist_dir
):
    # Prepare: a two-node cluster (both CPUs seen by its GCS) and a private
    # FLWR_HOME with free SuperLink ports
    address, temp_dir, cluster_env = ray_cluster
    before = cluster_state(address, cluster_env)
    assert sorted(before["nodes"].values()) == [1.0, 1.0]
    assert not [a for a in before["actors"] if a[0] == "ClientAppActor"]
    home = tmp_path / "flwr-home"
    port = free_port()
    env = {
        **os.environ,
        **LOOPBACK,
        "RAY_ADDRESS": address,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    results = tmp_path / "results"
    command = [sys.executable, "-m", "afl_flwr.launch", "run", str(REPO)]
    run_config = (
        "num-server-rounds=2 local-epochs=1 model='small-cnn' num-test=1000 "
        f"num-clients=2 clients-per-round=2 data-dir='{mnist_dir}' "
        f"results-dir='{results}'"
    )

    # Execute
    try:
        proc = run_bounded(
            [*command, "--run-config", run_config],
            timeout=300,
            env=env,
        )
        deadline = time.time() + 20
        while leftovers(home) and time.time() < deadline:
            time.sleep(0.5)
        left = leftovers(home)
    finally:
        stop_processes(superlink_pids(str(port)))
        for pid in leftovers(home):
            kill_group(pid)

    # Assert: the run finished and wrote its results
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert f"Ray: attaching to the existing cluster RAY_ADDRESS={address}" in (
        proc.stdout
    )
    [run_dir] = list(results.glob("async-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == 2
    assert summary["updates"]["merged"] >= 2
    # ... on our cluster: its GCS ran the simulation's driver and one ClientApp
    # actor on each node (1 CPU per client, 1 CPU per node), and each node's own
    # logs (its --temp-dir) hold its actor's output
    after = cluster_state(address, cluster_env)
    assert any("flwr-simulation" in job for job in after["jobs"]), after["jobs"]
    actor_nodes = {node for name, node in after["actors"] if name == "ClientAppActor"}
    assert actor_nodes == set(before["nodes"]), after["actors"]
    assert actor_logs(temp_dir / "head") and actor_logs(temp_dir / "node")
    # ... which listened on loopback only, and nothing of the run is left
    assert not non_loopback_listeners(cluster_processes(temp_dir))
    assert not left, f"Flower processes left running: {left}"
