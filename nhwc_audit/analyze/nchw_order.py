"""Does an NCHW run of the model keep every 4D/5D tensor in NCHW order? Then it moves nothing
between layouts, and the NCHW baseline (:mod:`nhwc_audit.refine`) need not run it: backward
(:func:`reorders_dims`, from the autograd nodes a channels_last run made) or forward
(:func:`forward_keeps_nchw`, from the ATen ops its propagation ran)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from ..layout import channels_innermost, memory_order, nchw_ordered
from ..propagate.blind import forward_hooked
from ..propagate.captured import Captured
from ..records import Layout, NodeRecord, TensorMeta

__all__ = ["forward_keeps_nchw", "reorders_dims"]


def reorders_dims(graph: torch.fx.Graph, reordering: frozenset[str], records: Sequence[NodeRecord] = ()) -> bool:
    """Can an NCHW run of the model hand a 4D/5D tensor on in another dim order than NCHW? Unless
    every autograd node the channels_last run made on tensors of rank 3 and up is of a kind known
    to keep NCHW order (``reordering``: those not in :data:`~nhwc_audit.propagate.order.KEEPS_ORDER`,
    inside leaf modules too), or the graph asks for a channels_last memory format
    (``.contiguous(memory_format=...)``, a no-op in the channels_last run), or a node reads a map
    laid out in neither order nor a slice of one (:func:`_laid_otherwise`: a tensor made in forward
    and ``expand``-ed or transposed, which no autograd node made: a convolution's backward re-lays
    it in NCHW too; not a ``stack`` of maps, whose maps are read, and laid, as they come: smp FPN's
    ``torch.stack(maps).sum(0)``), or a view permutes a 4D/5D tensor's dims with no autograd node (a
    window partition of the model's own input: :func:`_permutes`). Without any, the NCHW backward
    moves nothing."""
    formats = (torch.channels_last, torch.channels_last_3d)
    stacked = {r.name for r in records if r.op_name == "stack"}
    laid_otherwise = any(
        _laid_otherwise(i.meta) for r in records for i in r.inputs if i.meta.rank >= 4 and i.producer not in stacked
    )
    return (
        bool(reordering)
        or laid_otherwise
        or any(_permutes(r) for r in records)
        or any(
            v in formats
            for n in graph.nodes
            for v in tree_leaves((n.args, n.kwargs))
            if isinstance(v, torch.memory_format)
        )
    )


def _permutes(r: NodeRecord) -> bool:
    """``r`` is a view that puts a 4D/5D tensor's dims in another order (the same sizes and strides,
    size-1 dims aside, in another order): the NCHW run's view of its NCHW tensor is strided otherwise."""
    if not (r.aliases_input and r.outputs and r.inputs) or r.inputs[0].meta.rank < 4:
        return False
    src, out = r.inputs[0].meta, r.outputs[0]
    dims = [[(n, st) for n, st in zip(m.shape, m.strides, strict=False) if n > 1] for m in (src, out)]
    return dims[0] != dims[1] and sorted(dims[0]) == sorted(dims[1])


def _laid_otherwise(meta: TensorMeta) -> bool:
    """Broadcast over a dim of size > 1, or strided in an order that is neither NCHW's nor NHWC's:
    a channel slice of an NHWC map is in NHWC's (no NCHW run makes it); a transpose of H and W is in
    neither, whichever map it is of, even one no autograd node made (``y.detach().mT``, a buffer's,
    the input's): the NCHW run's copy of it is another order, and its conv's backward re-lays it."""
    if _broadcast(meta):
        return True
    if meta.layout is not Layout.STRIDED or nchw_ordered(meta):
        return False
    outer = [d for d in memory_order(meta) if d != 1]  # the dims but the channels, outermost first
    return not channels_innermost(meta) or outer != sorted(outer)


