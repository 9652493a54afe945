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
    'gpuGetDeviceCount failed' lines) go to /dev/null for the block. Python's own stderr keeps its
    destination: where it writes to descriptor 2 (a terminal), through a duplicate of it; where it
    is something else (a notebook's stream, a test's capture), as it is."""
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2: nothing to silence
        yield
        return
    try:
        python_fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a notebook's stream, a test's capture)
        python_fd = None
    previous, python_stderr = sys.stderr, None
    if python_fd == 2:
        previous.flush()
        python_stderr = os.fdopen(os.dup(saved), "w", buffering=1)
        sys.stderr = python_stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        if python_stderr is not None:
            python_stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if python_stderr is not None:
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
