"""Where an NCHW tensor started: walking the records back from a finding to the change that
removes it (the root cause the user should edit), and the dataflow graph of the records."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from ..layout import nchw_ordered
from ..records import CONV_OPS, Layout, NodeRecord

__all__ = ["CONV_OPS", "SKIP_OPS", "build_graph", "describe", "from_parameters_only", "origin_of", "via"]

SKIP_OPS = ("placeholder", "get_attr", "output")
"""Graph nodes that are not ops: never findings, never in a region."""


def build_graph(records: Sequence[NodeRecord]) -> nx.DiGraph[str]:
    """The dataflow graph: one node per record (keyed by name), edges producer -> user."""
    g: nx.DiGraph[str] = nx.DiGraph()
    for r in records:
        g.add_node(r.name, index=r.index)
    for r in records:
        for u in r.users:
            g.add_edge(r.name, u)
    return g


def origin_of(start: NodeRecord | None, by_name: dict[str, NodeRecord]) -> NodeRecord | None:
    """Walk back from an NCHW tensor's producer to the node where NCHW started: the first
    node (following each node's first NCHW activation input) that did not get NCHW input."""
    r = start
    seen: set[str] = set()
    while r is not None and r.name not in seen:
        seen.add(r.name)
        nchw = [
            i
            for i in r.spatial_inputs
            if i.meta.layout is Layout.CONTIGUOUS or (i.meta.layout is Layout.STRIDED and nchw_ordered(i.meta))
        ]
        if not nchw or r.op == "placeholder":
            return r
        nxt = by_name.get(nchw[0].producer or "")
        if nxt is None or nxt.op in SKIP_OPS:
            return r
        r = nxt
    return r


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
    """``r`` computes from parameters and buffers only: no model input upstream of it."""
    stack, seen = [r], set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "placeholder":
            return False
        for i in node.inputs:
            if i.producer is not None and i.producer in by_name:
                stack.append(by_name[i.producer])
    return True
