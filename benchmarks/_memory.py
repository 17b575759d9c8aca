"""Memory readings for benchmarks (psutil; the peak reset is Linux's ``/proc``).

* :func:`reset_peak_rss` / :func:`peak_rss_mib`: this process's resident-set
  high-water mark (``VmHWM``), reset by writing ``5`` to ``clear_refs`` (psutil
  has no reset of the peak);
* :class:`TreeSampler`: a thread that samples the proportional set size (PSS,
  shared pages split between the processes that map them) summed over this
  process and all its descendants (Ray's GCS, raylet and workers), and keeps the
  peak of that sum.

Off Linux the peak readings are ``None`` and PSS falls back to RSS.
"""

import resource
import sys
import threading
from pathlib import Path

import psutil

CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_mib() -> float | None:
    """This process's resident set now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS; success?"""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float | None:
    """This process's RSS high-water mark, in MiB (``ru_maxrss``, KiB on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def descendants(root: int) -> list[int]:
    """Process ids below ``root`` (children, their children, ...)."""
    try:
        return [p.pid for p in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def pss_mib(pid: int) -> float:
    """Proportional set size of one process in MiB (0 when it is gone)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return getattr(info, "pss", info.rss) / 2**20


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
