"""Fake mode: propagate FakeTensors through the graph. No weights are materialised and no
compute runs, so a model built on the meta device can be audited on a laptop, and a CPU
machine can predict another device's layouts. Every layout is a prediction: the meta
kernels behind FakeTensors disagree with real kernels on some ops (see ``KNOWN_DIVERGENCES``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import TraceError
from ..records import Finding, FindingKind, Layout, NodeRecord
from .copy import clone_modules, memory_format_for_rank

__all__ = ["KNOWN_DIVERGENCES", "divergence_warnings", "divergences", "fake_copy", "fake_inputs", "fake_mode"]

# (op name as recorded, device) -> what was observed. torch 2.14.1.
KNOWN_DIVERGENCES: dict[tuple[str, str], str] = {
    ("groupnorm", "cpu"): "GroupNorm: fake/meta returns NCHW, eager CPU keeps channels_last",
    ("group_norm", "cpu"): "GroupNorm: fake/meta returns NCHW, eager CPU keeps channels_last",
    ("roll", "cpu"): "torch.roll: fake/meta returns NCHW, eager CPU keeps channels_last",
    ("channelshuffle", "cpu"): "nn.ChannelShuffle: fake/meta returns NCHW, eager CPU keeps channels_last",
    ("channel_shuffle", "cpu"): "channel_shuffle: fake/meta returns NCHW, eager CPU keeps channels_last",
    ("pad", "cpu"): "5D reflect/replicate pad: fake/meta returns NCDHW, eager CPU keeps channels_last_3d",
}


def fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)


def _fake_like(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    target_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    fmt = memory_format_for_rank(t.dim())
    if fmt is not None:  # as conversion.convert does: .to(memory_format=...) restrides 1x1 weights too
        return torch.empty(t.shape, dtype=target_dtype, device=device).to(memory_format=fmt)
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=target_dtype, device=device)


def fake_copy(model: nn.Module, mode: Any, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are FakeTensors on ``device`` with
    channels_last strides for 4D/5D; the real (or meta) tensors are never read or copied."""
    memo: dict[int, Any] = {}
    with mode:
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(_fake_like(p, device, dtype), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = _fake_like(b, device, dtype)
    try:
        return clone_modules(model, memo)
    except Exception as e:
        raise TraceError(f"cannot copy {type(model).__name__} for a fake-mode audit: {e}") from e


def fake_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], mode: Any, device: torch.device, dtype: torch.dtype | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """FakeTensor inputs of the sample's shapes: 4D/5D channels_last(_3d), others as given."""

    def conv(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        fmt = memory_format_for_rank(v.dim())
        out = torch.empty(v.shape, dtype=target_dtype, device=device)
        return out.to(memory_format=fmt) if fmt is not None else out

    with mode:
        return tuple(tree_map(conv, a) for a in args), {k: tree_map(conv, v) for k, v in kwargs.items()}


def divergence_warnings(op_names: set[str], device: str) -> list[str]:
    """Known fake-vs-real disagreements for the ops this audit met on this device type."""
    dev = device.split(":")[0]
    return sorted({text for (op, d), text in KNOWN_DIVERGENCES.items() if d == dev and op in op_names})


def divergences(real: Sequence[NodeRecord], fake: Sequence[NodeRecord], device: str) -> list[Finding]:
    """Nodes whose output layout differs between the real run and the fake run of the same
    graph (matched by node name). Each predicts a place where compiled code, which plans
    with meta kernels, disagrees with eager (a stride assert or an extra conversion)."""
    fake_by = {r.name: r for r in fake}
    out: list[Finding] = []
    for r in real:
        f = fake_by.get(r.name)
        if f is None or r.op in ("placeholder", "get_attr", "output"):
            continue
        a, b = r.output_layout, f.output_layout
        if a == b or Layout.AMBIGUOUS in (a, b):
            continue
        spatial = r.spatial_outputs
        out.append(
            Finding(
                node=r.name,
                index=r.index,
                kind=FindingKind.DIVERGENCE,
                op=r.op_name,
                target=r.target,
                module_path=r.module_path,
                module_type=r.module_type,
                source=r.source,
                layout_in=a,
                layout_out=b,
                shape=spatial[0].shape if spatial else (),
                detail=r.detail,
                bytes=0,
                est_seconds=0.0,
                hint=(
                    f"real {device} kernels give {a.value}, fake/meta kernels give {b.value}: torch.compile "
                    "plans with meta kernels, so expect a stride assert or an extra conversion here; fake-mode "
                    "audits of this op are unreliable"
                ),
            )
        )
    return out
