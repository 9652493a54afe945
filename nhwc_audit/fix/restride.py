"""``restride-ambiguous``: an op that makes an NCHW map out of ambiguous input only gets that input
restrided to channels_last first.

A map of one channel, or of 1 x 1 spatial size, is dense in both orders; the ops after it pick their
output's layout by its strides, and NCHW-order strides make them write NCHW (torchvision's and smp's
DeepLabV3 ASPP pooling branch upsamples a pooled 1 x 1 map so, and the cat and the projection after
it follow). ``x.to(memory_format=torch.channels_last)`` restrides such a tensor, a copy of that small
tensor (``.contiguous(memory_format=...)`` hands an ambiguous tensor back as it is); the values are
the same, so the math is.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx
from torch.fx.node import map_arg

from ..analyze.analysis import Analysis
from ..analyze.origin import only_ambiguous_inputs
from ..prepare.copy import memory_format_for_rank
from ..records import Layout, NodeRecord
from .matched import find_node

__all__ = ["ambiguous_origins", "restride_inputs"]


def ambiguous_origins(records: list[NodeRecord], analysis: Analysis) -> Iterator[tuple[NodeRecord, dict[str, int]]]:
    """The origins of the findings, in graph order, which made an NCHW map out of ambiguous input
    only, each with the producers of those inputs and their ranks."""
    by_name = {r.name: r for r in records}
    seen: set[str] = set()
    for f in analysis.findings:
        r = by_name.get(f.origin or "")
        if r is None or r.name in seen or r.op in ("placeholder", "get_attr") or not only_ambiguous_inputs(r):
            continue
        seen.add(r.name)
        made = r.spatial_outputs
        producers = {i.producer: i.meta.rank for i in r.spatial_inputs if i.producer and not i.is_param}
        if made and made[0].layout is Layout.CONTIGUOUS and producers:
            yield r, producers


def restride_inputs(gm: torch.fx.GraphModule, *, name: str, producers: dict[str, int]) -> None:
    """Read the node ``name``'s inputs made by ``producers`` (name -> rank) through
    ``.to(memory_format=...)``: channels_last for a map, channels_last_3d for a volume."""
    n = find_node(gm, name)
    made: dict[torch.fx.Node, torch.fx.Node] = {}

    def restrided(a: torch.fx.Node) -> torch.fx.Node:
        if a.name not in producers:
            return a
        if a not in made:
            with gm.graph.inserting_before(n):
                fmt = memory_format_for_rank(producers[a.name])
                made[a] = gm.graph.call_method("to", (a,), {"memory_format": fmt})
        return made[a]

    n.args, n.kwargs = map_arg(n.args, restrided), map_arg(n.kwargs, restrided)
