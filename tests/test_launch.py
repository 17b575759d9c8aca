"""``afl-flwr run`` without starting anything: the ``flwr run`` command it builds.

``flwr run`` itself is replaced by a recorder, so these tests check the run
config and the federation (SuperNodes, CPU and GPU share per client) handed to
Flower's simulation, with CUDA mocked available or not.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.cli.run.run import _parse_federation_config_overrides
from flwr.cli.typing import SuperLinkConnection
from flwr.common.config import parse_config_args
from flwr.simulation.app import _run_simulation_settings

from afl_flwr import launch
from afl_flwr.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the ``flwr run`` command instead of running it; find no SuperLink."""
    commands: list[list[str]] = []

    def fake_run(command: list[str], **_: Any) -> "subprocess.CompletedProcess[str]":
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(run=fake_run))
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(launch, "superlink_pids", lambda port: [])
    return commands


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def client_resources(command: list[str]) -> tuple[int, dict[str, float]]:
    """SuperNodes and per-client resources Flower's simulation hands to Ray.

    Parsed by Flower's own (private) functions: ``flwr run``'s parsing of
    ``--federation-config`` and the simulation process's reading of the result.
    """
    sim = _parse_federation_config_overrides(
        [option(command, "--federation-config")],
        SuperLinkConnection(name="local", address=":local:"),
    )
    num_supernodes, _, backend_config, _, _ = _run_simulation_settings(sim)
    return num_supernodes, dict(backend_config["client_resources"])


@pytest.mark.parametrize(
    ("cuda", "clients_per_round", "expected_gpus"),
    [(False, 5, 0.0), (True, 5, 0.2), (True, 4, 0.25), (True, 1, 1.0)],
)
def test_gpu_share_follows_cuda_and_clients_per_round(
    recorded, monkeypatch, cuda, clients_per_round, expected_gpus
):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    run_config = f"num-clients=8 clients-per-round={clients_per_round}"

    # Execute
    code = launch.main(["run", str(REPO), "--run-config", run_config])

    # Assert: what Flower's simulation receives
    assert code == 0
    [command] = recorded
    num_supernodes, resources = client_resources(command)
    assert num_supernodes == 8
    assert resources["num_cpus"] == 1
    assert resources["num_gpus"] == pytest.approx(expected_gpus)
    if expected_gpus:
        # clients-per-round clients fit on one GPU at once
        assert int(1 / resources["num_gpus"] + 1e-6) == clients_per_round


