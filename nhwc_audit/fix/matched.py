"""What a rewrite matches: a graph node by name, and the node and the record of each finding of a kind."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx

from ..analyze.analysis import Analysis
from ..records import FindingKind, NodeRecord

__all__ = ["find_node", "found"]


def find_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """The node of ``gm`` named ``name`` (KeyError: none)."""
    for n in gm.graph.nodes:
        if n.name == name:
            node: torch.fx.Node = n
            return node
    raise KeyError(name)


def found(
    gm: torch.fx.GraphModule, records: list[NodeRecord], analysis: Analysis, kind: FindingKind
) -> Iterator[tuple[torch.fx.Node, NodeRecord]]:
    """The node of ``gm`` and the record of each finding of ``kind``, in the findings' order."""
    by_name = {r.name: r for r in records}
    nodes = {n.name: n for n in gm.graph.nodes}
    for f in analysis.findings:
        n, r = nodes.get(f.node), by_name.get(f.node)
        if f.kind is kind and n is not None and r is not None:
            yield n, r
