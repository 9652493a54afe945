"""Audit wall time vs one eager forward of the same channels_last model, side by side.

    python benchmarks/audit_overhead.py [--model resnet50] [--batch 1] [--size 224] [--repeats 5]

Prints the median and min/max of each and their ratio (no assertions; run on an idle machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision.models as tvm

import nhwc_audit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = getattr(tvm, a.model)()
    x = torch.randn(a.batch, 3, a.size, a.size)
    cl_model = nhwc_audit.convert(model)
    cl_x = x.contiguous(memory_format=torch.channels_last)
    fwd: list[float] = []
    aud: list[float] = []
    with torch.no_grad():
        cl_model(cl_x)  # warm-up
    nhwc_audit.audit(model, x)  # warm-up (imports, bandwidth measurement memoized)
    for _ in range(a.repeats):  # interleaved so noise hits both alike
        t = time.perf_counter()
        with torch.no_grad():
            cl_model(cl_x)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        report = nhwc_audit.audit(model, x)
        aud.append(time.perf_counter() - t)
    f, m = statistics.median(fwd), statistics.median(aud)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.model} {a.batch}x3x{a.size}x{a.size}")
    print(f"eager channels_last forward: median {f * 1e3:.1f} ms (min {min(fwd) * 1e3:.1f}, max {max(fwd) * 1e3:.1f})")
    print(f"audit():                     median {m * 1e3:.1f} ms (min {min(aud) * 1e3:.1f}, max {max(aud) * 1e3:.1f})")
    print(f"ratio audit / forward: {m / f:.2f}x")
    print("audit stages (last run):", {k: f"{v * 1e3:.1f} ms" for k, v in report.timing.items() if k.endswith("_s")})


if __name__ == "__main__":
    main()
