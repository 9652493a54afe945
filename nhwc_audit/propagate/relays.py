"""Layout changes an ATen op makes while it computes (:func:`computed_relay`): not a copy, yet its
4D/5D output laid otherwise than an input of its rank. The recorder (:mod:`.dispatch`) keeps them
for the ops a node runs inside it, less the node's own op (:func:`inner_copies`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, NamedTuple

import torch
from torch import nn

from ..channels import COPY_OPS, broadcast_across, conv_layout, relay_bytes, relays_view, runs_otherwise
from ..layout import reorders, tensor_meta
from ..records import ALLOCATING_OPS, CONV_OPS, GEMM_OPS, HiddenCopy, Layout, TensorMeta
from ..tensors import iter_tensors

__all__ = ["Relay", "computed_relay", "first_output", "inner_copies", "is_alias_of"]

_DECIDED = frozenset({Layout.CHANNELS_LAST, Layout.CONTIGUOUS})


class Relay(NamedTuple):
    """One op's layout change (:func:`computed_relay`)."""

    copy: HiddenCopy
    source: int
    """``id()`` of the first input it re-lays."""
    result: int
    """``id()`` of its output."""
    weight: bool
    """A convolution's weight is among what it re-lays (one computed in forward: its kernel's own
    copy of it is this one, not another)."""


def first_output(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def is_alias_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` shares storage with ``b`` (works for FakeTensors, unlike data_ptr)."""
    return bool(torch._C._is_alias_of(a, b))  # type: ignore[attr-defined]


def _layouts(
    t: torch.Tensor, m: TensorMeta, om: TensorMeta, conv: bool, name: str, weight: bool
) -> tuple[Layout, Layout, bool] | None:
    """How an op that computes ``om`` from ``t`` (laid ``m``; ``weight``: a convolution's) re-lays it, and
    whether that is a reorder of no format's (:attr:`HiddenCopy.reorder`: whose it is, the analysis's
    call), or None."""
    if weight and m.layout is Layout.STRIDED and om.layout in _DECIDED:
        return m.layout, om.layout, False  # dense in neither format: copied into the one it computes in
    if om.layout in _DECIDED and m.layout in _DECIDED and m.layout is not om.layout:
        return m.layout, om.layout, False
    if conv and om.layout in _DECIDED and m.layout is Layout.STRIDED and runs_otherwise(m, om):
        return m.layout, om.layout, False  # a slice in another order (a pad's crop): the kernel re-lays it
    if not conv and name not in GEMM_OPS and relays_view(t, m, om):  # they compute their output
        return Layout.CHANNELS_LAST, Layout.CONTIGUOUS, False
    if broadcast_across(m, om):  # F.normalize's norm, expanded back over the map
        return Layout.CONTIGUOUS, Layout.CHANNELS_LAST, False
    if not conv and name not in GEMM_OPS and Layout.STRIDED in (m.layout, om.layout) and _read_along(m, om):
        return m.layout, om.layout, True  # a view in no format read in another order (a norm of channel groups)
    return None


def _read_along(m: TensorMeta, om: TensorMeta) -> bool:
    """An op reads ``m`` along ``om``'s dims (the same rank: each dim ``om``'s, broadcast, reduced to 1
    by a reduction that keeps it, or resized: the pad inside F.local_response_norm grows the channel
    groups' dim) and writes it in another memory order (:func:`~nhwc_audit.layout.reorders`), as eager
    PyTorch charges an op whose output's order disagrees with its input's."""
    return m.rank == om.rank and reorders(m, om, positional=True)


def computed_relay(func: Any, args: Any, out: Any, unsure: Collection[int] = ()) -> Relay | None:
    """The record of an ATen op that is neither a copy nor a view and computes its 4D/5D output
    in NHWC from an NCHW input of its rank, or the other way (a convolution inside a
    circular-padding Conv2d re-lays the padded NCHW input; the 2D pool inside AvgPool1d reads a
    token map unsqueezed from an NHWC map and writes NCHW), and an op on a parameter inside a leaf
    module (an orthogonal map's ``tril`` of a weight converted channels_last); a convolution's
    parameters are left to its kernel's own copies (:func:`~.conv_kernels.own_copies`). Bytes by
    :func:`~nhwc_audit.channels.relay_bytes`, summed over such inputs (a node's own op is its record's:
    :class:`~.dispatch.CopyRecorder` judges an op that reads only the node's inputs once it knows the
    node's result). ``unsure``: the ``id()`` of tensors whose layouts are
    not to be trusted (made by meta kernels known to differ from eager)."""
    if func in COPY_OPS:
        return None
    result = first_output(out)
    if not isinstance(result, torch.Tensor) or result.dim() < 4:
        return None
    om = tensor_meta(result)
    name = str(func.overloadpacket.__name__)
    if name in ALLOCATING_OPS:
        return None
    tensors = list(iter_tensors(args))
    conv = name in CONV_OPS
    if conv and om.layout is Layout.AMBIGUOUS:  # one output channel: the format the kernel computed in
        om = dataclasses.replace(om, layout=conv_layout(om, tuple(tensor_meta(t) for t in tensors[:2])))
    moved, first, source, weight = 0, None, 0, False
    rank = result.dim()
    for k, t in enumerate(tensors):
        if t.dim() != rank or (conv and isinstance(t, nn.Parameter)) or id(t) in unsure:
            continue
        m = tensor_meta(t)
        layouts = _layouts(t, m, om, conv, name, conv and k == 1)
        if layouts is None:
            continue
        if is_alias_of(result, t):
            return None  # a view, or written in place
        moved += relay_bytes(m, om, conv=conv)
        first, source, weight = first or layouts, source or id(t), weight or (conv and k == 1)
    if first is None:
        return None
    copy = HiddenCopy(
        op=name, layout_in=first[0], layout_out=first[1], shape=om.shape, bytes=moved, computed=True, reorder=first[2]
    )
    return Relay(copy, source, id(result), weight)


def inner_copies(relayed: list[Relay], inputs: list[torch.Tensor], result: Any) -> list[HiddenCopy]:
    """The layout changes computed inside a node (:attr:`~.dispatch.CopyRecorder.relayed`), less its
    own op's (from one of its ``inputs`` to its ``result``: its record shows that one)."""
    ins = {id(t) for t in inputs}
    outs = {id(result)} if isinstance(result, torch.Tensor) else {id(t) for t in iter_tensors(result)}
    return [r.copy for r in relayed if not (r.source in ins and r.result in outs)]
