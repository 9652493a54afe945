"""Strides torch.export fixed from the channels_last sample, read again for the NCHW runs.

torch.export specialises a graph to the sample it traces: a forward that reads its map's strides
(``st = y.stride(); y.as_strided(size, (st[0], st[1], st[2], st[3], st[2], st[3]))``, sliding
windows by the map's own strides) leaves ``as_strided`` with the channels_last strides as
constants. The NCHW baseline runs that graph on NCHW tensors: with those constants it reads NCHW
memory as if it were channels_last (a revert of its own, netted against the real one: 25,088 B
where eager moves 50,176), where the NCHW model reads its own strides. fx and the eager
recording read strides at run time and need none of this.

Each such constant is a step in the map's memory: read as the step of each logical dim it makes
in the channels_last map (the digits of a mixed radix: a dense layout's strides divide each
other), it is the same step in NCHW, what the NCHW model's ``y.stride()`` gives it
(:func:`relaid`). Only where the node's input was dense channels_last in the audit's run and
every constant reads so; else the node runs as captured.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..channels import dense_strides, format_order
from ..records import Layout, NodeRecord

__all__ = ["nchw_graph", "relaid"]

_AS_STRIDED = frozenset({torch.ops.aten.as_strided.default, torch.ops.aten.as_strided_copy.default})


def relaid(step: int, shape: Sequence[int]) -> int | None:
    """``step``, elements of a dense channels_last map of ``shape`` apart, as the same logical step
    in a dense NCHW one; None where it is no whole number of steps of its dims."""
    if step < 0:
        return None
    rank = len(shape)
    cl, nchw = dense_strides(shape, format_order(rank, True)), dense_strides(shape, format_order(rank, False))
    out, left = 0, step
    for i, d in enumerate(d for d in format_order(rank, True) if shape[d] > 1):
        digit, left = divmod(left, cl[d])
        if i > 0 and digit >= shape[d]:
            return None
        out += digit * nchw[d]
    return out if left == 0 else None


def nchw_graph(graph: torch.fx.Graph, records: Sequence[NodeRecord]) -> tuple[torch.fx.Graph, tuple[str, ...]]:
    """``graph`` for the NCHW runs of an exported capture (``records``: the audit's run of it), its
    ``as_strided`` strides and offset fixed from a dense channels_last input read as NCHW steps, and
    the names of the nodes changed; ``graph`` itself when none is."""
    by_name = {r.name: r for r in records}
    changes: dict[str, list[int]] = {}
    for n in graph.nodes:
        r = by_name.get(n.name)
        if n.op != "call_function" or n.target not in _AS_STRIDED or r is None or not r.inputs or n.kwargs:
            continue
        meta = r.inputs[0].meta
        if meta.rank not in (4, 5) or meta.layout is not Layout.CHANNELS_LAST:
            continue
        if meta.strides != dense_strides(meta.shape, format_order(meta.rank, True)):
            continue
        fixed = [*n.args[2], *n.args[3:4]]  # (the offset, when given)
        if not all(type(v) is int for v in fixed):
            continue
        steps = [s for v in fixed if (s := relaid(v, meta.shape)) is not None]
        if len(steps) < len(fixed) or not _inside(steps, n.args[1], meta.numel):
            continue  # (strides the model wrote itself, NCHW's: read as channels_last steps they leave the map)
        changes[n.name] = steps
    if not changes:
        return graph, ()
    out = copy.deepcopy(graph)
    for n in out.nodes:
        if n.name in changes:
            new = changes[n.name]
            n.args = (n.args[0], n.args[1], new[: len(n.args[2])], *new[len(n.args[2]) :])
    return out, tuple(changes)


def _inside(steps: list[int], size: Sequence[int], numel: int) -> bool:
    """A view of ``size`` with ``steps`` (strides, then an offset when given) stays inside a dense
    tensor of ``numel`` elements."""
    strides, offset = steps[: len(size)], sum(steps[len(size) :])
    return offset + sum((n - 1) * st for n, st in zip(size, strides, strict=True) if n > 0) < numel
