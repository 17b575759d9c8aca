"""Flower's SuperNode with its idle pull interval set: ``python -m afl_flwr.supernode``.

Flower's own loop (``flwr.supernode.start_client_internal``) runs here against a
fake SuperLink connection, so the test sees which waits the real loop asks for
after an empty pull; the option parsing and the refusal of a Flower whose loop
differs are checked directly. The deployment tests run the runbook, which starts
every SuperNode through this entry point.
"""

import contextlib
import subprocess
import sys
import time
from types import ModuleType, SimpleNamespace

import pytest
from flwr.supernode import start_client_internal as loop

from afl_flwr import supernode


def test_clock_maps_flowers_two_fixed_waits_and_passes_other_durations():
    slept = []
    clock = supernode.LoopClock(0.4, 0.05, sleep=slept.append)
    for seconds in (3, 0.5, 0.2, 10):
        clock.sleep(seconds)
    assert slept == [0.4, 0.05, 0.2, 10]
    assert clock.time is time.time and clock.monotonic is time.monotonic


def test_installed_flower_has_the_loop_it_adjusts():
    supernode.check_loop_source(loop)  # raises if Flower changed the loop


def test_a_flower_without_those_sleeps_is_refused():
    other = ModuleType("flwr.supernode.start_client_internal")
    other.time = time
    with (
        pytest.raises(RuntimeError, match=r"missing: time\.sleep\(3\)"),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setattr(supernode.inspect, "getsource", lambda _m: "time.sleep(0.5)")
        supernode.check_loop_source(other)


class _Stop(Exception):
    pass


def _run_loop(monkeypatch, clock, empty_pulls):
    """Flower's SuperNode loop on a connection that has no message for it."""
    pulls = []

    def receive():
        pulls.append(time.monotonic())
        if len(pulls) > empty_pulls:
            raise _Stop
        return None

    @contextlib.contextmanager
    def connection(**_kwargs):
        unused = object()
        yield (7, receive, unused, unused, unused, unused, unused, unused)

    monkeypatch.setattr(loop, "_init_connection", connection)
    monkeypatch.setattr(loop, "register_signal_handlers", lambda **_kw: None)
    monkeypatch.setattr(loop, "time", clock)
    state = SimpleNamespace(set_node_id=lambda _id: None)
    factory = SimpleNamespace(
        state=lambda: state,
        objectstore_factory=SimpleNamespace(store=lambda: object()),
    )
    with pytest.raises(_Stop):
        loop.start_client_internal(
            state_factory=factory,
            server_address="127.0.0.1:1",
            node_config={},
            insecure=True,
            isolation="process",
        )
    return pulls


def test_flowers_loop_waits_the_idle_interval_after_each_empty_pull(monkeypatch):
    slept = []
    clock = supernode.LoopClock(0.25, 0.1, sleep=slept.append)
    pulls = _run_loop(monkeypatch, clock, empty_pulls=3)
    assert len(pulls) == 4
    assert slept == [0.25] * 3  # Flower's own loop: time.sleep(3) each time


def test_install_replaces_the_loops_clock_only(monkeypatch):
    monkeypatch.setattr(loop, "time", time)
    clock = supernode.install(0.5, 0.1)
    assert loop.time is clock and clock.idle_pull_interval == 0.5
    assert sys.modules["time"] is time and time.sleep is not clock.sleep


@pytest.mark.parametrize(
    "argv, intervals, rest",
    [
        (["--", "flower-supernode", "--insecure"], (0.5, 0.1), ["--insecure"]),
        (["--", "/bin/flower-supernode", "--insecure"], (0.5, 0.1), ["--insecure"]),
        (
            ["--idle-pull-interval", "1", "--", "--superlink", "127.0.0.1:9"],
            (1.0, 0.1),
            ["--superlink", "127.0.0.1:9"],
        ),
        (
            ["--reply-poll-interval", "0.2", "--insecure", "--port", "9200"],
            (0.5, 0.2),
            ["--insecure", "--port", "9200"],
        ),
    ],
)
def test_options_are_split_from_the_supernodes(argv, intervals, rest):
    options, supernode_argv = supernode.parse_args(argv)
    assert (options.idle_pull_interval, options.reply_poll_interval) == intervals
    assert supernode_argv == rest


@pytest.mark.parametrize("value", ["0", "-1", "61", "soon"])
def test_a_bad_interval_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        supernode.parse_args(["--idle-pull-interval", value, "--", "--insecure"])
    assert exit_info.value.code == 2
    assert "--idle-pull-interval must be" in capsys.readouterr().err


def test_help_names_flowers_intervals():
    out = subprocess.run(
        [sys.executable, "-m", "afl_flwr.supernode", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Flower: 3" in out and "flower-supernode" in out
