"""What the NCHW baseline's bytes are set against: a copy the NCHW model makes at one node that
the channels_last model makes at a later one (:func:`displaced`). Pure functions of the records."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..records import NodeRecord
from .moves import moved_bytes

__all__ = ["displaced"]


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
