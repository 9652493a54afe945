"""This tree's audit against another revision's, side by side in one process.

    python benchmarks/versus.py [--base REV] [--repeats 9] [CASE ...]

CASE is ``torchvision_name:size:batch`` (``resnet50:224:1``) or ``chainN`` (a conv and N
relu/add pairs, no compute to speak of). The base revision's package is exported with
``git archive`` into a temporary folder under another name, so both versions run interleaved
in the same process on the same model and sample: machine noise (this project's machine drifts
by 20-30% within minutes) cancels out of the ratio. Wall time and CPU time (``process_time``:
all threads, so the forward counts twice on 2 cores) are both printed. No assertions.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def _base_package(rev: str, into: Path) -> Any:
    """The package as it is at ``rev``, imported as ``nhwc_audit_base``."""
    archive = subprocess.run(["git", "archive", rev, "nhwc_audit"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "nhwc_audit").rename(into / "nhwc_audit_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("nhwc_audit_base")


def _case(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("chain"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import _Chain

        return _Chain(int(name[5:] or 2000)), torch.randn(1, 3, 4, 4)
    import torchvision.models as tvm

    model, size, batch = name.split(":")
    return getattr(tvm, model)(weights=None).eval(), torch.randn(int(batch), 3, int(size), int(size))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="HEAD~1")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("cases", nargs="*", default=["resnet50:224:1", "densenet121:64:1", "chain2000"])
    a = p.parse_args()
    import nhwc_audit

    tmp = Path(tempfile.mkdtemp(prefix="nhwc-versus-"))
    try:
        base = _base_package(a.base, tmp)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; base {a.base}; medians of {a.repeats}")
        print("| case | nodes | forward | base audit | this audit | this / base (wall) | this / base (CPU) |")
        print("|---|---|---|---|---|---|---|")
        for name in a.cases:
            model, x = _case(name)
            cl, xc = nhwc_audit.convert(model), x.contiguous(memory_format=torch.channels_last)

            def forward(cl: Any = cl, xc: Any = xc) -> None:
                with torch.no_grad():
                    cl(xc)

            runs = {
                "forward": forward,
                "base": lambda m=model, x=x: base.audit(m, x, bandwidth=1e10),
                "this": lambda m=model, x=x: nhwc_audit.audit(m, x, bandwidth=1e10),
            }
            wall: dict[str, list[float]] = {k: [] for k in runs}
            cpu: dict[str, list[float]] = {k: [] for k in runs}
            for fn in runs.values():
                fn()
            for _ in range(a.repeats):
                for k, fn in runs.items():
                    gc.collect()
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    wall[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
            nodes = len(nhwc_audit.audit(model, x, bandwidth=1e10).nodes)
            w = {k: statistics.median(v) for k, v in wall.items()}
            c = {k: statistics.median(v) for k, v in cpu.items()}
            print(
                f"| {name} | {nodes} | {w['forward'] * 1e3:.1f} ms | {w['base'] * 1e3:.1f} ms "
                f"({w['base'] / w['forward']:.2f}x) | {w['this'] * 1e3:.1f} ms ({w['this'] / w['forward']:.2f}x) | "
                f"{w['this'] / w['base']:.3f} | {c['this'] / c['base']:.3f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
