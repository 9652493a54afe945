"""Stored tensors the conversion restrided, read as data.

``model.to(memory_format=torch.channels_last)`` re-lays every 4D parameter and buffer (5D ones,
``channels_last_3d``), a table of positions or frequencies as well as a weight: its dim 1 becomes
innermost. An op that reads such a table, or a view of it, into another order moves data the NCHW
model, whose table is row-major, never moves: NaFlexViT interpolates its (1, H, W, C) position table
through ``permute(0, 3, 1, 2)`` and writes NCHW; a RoPE-mixed ViT multiplies its (2, depth, heads, L)
frequencies into token coordinates, which keeps the table's order, until ``repeat_interleave``
copies the product row-major. The NCHW baseline runs the same rules on the model as built, where
no table is restrided: a copy both make is netted there.
"""

from __future__ import annotations

from ..layout import memory_order, reorders, row_major
from ..records import Layout, NodeInput, NodeRecord, TensorMeta
from .moves import channels_source

__all__ = ["from_restrided_table", "moved_out"]

_STEPS = 16
"""How many ops back an order is followed (a table is read a few ops from where it is stored)."""


def _keeps_order(src: TensorMeta, out: TensorMeta) -> bool:
    """``out``, an element-wise result of ``src`` (same rank, each dim of ``src`` the output's or
    broadcast), lies in ``src``'s memory order over the dims ``src`` holds, two of them at least:
    an element-wise op follows its operand's strides."""
    if src.rank != out.rank or len(src.strides) != src.rank or len(out.strides) != out.rank:
        return False
    if any(a not in (1, b) for a, b in zip(src.shape, out.shape, strict=True)):
        return False
    held = memory_order(src, held=True)
    return len(held) >= 2 and held == tuple(d for d in memory_order(out, held=True) if d in held)


def from_restrided_table(i: NodeInput, by_name: dict[str, NodeRecord]) -> bool:
    """``i``'s memory is in the order the conversion gave a stored tensor: a 4D/5D parameter,
    buffer or constant that is channels_last now, a view of one, or what ops wrote keeping such
    a view's order (not row-major), walked back to the table."""
    meta, node, stored = i.meta, by_name.get(i.producer or ""), i.is_param
    for _ in range(_STEPS):
        if stored:
            return meta.rank in (4, 5) and meta.layout is Layout.CHANNELS_LAST
        if node is None or not node.inputs or not node.outputs:
            return False
        # a view: its base's order; an element-wise op (not writing row-major): the operand whose
        # order it kept, an activation before a stored tensor (``pos + y`` is in y's order); not a
        # convolution or a GEMM, which compute their output's layout
        if node.aliases_input:
            kept = [node.inputs[0]]
        elif row_major(meta) or node.convolves_or_multiplies:
            return False
        else:
            kept = sorted(node.inputs, key=lambda j: j.is_param)
        nxt = next((j for j in kept if node.aliases_input or _keeps_order(j.meta, meta)), None)
        if nxt is None:
            return False
        meta, node, stored = nxt.meta, by_name.get(nxt.producer or ""), nxt.is_param
    return False


def moved_out(i: NodeInput, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> bool:
    """An input a revert into ``reverted`` moves: its memory runs along the channels
    (:func:`~.moves.channels_source`), or it lies in the order the conversion gave a stored table
    and the op writes another (NaFlexViT's permuted position table interpolated into NCHW)."""
    if channels_source(i, reverted, by_name):
        return True
    return bool(reverted) and reorders(i.meta, reverted[0]) and from_restrided_table(i, by_name)
