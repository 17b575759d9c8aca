r"""Flower's SuperNode with its idle pull interval and reply poll set by the caller.

A Flower SuperNode (``flower-supernode``, ``flwr.supernode``) handles one
message at a time in a loop (``start_client_internal``):

1. it pulls a message from the SuperLink; when none is waiting it **sleeps 3 s**
   and pulls again;
2. it hands the message to its task process, then polls its own state **every
   0.5 s** until the reply is there, and pushes the reply;
3. it pulls again, at once.

An asynchronous strategy sends a node its next task when the node's reply
arrives, so step 3 finds nothing and the node sleeps the full 3 s after every
reply: in a deployment that is the largest wait of a node's cycle. Both waits
are fixed numbers in Flower 1.40-1.42, not options. This entry point is
``flower-supernode`` itself (its parser, its options, its loop) with those two
sleeps replaced by the intervals given here::

    python -m afl_flwr.supernode --idle-pull-interval 0.5 -- \
        flower-supernode --insecure --superlink 127.0.0.1:9092 ...

A shorter idle interval means a node that has nothing to do pulls the
SuperLink more often (one small request per interval); the reply poll reads
the node's local state only. The SuperLink, the task processes and everything
else are Flower's. Only the ``time.sleep(3)`` and ``time.sleep(0.5)`` calls of
``flwr.supernode.start_client_internal`` are changed; the module is checked
to still contain them, and the SuperNode refuses to start when it does not
(a Flower version whose loop differs).
"""

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable, Sequence
from logging import INFO
from types import ModuleType
from typing import Any

# The sleeps of Flower's SuperNode loop (flwr.supernode.start_client_internal),
# Flower 1.40-1.42: after an empty pull, and while waiting for a reply.
FLOWER_IDLE_SLEEP = 3
FLOWER_REPLY_POLL = 0.5
DEFAULT_IDLE_PULL_INTERVAL = 0.5
DEFAULT_REPLY_POLL_INTERVAL = 0.1


class LoopClock:
    """Stand-in for the ``time`` module inside Flower's SuperNode loop.

    ``sleep`` maps Flower's two fixed waits to the configured intervals and
    passes any other duration through; every other attribute is ``time``'s.

    Parameters
    ----------
    idle_pull_interval : float
        Seconds to wait after a pull that found no message (Flower: 3).
    reply_poll_interval : float
        Seconds between checks for a reply or its content (Flower: 0.5).
    sleep : Callable[[float], None], optional
        What waits (default ``time.sleep``).
    """

    def __init__(
        self,
        idle_pull_interval: float,
        reply_poll_interval: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.idle_pull_interval = idle_pull_interval
        self.reply_poll_interval = reply_poll_interval
        self._sleep = sleep

    def sleep(self, seconds: float) -> None:
        """Sleep the configured interval for Flower's fixed waits, else ``seconds``."""
        if seconds == FLOWER_IDLE_SLEEP:
            seconds = self.idle_pull_interval
        elif seconds == FLOWER_REPLY_POLL:
            seconds = self.reply_poll_interval
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_loop_source(module: ModuleType) -> None:
    """Raise if Flower's SuperNode loop no longer has the sleeps this replaces.

    Parameters
    ----------
    module : ModuleType
        ``flwr.supernode.start_client_internal``.

    Raises
    ------
    RuntimeError
        When the module does not import ``time`` or lacks the idle sleep
        ``time.sleep(3)`` or the reply poll ``time.sleep(0.5)``.
    """
    source = inspect.getsource(module)
    expected = (f"time.sleep({FLOWER_IDLE_SLEEP})", f"time.sleep({FLOWER_REPLY_POLL})")
    missing = [call for call in expected if call not in source]
    if getattr(module, "time", None) is not time or missing:
        raise RuntimeError(
            f"{module.__name__} (Flower) does not have the SuperNode loop this "
            f"entry point adjusts (missing: {', '.join(missing) or 'import time'}); "
            "run flower-supernode itself"
        )


def install(idle_pull_interval: float, reply_poll_interval: float) -> LoopClock:
    """Replace the sleeps of Flower's SuperNode loop in this process.

    Parameters
    ----------
    idle_pull_interval : float
        Seconds to wait after a pull that found no message.
    reply_poll_interval : float
        Seconds between checks for a reply.

    Returns
    -------
    LoopClock
        The clock now used by ``flwr.supernode.start_client_internal``.
    """
    from flwr.supernode import start_client_internal as loop

    check_loop_source(loop)
    clock = LoopClock(idle_pull_interval, reply_poll_interval)
    loop.time = clock  # type: ignore[assignment]
    return clock


def _interval(name: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a number, got {text!r}"
            ) from None
        if not 0 < value <= 60:
            raise argparse.ArgumentTypeError(
                f"{name} must be in (0, 60] seconds, got {text}"
            )
        return value

    return parse


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split this entry point's options from the SuperNode's command.

    Parameters
    ----------
    argv : Sequence[str]
        ``[options] -- flower-supernode [its options]``; the ``--`` and the
        command name may be left out (everything after the options is then
        the SuperNode's options).

    Returns
    -------
    tuple of (argparse.Namespace, list of str)
        The intervals, and the SuperNode's options (without the command name).
    """
    parser = argparse.ArgumentParser(
        prog="python -m afl_flwr.supernode",
        description="Flower's flower-supernode with its idle pull interval "
        "(Flower: 3 s) and reply poll (Flower: 0.5 s) set here. Options after -- "
        "(and the optional command name flower-supernode) are flower-supernode's.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--idle-pull-interval",
        type=_interval("--idle-pull-interval"),
        default=DEFAULT_IDLE_PULL_INTERVAL,
        help="seconds to wait after a pull that found no message "
        f"(default {DEFAULT_IDLE_PULL_INTERVAL}; Flower: {FLOWER_IDLE_SLEEP})",
    )
    parser.add_argument(
        "--reply-poll-interval",
        type=_interval("--reply-poll-interval"),
        default=DEFAULT_REPLY_POLL_INTERVAL,
        help="seconds between checks for a task's reply "
        f"(default {DEFAULT_REPLY_POLL_INTERVAL}; Flower: {FLOWER_REPLY_POLL})",
    )
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        options, rest = parser.parse_args(argv[:split]), argv[split + 1 :]
    else:
        options, rest = parser.parse_known_args(argv)
    if rest and os.path.basename(rest[0]) == "flower-supernode":
        rest = rest[1:]
    return options, rest


def main(argv: Sequence[str] | None = None) -> None:
    """Run Flower's SuperNode with the given intervals.

    Parameters
    ----------
    argv : Sequence[str], optional
        Command-line arguments (default: ``sys.argv[1:]``).
    """
    options, supernode_argv = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        install(options.idle_pull_interval, options.reply_poll_interval)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.common.logger import log
    from flwr.supernode.cli.flower_supernode import flower_supernode

    log(
        INFO,
        "SuperNode pull intervals: %g s after an empty pull (Flower: %g s), "
        "%g s between reply checks (Flower: %g s)",
        options.idle_pull_interval,
        FLOWER_IDLE_SLEEP,
        options.reply_poll_interval,
        FLOWER_REPLY_POLL,
    )
    sys.argv = ["flower-supernode", *supernode_argv]
    flower_supernode()


if __name__ == "__main__":
    main()
