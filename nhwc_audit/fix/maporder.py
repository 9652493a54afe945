"""``contiguous-map-order``: a ``.contiguous()`` that copies a reordered view of a channels_last map
into row-major order, right before a view that makes a map of it again (a channel shuffle:
``x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)``; a space-to-depth:
``x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous().view(n, 4 * c, h // 2,
w // 2)``), copies in the order that makes that map channels_last instead.

The copy is made in both layouts, but row-major order puts the dims that become the map's channels
outermost: the map comes out NCHW and the convolution after it converts it back. Copied with the dims
that become the batch first, then those that become the spatial dims, then those that become the
channels (``t.permute(order).contiguous().permute(inverse)``: the same tensor, another memory order),
the view makes a channels_last map, and nothing else moves. The values are the same, so the math is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.fx

from ..analyze.analysis import Analysis
from ..records import FindingKind, NodeRecord
from .matched import find_node, found

__all__ = ["copy_in_map_order", "map_order", "map_order_copies"]

_RESHAPES = frozenset({"view", "reshape"})


def _groups(src: Sequence[int], dst: Sequence[int]) -> list[list[int]] | None:
    """The consecutive dims of ``src`` each dim of ``dst`` merges (a view's split and merge), or None
    where ``dst`` is no such merge of ``src``."""
    out: list[list[int]] = []
    i = 0
    for d in dst:
        group, size = [], 1
        while i < len(src) and size * src[i] <= d and (size < d or src[i] == 1):
            size *= src[i]
            group.append(i)
            i += 1
        if size != d:
            return None
        out.append(group)
    if any(src[j] != 1 for j in range(i, len(src))):
        return None
    out[-1] += list(range(i, len(src)))
    return out


def map_order(src: Sequence[int], dst: Sequence[int]) -> tuple[int, ...] | None:
    """The order to copy a tensor of shape ``src`` in so that its view as the map or volume ``dst``
    (rank 4 or 5) is channels_last: batch, spatial, then channel dims; None where ``dst`` is no merge
    of ``src``, or where row-major order is that order already."""
    groups = _groups(src, dst) if len(dst) in (4, 5) else None
    if groups is None:
        return None
    order = tuple(d for g in (groups[0], *groups[2:], groups[1]) for d in g)
    return None if order == tuple(range(len(src))) else order


def _reshaped_into_map(node: torch.fx.Node, by_name: dict[str, NodeRecord]) -> NodeRecord | None:
    """The record of the view or reshape ``node`` is read by alone, when it makes a map or a volume."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    if user.op not in ("call_method", "call_function") or name not in _RESHAPES or user.args[:1] != (node,):
        return None
    r = by_name.get(user.name)
    return r if r is not None and r.spatial_outputs else None


def map_order_copies(
    gm: torch.fx.GraphModule, records: list[NodeRecord], analysis: Analysis
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The reverts at a ``.contiguous()`` whose only reader views the copy as a map, each with the
    order to copy in (:func:`map_order`)."""
    by_name = {r.name: r for r in records}
    for n, r in found(gm, records, analysis, FindingKind.REVERT):
        plain = not n.kwargs or n.kwargs == {"memory_format": torch.contiguous_format}
        if n.op != "call_method" or n.target != "contiguous" or len(n.args) != 1 or not plain or not r.outputs:
            continue
        user = _reshaped_into_map(n, by_name)
        order = map_order(r.outputs[0].shape, user.spatial_outputs[0].shape) if user is not None else None
        if order is not None:
            yield n.name, order


def copy_in_map_order(gm: torch.fx.GraphModule, *, name: str, order: tuple[int, ...]) -> None:
    """Make the ``.contiguous()`` at ``name`` copy in ``order``: it reads its input permuted so, and its
    readers read the copy permuted back (two views; the copy keeps its node, and its name)."""
    n = find_node(gm, name)
    inverse = tuple(order.index(d) for d in range(len(order)))
    with gm.graph.inserting_before(n):
        n.args = (gm.graph.call_method("permute", (n.args[0], *order)),)
    n.kwargs = {}
    with gm.graph.inserting_after(n):
        back = gm.graph.call_method("permute", (n, *inverse))
    n.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