def test_explicit_gpu_share_and_cpus_win_over_detection(recorded, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    code = launch.main(["run", str(REPO), "--client-gpus", "0.5", "--client-cpus", "2"])

    assert code == 0
    _, resources = client_resources(recorded[0])
    assert resources == {"num_cpus": 2, "num_gpus": pytest.approx(0.5)}


@pytest.mark.parametrize("argv", [["--client-gpus", "1.5"], ["--client-cpus", "0"]])
def test_bad_resources_stop_before_flwr_runs(recorded, monkeypatch, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    code = launch.main(["run", str(REPO), *argv])

    assert code == 2
    assert recorded == []


def test_queue_depth_above_one_is_refused_before_the_simulation_starts(
    recorded, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    code = launch.main(["run", str(REPO), "--run-config", "node-queue-depth=2"])

    assert code == 2
    assert recorded == []  # flwr run never started
    assert "node-queue-depth=2 cannot run in Flower's simulation" in (
        capsys.readouterr().err
    )


def test_in_process_simulation_refuses_queue_depth_above_one():
    from afl_flwr.simulate import main as simulate_main

    assert simulate_main(["--run-config", "node-queue-depth=3"]) == 2


def test_preset_file_and_overrides_merge_in_order(recorded, monkeypatch):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(REPO)
    preset = "presets/quick-cpu.toml"

    # Execute
    code = launch.main(
        ["run", ".", "--run-config", preset, "--run-config", "num-server-rounds=3"]
    )

    # Assert: the preset's values, the later override, absolute paths
    assert code == 0
    run_config = parse_config_args([option(recorded[0], "--run-config")])
    assert run_config["model"] == "small-cnn"
    assert run_config["local-epochs"] == 1
    assert run_config["num-server-rounds"] == 3
    assert run_config["data-dir"] == str((REPO / "../shared/data/mnist").resolve())
    assert Path(run_config["results-dir"]).is_absolute()


def test_read_run_config_later_values_win(tmp_path):
    first = tmp_path / "a.toml"
    first.write_text('model = "small-cnn"\nseed = 1\n')

    merged = launch.read_run_config([str(first), "seed=7 mode='sync'"])

    assert merged == {"model": "small-cnn", "seed": 7, "mode": "sync"}


@pytest.mark.parametrize("content", [None, "model = \n"])
def test_read_run_config_names_an_unreadable_file(tmp_path, content):
    path = tmp_path / "preset.toml"
    if content is not None:
        path.write_text(content)

    with pytest.raises(ConfigError, match=r"preset\.toml"):
        launch.read_run_config([str(path)])


RUNBOOK = REPO / "docker" / "run-local-deployment.sh"


def readme_deployment_command() -> list[str]:
    """The runbook's arguments exactly as docs/deployment.md prints them."""
    section = (REPO / "docs" / "deployment.md").read_text()
    match = re.search(r"docker/run-local-deployment\.sh (.*?)\n```", section, re.S)
    assert match, "no runbook command in docs/deployment.md"
    return shlex.split(match.group(1).replace("\\\n", " "))


def run_runbook(args: list[str], work: Path) -> "subprocess.CompletedProcess[str]":
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        ["bash", str(RUNBOOK), "--work-dir", str(work), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_readme_deployment_command_passes_the_check(tmp_path):
    # Prepare
    args = readme_deployment_command()

    # Execute
    proc = run_runbook([*args, "--check-only"], tmp_path / "work")

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert "Run config OK for 3 SuperNodes" in proc.stdout
    assert "clients-per-round=3" in proc.stdout
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("clients-per-round=5", r"clients-per-round=5 exceeds num-clients=3"),
        ("num-clients=2 clients-per-round=2", r"num-clients=2 is below the 3"),
        ("data-dir='/no/such/dir'", r"data-dir='/no/such/dir' holds no mnist"),
        ("local-epoch=1", r"Unknown run-config key.*local-epoch"),
    ],
)
def test_runbook_refuses_a_bad_config_before_starting_anything(
    tmp_path, overrides, message
):
    # Prepare
    work = tmp_path / "work"
    args = ["--insecure", "--data-dir", str(REPO.parent / "shared" / "data" / "mnist")]

    # Execute
    proc = run_runbook([*args, "--run-config", overrides], work)

    # Assert: refused with the reason, and no work dir, log or process created.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr)
    assert "nothing was started" in proc.stderr
    assert "flower-superlink" not in proc.stdout
    assert not work.exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--node-pull-interval", "0"], r"--node-pull-interval must be a number"),
        (["--node-pull-interval", "soon"], r"got 'soon'"),
        (["--task-launcher", "cold"], r"--task-launcher must be 'warm' or 'flower'"),
    ],
)
def test_runbook_refuses_a_bad_option_before_starting_anything(
    tmp_path, option, message
):
    work = tmp_path / "work"
    proc = run_runbook(["--insecure", *option], work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr)
    assert "flower-superlink" not in proc.stdout
    assert not work.exists()


def test_check_deployment_merges_the_app_defaults_and_overrides():
    cfg = launch.check_deployment(
        REPO, ["num-clients=4 clients-per-round=4", "clients-per-round=2"], 4
    )

    assert (cfg.num_clients, cfg.clients_per_round) == (4, 2)
    assert cfg.model == "small-cnn"  # the app's pyproject value


def test_ray_address_reaches_flwr_run_and_is_announced(monkeypatch, capsys):
    # Prepare: record the environment `flwr run` gets (the local SuperLink and
    # the simulation's ray.init() inherit it)
    envs: list[dict[str, str]] = []

    def fake_run(command: list[str], env: dict[str, str], **_: Any):
        envs.append(env)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(run=fake_run))
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(launch, "superlink_pids", lambda port: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")

    # Execute
    code = launch.main(["run", str(REPO)])

    # Assert
    assert code == 0
    assert envs[0]["RAY_ADDRESS"] == "10.0.0.5:6379"
    out = capsys.readouterr().out
    assert "Ray: attaching to the existing cluster RAY_ADDRESS=10.0.0.5:6379" in out


@pytest.mark.parametrize(
    ("theirs", "ours", "noted"),
    [
        ("", "", False),
        ("10.0.0.5:6379", "10.0.0.5:6379", False),
        ("", "10.0.0.5:6379", True),
        ("10.0.0.5:6379", "", True),
    ],
)
def test_ray_address_note_names_a_superlink_with_another_ray_address(
    theirs, ours, noted
):
    # A stand-in for a running SuperLink: a process with its own environment
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if theirs:
        env["RAY_ADDRESS"] = theirs
    code = "import time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        # Once it prints, it runs with its own environment (not pytest's, as
        # between fork and exec)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        note = launch.ray_address_note([proc.pid], ours)
    finally:
        proc.kill()
        proc.communicate()

    assert (note is not None) == noted
    if noted:
        assert f"pid {proc.pid}" in note and f"RAY_ADDRESS={theirs!r}" in note