def forward_keeps_nchw(captured: Captured, records: Sequence[NodeRecord], *, handed: bool = False) -> bool:
    """Does the NCHW forward of an fx capture move nothing, so that its baseline nets nothing (no
    revert, mixed op, conversion or re-lay in NCHW to charge against channels_last's)? Where every
    ATen op the propagation ran on tensors of rank 3 and up keeps NCHW order
    (:attr:`~.propagate.captured.Captured.reordering` empty: the recorder saw every op but those of
    :mod:`~nhwc_audit.propagate.blind` calls, one such op each), no node reads a map laid out in
    neither order or permutes one (:func:`reorders_dims`), every tensor the conversion leaves as
    built is in NCHW order, and every call runs torch's own code (a ``torch.nn`` leaf module with no
    hook, parametrization or forward of its own (:func:`_torch_leaf`), a torch function, an ATen op, a
    tensor method: no code of the model's, run eagerly, that may take another branch on NCHW input,
    no custom op); and no node broke, sliced a map (:func:`_slices`) or read a table or
    tokens laid across row-major order (:func:`_across`). Not where the NCHW run is ``handed``
    inputs of its own (a part of a model, on what the NCHW model hands it: an encoder's last map its
    kernel made channels_last), in place of an NCHW copy of the sample. What a convolution's kernel
    copies of its own is no move: the baseline asks it of the NCHW call's kernel
    (:func:`~nhwc_audit.propagate.nchw_kernels.forward_inside`)."""
    cap = captured.capture
    if cap is None or captured.method != "fx" or captured.reordering is None or handed:
        return False
    if any(r.error or _slices(r) or any(_across(i.meta) for i in r.inputs) for r in records):
        return False
    made, outputs = captured.unconverted, {r.name: r.outputs for r in records}
    for n in cap.graph.nodes:
        if (
            n.op == "get_attr"
            and n.target in made
            and any(m.rank >= 4 and not nchw_ordered(m) for m in outputs[n.name])
        ):
            return False  # a tensor constant read as built in both runs: channels_last, it mixes in NCHW's
        if n.op == "call_module" and not _torch_leaf(cap.root.get_submodule(str(n.target))):
            return False
        if n.op == "call_function" and not _torch_code(n.target):
            return False
    return not reorders_dims(cap.graph, captured.reordering, records)


def _torch_code(target: object) -> bool:
    """``target`` (a function, or a module's type) is torch's own: neither the model's nor a library's
    (nor a custom op of ``torch.ops``, whose kernel the recorder cannot see into, named like ATen's)."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in ("aten", "prims")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0] in ("aten", "prims")
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "builtins", "math") and not (
        isinstance(target, type) and issubclass(target, torch.jit.ScriptModule)
    )


def _torch_leaf(m: nn.Module) -> bool:
    """A leaf call of ``m`` runs torch's code alone: every module in it of torch's own type, none
    parametrized (a parametrization's module may be the model's) or with a ``forward`` of its own, and
    no hook on them or on every module (a hook that makes its output channels_last dispatches nothing
    in the channels_last run and a copy in the NCHW one)."""
    return all(
        _torch_code(type(sub))
        and not parametrize.is_parametrized(sub)
        and "forward" not in sub.__dict__
        and not forward_hooked(sub)
        for sub in m.modules()
    )


def _slices(r: NodeRecord) -> bool:
    """``r`` is a view of fewer elements than it reads, of rank 3 and up (a crop, a channel slice,
    ``select``, ``chunk``): in NCHW order it may not be dense where it is in channels_last (a crop
    of an NHWC map at batch 1 is), and the NCHW run's kernels copy it whole first (a convolution's)."""
    if not r.aliases_input:
        return False
    read = max((math.prod(i.meta.shape) for i in r.inputs if i.meta.rank >= 3), default=0)
    return any(o.rank >= 3 and math.prod(o.shape) < read for o in r.outputs)


def _across(meta: TensorMeta) -> bool:
    """A tensor of rank 2 or 3 laid out of row-major order, or broadcast over a dim of size > 1: the
    same tensor in both runs where no map made it (a table, ``p.t()`` added to a map), read across
    an NCHW map's order as across an NHWC one's; tokens of a channels_last map, whose NCHW
    counterparts are laid otherwise."""
    if not 2 <= meta.rank <= 3:
        return False
    order = memory_order(meta)
    return _broadcast(meta) or list(order) != sorted(order)


def _broadcast(meta: TensorMeta) -> bool:
    """Broadcast over a dim of size > 1 (stride 0: ``expand``)."""
    return any(n > 1 and st == 0 for n, st in zip(meta.shape, meta.strides, strict=False))
