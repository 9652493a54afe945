"""A reduction's layout question: does it write the dims it keeps in the order its input holds them?"""

from __future__ import annotations

from ..layout import memory_order
from ..records import Finding, FindingKind, Layout, NodeRecord, TensorMeta
from . import hint_keys as H
from .finding_record import Ctx, make_finding
from .moves import revert_bytes

__all__ = ["reduces_across", "reduction_revert", "revert_hint"]


def reduces_across(r: NodeRecord) -> bool | None:
    """Does a reduction (:attr:`NodeRecord.reduced`) of one map into a map write its kept dims in
    another order than its input holds them? Its kernel then reads across orders (a cost volume
    ``(a.unsqueeze(2) * b.unsqueeze(1)).sum(1)`` of channels_last maps transposes; the same of a product
    whose summed dim is innermost does not). None where that is not the question: no dims known, not
    one 4D/5D input and output."""
    ins = [i for i in r.activation_inputs if i.meta.is_spatial]
    if r.reduced is None or len(ins) != 1 or not r.spatial_outputs:
        return None
    src, out = ins[0].meta, r.outputs[0]
    if out.rank == src.rank:  # keepdim
        place = {d: d for d in range(src.rank) if d not in r.reduced}
    elif out.rank == src.rank - len(r.reduced):
        place = {d: k for k, d in enumerate(d for d in range(src.rank) if d not in r.reduced)}
    else:
        return None
    kept = tuple(place[d] for d in memory_order(src) if d in place and out.shape[place[d]] > 1)
    return kept != memory_order(out)


def reduction_revert(ctx: Ctx, r: NodeRecord) -> Finding:
    """The revert of a reduction that writes its kept dims in another order than its input holds them
    (:func:`reduces_across`): its output read and written, as any revert that leaves a map's order."""
    src = [i for i in r.activation_inputs if i.meta.is_spatial]
    nbytes = revert_bytes(r, src, [r.outputs[0]])
    hint = revert_hint(src[0].meta, r.outputs[0])
    return make_finding(ctx, r, FindingKind.REVERT, layout_in=src[0].meta.layout, nbytes=nbytes, hint_op=hint)


def revert_hint(src: TensorMeta, to: TensorMeta) -> str | None:
    """The hint of a revert from ``src`` into ``to``: the op's own (None) where it leaves a channels_last
    map, or one dense in both orders (C == 1: not a channel-shuffle copy), for a map; else a stack
    reduced (fewer elements, a lower rank) or an N-D transpose (a 6D window reshaped: as many)."""
    if src.layout in (Layout.CHANNELS_LAST, Layout.AMBIGUOUS) and to.is_spatial:
        return None
    return H.STACK_REDUCE if src.rank > to.rank and src.numel > to.numel else H.ND_TRANSPOSE
