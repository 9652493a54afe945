"""Where an NCHW tensor started: walking the records back from a finding to the change that
removes it (the root cause the user should edit), and the dataflow graph of the records."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from ..channels import view_channels
from ..layout import channels_innermost, is_dense_in_order, memory_order, nchw_ordered, row_major
from ..records import Layout, NodeInput, NodeRecord, TensorMeta

__all__ = [
    "channels_last_ordered",
    "sliced_channels_last",
    "SKIP_OPS",
    "build_graph",
    "conversion_free",
    "describe",
    "disagreeing",
    "feeds_a_weight",
    "from_parameters_only",
    "dense",
    "odd_order_from_map",
    "only_ambiguous_inputs",
    "origin_of",
    "split_channels",
    "via",
]

SKIP_OPS = ("placeholder", "get_attr", "output")
"""Graph nodes that are not ops: never findings, never in a region."""


def build_graph(records: Sequence[NodeRecord]) -> nx.DiGraph[str]:
    """The dataflow graph of ``records``: one node per record (keyed by name), edges producer ->
    user among them (the subgraph they induce, where they are some of a run's records)."""
    g: nx.DiGraph[str] = nx.DiGraph()
    for r in records:
        g.add_node(r.name, index=r.index)
    for r in records:
        g.add_edges_from((r.name, u) for u in r.users if u in g)
    return g


def only_ambiguous_inputs(r: NodeRecord) -> bool:
    """The node's spatial inputs are all ambiguous (C == 1 or H == W == 1: dense in both orders), so
    their strides alone chose the layout it made (an op that makes NCHW from them is a finding's
    origin that ``.to(memory_format=...)`` on its input fixes)."""
    return bool(ins := r.spatial_inputs) and all(i.meta.layout is Layout.AMBIGUOUS for i in ins)


def origin_of(start: NodeRecord | None, by_name: dict[str, NodeRecord]) -> NodeRecord | None:
    """Walk back from an NCHW tensor's producer to the node where NCHW started: the first
    node (following each node's first NCHW activation input, and in an eager capture the ops of
    one torch call) that did not get NCHW input."""
    r = start
    seen: set[str] = set()
    while r is not None and r.name not in seen:
        seen.add(r.name)
        nchw = [
            i
            for i in r.spatial_inputs
            if i.meta.layout is Layout.CONTIGUOUS or (i.meta.layout is Layout.STRIDED and nchw_ordered(i.meta))
        ]
        if not nchw and not r.spatial_inputs and r.call is not None:
            # an eager capture's op on the flat view a torch call made (a Linear's mm and
            # _unsafe_view of a 4D input): the call's ops are one node of a graph, go on inside it
            inside = [by_name.get(i.producer or "") for i in r.activation_inputs]
            nxt = next((p for p in inside if p is not None and p.call == r.call), None)
            if nxt is not None:
                r = nxt
                continue
        if not nchw or r.op == "placeholder":
            return r
        nxt = by_name.get(nchw[0].producer or "")
        if nxt is None or nxt.op in SKIP_OPS:
            return r
        r = nxt
    return r


def disagreeing(
    r: NodeRecord, cl_in: list[NodeInput], nchw_in: list[NodeInput], sources: list[NodeInput]
) -> tuple[list[NodeInput], list[NodeInput]]:
    """``(roots, losers)`` of a node that reverted because its inputs disagree in layout and it
    followed the NCHW one: mixed, not an op without an NHWC kernel. An NCHW-ordered slice (dense in
    no order) read with channels_last inputs (``cl_in``, the losers); or a slice of an NHWC map
    (among ``sources``, what the node moved out of channels order: the losers) read with an NCHW
    activation (``nchw_in``; timm CSP's cat of a split half and a ``.contiguous()`` branch). Empty
    lists where neither holds."""
    if cl_in:
        return [i for i in r.spatial_inputs if i.meta.layout is Layout.STRIDED and nchw_ordered(i.meta)], cl_in
    sliced = [i for i in sources if sliced_channels_last(i.meta)]
    roots = [i for i in nchw_in if not i.is_param] if sliced else []
    return roots, sliced if roots else []


def via(origin: NodeRecord | None, producer: NodeRecord | None) -> str | None:
    if origin is None:
        return None
    text = f"{origin.name} ({describe(origin)})"
    if producer is not None and producer.name != origin.name:
        text += f", via {producer.name}"
    return text


def describe(r: NodeRecord) -> str:
    op = r.op_label
    return f"{op} at {r.location}" if r.location else op


def from_parameters_only(r: NodeRecord, by_name: dict[str, NodeRecord]) -> bool:
    """``r`` computes from parameters and buffers only: no model input upstream of it (a
    placeholder, or in an eager capture an input that is no parameter and has no producer)."""
    stack, seen = [r], set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "placeholder":
            return False
        for i in node.inputs:
            if i.producer is None and not i.is_param:
                return False  # the model's input, as an eager capture records it
            if i.producer is not None and i.producer in by_name:
                stack.append(by_name[i.producer])
    return True


def feeds_a_weight(r: NodeRecord, by_name: dict[str, NodeRecord], hops: int = 8) -> bool:
    """``r``'s output becomes a convolution's weight within ``hops`` ops (weight standardisation:
    reshape, batch_norm, reshape_as, then the conv), not data (a 4D table of coordinates a Linear
    reads)."""
    frontier, seen = [r], {r.name}
    for _ in range(hops):
        nxt = []
        for node in frontier:
            for user in (by_name.get(u) for u in node.users):
                if user is None or user.name in seen:
                    continue
                if user.convolves:
                    if len(user.inputs) > 1 and user.inputs[1].producer == node.name:
                        return True
                    continue  # data of a conv: its output is an activation
                seen.add(user.name)
                nxt.append(user)
        frontier = nxt
    return False


def conversion_free(records: Sequence[NodeRecord]) -> frozenset[str]:
    """The records the conversion leaves as they are: computed from parameters, buffers and
    constants only, none of them 4D or 5D (``.to(memory_format=...)`` restrides those, even one
    dense in both orders: a (1, C, 1, 1) scale, a 1x1 conv's weight), with no model input
    upstream; their layouts are those of the model run NCHW (a relative-position bias table
    indexed and permuted to (1, heads, N, N) has channels_last strides in both), so what they do
    is not the conversion's. ``records`` in graph order."""
    free: set[str] = set()
    for r in records:
        if r.op == "placeholder":
            continue
        if r.op == "get_attr":
            kept = all(o.rank not in (4, 5) for o in r.outputs)
        else:  # an input with no producer is a parameter or buffer, else the model's input (eager)
            kept = all(
                i.producer in free if i.producer is not None else i.is_param and i.meta.rank not in (4, 5)
                for i in r.inputs
            )
        if kept:
            free.add(r.name)
    return frozenset(free)


def split_channels(i: NodeInput, by_name: dict[str, NodeRecord]) -> frozenset[int]:
    """The dims of ``i`` that hold the channels of the channels_last map it views, through
    views and ops that keep a view's strides (torchvision RAFT's ``mask.view(N, 1, 9, 8, 8, H, W)``
    of an N x 576 x H x W map: dims 2-4; diffusers' FIR filters pad a ``reshape(-1, H, W, 1)``
    of the map viewed in 6D): those strided below every other dim of the map (its channels are
    innermost); none when ``i`` is no view of a channels_last map."""
    node = by_name.get(i.producer or "")
    # a view views its first operand (``m.expand_as(x)`` views the buffer ``m``, not ``x``); an op
    # that wrote its first operand's strides (``torch.where(v > 0, v, 0)`` of such a view) kept it
    while node is not None and node.inputs and not node.inputs[0].is_param and _kept_first(node):
        src = node.inputs[0].meta
        if src.layout is Layout.CHANNELS_LAST:
            return view_channels(i.meta, src)
        node = by_name.get(node.inputs[0].producer or "")
    return frozenset()


def sliced_channels_last(meta: TensorMeta, channels: frozenset[int] = frozenset({1})) -> bool:
    """A view of a channels_last map dense in no order, its ``channels`` innermost: a channel slice
    of an NHWC map (``chunk``, ``split``), a channel shuffle's 5D view of one."""
    return meta.layout is Layout.STRIDED and channels_innermost(meta, channels)


def channels_last_ordered(i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """``i`` is channels_last, or a view of a channels_last map with its channels innermost."""
    if i.meta.layout is Layout.CHANNELS_LAST:
        return True
    return sliced_channels_last(i.meta, split_channels(i, by_name) or frozenset({1}))


def _kept_first(node: NodeRecord) -> bool:
    """``node`` views its first operand, or writes one not row-major in its own shape and
    strides (an element-wise op of a 5D view of a map, a zero pad of a 6D one)."""
    if node.aliases_input:
        return True
    first, out = node.inputs[0].meta, node.outputs[0] if node.outputs else None
    same = out is not None and (out.shape, out.strides) == (first.shape, first.strides)
    rows = tuple(range(first.rank - 1, -1, -1))
    return same and len(first.strides) == first.rank and not is_dense_in_order(first.shape, first.strides, rows)


def dense(meta: TensorMeta) -> bool:
    """Dense in its own memory order: no gap or overlap, whatever the order (a view that skips
    elements, a broadcast, is not)."""
    return is_dense_in_order(meta.shape, meta.strides, memory_order(meta)[::-1])


def odd_order_from_map(i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """``i``'s memory is in an order a channels_last map gave it: the map, a view of it, or what
    an op wrote keeping such a view's order where that order is not row-major (EfficientViT's
    ReLU of a head view), walked back to the map. Heads of a Linear's tokens, or a window of a
    map a model keeps as N x H x W x C itself (Swin), are in the same order in either layout."""
    meta, node = i.meta, by_name.get(i.producer or "")
    while meta.layout is not Layout.CHANNELS_LAST:
        if node is None or not node.inputs or node.inputs[0].is_param:
            return False
        giver = node.inputs[0] if node.aliases_input else _order_giver(node, meta)
        if giver is None:
            return False
        meta, node = giver.meta, by_name.get(giver.producer or "")
    return True


def _order_giver(node: NodeRecord, meta: TensorMeta) -> NodeInput | None:
    """The activation that gave an element-for-element op's output ``meta`` (dense, not row-major)
    its order: one of the same rank not row-major over the dims it holds (where several are, the
    kernel blends their orders: an involution's per-pixel kernel, a view of a channels_last map,
    times the map's row-major 6D patches writes them N x G x C x H x W x taps)."""
    if row_major(meta) or not dense(meta):
        return None
    for inp in node.activation_inputs:
        held = memory_order(inp.meta, held=True)
        if inp.meta.rank == meta.rank and held and held != tuple(sorted(held)):
            return inp
    return None
