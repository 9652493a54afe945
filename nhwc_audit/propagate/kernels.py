"""Backward kernels that compute another result when the gradient they are handed is
channels_last, measured on the audit's own torch and device.

torch 2.14.1's CPU ``instance_norm`` backward at batch size 1 returns a wrong input gradient for
a channels_last gradient (relative difference ~1.4 against the same gradient in NCHW, and against
float64). A channels_last model hands InstanceNorm such a gradient wherever the op after it
computes channels_last. The audit cannot know which torch builds have the fault, so it asks the
kernel: for each InstanceNorm node whose output gradient the backward audit recorded
channels_last, the op runs forward and backward on random values of the node's input shape,
once with the gradient NCHW and once channels_last, and the two input gradients are compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..records import Layout, NodeRecord
from ..tensors import seeded

__all__ = ["DIFFERS", "PROBE_NUMEL", "layout_dependent_backwards"]

DIFFERS = 1e-3
"""Relative difference between the two input gradients past which the kernel's result depends on
the gradient's layout: rounding alone moves them ~1e-7 in float32."""

PROBE_NUMEL = 1 << 22
"""Shapes up to this many elements are probed (a probe runs the op twice, forward and back)."""


def _instance_norm(r: NodeRecord) -> bool:
    return r.op_name == "instance_norm" or (r.module_type or "").startswith("InstanceNorm")


def _relative_difference(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> float:
    """|dx(channels_last dy) - dx(NCHW dy)| / |dx(NCHW dy)| for ``F.instance_norm`` with batch
    statistics on random values of ``shape``."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    with seeded(0), torch.enable_grad():
        x = torch.randn(shape, device=device).to(dtype)
        dy = torch.randn(shape, device=device).to(dtype)
        got = []
        for grad in (dy, dy.contiguous(memory_format=fmt)):
            xi = x.detach().clone().requires_grad_(True)
            (dx,) = torch.autograd.grad(F.instance_norm(xi), xi, grad)
            got.append(dx.double())
    ref = float(got[0].norm())
    return float((got[1] - got[0]).norm()) / max(ref, 1e-30)


def layout_dependent_backwards(records: list[NodeRecord], device: str, *, fake: bool) -> tuple[str, ...]:
    """One note per input shape naming the InstanceNorm nodes whose backward, handed the
    channels_last gradient the audit recorded, computes another input gradient than for the same
    gradient in NCHW on this torch and device (measured; nothing is said on a fake run or for a
    device this process cannot run)."""
    if fake or (device.startswith("cuda") and not torch.cuda.is_available()):
        return ()
    by_shape: dict[tuple[tuple[int, ...], str], list[str]] = {}
    for r in records:
        if not (_instance_norm(r) and r.grads and r.grads[0].layout is Layout.CHANNELS_LAST and r.inputs):
            continue
        meta = r.inputs[0].meta
        if len(meta.shape) in (4, 5) and 0 < meta.numel <= PROBE_NUMEL and meta.dtype.startswith(("float", "bfloat")):
            by_shape.setdefault((tuple(meta.shape), meta.dtype), []).append(r.module_path or r.name)
    notes = []
    for (shape, dtype), nodes in by_shape.items():
        try:
            rel = _relative_difference(shape, getattr(torch, dtype), device)
        except Exception:  # a shape or dtype the kernel does not take alone: nothing measured
            continue
        if rel > DIFFERS:
            where = ", ".join(nodes[:4]) + (", ..." if len(nodes) > 4 else "")
            size = "x".join(map(str, shape))
            notes.append(
                f"backward: InstanceNorm ({where}) is handed a channels_last gradient, and this torch's {device} "
                f"kernel computes another input gradient for it than for the same gradient in NCHW (relative "
                f"difference {rel:.2g} at {size} {dtype}): training channels_last gets wrong gradients there; "
                "the repair's InstanceNorm -> GroupNorm rewrite avoids the kernel"
            )
    return tuple(notes)
