"""What the NCHW baseline's bytes are set against: a copy the NCHW model makes at one node that
the channels_last model makes at a later one (:func:`displaced`), or, in backward, at an earlier
one (:func:`displaced_backward`). Pure functions of the records."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence

from ..records import NodeRecord
from .moves import moved_bytes

__all__ = ["displaced", "displaced_backward"]


def displaced(records: Sequence[NodeRecord], nchw_moved: dict[str, int], charged: Collection[str]) -> dict[str, int]:
    """For each node of ``charged`` (findings the NCHW baseline can change), the bytes NCHW moves
    at a node upstream where channels_last moves fewer (``nchw_moved`` against :func:`~.moves.moved_bytes`):
    the same copy, made later in the same line (diffusers' TemporalConvLayer: NCHW copies at its
    GroupNorm, channels_last at its Conv3d). Up the first activation inputs at one shape."""
    by_name = {r.name: r for r in records}
    credit: dict[str, int] = {}
    used: set[str] = set()
    for name in charged:
        site, first = by_name[name].source, by_name[name].activation_inputs[:1]
        shape = first[0].meta.shape if first else None
        node = by_name.get(first[0].producer or "") if first else None
        while node is not None and node.name not in charged and node.outputs and node.outputs[0].shape == shape:
            saved = nchw_moved.get(node.name, 0) - moved_bytes(node)
            if saved > 0 and node.name not in used and node.source == site:  # one call of the model's
                credit[name] = saved
                used.add(node.name)
                break
            up = node.activation_inputs[:1]
            node = by_name.get(up[0].producer or "") if up else None
    return credit


def displaced_backward(records: Sequence[NodeRecord], nchw: dict[str, int], ours: dict[str, int]) -> dict[str, int]:
    """For each node whose backward moves data in channels_last (``ours``), the bytes NCHW's
    backward moves at a node downstream where channels_last's moves fewer (``nchw``): the same
    copy, which the gradient, flowing back, meets earlier in the same line (``act(bn(conv(y)))``
    handed an NHWC-ordered gradient: NCHW copies at the BatchNorm's backward, channels_last at the
    convolution's). Down every reader of each output at one shape, nearest first (a BatchNorm
    read by its activation and by a mean: NCHW copies at the activation's backward, channels_last
    at the BatchNorm's); the nodes furthest downstream, which the gradient reaches first, first."""
    by_name = {r.name: r for r in records}
    readers: dict[str, list[NodeRecord]] = {}
    for r in records:
        if first := r.activation_inputs[:1]:
            readers.setdefault(first[0].producer or "", []).append(r)
    credit: dict[str, int] = {}
    used: set[str] = set()
    for name in sorted(ours, key=lambda n: by_name[n].index, reverse=True):
        start = by_name[name]
        shape = start.outputs[0].shape if start.outputs else None
        frontier, seen = deque(readers.get(name, [])), {name}
        while frontier:
            node = frontier.popleft()
            if node.name in seen or not node.outputs or node.outputs[0].shape != shape or node.source != start.source:
                continue
            seen.add(node.name)
            saved = nchw.get(node.name, 0) - ours.get(node.name, 0)
            if saved > 0 and node.name not in used:  # one call of the model's
                credit[name] = saved
                used.add(node.name)
                break
            frontier.extend(readers.get(node.name, []))
    return credit
