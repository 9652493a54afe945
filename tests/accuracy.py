"""The audit's bytes against eager ground truth, per model of the zoo.

For each model: the bytes the audit charges (``summary.bytes_moved``) and the bytes
channels_last adds in eager PyTorch, measured by :mod:`tests.eager_bytes` (a dispatch-level
recorder over an NCHW run and a channels_last run; it shares no code with the audit).

    python -m tests.accuracy --out reports/accuracy.md [--models NAME ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from nhwc_audit import audit
from nhwc_audit.zoo.models import MODELS, build
from tests.eager_bytes import eager_bytes

__all__ = ["Row", "compare", "within"]

TOLERANCE = 0.2
"""The audit's bytes are within this fraction of eager's."""


@dataclass(frozen=True)
class Row:
    name: str
    capture: str
    shapes: str
    audit_bytes: int
    eager_bytes: int
    saved_bytes: int

    @property
    def ratio(self) -> float | None:
        return self.audit_bytes / self.eager_bytes if self.eager_bytes else None


def within(row: Row, tolerance: float = TOLERANCE) -> bool:
    """The audit's bytes agree with eager's: within ``tolerance``, or both zero."""
    if row.eager_bytes == 0:
        return row.audit_bytes == 0
    return abs(row.audit_bytes - row.eager_bytes) <= tolerance * row.eager_bytes


def compare(name: str) -> Row:
    """Audit one zoo model and measure it in eager, in this process (same threads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, args, kwargs = build(name)
        report = audit(model, args, example_kwargs=kwargs, bandwidth=1e9)
        truth = eager_bytes(model, args, kwargs)
    shapes = ", ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor))
    return Row(name, report.meta.capture, shapes, report.summary.bytes_moved, truth.added, truth.saved)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def _versions() -> str:
    names = ["torch", "torchvision", "timm", "diffusers", "monai", "segmentation-models-pytorch", "ultralytics"]
    found = []
    for n in names:
        try:
            found.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def table(rows: list[Row]) -> str:
    head = (
        "# Bytes the audit charges vs bytes channels_last adds in eager\n\n"
        "Regenerate: `python -m tests.accuracy --out reports/accuracy.md` (needs the `test` extra).\n\n"
        f"Environment: {_versions()}; Python {platform.python_version()}; CPU, "
        f"{torch.get_num_threads()} threads; float32, eval, random weights, batch 1.\n\n"
        "*eager MB*: per source line of the model, transposes (dispatch level) in the channels_last run "
        "minus those in the NCHW run, where positive; *saved MB*: where the NCHW run transposes more. "
        f"A row passes when the audit is within ±{TOLERANCE:.0%} of eager (or both are 0).\n\n"
        "| model | capture | input | audit MB | eager MB | ratio | saved MB | ok |\n"
        "|---|---|---|---:|---:|---:|---:|---|\n"
    )
    lines = [
        f"| {r.name} | {r.capture} | {r.shapes} | {_mb(r.audit_bytes)} | {_mb(r.eager_bytes)} | "
        f"{'' if r.ratio is None else f'{r.ratio:.2f}'} | {_mb(r.saved_bytes)} | {'yes' if within(r) else 'NO'} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/accuracy.md"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    ns = parser.parse_args(argv)
    rows = []
    for name in ns.models:
        row = compare(name)
        print(f"{name}: audit {_mb(row.audit_bytes)} MB, eager {_mb(row.eager_bytes)} MB", file=sys.stderr)
        rows.append(row)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(table(rows))
    bad = [r.name for r in rows if not within(r)]
    print(
        f"{len(rows) - len(bad)} of {len(rows)} within ±{TOLERANCE:.0%}"
        + (f"; outside: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
