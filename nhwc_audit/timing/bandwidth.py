"""Copy bandwidth used to turn bytes moved by layout changes into an estimated time."""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["measure_transpose_bandwidth", "round_sig"]


def round_sig(x: float, digits: int = 2) -> float:
    """Round to ``digits`` significant digits (keeps reports stable across runs).

    >>> round_sig(12345.0)
    12000.0
    """
    if x <= 0:
        return 0.0
    return float(f"{x:.{digits}g}")


@functools.lru_cache(maxsize=8)
def measure_transpose_bandwidth(device: str, *, mbytes: int = 8, repeats: int = 7) -> float:
    """Bytes per second of an NCHW -> NHWC copy of a ``mbytes`` MB float32 tensor on
    ``device``: the median of ``repeats`` timings into a preallocated tensor after warm-up,
    counting read + write (2 x the tensor's bytes), rounded to two significant digits. On CUDA
    each timing is of 10 copies queued back to back: one copy between two synchronisations is
    mostly launch and sync (an H200: 740 GB/s so, 1.5 TB/s queued, about what 64 MB copies
    give). Memoized per device for the process: it is a property of the hardware.
    """
    dev = torch.device(device)
    c = 64
    hw = int((mbytes * (1 << 20) // 4 // c) ** 0.5)
    src = torch.ones(1, c, hw, hw, device=dev)
    dst = torch.empty_like(src, memory_format=torch.channels_last)
    nbytes = 2 * src.numel() * src.element_size()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    queued = 10 if dev.type == "cuda" else 1
    times: list[float] = []
    for i in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        for _ in range(queued):
            dst.copy_(src)
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t0) / queued)
    times.sort()
    median = times[len(times) // 2]
    return round_sig(nbytes / median) if median > 0 else 0.0
