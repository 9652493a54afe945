"""What moves data, as the findings rules ask it: inputs whose memory runs along the channels,
copies that reorder memory, in-place writes, weights computed in forward. Pure functions of
the node records."""

from __future__ import annotations

from ..layout import (
    channel_dims,
    channels_innermost,
    leans_channels_last,
    memory_order,
    nchw_side,
    relay_bytes,
    reorders,
)
from ..records import ALLOCATING_OPS, CONV_OPS, FindingKind, Layout, NodeInput, NodeRecord, TensorMeta
from .origin import SKIP_OPS, from_parameters_only

__all__ = [
    "allocates",
    "baselined",
    "channels_source",
    "computed_weight",
    "converted_weight",
    "data_inputs",
    "exits_spatial",
    "other_side",
    "reorder_bytes",
    "revert_bytes",
    "split_channels",
    "viewed_as",
    "writes_in_place",
]


def allocates(r: NodeRecord) -> bool:
    """An allocation (``zeros_like``, ``new_zeros``): it reads no data, so it moves none, in
    whatever layout it makes its result; an op that reads that result judges it."""
    return r.op_name in ALLOCATING_OPS


def baselined(kind: FindingKind, op: str, *, hidden: bool = False) -> bool:
    """Charged only what channels_last adds over the NCHW baseline (``nchw_bytes``): reverts,
    mixed ops, a convolution's conversion (it re-lays a transposed map in NCHW too) and the
    layout changes a node makes inside (``hidden``: a matmul clones a transposed operand in NCHW
    too); not a conversion the model or a repair asks for (``.contiguous(memory_format=...)``)."""
    return (
        hidden
        or kind in (FindingKind.REVERT, FindingKind.MIXED)
        or (kind is FindingKind.CONVERSION and op.lower() in CONV_OPS)
    )


