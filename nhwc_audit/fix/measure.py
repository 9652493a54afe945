"""The repair's measurements: one propagation of a graph (its records and analysis), and of a
trial rewrite of a measured graph, only the part of it the rewrite can change.

A rewrite changes nothing before its first rewritten node, so those nodes take the measured
run's values and records. From there the trial runs node by node until it is past its last
rewritten node and every value still live has the shape, strides and dtype the measured run's
value of that node had: the nodes after it then read what they read in the measured run, and
record what they recorded there (a layout is decided by metadata, not values; the values
differ by rounding at most, the rewrites keeping the math, which the repair's check verifies).
On the bundled UNet a rewrite's measurement runs 4-56% of the graph; on torchvision's MaxViT,
whose rewrites each change one attention block, a few percent.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from ..analyze.analysis import Analysis, analyze
from ..propagate.backward import backward_layouts
from ..propagate.inputs import positional_inputs
from ..propagate.interpreter import LayoutProp
from ..propagate.recompute import recompute_counts, state_kept
from ..propagate.runner import autograd
from ..records import NodeRecord
from ..tensors import clone_value, seeded

__all__ = ["Measured", "measure", "with_backward"]


@dataclass(frozen=True)
class Measured:
    """One graph's propagation of the sample: its records and analysis, and every node's value
    by name (what a trial rewrite of this graph starts from)."""

    records: list[NodeRecord]
    analysis: Analysis
    values: dict[str, Any]


_RESTRIDES_IN_PLACE = frozenset(
    {"resize_", "resize_as_", "as_strided_", "set_", "t_", "transpose_", "swapdims_", "swapaxes_", "squeeze_"}
    | {"unsqueeze_", "detach_", "requires_grad_"}
)
"""Methods that change a tensor's shape, strides or autograd flag in place: a trial that runs one
could change a value the measured run holds for the next trial, so such graphs are measured whole."""

_MISSING = object()


def _meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (type(v), v.shape, v.stride(), v.dtype, v.device, v.storage_offset(), v.requires_grad)
    return v


def _same(a: Any, b: Any) -> bool:
    """Values a node's users cannot tell apart by layout: tensors of one shape, strides and
    dtype; anything else equal."""
    if a is b:
        return True
    (xs, spec_a), (ys, spec_b) = tree_flatten(a), tree_flatten(b)
    if spec_a != spec_b:
        return False
    try:
        return all(x is y or bool(_meta(x) == _meta(y)) for x, y in zip(xs, ys, strict=True))
    except Exception:  # a value that cannot be compared: not the same
        return False


def incremental(gm: torch.fx.GraphModule) -> bool:
    """Can trials of ``gm``'s rewrites be measured from its measurement (:func:`measure`'s
    ``base``)? Not when a node changes a tensor's layout in place."""
    return not any(
        n.op == "call_method"
        and n.target in _RESTRIDES_IN_PLACE
        or n.op == "call_function"
        and getattr(n.target, "__name__", "") in _RESTRIDES_IN_PLACE
        for n in gm.graph.nodes
    )


def measure(
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    bandwidth: float,
    baseline: Mapping[str, tuple[int, int]],
    *,
    base: Measured | None = None,
    changed: frozenset[str] = frozenset(),
) -> Measured:
    """The records and analysis of one propagation of ``gm`` (``base``: the measurement of the
    graph ``gm`` rewrites at the nodes ``changed``, when :func:`incremental`: only the part the
    rewrite can change runs), whose buffers (BatchNorm statistics in train mode) and module
    attributes are as they were before it; a node named in ``baseline`` is charged only what it
    moves, and its kernels copy inside, beyond that (its NCHW baseline in the audit: ``nchw_bytes``,
    ``nchw_inside``)."""
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    spots = [index[name] for name in changed if name in index]
    if base is not None and not (spots and incremental(gm)):
        base = None
    first, last = (min(spots), max(spots)) if base is not None else (0, len(nodes))
    env = {n: base.values[n.name] for n in nodes[:first]} if base is not None else {}
    held = base.values if base is not None else {}

    def until(n: torch.fx.Node, live: dict[torch.fx.Node, Any]) -> bool:
        return index[n.name] > last and all(_same(v, held.get(k.name, _MISSING)) for k, v in live.items())

    interp = LayoutProp(gm, record_hidden=True)
    interp.kept, interp.until = {}, until if base is not None else None
    with state_kept(gm), seeded(0, (args, kwargs)), autograd(False):
        values = positional_inputs(interp.graph, tree_map(clone_value, args), tree_map(clone_value, kwargs))
        interp.run(*values, initial_env=env, enable_io_processing=False)
    ran = {r.name: r for r in interp.records}
    before = {r.name: r for r in base.records} if base is not None else {}
    records: list[NodeRecord] = []
    for n in nodes:
        r = ran.get(n.name)
        if r is None and n.name in before:  # not run: the measured run's, at its place and with its users here
            r = _placed(before[n.name], n, index)
        if r is not None:
            if r.name in baseline:
                r = dataclasses.replace(r, nchw_bytes=baseline[r.name][0], nchw_inside=baseline[r.name][1])
            records.append(r)
    return Measured(records, analyze(records, bandwidth=bandwidth), {**held, **interp.kept})


def _placed(r: NodeRecord, n: torch.fx.Node, index: dict[str, int]) -> NodeRecord:
    """``r``, the measured run's record of ``n``, at ``n``'s place in its graph and with its users
    there (a rewrite moves the nodes after one it inserts, and gives a node new users)."""
    users = r.users if len(n.users) == len(r.users) and all(u.name in r.users for u in n.users) else None
    if r.index == index[n.name] and users is not None:
        return r
    placed = copy.copy(r)  # (dataclasses.replace re-runs __init__: ~10 us a record, a graph's worth a trial)
    object.__setattr__(placed, "index", index[n.name])
    if users is None:
        object.__setattr__(placed, "users", tuple(u.name for u in sorted(n.users, key=lambda u: index[u.name])))
    return placed


def with_backward(
    m: Measured,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    bandwidth: float,
    nchw_backward: Mapping[str, tuple[int, int]],
) -> Measured:
    """``m`` (a measurement of ``gm``) with what one backward pass moves at each node, as a train
    audit counts it: a repair's figures per training step, forward and backward. A node named in
    ``nchw_backward`` (the audit's NCHW baseline of the backward) is charged only what it moves
    beyond that; one the repair made, whole. ``gm``'s buffers and attributes are restored."""
    with state_kept(gm):
        flat = positional_inputs(gm.graph, tree_map(clone_value, args), tree_map(clone_value, kwargs))
        breaks = frozenset(r.name for r in m.records if r.error)
        ran = backward_layouts(gm, flat, breaks=breaks)
        again, _ = recompute_counts(gm, flat, lambda: {f.node for f in m.analysis.findings if f.bytes}, breaks)
    records = [
        dataclasses.replace(
            r,
            grads=ran.layouts.get(r.name, ()),
            backward=tuple(ran.moved.get(r.name, ())),
            nchw_backward_bytes=nchw_backward.get(r.name, (0, 0))[0],
            nchw_backward_inside=nchw_backward.get(r.name, (0, 0))[1],
            recomputed=again.get(r.name, 0),
        )
        for r in m.records
    ]
    return Measured(records, analyze(records, bandwidth=bandwidth), m.values)
