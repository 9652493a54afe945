"""What moves data, as the findings rules ask it: inputs whose memory runs along the channels,
copies that reorder memory, in-place writes, weights computed in forward. Pure functions of
the node records."""

from __future__ import annotations

from collections.abc import Sequence

from ..channels import (
    broadcast_across,
    channels_relaid,
    conv_layout,
    conv_relays,
    moves_into,
    relaid_weight,
    relay_bytes,
    runs_otherwise,
)
from ..dtypes import casts_first
from ..layout import (
    channel_dims,
    channels_innermost,
    leans_channels_last,
    memory_order,
    nchw_side,
    reorders,
)
from ..records import ALLOCATING_OPS, GEMM_OPS, FindingKind, Layout, NodeInput, NodeRecord, TensorMeta
from ..records.kinds import in_place_name
from .origin import SKIP_OPS, channels_last_ordered, dense, from_parameters_only, split_channels

__all__ = [
    "allocates",
    "aten_op",
    "baselined",
    "channels_source",
    "computed_weight",
    "converted_weight",
    "copies_into",
    "data_inputs",
    "mixed_bytes",
    "moved_bytes",
    "other_side",
    "relaid_views",
    "reorder_bytes",
    "reordered",
    "revert_bytes",
    "strided_across",
    "writes_in_place",
]


def allocates(r: NodeRecord) -> bool:
    """An allocation (``zeros_like``, ``new_zeros``): reads no data, moves none (its reader judges it)."""
    return r.op_name in ALLOCATING_OPS or aten_op(r) in ALLOCATING_OPS


def aten_op(r: NodeRecord) -> str:
    """The ATen op an ATen-level record ran (``aten.new_empty.default``: ``new_empty``), which the
    eager capture names by the call the model made (``pad``, ``setitem``); '' for other records."""
    parts = r.target.split(".")
    return parts[-2] if len(parts) > 2 and "aten" in parts[:-2] else ""


def baselined(kind: FindingKind, *, hidden: bool = False) -> bool:
    """Charged only what channels_last adds over the NCHW baseline (``nchw_bytes``): reverts,
    mixed ops, conversions (a convolution re-lays a transposed map in NCHW too; the NCHW model makes
    the copy a ``.contiguous(memory_format=...)`` in its forward asks for) and the layout changes a
    node makes inside (``hidden``: a matmul clones a transposed operand in NCHW too). A repair's
    own conversions have no baseline (new nodes): ``AuditReport.repaired`` charges them whole."""
    return hidden or kind in (FindingKind.REVERT, FindingKind.MIXED, FindingKind.CONVERSION)


