"""The thread count an audit runs at, kept for what follows it.

CPU kernels choose by torch's intra-op thread count (a convolution's backend, and with it the copies it
makes inside): MONAI's DynUNet 3D at batch 2 moves 7,704,928 B a training step at one thread and
8,491,424 B at two, by eager's own count. ``audit(threads=N)`` (``--threads N``) runs at N; the repair
and the measurement that follow it run at the count the audit ran at (``AuditMeta.threads``), or the
repair was chosen for another configuration than the one audited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["threads_set"]


@contextlib.contextmanager
def threads_set(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` while the block runs (None: left as it is), then put
    back as it was."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
