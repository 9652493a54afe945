"""``sum-as-adds``: a sum over the stacking dim of a stack of channels_last maps (timm's selective
kernel: ``torch.stack(paths, dim=1)``, weighted, then ``torch.sum(x, dim=1)``) becomes the maps added
one by one (``torch.unbind(x, dim)``, then ``+``).

The stack keeps each map's NHWC strides, so the channels are not the innermost dim of the stacked
tensor and the reduction writes its result in row-major order: an NCHW map the convolution after it
converts back. Each slice the unbind gives is a channels_last map, and an add of channels_last maps
stays channels_last. The sum is the same up to the order of its additions (rounding, which the
repair's check allows).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.fx

from ..analyze.analysis import Analysis
from ..records import FindingKind, NodeRecord
from .matched import find_node, found

__all__ = ["sum_as_adds", "sums_over_stacks"]

_MAX_TERMS = 16
"""A sum over more terms than this is left: the adds would each write a map."""


def _summed_dim(n: torch.fx.Node) -> int | None:
    """The dim a plain ``x.sum(d)`` / ``torch.sum(x, d)`` node reduces (one int, no keepdim, no dtype)."""
    method = n.op == "call_method" and n.target == "sum"
    function = n.op == "call_function" and n.target is torch.sum
    if not (method or function) or len(n.args) > 2 or set(n.kwargs) - {"dim"}:
        return None
    dim = n.args[1] if len(n.args) == 2 else n.kwargs.get("dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return dim if isinstance(dim, int) else None


def sums_over_stacks(
    gm: torch.fx.GraphModule, records: list[NodeRecord], analysis: Analysis
) -> Iterator[tuple[str, int, int]]:
    """The reverts at a sum of a 5D/6D tensor over one dim into a map or a volume, each with that dim
    (non-negative) and its size."""
    for n, r in found(gm, records, analysis, FindingKind.REVERT):
        dim, acts = _summed_dim(n), r.activation_inputs
        if dim is None or not acts or not r.spatial_outputs or acts[0].meta.rank != r.spatial_outputs[0].rank + 1:
            continue
        shape = acts[0].meta.shape
        dim %= len(shape)
        if dim != 0 and 2 <= shape[dim] <= _MAX_TERMS:
            yield n.name, dim, shape[dim]


def sum_as_adds(gm: torch.fx.GraphModule, *, name: str, dim: int, terms: int) -> None:
    """Replace the sum at ``name`` by ``unbind(x, dim)`` and ``terms - 1`` adds, the last of them the
    sum's own node (its name kept: what it moves is charged over the sum's NCHW baseline)."""
    n = find_node(gm, name)
    g = gm.graph
    with g.inserting_before(n):
        parts = g.call_function(torch.unbind, (n.args[0], dim))
        items = [g.call_function(operator.getitem, (parts, i)) for i in range(terms)]
        total = items[0]
        for item in items[1:-1]:
            total = g.call_function(operator.add, (total, item))
    n.op, n.target, n.args, n.kwargs = "call_function", operator.add, (total, items[-1]), {}
