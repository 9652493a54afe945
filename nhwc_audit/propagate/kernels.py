"""Backward kernels that compute another result when the gradient they are handed is
channels_last, measured on the audit's own torch and device.

torch 2.14.1's CPU ``instance_norm`` backward at batch size 1 returns a wrong input gradient for
a channels_last gradient (relative difference ~1.4 against the same gradient in NCHW, and against
float64). A channels_last model hands InstanceNorm such a gradient wherever the op after it
computes channels_last. The audit cannot know which torch builds have the fault, so it asks the
kernel: for each InstanceNorm node whose output gradient the backward audit recorded
channels_last, the op runs forward and backward on random values of the node's input shape,
with the gradient channels_last and NCHW, and both input gradients are compared with float64's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..records import Layout, NodeRecord
from ..tensors import seeded

__all__ = ["DIFFERS", "PROBE_NUMEL", "layout_dependent_backwards"]

DIFFERS = 1e-3
"""Relative error against float64 past which an input gradient is wrong, not rounded (float32
rounding: ~1e-7); it must also be 10x the error for the same gradient in NCHW. float32 and
float64 nodes only: half-precision rounding is of this order."""

PROBE_NUMEL = 1 << 22
"""Shapes up to this many elements are probed (a probe runs the op twice, forward and back)."""


def _instance_norm(r: NodeRecord) -> bool:
    return r.op_name == "instance_norm" or (r.module_type or "").startswith("InstanceNorm")


def _errors(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple[float, float]:
    """The relative error against float64 of ``F.instance_norm``'s input gradient (batch
    statistics, random values of ``shape``) for a channels_last gradient, and for the same
    gradient in NCHW."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    with seeded(0):
        x, dy = torch.randn(shape), torch.randn(shape)

    def dx(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (got,) = torch.autograd.grad(F.instance_norm(t), t, g)
        return got.double().cpu()

    exact = dx(x.double(), dy.double())
    xd, dyd = x.to(device, dtype), dy.to(device, dtype)
    scale = max(float(exact.norm()), 1e-30)
    cl = float((dx(xd, dyd.contiguous(memory_format=fmt)) - exact).norm()) / scale
    nchw = float((dx(xd, dyd) - exact).norm()) / scale
    return cl, nchw


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
        if len(meta.shape) in (4, 5) and 0 < meta.numel <= PROBE_NUMEL and meta.dtype in ("float32", "float64"):
            by_shape.setdefault((tuple(meta.shape), meta.dtype), []).append(r.module_path or r.name)
    notes = []
    for (shape, dtype), nodes in by_shape.items():
        try:
            cl, nchw = _errors(shape, getattr(torch, dtype), device)
        except Exception:  # a shape the kernel does not take alone: nothing measured
            continue
        if cl > DIFFERS and cl > 10 * nchw:
            where = ", ".join(nodes[:4]) + (", ..." if len(nodes) > 4 else "")
            size = "x".join(map(str, shape))
            notes.append(
                f"backward: InstanceNorm ({where}) is handed a channels_last gradient, and this torch's {device} "
                f"kernel returns a wrong input gradient for it (relative error {cl:.2g} against float64 at {size} "
                f"{dtype}; {nchw:.1g} for the same gradient in NCHW): training channels_last gets wrong gradients "
                "there; the repair's InstanceNorm -> GroupNorm rewrite avoids the kernel"
            )
    return tuple(notes)
