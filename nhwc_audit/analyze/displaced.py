"""What the NCHW baseline's bytes are set against: a copy the NCHW model makes at one node that
the channels_last model makes at a later one (:func:`displaced`), or, in backward, at an earlier
one (:func:`displaced_backward`). Pure functions of the records."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence

from ..records import NodeRecord, SourceLoc
from .moves import moved_bytes

__all__ = ["call_of", "displaced", "displaced_backward", "unpaired"]


def displaced(records: Sequence[NodeRecord], nchw_moved: dict[str, int], charged: Collection[str]) -> dict[str, int]:
    """For each node of ``charged`` (findings the NCHW baseline can change), the bytes NCHW moves
    at a node upstream where channels_last moves fewer (``nchw_moved`` against :func:`~.moves.moved_bytes`):
    the same copy, made later in the same line (diffusers' TemporalConvLayer: NCHW copies at its
    GroupNorm, channels_last at its Conv3d; an add ``y + t.contiguous()``: NCHW copies ``t`` at the
    contiguous, channels_last reads it across at the add). Up every activation input, each chain at
    its operand's shape, nearest first."""
    by_name = {r.name: r for r in records}
    credit: dict[str, int] = {}
    used: set[str] = set()
    for name in charged:
        site = call_of(by_name[name])
        frontier, seen = deque(_producers(by_name[name], by_name)), {name}
        while frontier:
            node, shape = frontier.popleft()
            if node.name in seen or node.name in charged or not node.outputs or node.outputs[0].shape != shape:
                continue
            seen.add(node.name)
            before = nchw_moved.get(node.name, 0)  # (most move nothing in NCHW: their own bytes are not asked)
            saved = before - moved_bytes(node) if before > 0 else 0
            if saved > 0 and node.name not in used and call_of(node) == site:  # one call of the model's
                credit[name] = saved
                used.add(node.name)
                break
            frontier.extend(_producers(node, by_name))
    return credit


def call_of(r: NodeRecord) -> tuple[SourceLoc | None, str]:
    """Which call of the model's code ran ``r``: its source line, in the forward of the module instance
    that line belongs to (a torch.nn module's own ops, and a call of it: its parent's, whose forward
    called it). Two instances of one module class run one line in two calls."""
    leaf = r.op == "call_module" or r.in_leaf_module
    return r.source, r.module_path.rpartition(".")[0] if leaf else r.module_path


def _producers(r: NodeRecord, by_name: dict[str, NodeRecord]) -> list[tuple[NodeRecord, tuple[int, ...]]]:
    """The records of ``r``'s activation inputs, in operand order, each with the shape ``r`` reads;
    past the first, none computed from stored tensors alone (a weight transposed in forward, which a
    fake run measures as a copy where a real one sees a view)."""
    out = []
    for k, i in enumerate(r.activation_inputs):
        p = by_name.get(i.producer or "")
        if p is not None and not (k and p.inputs and all(j.is_param for j in p.inputs)):
            out.append((p, i.meta.shape))
    return out


def unpaired(
    nchw: Sequence[NodeRecord], pairs: dict[str, str], nchw_moved: dict[str, int], charged: Collection[str]
) -> dict[str, int]:
    """For each node of ``charged`` (channels_last record names, ``pairs``: each one's NCHW record),
    the bytes the NCHW run moves at a node of the same line that only it made (no pair), read by
    the node's NCHW pair: a ``.contiguous()`` that copies in NCHW and, in channels_last, returns its
    input, which the eager capture does not record (``y + t.contiguous()``: NCHW copies ``t``,
    channels_last reads it across at the add)."""
    by_name = {r.name: r for r in nchw}
    mine = {theirs: ours for ours, theirs in pairs.items() if ours in charged}
    made = set(pairs.values())
    credit: dict[str, int] = {}
    for r in nchw:
        moved = nchw_moved.get(r.name, 0)
        if moved <= 0 or r.name in made or r.source is None:
            continue
        reader = next((u for u in r.users if u in mine and by_name[u].source == r.source), None)
        if reader is not None:
            credit[mine[reader]] = credit.get(mine[reader], 0) + moved
    return credit


def displaced_backward(records: Sequence[NodeRecord], nchw: dict[str, int], ours: dict[str, int]) -> dict[str, int]:
    """For each node whose backward moves data in channels_last (``ours``), the bytes NCHW's
    backward moves at another node of the same call where channels_last's moves fewer (``nchw``):
    the same copy, which the gradient meets at another node of the line in each layout. First
    downstream, where the gradient, flowing back, meets it earlier (``act(bn(conv(y)))`` handed an
    NHWC-ordered gradient: NCHW copies at the BatchNorm's backward, channels_last at the
    convolution's), down every reader of each output at one shape, nearest first (a BatchNorm read
    by its activation and by a mean: NCHW copies at the activation's backward, channels_last at the
    BatchNorm's); else upstream, where it meets it later (diffusers' TemporalConvLayer,
    ``h + conv1(h)`` with ``conv1`` a GroupNorm, a SiLU and a Conv3d: channels_last re-lays the
    Conv3d's NCDHW gradient at the SiLU's backward, NCHW sums the two gradients of ``h`` at the
    GroupNorm's: 131,072 B charged twice a block where eager adds it once); the nodes furthest
    downstream, which the gradient reaches first, first."""
    by_name = {r.name: r for r in records}
    readers: dict[str, list[NodeRecord]] = {}
    for r in records:
        if first := r.activation_inputs[:1]:
            readers.setdefault(first[0].producer or "", []).append(r)

    def producers(r: NodeRecord) -> list[NodeRecord]:
        return [by_name[i.producer] for i in r.activation_inputs[:1] if i.producer in by_name]

    credit: dict[str, int] = {}
    used: set[str] = set()
    for name in sorted(ours, key=lambda n: by_name[n].index, reverse=True):
        start = by_name[name]
        shape, site = start.outputs[0].shape if start.outputs else None, call_of(start)
        for step in (lambda r: readers.get(r.name, []), producers):
            frontier, seen = deque(step(start)), {name}
            while frontier and name not in credit:
                node = frontier.popleft()
                if node.name in seen or not node.outputs or node.outputs[0].shape != shape or call_of(node) != site:
                    continue
                seen.add(node.name)
                saved = nchw.get(node.name, 0) - ours.get(node.name, 0)
                if saved > 0 and node.name not in used:  # one call of the model's
                    credit[name] = saved
                    used.add(node.name)
                    break
                frontier.extend(step(node))
            if name in credit:
                break
    return credit