def channels_source(i: NodeInput, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> bool:
    """An input whose memory runs along the channels of the NCHW output it was copied into
    (at the same shape, through a reshape that merges dims into the channels, or a map stack
    reduced over its stacking dim; for a view above rank 5, :func:`split_channels`), or an
    ambiguous input whose strides lean channels_last (kernels follow them)."""
    if leans_channels_last(i.meta) or channels_innermost(i.meta):
        return True
    if i.meta.rank > 5:  # element for element only: a reshape may keep the channels innermost (MaxViT)
        same = bool(reverted) and reverted[0].shape == i.meta.shape
        return same and channels_innermost(i.meta, split_channels(i, by_name) - {reverted[0].rank - 1})
    channels = channel_dims(i.meta, reverted[0]) if reverted else None
    return channels is not None and channels_innermost(i.meta, channels)


def split_channels(i: NodeInput, by_name: dict[str, NodeRecord]) -> frozenset[int]:
    """The dims of ``i`` that hold the channels of the channels_last map it views, through
    views only (torchvision RAFT's ``mask.view(N, 1, 9, 8, 8, H, W)`` of an N x 576 x H x W
    map: dims 2-4): those strided below every other dim of the map (its channels are
    innermost); none when ``i`` is no view of a channels_last map."""
    node = by_name.get(i.producer or "")
    while node is not None and node.aliases_input and node.activation_inputs:
        src = node.activation_inputs[0].meta
        if src.is_spatial:
            if src.layout is not Layout.CHANNELS_LAST:
                break
            below = min(st for d, (n, st) in enumerate(zip(src.shape, src.strides, strict=True)) if d != 1 and n > 1)
            return frozenset(
                d
                for d, (n, st) in enumerate(zip(i.meta.shape, i.meta.strides, strict=True))
                if n > 1 and 0 < st < below
            )
        node = by_name.get(node.activation_inputs[0].producer or "")
    return frozenset()


def computed_weight(r: NodeRecord, nchw_in: list[NodeInput], by_name: dict[str, NodeRecord]) -> NodeInput | None:
    """For a convolution: its NCHW input that is a weight computed in forward from parameters
    only (weight standardisation: batch_norm over the reshaped weight, then reshape_as)."""
    if r.op_name.lower() not in CONV_OPS:
        return None
    return next((i for i in nchw_in if _from_parameters(i, by_name)), None)


def _from_parameters(i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """``i`` is computed in forward from parameters and buffers only (no model input upstream)."""
    producer = by_name.get(i.producer or "")
    return producer is not None and from_parameters_only(producer, by_name)


def converted_weight(r: NodeRecord, i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """For a convolution: ``i``, its weight (the operand after the input), is computed in forward
    from parameters only and channels_last, as the conversion lays weights out (autocast's cast of
    the weight, which the eager capture records as an op of its own): a weight, not an activation
    that disagrees with another."""
    if r.op_name.lower() not in CONV_OPS or i.meta.layout is not Layout.CHANNELS_LAST:
        return False
    if len(r.inputs) < 2 or r.inputs[1] is not i:  # the weight, after the input (a constant map is data)
        return False
    return _from_parameters(i, by_name)


def data_inputs(r: NodeRecord) -> tuple[NodeInput, ...]:
    """The inputs an op reads as data, in their own layouts: its activations, and its
    parameters, buffers and tensor constants unless it is a convolution (whose weight the
    weight rules judge). ``model.to(memory_format=torch.channels_last)`` restrides every 4D
    parameter and buffer, so one that holds tokens (timm NesT's position embedding, added to a
    row-major token map) is read across layouts on every call; a tensor a graph holds as a
    constant was made in forward, NCHW (``x + torch.ones(...)``). Only inputs read element for
    element with the output: its shape but for the channels (a cat) and broadcast dims; a
    sampling grid (``grid_sample``'s N x H x W x 2) holds coordinates, not a map."""
    if r.op_name.lower() in CONV_OPS:
        return r.activation_inputs
    outs = r.spatial_outputs
    if not outs:
        return r.inputs
    return tuple(i for i in r.inputs if _elementwise(i.meta, outs[0]))


def _elementwise(t: TensorMeta, out: TensorMeta) -> bool:
    return t.rank == out.rank and all(
        d == 1 or a in (b, 1) for d, (a, b) in enumerate(zip(t.shape, out.shape, strict=True))
    )


def revert_bytes(r: NodeRecord, sources: list[NodeInput], reverted: list[TensorMeta]) -> int:
    """Bytes a revert moves: each input whose memory runs along the channels (``sources``)
    brought into the NCHW output's order, read and written. A convolution re-lays its whole
    input (the kernel makes it contiguous, then computes: a CPU Conv3d from 45 to 64 channels
    moves its 45-channel input); any other op moves the smaller of the input and the output
    (a cat moves only its channels_last operands; a reduction over a stack, only its result).
    The output is the first one reverted: the values of an op that also returns indices
    (``topk``, a max pool's ``return_indices``), which are computed, not moved. A node
    whose ops transposed an intermediate into that output (``torch.fft.fft2`` of a real map:
    ATen casts it to complex, channels_last, then transposes the complex tensor) is charged what
    they moved (its hidden relays)."""
    if not reverted:
        return 0
    inner = [h for h in r.hidden if h.computed and h.shape == reverted[0].shape and h.layout_in is Layout.CHANNELS_LAST]
    if inner:
        return sum(h.bytes for h in inner)
    conv = r.op_name.lower() in CONV_OPS
    return sum(relay_bytes(i.meta, reverted[0], conv=conv) for i in sources)


def reorder_bytes(r: NodeRecord) -> int:
    """Bytes a node moves reordering memory: twice its output when it copies an activation
    (a reshape's too) or a stored tensor read element for element (:func:`data_inputs`: timm volo
    adds its position embedding to a permuted map) into another dim order
    (:func:`~nhwc_audit.layout.reorders`: any permutation, not only NHWC <-> NCHW); a
    convolution, twice its input when that is not laid out as its output (the kernel re-lays it:
    a map transposed to N x W x H x C is copied in either layout). The NCHW baseline's measure of
    the copies a model makes in either layout."""
    if r.op in SKIP_OPS or r.aliases_input or not r.outputs or allocates(r):
        return 0
    out = r.outputs[0]
    act = r.activation_inputs[0] if r.activation_inputs else None
    if r.op_name.lower() in CONV_OPS and act is not None and act.meta.is_spatial and out.is_spatial:
        both = [d for d in range(out.rank) if act.meta.shape[d] > 1 and out.shape[d] > 1]
        relaid = [d for d in memory_order(act.meta) if d in both] != [d for d in memory_order(out) if d in both]
        return 2 * act.meta.nbytes if relaid else 0
    ins = (*r.activation_inputs, *(i for i in data_inputs(r) if i.is_param))
    return 2 * out.nbytes if any(reorders(i.meta, out) for i in ins) else 0


def other_side(r: NodeRecord, i: NodeInput) -> bool:
    """``i`` is read across layouts by a kernel writing channels_last: on the NCHW side of a
    transpose (:func:`~nhwc_audit.layout.nchw_side`), or, into a convolution (which re-lays
    its whole input), strided with its memory running along another dim than the channels (a
    map permuted to N x W x C x H; not a one-channel slice, compacted in either layout)."""
    if nchw_side(i.meta):
        return True
    if r.op_name.lower() not in CONV_OPS or i.meta.layout is not Layout.STRIDED or 0 in i.meta.strides:
        return False
    order = memory_order(i.meta)  # a channel slice with a step (y[:, ::2]) still runs along the channels
    # one channel (``y[:, :1]`` of a channels_last map): no run along the channels to leave; the
    # kernel compacts it, as it compacts a slice of an NCHW map, without changing its order
    return 1 in order and order[-1] != 1


def writes_in_place(r: NodeRecord) -> bool:
    """An in-place op other than a copy (``add_``, ``mul_``: ``out += skip`` under torch.export
    or eager capture; ``ReLU(inplace=True)``, as the run saw it write): it reads its other
    operands in the written tensor's layout, so mixed layouts move data as they do out of place.
    ``copy_`` is a copy (the hidden-copy rule)."""
    name = r.op_name
    if name == "copy_":
        return False
    return r.in_place or (name.endswith("_") and not name.endswith("__"))


_RESHAPE_COPIES = ("clone", "contiguous", "_reshape_copy", "reshape", "flatten")
"""Copies a ``reshape`` that cannot view decomposes into (then ``_unsafe_view``), as ATen names
them or as the eager capture labels them (by the call the model made)."""


def _reshape_view(r: NodeRecord, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> NodeRecord | None:
    """For a copy that keeps its input's shape and whose one user views it as another shape of
    the same size (ATen's ``reshape`` is ``clone`` then ``_unsafe_view``: the eager capture sees
    the copy and the new shape as two ops), that view."""
    if len(r.users) != 1 or not reverted or r.op_name not in _RESHAPE_COPIES:
        return None
    if not any(i.meta.shape == reverted[0].shape for i in r.activation_inputs):
        return None
    user = by_name.get(r.users[0])
    if user is None or not user.aliases_input or not user.outputs:
        return None
    return user if user.outputs[0].numel == reverted[0].numel else None


def viewed_as(r: NodeRecord, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> list[TensorMeta]:
    """The shape a copy is read as: its own, or, for the copy of a reshape to another spatial
    shape (:func:`_reshape_view`), that one (a graph's ``reshape`` node already has its shape)."""
    user = _reshape_view(r, reverted, by_name)
    return [user.outputs[0]] if user is not None and user.outputs[0].is_spatial else reverted


def exits_spatial(r: NodeRecord, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> bool:
    """The copy of one reshape call out of the spatial ranks (``torch.flatten(x, 1)`` before a
    classifier, as the eager capture records it: a copy, then a view to 2D, both made by that
    call, at its line): an exit, which a graph records as one node with a non-spatial output. A
    copy the model asks for itself (``.contiguous()``) that a later call flattens stays a copy,
    and so does a weight reshaped in forward (weight standardisation: :func:`_reshape_view` reads
    activations only)."""
    user = _reshape_view(r, reverted, by_name)
    return user is not None and not user.outputs[0].is_spatial and user.op_name == r.op_name and user.source == r.source
