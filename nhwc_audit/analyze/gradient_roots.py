"""Analyze stage: which change removes a finding (:func:`root_of`), and, for a train audit's backward
findings, which forward change removes what the backward moves (:func:`backward_shares`): the
gradient a node's backward re-lays comes from downstream, its input's layout from upstream."""

from __future__ import annotations

from ..records import Finding, FindingKind, Layout, NodeRecord
from .origin import origin_of

__all__ = ["GRADIENT_HOPS", "backward_root", "backward_shares", "root_of"]


def root_of(f: Finding) -> str:
    """The node whose change removes ``f``: conversions and mixed ops go with the change that removes
    them (their ``origin``); a latent break with the revert that hides it (fixing that revert without
    it makes it raise); a revert or a break is its own."""
    traced = (FindingKind.CONVERSION, FindingKind.MIXED, FindingKind.LATENT)
    return f.origin if f.kind in traced and f.origin else f.node


GRADIENT_HOPS = 6
"""How far downstream a backward finding's cause is looked for, through ops that keep channels_last."""


def backward_root(f: Finding, forward: dict[str, Finding], by_name: dict[str, NodeRecord]) -> str:
    """The node whose change removes backward finding ``f`` (not a kernel's own copy), given each
    node's ``forward`` finding: the root of its node's; else of the nearest one downstream, through
    ops that stay channels_last (an upsample, an identity, a scale: their backward hands the gradient
    on in the layout it came in), or of the one where the NCHW region such an op runs in starts (an
    InstanceNorm's revert: the convolution before it and the ReLU after it re-lay gradients); else its
    own node."""
    r = by_name[f.node]
    moved = [c for c in r.backward if not c.result]
    if moved and all(c.op.startswith("AccumulateGrad") or c.densified for c in moved):
        # a parameter's gradient copied into its strides, a saved slice made dense: the node's own doing
        return root_of(forward[f.node]) if f.node in forward else f.node
    return _walk([r], r, forward, by_name) or f.node


def _walk(
    frontier: list[NodeRecord], r: NodeRecord, forward: dict[str, Finding], by_name: dict[str, NodeRecord]
) -> str | None:
    """The root of the first forward finding met from ``frontier`` on, downstream of ``r`` (see
    :func:`backward_root`); None where none is."""
    seen = {r.name, *(c.name for c in frontier)}
    for _ in range(GRADIENT_HOPS):
        ahead = []
        for c in frontier:
            start = origin_of(c, by_name) if c.name not in forward and c.output_layout is Layout.CONTIGUOUS else c
            if start is not None and start.name in forward:  # (its own, or where its NCHW region starts)
                # a gradient that comes back through a view of other dims (a channel shuffle's) is laid
                # out by that view's backward, whatever the change does: no cause downstream
                return root_of(forward[start.name]) if c is r or _regrades(c, by_name) else None
            # on through an op that stays channels_last with no forward finding (a convolution's backward re-lays
            # what comes in: none past it)
            if c is r or (c.output_layout is Layout.CHANNELS_LAST and not c.convolves):
                ahead += [by_name[u] for u in c.users if u in by_name and u not in seen]
        seen.update(c.name for c in ahead)
        frontier = ahead
    return None


def _regrades(r: NodeRecord, by_name: dict[str, NodeRecord]) -> bool:
    """Whether ``r``'s gradient comes back in the layout its output has: no user views it as a tensor of
    another rank (the backward of such a view reshapes the gradient, row-major where it cannot view it)."""
    rank = r.outputs[0].rank if r.outputs else 0
    return all(u.outputs[0].rank == rank for u in map(by_name.get, r.users) if u is not None and u.outputs)


def backward_shares(f: Finding, forward: dict[str, Finding], by_name: dict[str, NodeRecord]) -> list[tuple[str, int]]:
    """(root, bytes) of backward finding ``f``: all of it with :func:`backward_root`'s, but where its
    node has a forward finding of its own and the gradient reached it in another layout than its
    output's: what its backward re-lays of that gradient (copies of its output's shape) goes with the
    nearest forward finding downstream, the change that makes that gradient arrive in the output's
    layout (the bundled UNet in training: its last convolution re-lays the gradient its softmax over
    the channels hands back NCHW, and its input because an InstanceNorm before it reverted)."""
    own = backward_root(f, forward, by_name)
    r = by_name[f.node]
    arrived = r.grads[0].layout if r.grads else r.output_layout
    if f.node not in forward or arrived is r.output_layout or not r.users:
        return [(own, f.bytes)]
    shapes = {o.shape for o in r.outputs}
    relaid = [c for c in r.backward if not c.result and c.shape in shapes]
    for i in r.spatial_inputs:  # an input of the output's shape in another layout: one of those copies is its
        if i.meta.layout is r.output_layout:
            continue
        own_copy = next((c for c in relaid if c.shape == i.meta.shape), None)
        if own_copy is not None:
            relaid.remove(own_copy)
    part = min(f.bytes, sum(c.bytes for c in relaid))
    ahead = _walk([by_name[u] for u in r.users if u in by_name], r, forward, by_name) if part else None
    if ahead is None or ahead == own:
        return [(own, f.bytes)]
    return [(ahead, part), (own, f.bytes - part)] if f.bytes > part else [(ahead, part)]