def channels_source(i: NodeInput, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> bool:
    """An input whose memory runs along the channels of the NCHW output it was copied into
    (at the same shape, through a reshape that merges dims into the channels, or a map stack
    reduced over its stacking dim, 3D maps' too; for a view above rank 5, :func:`split_channels`), or an
    ambiguous input whose strides lean channels_last (kernels follow them). Not one that holds
    one dim in memory (an index of N x C x 1 x 1 expanded to the map), nor N then C only (a pooled
    map broadcast over it, as NCHW orders them): it has no order to change."""
    if len(held := [d for d in memory_order(i.meta) if i.meta.strides[d] != 0]) < 2 or held == [0, 1]:
        return False
    if leans_channels_last(i.meta) or channels_innermost(i.meta):
        return True
    reduced = bool(reverted) and i.meta.rank - reverted[0].rank in (0, 1) and i.meta.numel != reverted[0].numel
    shape = i.meta.shape  # the dims whose removal gives the output's shape (reduced over one of them)
    ways = {d for d in range(i.meta.rank) if reverted and shape[:d] + shape[d + 1 :] == reverted[0].shape}
    one = any(shape[d] == 1 for d in ways)  # a stack of one map reduced over the stack's dim (monai RegUNet)
    if i.meta.rank > 5 and not (reduced or one):
        # element for element: a reshape may keep the channels innermost (MaxViT)
        same = bool(reverted) and reverted[0].shape == i.meta.shape
        return same and channels_innermost(i.meta, split_channels(i, by_name) - {reverted[0].rank - 1})
    channels = channel_dims(i.meta, reverted[0]) if reverted else None
    either = channel_dims(i.meta, reverted[0], either=True) if reverted and channels is None else None
    if either and either <= (split := split_channels(i, by_name)):
        channels = split  # N x G x C/G x H x W with G == C/G reduced over either: the shapes cannot say which
    if channels is not None and reduced:  # a mean over a channel group too
        split = split_channels(i, by_name)  # (diffusers' AutoencoderDC: unflatten(1, (-1, 2)).mean(2))
        # or over the groups, keeping their dim: N x 1 x C/G x H x W holds channels in dim 2
        kept = i.meta.rank == reverted[0].rank and any(reverted[0].shape[d] > 1 for d in split)
        if reverted[0].shape[1] > 1 or kept:
            channels |= split
    return channels is not None and channels_innermost(i.meta, channels)


_UNNAMED = (Layout.STRIDED, Layout.NOT_SPATIAL)  # in no format: a 4D/5D view, or one above rank 5
_FORMATS = (Layout.CHANNELS_LAST, Layout.CONTIGUOUS)  # the two a layout change is between


def relaid_views(r: NodeRecord, by_name: dict[str, NodeRecord]) -> list[NodeInput]:
    """The inputs ``r`` writes with a channels_last map's channels moved out of the innermost
    place, read through a view that no format flag calls channels_last (:mod:`nhwc_audit.channels`:
    LocalResponseNorm pads an N x 1 x C x H x W view of its NHWC input into row-major order). Not
    at a convolution or a matmul, which compute their output (their relays are their own rules)."""
    if r.aliases_input or not r.outputs or r.convolves_or_multiplies:
        return []
    out = r.outputs[0]
    return [
        i
        for i in r.activation_inputs
        if i.meta.layout in _UNNAMED and i.meta.rank >= 4 and channels_relaid(i.meta, split_channels(i, by_name), out)
    ]


def computed_weight(r: NodeRecord, nchw_in: list[NodeInput], by_name: dict[str, NodeRecord]) -> NodeInput | None:
    """For a convolution: its NCHW input that is a weight computed in forward from parameters
    only (weight standardisation: batch_norm over the reshaped weight, then reshape_as)."""
    if not r.convolves:
        return None
    return next((i for i in nchw_in if not i.is_param and _from_parameters(i, by_name)), None)


def _from_parameters(i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """``i`` is computed in forward from parameters and buffers only (no model input upstream)."""
    producer = by_name.get(i.producer or "")
    return producer is not None and from_parameters_only(producer, by_name)


def converted_weight(r: NodeRecord, i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """For a convolution: ``i``, its weight (the operand after the input), is computed in forward
    from parameters only and channels_last, as the conversion lays weights out (autocast's cast of
    the weight, which the eager capture records as an op of its own): a weight, not an activation
    that disagrees with another."""
    if not r.convolves or i.meta.layout is not Layout.CHANNELS_LAST:
        return False
    if len(r.inputs) < 2 or r.inputs[1] is not i:  # the weight, after the input (a constant map is data)
        return False
    return _from_parameters(i, by_name)


def conv_ins(r: NodeRecord) -> tuple[TensorMeta, ...]:  # what a conv kernel picks its format by
    return tuple(i.meta for i in r.inputs[:2])


def data_inputs(r: NodeRecord, stored: frozenset[str] | None = frozenset()) -> tuple[NodeInput, ...]:
    """The inputs an op reads as data, in their own layouts: its activations, and its stored tensors,
    but a convolution's weight (``stored`` None, the channels_last run: any it left NCHW, a constant
    or a plain attribute, is re-laid every call; else those of these producers). ``model.to(...)``
    restrides every 4D parameter and buffer, so one that holds tokens (timm NesT's position embedding,
    added to a row-major token map) is read across layouts on every call; a graph's tensor constant was
    made in forward, NCHW (``x + torch.ones(...)``). Only inputs read element for element with the output:
    its shape but for the channels (a cat) and broadcast dims; a grid_sample grid holds coordinates."""
    if r.convolves:
        cl = r.outputs[0] if r.outputs and conv_layout(r.outputs[0], conv_ins(r)) is Layout.CHANNELS_LAST else None
        ws = [i for i in r.inputs[1:2] if i.is_param and cl and relaid_weight(i.meta, cl, conv_ins(r))]
        held = r.inputs[:1] if r.inputs and r.inputs[0].is_param else ()  # a stored tensor convolved (made in forward)
        return (*held, *r.activation_inputs, *(i for i in ws if stored is None or i.producer in stored))
    outs = r.spatial_outputs
    if not outs:
        return r.inputs
    if "index_put" in (r.op_name.rstrip("_"), aten_op(r).rstrip("_")):  # ``buf[idx] = y``: y fills indexed rows
        return tuple(i for i in r.inputs if i.meta.rank == outs[0].rank)
    return tuple(i for i in r.inputs if _elementwise(i.meta.shape, outs[0].shape))


def _elementwise(s: tuple[int, ...], out: tuple[int, ...]) -> bool:
    return len(s) == len(out) and all(d == 1 or a in (b, 1) for d, (a, b) in enumerate(zip(s, out, strict=True)))


def revert_bytes(
    r: NodeRecord, sources: list[NodeInput], reverted: list[TensorMeta], alike: Sequence[NodeInput] = ()
) -> int:
    """Bytes a revert moves: each input whose memory runs along the channels (``sources``, not one
    laid alike in both, :func:`~nhwc_audit.channels.moves_into`) brought into the NCHW output's order,
    read and written. A convolution re-lays its whole input (a CPU Conv3d from 45 to 64 channels its
    45-channel input); any other op moves the smaller of the input and the output (a cat only its
    channels_last operands). The output is the first one reverted (not ``topk``'s indices). A node
    whose ops transposed an intermediate into it (``torch.fft.fft2`` of a real map: ATen casts it to
    complex, channels_last, then transposes that) is charged what they moved (its hidden relays, the
    reorders of a view in no format among them: gumbel_softmax of channel groups, its noise and softmax);
    one whose copies moved less, no more (a circular pad cropping W). ``alike``: inputs laid alike in
    either layout that the op re-lays too (a transposed view cat with a map), counted up to what the
    node moves in NCHW (:attr:`NodeRecord.nchw_bytes`, taken off after): that baseline holds their
    moves, so without them the sources' would be netted against them (4,096 B where eager moves 6,144)."""
    if not reverted:
        return 0
    out = reverted[0]
    inner = [h for h in r.hidden if h.computed and h.shape == out.shape and (h.layout_in in _FORMATS or h.reorder)]
    if inner:
        return sum(h.bytes for h in inner)
    held = [i.meta.shape for i in r.inputs if 0 not in i.meta.strides]  # (an expanded map stores less)
    if any(not h.reorder and h.op != "_to_copy" and h.shape in held for h in r.hidden):
        # it copied inputs whole, then computed from the copies (roi_align's input.contiguous()):
        # what it copied (the NCHW baseline's own copies are taken off as for any node); a cast
        # (``_to_copy``) is the node's own op, charged as any revert
        return sum(h.bytes for h in r.hidden)
    conv, first = r.convolves, casts_first(r)
    total = sum(relay_bytes(i.meta, out, conv=conv, cast_first=first) for i in sources if moves_into(i.meta, out))
    again = [i for i in alike if not i.is_param and i.meta.rank == out.rank and runs_otherwise(i.meta, out)]
    same = sum(relay_bytes(i.meta, out, conv=conv, cast_first=first) for i in again)
    total += min(same, r.nchw_bytes)
    copies = [h.bytes for h in r.hidden if not h.reorder]
    return min(total, sum(copies)) if copies else total


def reordered(r: NodeRecord, out: TensorMeta, by_name: dict[str, NodeRecord]) -> bool:
    """``out`` is dense in another dim order than a channels_last input it was written from, the
    channels innermost still (an index along H writes N x W x H x C): channels_last is left, as
    by a copy to NCHW. Not at a convolution or a matmul, which compute their output's layout. A
    stack of batch-1 maps at dim 0 is ambiguous by the 5D rule (its dim 1 is the maps' batch),
    and so is a reduction over the groups of a channel-group view that keeps its dim (N x 1 x
    C/G x H x W, read from a view whose channels, :func:`split_channels`, are innermost)."""
    odd = out.layout in (Layout.STRIDED, Layout.AMBIGUOUS) and not r.convolves_or_multiplies
    if not odd or r.aliases_input or not dense(out):
        return False
    return any(channels_last_ordered(i, by_name) and reorders(i.meta, out) for i in r.activation_inputs)


def mixed_bytes(r: NodeRecord, losers: list[NodeInput]) -> int:
    """Bytes a mixed op moves reading ``losers`` across layouts: each brought into its output's
    layout as :func:`~nhwc_audit.channels.relay_bytes` counts it (a scatter of an 8-channel map into
    a 4-channel buffer moves at most the buffer)."""
    if not r.outputs:
        return 2 * sum(i.meta.nbytes for i in losers)
    conv, first = r.convolves, casts_first(r)
    return sum(relay_bytes(i.meta, r.outputs[0], conv=conv, cast_first=first) for i in losers)


def reorder_bytes(r: NodeRecord) -> int:
    """Bytes a node moves reordering memory: each activation it copies (a reshape's too) or
    stored tensor it reads element for element (:func:`data_inputs`: timm volo adds its position
    embedding to a permuted map) into another dim order, as ``relay_bytes`` counts it
    (:func:`~nhwc_audit.layout.reorders`: any permutation, not only NHWC <-> NCHW); a
    convolution, twice its input when that is not laid out as its output (the kernel re-lays it:
    a map transposed to N x W x H x C is copied in either layout). The NCHW baseline's measure of
    the copies a model makes in either layout."""
    if r.op in SKIP_OPS or not r.outputs or allocates(r) or 0 in r.outputs[0].strides or r.op_name.lower() in GEMM_OPS:
        return 0  # a broadcast output is an ``expand`` (a view); a GEMM reads a transposed operand as it is
    if r.aliases_input and not writes_in_place(r):
        return 0  # a view; ``y.add_(t)`` reads ``t`` into ``y``'s order
    out = r.outputs[0]
    act = r.activation_inputs[0] if r.activation_inputs else None
    if r.convolves and act is not None and act.meta.is_spatial and out.is_spatial:
        # and a weight computed in forward: diffusers' FIR upsampler transposes it (re-laid in NCHW too)
        kin = conv_ins(r)
        w = [i.meta for i in r.inputs[1:2] if not i.is_param and i is not act and relaid_weight(i.meta, out, kin)]
        return 2 * (act.meta.nbytes if conv_relays(act.meta, out, kin) else 0) + 2 * sum(m.nbytes for m in w)
    ins = (
        r.activation_inputs[1:]
        if r.aliases_input
        else (*r.activation_inputs, *(i for i in data_inputs(r) if i.is_param))
    )
    cast = casts_first(r)
    return sum(relay_bytes(i.meta, out, conv=False, cast_first=cast) for i in ins if reorders(i.meta, out))


def read_across(r: NodeRecord) -> list[NodeInput]:
    """The operands an element-for-element op (no convolution or GEMM) reads in another dense
    order than it writes (:func:`~nhwc_audit.layout.reorders`; densenet's cats decided by labels)."""
    if r.convolves_or_multiplies or not r.outputs or r.aliases_input:
        return []
    out = r.outputs[0]
    if out.layout in _FORMATS and all(i.meta.layout is out.layout and i.meta.rank == out.rank for i in r.inputs):
        return []  # one dense order throughout: no sort
    return [i for i in data_inputs(r) if reorders(i.meta, out)]  # a graph's constant made in forward too


def strided_across(r: NodeRecord) -> list[NodeInput]:
    """The operands in a dense order no layout names that ``r`` reads across (:func:`read_across`):
    ``torch.where(nchw_mask, x, x.mT)`` writing NCHW reads ``x.mT`` across as well as ``x``."""
    return [i for i in read_across(r) if i.meta.layout is Layout.STRIDED]


def moved_bytes(r: NodeRecord) -> int:
    """What a node moves in either layout: its reorders (:func:`reorder_bytes`) or the copies it
    makes inside, whichever is more; the NCHW baseline's measure, in both runs alike."""
    return max(reorder_bytes(r), sum(h.bytes for h in r.hidden))


def other_side(r: NodeRecord, i: NodeInput) -> bool:
    """``i`` is read across layouts by a kernel writing channels_last: on the NCHW side of a
    transpose (:func:`~nhwc_audit.layout.nchw_side`), or strided in another dim order than a
    channels_last output, or than any a convolution writes (it re-lays its whole input): a map
    permuted to N x W x C x H, or indexed along H into N x W x H x C; not a one-channel slice."""
    out = r.outputs[0] if r.outputs else None
    if 0 in i.meta.strides:  # broadcast (``ctx.expand_as(v)``): across where the dims it holds run otherwise
        return out is not None and broadcast_across(i.meta, out)
    if nchw_side(i.meta):
        return True
    if out is None or i.meta.layout is not Layout.STRIDED:
        return False
    if out.layout is not Layout.CHANNELS_LAST and not r.convolves:
        return False
    # y[:, ::2] runs along the channels; y[:, :1] has no run to leave
    return conv_relays(i.meta, out, conv_ins(r)) if r.convolves else runs_otherwise(i.meta, out)


def writes_in_place(r: NodeRecord) -> bool:
    """An in-place op other than a copy (``add_``, ``mul_``: ``out += skip`` under torch.export
    or eager capture, ``y[idx] += 1``'s ``index_put_``, which the eager capture names ``setitem``;
    ``ReLU(inplace=True)``, as the run saw it write): it reads its other
    operands in the written tensor's layout, so mixed layouts move data as they do out of place.
    ``copy_`` is a copy (the hidden-copy rule)."""
    return not copies_into(r) and (r.in_place or in_place_name(r.op_name) or in_place_name(aten_op(r)))


def copies_into(r: NodeRecord) -> bool:
    """``buf[...].copy_(x)``, or ``buf[...] = x`` (the eager capture names the ATen ``copy_`` by
    the call the model made, ``setitem``): a copy into an existing tensor, charged what it re-lays."""
    return r.op_name == "copy_" or aten_op(r) == "copy_"
