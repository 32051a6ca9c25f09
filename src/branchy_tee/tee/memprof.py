"""Resident-memory sampler writing memory_profiler's ``mprofile_<timestamp>.dat`` format.

A background thread reads the resident set size from /proc/self/statm every ``interval`` seconds.
The file is what ``mprof run`` writes (``CMDLINE`` then ``MEM <MiB> <unix time>`` lines), so
``mprof plot`` reads it.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

from branchy_tee.core.fileio import atomic_write_text

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def max_rss_mib() -> float:
    """Peak RSS of this process as the kernel counts it.

    VmHWM (/proc/self/status) belongs to the process's own address space. ``ru_maxrss`` is only the
    fallback: after fork+exec it starts from the *parent's* RSS, so a child launched by a big parent
    would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except OSError:  # Gramine's LibOS implements neither VmHWM nor getrusage: the samples must do
        return 0.0


class MemorySampler:
    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memprof", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), rss_mib()))
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), rss_mib()))

    @property
    def peak_mib(self) -> float:
        return max([m for _, m in self.samples] + [max_rss_mib()])

    def write(self, directory: str | os.PathLike[str]) -> Path:
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(self.samples[0][0] if self.samples else time.time()))
        lines = ["CMDLINE " + " ".join([sys.executable, *sys.argv])]
        lines += [f"MEM {mib:.6f} {t:.4f}" for t, mib in self.samples]
        return atomic_write_text(Path(directory) / f"mprofile_{stamp}.dat", "\n".join(lines) + "\n")
