"""This tree's audit against another revision's, side by side in one process.

    python benchmarks/versus.py [--base REV] [--repeats 9] [--train] [CASE ...]

CASE is ``torchvision_name:size:batch`` (``resnet50:224:1``), ``unet`` (the bundled example,
1x3x128x128), ``chainN`` (a conv and N
relu/add pairs, no compute to speak of) or ``sd15`` (Stable Diffusion 1.5's UNet built on the
meta device, audited in fake mode: no forward to compare with, so its forward column is
empty). The base revision's package is exported with ``git archive`` into a temporary folder
under another name, so both versions run interleaved in the same process on the same model
and sample, swapping places every round: machine noise (this project's machine drifts by
20-30% within minutes) cancels out of the ratio, and so does what whichever audit runs second
loses (2-3% on resnet50, 14% on the 4,003-node chain). Wall time and CPU time (``process_time``:
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


def _case(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], str]:
    """The model, its sample (args, kwargs) and the audit's mode."""
    torch.manual_seed(0)
    if name.startswith("chain"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import _Chain

        return _Chain(int(name[5:] or 2000)), (torch.randn(1, 3, 4, 4),), {}, "real"
    if name == "unet":  # the bundled example the README's first command audits
        from nhwc_audit.examples import unet

        model, args = unet()
        return model, args, {}, "real"
    if name == "sd15":
        from nhwc_audit.zoo.large import sd15_meta

        model, args, kwargs = sd15_meta()
        return model, args, kwargs, "fake"
    import torchvision.models as tvm

    model, size, batch = name.split(":")
    return getattr(tvm, model)(weights=None).eval(), (torch.randn(int(batch), 3, int(size), int(size)),), {}, "real"


def _cell(seconds: float, forward: float | None) -> str:
    return f"{seconds * 1e3:.1f} ms" + (f" ({seconds / forward:.2f}x)" if forward else "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="HEAD~1")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--train", action="store_true", help="audit with train=True; the forward column is one training step"
    )
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
            model, args, kwargs, mode = _case(name)

            def audit(pkg: Any, m: Any = model, args: Any = args, kwargs: Any = kwargs, mode: str = mode) -> Any:
                return pkg.audit(m, args, example_kwargs=kwargs, mode=mode, bandwidth=1e10, train=a.train)

            runs = {"base": lambda: audit(base), "this": lambda: audit(nhwc_audit)}
            if mode == "real":
                cl = nhwc_audit.convert(model)
                xc = tuple(x.contiguous(memory_format=torch.channels_last) for x in args)

                def forward(cl: Any = cl, xc: Any = xc) -> None:
                    if a.train:  # one training step: forward, a linear loss, backward
                        cl.zero_grad(set_to_none=True)
                        cl(*xc).float().sum().backward()
                        return
                    with torch.no_grad():
                        cl(*xc)

                runs = {"forward": forward, **runs}
            wall: dict[str, list[float]] = {k: [] for k in runs}
            cpu: dict[str, list[float]] = {k: [] for k in runs}
            for fn in runs.values():
                fn()
            order = list(runs.items())
            for i in range(a.repeats):
                # the two audits swap places every round: with the same code in both places,
                # whichever ran second measured 2-14% slower
                for k, fn in order if i % 2 == 0 else [*order[:-2], *order[-2:][::-1]]:
                    gc.collect()
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    wall[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
            nodes = len(audit(nhwc_audit).nodes)
            w = {k: statistics.median(v) for k, v in wall.items()}
            c = {k: statistics.median(v) for k, v in cpu.items()}
            fw = w.get("forward")

            print(
                f"| {name} | {nodes} | {f'{fw * 1e3:.1f} ms' if fw else '-'} | {_cell(w['base'], fw)} | {_cell(w['this'], fw)} | "
                f"{w['this'] / w['base']:.3f} | {c['this'] / c['base']:.3f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
