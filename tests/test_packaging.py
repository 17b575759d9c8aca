"""The app's dependency metadata, checked the way the SuperLink will see it.

A plain ``flwr run .`` ships the app as a FAB; with Flower's runtime dependency
installation (on by default) the SuperLink unpacks it and runs ``uv sync`` there,
which resolves the FAB's ``[project]`` dependencies (extras included) for every
Python version its ``requires-python`` admits. ``requires-python = ">=3.10"``
next to ``flwr`` (which needs 3.11) made every such run fail with exit code 608.

Offline, these tests build the FAB with Flower's own builder and let ``uv`` (a
dependency of ``flwr``, the resolver the SuperLink uses) resolve it for each
declared Python version against an index holding exactly the installed
distributions (metadata-only wheels): the ranges must admit what is installed,
and every installed dependency must support every declared Python. ``.ci/run``
additionally locks the FAB against PyPI, as the SuperLink does.
"""

import io
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
# CPython minor versions a requires-python may admit (3.8 .. 3.14).
PYTHON_MINORS = [f"3.{minor}" for minor in range(8, 15)]


def project_table(project_dir: Path) -> dict[str, Any]:
    with (project_dir / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]


def declared_pythons(project: dict[str, Any]) -> list[str]:
    """The CPython minor versions the project's ``requires-python`` admits."""
    spec = SpecifierSet(project["requires-python"])
    return [v for v in PYTHON_MINORS if spec.contains(f"{v}.0")]


def write_stub_index(directory: Path) -> int:
    """One metadata-only wheel per installed distribution; return how many."""
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        text = dist.read_text("METADATA")
        if not name or text is None:
            continue
        norm = re.sub(r"[-_.]+", "_", name).lower()
        if norm in seen:
            continue
        seen.add(norm)
        info = f"{norm}-{dist.version}.dist-info"
        wheel = directory / f"{norm}-{dist.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{info}/METADATA", text)
            archive.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\n"
                "Tag: py3-none-any\n",
            )
            archive.writestr(f"{info}/RECORD", "")
    return len(seen)


def uv_resolve(
    project_dir: Path, index: Path, python: str
) -> "subprocess.CompletedProcess[str]":
    """``uv pip compile`` of the project for ``python``, offline, on ``index`` only."""
    command = [
        sys.executable,
        "-m",
        "uv",
        "pip",
        "compile",
        str(project_dir / "pyproject.toml"),
        "--all-extras",
        "--offline",
        "--no-index",
        "--find-links",
        str(index),
        "--no-config",
        "--no-cache",
        "--no-header",
        "--python",
        sys.executable,
        "--python-version",
        python,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def fab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAB ``flwr run .`` would build, unpacked as the SuperLink unpacks it."""
    directory = tmp_path_factory.mktemp("fab")
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))) as fab:
        fab.extractall(directory)
    return directory


@pytest.fixture(scope="module")
def stub_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("index")
    assert write_stub_index(directory) > 10
    return directory


def test_fab_declares_only_pythons_that_flower_supports(fab_dir):
    # Prepare
    project = project_table(fab_dir)
    flwr_python = SpecifierSet(metadata.metadata("flwr")["Requires-Python"])

    # Execute
    declared = declared_pythons(project)

    # Assert
    assert declared, f"requires-python {project['requires-python']!r} admits nothing"
    assert [v for v in declared if not flwr_python.contains(f"{v}.0")] == []
    assert project["dependencies"] == project_table(REPO)["dependencies"]


def test_classifiers_name_declared_pythons(fab_dir):
    project = project_table(fab_dir)
    prefix = "Programming Language :: Python :: 3."
    named = {
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith(prefix)
    }

    assert named
    assert named <= set(declared_pythons(project))


def test_uv_resolves_the_fab_for_every_declared_python(fab_dir, stub_index):
    # Prepare
    declared = declared_pythons(project_table(fab_dir))

    # Execute
    failures = {}
    for python in declared:
        proc = uv_resolve(fab_dir, stub_index, python)
        if proc.returncode != 0:
            failures[python] = proc.stderr[-2000:]

    # Assert
    assert failures == {}


def test_uv_resolution_catches_a_python_flower_does_not_support(
    fab_dir, stub_index, tmp_path
):
    # Prepare: the metadata that made the SuperLink's `uv sync` fail (exit 608)
    text = (fab_dir / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        re.sub(r'requires-python = "[^"]*"', 'requires-python = ">=3.10"', text)
    )

    # Execute
    proc = uv_resolve(tmp_path, stub_index, "3.10")

    # Assert
    assert proc.returncode != 0
    assert "flwr" in proc.stderr and "3.11" in proc.stderr
