"""Memory readings for benchmarks, from Linux's ``/proc`` (no psutil needed).

* :func:`reset_peak_rss` / :func:`peak_rss_mib`: this process's resident-set
  high-water mark (``VmHWM``), reset by writing ``5`` to ``clear_refs``;
* :class:`TreeSampler`: a thread that samples the proportional set size (PSS,
  shared pages split between the processes that map them) summed over this
  process and all its descendants (Ray's GCS, raylet and workers), and keeps the
  peak of that sum.

Off Linux every reading is ``None``.
"""

import threading
from pathlib import Path

PROC = Path("/proc")


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_mib() -> float | None:
    """This process's resident set now, in MiB."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS; success?"""
    try:
        (PROC / "self" / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float | None:
    """This process's RSS high-water mark, in MiB."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def descendants(root: int) -> list[int]:
    """Process ids below ``root`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def pss_mib(pid: int) -> float:
    """Proportional set size of one process in MiB (0 when it is gone)."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


class TreeSampler:
    """Peak PSS of this process plus its descendants, sampled in a thread.

    Parameters
    ----------
    pid : int
        Root of the process tree (normally ``os.getpid()``).
    interval : float (default: 0.5)
        Seconds between samples.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_total = 0.0
        self.peak_root = 0.0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        root = pss_mib(self.pid)
        others = descendants(self.pid)
        total = root + sum(pss_mib(p) for p in others)
        self.peak_root = max(self.peak_root, root)
        self.peak_total = max(self.peak_total, total)
        self.peak_processes = max(self.peak_processes, 1 + len(others))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "TreeSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
