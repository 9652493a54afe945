"""The process's peak resident memory, as the benchmarks and the audit's timings report it."""

from __future__ import annotations

import sys

__all__ = ["peak_rss"]


def peak_rss() -> int:
    """High-water mark of this process's resident memory, in bytes (0 where unknown): the
    kernel's VmHWM where /proc has it. getrusage's ``ru_maxrss`` carries over the peak of the
    process this one was started from (Linux keeps it across fork and exec): a process started
    from a 1.4 GB Python process read 1.4 GB before allocating anything, against 13 MB of its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere
    except Exception:
        return 0
