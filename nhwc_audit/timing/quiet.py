"""Keeping native libraries' notices off the terminal while nhwc-audit runs them: the profiler's
'USDT ... profiler_start' and 'gpuGetDeviceCount failed' lines (written by C++ to file descriptor 2)
and torch.utils.cpp_extension's CUDA_HOME notice on a machine without CUDA. Imports no torch."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["native_stderr_silenced", "profiler_notices_silenced"]


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Native code's writes to file descriptor 2 (the profiler's 'USDT ... profiler_start' and
    'gpuGetDeviceCount failed' lines) go to /dev/null; Python's own stderr, where nhwc-audit
    prints its errors, keeps the terminal through a duplicate of the descriptor."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a test's capture): nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    python_stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    previous = sys.stderr
    os.dup2(devnull, fd)
    os.close(devnull)
    sys.stderr = python_stderr
    try:
        yield
    finally:
        python_stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        sys.stderr = previous
        python_stderr.close()


@contextlib.contextmanager
def profiler_notices_silenced() -> Iterator[None]:
    """:func:`native_stderr_silenced`, and torch.utils.cpp_extension's notices (its CUDA_HOME line, logged
    when torch.utils.benchmark first imports it) below errors, for a block that times or profiles;
    the logger's level is put back after."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with native_stderr_silenced():
            yield
    finally:
        logger.setLevel(level)
