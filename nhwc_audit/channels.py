"""Which copies move a channels_last map's channels out of the innermost place: a copy
between NHWC and NCHW (:func:`layout_change`), and one out of a view that puts the channels at
another dim, whatever the view's format flags say.

A view can put an NHWC map's channels at another dim: ``F.local_response_norm`` views an
N x C x H x W map as N x 1 x C x H x W. That 5D tensor is dense in no memory format, and a
row-major copy of it (its constant pad) is ``AMBIGUOUS`` by the layout rule (dim 1 has size 1),
yet the copy moves the channels out of the innermost place: an NHWC -> NCHW transpose.

A copy can also reorder a map's memory without moving the channels between innermost and
outermost: a matmul folds batch and heads of ``conv(x).reshape(B, heads, d, H * W)`` into one dim
by a copy of the NHWC map at batch >= 2, where NCHW memory views (:func:`hidden_copy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .dtypes import kernel_nbytes
from .layout import (
    classify_strides,
    innermost_dim,
    is_dense_in_order,
    leans_channels_last,
    memory_order,
    reorders,
    tensor_meta,
)
from .records import HiddenCopy, Layout, TensorMeta

__all__ = [
    "COPY_OPS",
    "broadcast_across",
    "conv_layout",
    "conv_relays",
    "dense_strides",
    "format_order",
    "channels_relaid",
    "hidden_copy",
    "kernel_copy",
    "laid_out",
    "layout_change",
    "moves_into",
    "permuted",
    "relaid_weight",
    "relay_bytes",
    "relays_view",
    "runs_otherwise",
    "view_channels",
]


def layout_change(src: TensorMeta, dst: TensorMeta) -> bool:
    """A copy from ``src`` to ``dst`` (rank >= 4, same shape) moves the innermost memory dim
    between the channels (dim 1, NHWC) and the last dim (NCHW): a layout transpose. Copies
    between other dims (attention's B x heads x N x d transposes) are not layout changes, nor is
    one of a source broadcast along either of the two (a channel mean ``expand``-ed back)."""
    if src.rank < 4 or src.shape != dst.shape:
        return False
    last = max((i for i, s in enumerate(src.shape) if s > 1), default=None)
    if last is not None and len(src.strides) == src.rank and 0 in (src.strides[1], src.strides[last]):
        return False  # a dim the source repeats (``expand``): what it holds keeps its order
    pair = {innermost_dim(src), innermost_dim(dst)}
    return last is not None and last != 1 and pair == {1, last}


def view_channels(view: TensorMeta, base: TensorMeta) -> frozenset[int]:
    """The dims of ``view`` that hold the channels of ``base``, the channels_last map it views:
    those strided below every other dim of the map (none when ``base`` is not channels_last).

    >>> import torch
    >>> from nhwc_audit.layout import tensor_meta
    >>> x = torch.zeros(1, 16, 8, 8).to(memory_format=torch.channels_last)
    >>> sorted(view_channels(tensor_meta(x.view(1, 1, 16, 8, 8)), tensor_meta(x)))
    [2]
    """
    if base.layout is not Layout.CHANNELS_LAST or len(view.strides) != view.rank:
        return frozenset()
    others = [st for d, (n, st) in enumerate(zip(base.shape, base.strides, strict=True)) if d != 1 and n > 1]
    below = min(others, default=base.numel)
    return frozenset(
        d for d, (n, st) in enumerate(zip(view.shape, view.strides, strict=True)) if n > 1 and 0 < st < below
    )


def channels_relaid(src: TensorMeta, channels: frozenset[int], dst: TensorMeta) -> bool:
    """Writing ``src``, whose memory runs along ``channels`` (:func:`view_channels`), as ``dst``
    of its rank moves them out of the innermost place, the channels kept (a reduction over them
    computes, it does not move them) and ``dst`` dense: an NHWC -> NCHW transpose.

    >>> import torch
    >>> from nhwc_audit.layout import tensor_meta
    >>> x = torch.zeros(1, 16, 8, 8).to(memory_format=torch.channels_last).view(1, 1, 16, 8, 8)
    >>> channels_relaid(tensor_meta(x), frozenset({2}), tensor_meta(x.contiguous()))
    True
    >>> channels_relaid(tensor_meta(x), frozenset({2}), tensor_meta(x * 2))
    False
    """
    if not channels or src.rank != dst.rank or src.rank < 4 or len(dst.strides) != dst.rank:
        return False
    if innermost_dim(src) not in channels or any(dst.shape[d] < 2 for d in channels):
        return False
    order = memory_order(dst)
    return bool(order) and order[-1] not in channels and is_dense_in_order(dst.shape, dst.strides, order[::-1])


def broadcast_across(src: TensorMeta, out: TensorMeta) -> bool:
    """``src``, broadcast (stride 0: ``ctx.expand_as(v)``), is read across layouts into the
    channels_last ``out``: the dims it holds in memory run in another order there (MobileViTV2's
    context, summed over W and expanded back; ``F.normalize``'s norm)."""
    return 0 in src.strides and out.layout is Layout.CHANNELS_LAST and reorders(src, out)


def relays_view(t: torch.Tensor, meta: TensorMeta, out: TensorMeta) -> bool:
    """At dispatch level: ``t`` (``meta``) views a 4D/5D channels_last map (its ``_base``), in no
    format the layout rule names, and is written as ``out`` with the channels out of the innermost
    place (:func:`channels_relaid`)."""
    base = t._base
    if meta.layout is not Layout.STRIDED or base is None or base.dim() not in (4, 5):
        return False
    return channels_relaid(meta, view_channels(meta, tensor_meta(base)), out)


COPY_OPS = frozenset(
    {
        torch.ops.aten.clone.default,
        torch.ops.aten.copy_.default,
        torch.ops.aten._to_copy.default,
        torch.ops.aten.contiguous.default,
    }
)


def hidden_copy(func: Any, args: Any, out: Any) -> HiddenCopy | None:
    """The record of an ATen copy (clone, copy_, _to_copy, contiguous) that changes layout, or
    that reorders memory otherwise (``reorder``: a matmul folding the batch and heads of a
    channels_last conv's ``reshape(B, heads, d, H * W)``, which NCHW views). Whether a reorder is
    the conversion's doing is the analysis's call (:func:`~nhwc_audit.analyze.origin.odd_order_from_map`:
    heads of a Linear's tokens are copied in either layout); the NCHW baseline records the same
    copies, so one made in either layout is charged nothing."""
    if func not in COPY_OPS:
        return None
    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    view = src.dim() < 4  # a 3D view of a map in another order copied row-major (``instance_norm``'s ``contiguous()``)
    if view and not (permuted(src) and src.shape == out.shape and out.layout is torch.strided and out.is_contiguous()):
        return None
    sm, dm = tensor_meta(src), tensor_meta(out)
    change = not view and layout_change(sm, dm)
    if not (view or change or reorders(sm, dm)):
        return None
    name = str(func.overloadpacket.__name__)
    # a broadcast source (a table ``expand``-ed over the batch) moves what it stores, laid out as it
    # holds it: a dim it repeats (stride 0) places no constraint, as one of size 1
    held = tuple(1 if st == 0 else n for n, st in zip(sm.shape, sm.strides, strict=False))
    layout = classify_strides(held, sm.strides) if len(sm.strides) == sm.rank else sm.layout
    nbytes = 2 * min(sm.stored_nbytes, dm.nbytes)
    return HiddenCopy(op=name, layout_in=layout, layout_out=dm.layout, shape=dm.shape, bytes=nbytes, reorder=not change)


def laid_out(t: torch.Tensor) -> bool:
    """Not a 4D/5D tensor, or one dense in NCHW or channels_last order: what a kernel reads as it
    is (the ``contiguous()`` of its format it asks for first copies nothing, or re-lays the whole
    tensor, which the node's layouts show)."""
    if t.dim() not in (4, 5) or t.is_contiguous():
        return True
    return t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def permuted(t: torch.Tensor) -> bool:
    """A 3D tensor dense in memory, not row-major: a channels_last map's ``flatten(2)`` (strided
    HW*C, 1, C), which a GroupNorm, a softmax, a Conv1d copies row-major first (NCHW's is row-major)."""
    if t.dim() != 3 or t.layout is not torch.strided or t.is_contiguous():  # (a 2D one: a GEMM's transposed weight)
        return False
    strides = t.stride()
    return is_dense_in_order(tuple(t.shape), strides, sorted(range(t.dim()), key=lambda d: (strides[d], -d)))


def kernel_copy(func: Any, args: Any, out: Any) -> HiddenCopy | None:
    """A copy an ATen kernel made inside (``func``: an op it called, on ``args``, giving ``out``)
    that no layout shows: the ``contiguous()`` of a tensor not :func:`laid_out` into a dense one of
    the same order (a channel slice of a channels_last map, ``torch.split``'s, ``chunk``'s: dense in
    NCHW memory at batch 1, copied whole in channels_last by a convolution, a pool, a norm). What a
    kernel re-lays into another order is the rules' to judge, as for any op."""
    if func is not torch.ops.aten.contiguous.default or out is args[0] or args[0].dim() < 4 or laid_out(args[0]):
        return None
    sm, dm = tensor_meta(args[0]), tensor_meta(out)
    if layout_change(sm, dm) or reorders(sm, dm):
        return None
    return HiddenCopy(
        "contiguous", sm.layout, dm.layout, dm.shape, 2 * min(sm.stored_nbytes, dm.nbytes), densified=True
    )


def relay_bytes(source: TensorMeta, out: TensorMeta, *, conv: bool, cast_first: bool = False) -> int:
    """Bytes an op moves bringing ``source`` into ``out``'s layout, read and written: a
    convolution re-lays its whole input (the kernel makes it contiguous, then computes); any
    other op moves at most the smaller of the two (a cat only its operands, a reduction over a
    stack only its result); a broadcast source (``repeat_interleave``'s expand) its stored bytes. A
    source of another dtype than the output counts at the output's where ``cast_first``: autocast casts it, keeping its
    layout, to the dtype the kernel computes in, and the kernel re-lays the cast (a weight computed in
    float32 into a bfloat16 convolution moves bfloat16; an expanded one its every element:
    :func:`kernel_nbytes`)."""
    stored = kernel_nbytes(source, out, cast_first=cast_first)
    return 2 * (stored if conv else min(stored, out.nbytes))


def relaid_weight(w: TensorMeta, out: TensorMeta, ins: Sequence[TensorMeta] = ()) -> bool:
    """A convolution re-lays its weight ``w``: not dense in the memory format of its output (its
    layout is neither the one it computes in, :func:`conv_layout`, nor ambiguous, dense in both)."""
    kernel = conv_layout(out, ins)
    if kernel not in (Layout.CHANNELS_LAST, Layout.CONTIGUOUS) or w.rank != out.rank:
        return False
    return w.layout not in (kernel, Layout.AMBIGUOUS)


def dense_strides(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` with its dims in ``order``, outermost first."""
    strides, step = [0] * len(shape), 1
    for d in reversed(order):  # innermost first
        strides[d], step = step, step * max(shape[d], 1)
    return tuple(strides)


def format_order(rank: int, nhwc: bool) -> list[int]:
    """A memory format's dims of a ``rank``-d map, outermost first: N, H, W, C (N, D, H, W, C) or N, C, H, W."""
    return [0, *range(2, rank), 1] if nhwc else list(range(rank))


def conv_layout(out: TensorMeta, ins: Sequence[TensorMeta] = ()) -> Layout:
    """The layout a convolution computed in: its output's, or, for an output dense in both orders
    (one channel: a mask or depth head, CBAM's spatial attention), the memory format its strides
    lean to (:func:`~nhwc_audit.layout.leans_channels_last`): kernels allocate their output in the
    format they compute in. Where the two formats stride the output alike (N x 1 x 1 x 1: a
    DCGAN discriminator's last conv), the kernel's own rule (ATen's ``mkldnn_conv_use_channels_last``):
    channels_last when its input or weight (``ins``) leans so."""
    if out.layout is not Layout.AMBIGUOUS:
        return out.layout
    if dense_strides(out.shape, format_order(out.rank, True)) != dense_strides(
        out.shape, format_order(out.rank, False)
    ):
        return Layout.CHANNELS_LAST if leans_channels_last(out) else Layout.CONTIGUOUS
    return (
        Layout.CHANNELS_LAST if any(m.rank == out.rank and leans_channels_last(m) for m in ins) else Layout.CONTIGUOUS
    )


def conv_relays(src: TensorMeta, out: TensorMeta, ins: Sequence[TensorMeta] = ()) -> bool:
    """A convolution re-lays its input ``src`` (copies it whole into the format it computes in):
    ``src`` runs in another order than the output (:func:`runs_otherwise`), or, where the output
    is dense in both orders, than :func:`conv_layout` says the kernel computed in (``ins``: its input
    and weight)."""
    if out.layout is not Layout.AMBIGUOUS or src.rank != out.rank:
        return runs_otherwise(src, out)
    held = list(memory_order(src, held=True))
    order = format_order(src.rank, conv_layout(out, ins) is Layout.CHANNELS_LAST)
    return held != [d for d in order if d in held]


def moves_into(src: TensorMeta, out: TensorMeta) -> bool:
    """Not a source read element for element or broadcast whose memory runs in ``out``'s order over
    the dims both hold (an N x 1 x H x W mask is laid alike in either layout)."""
    broadcast = src.rank == out.rank and all(a in (b, 1) for a, b in zip(src.shape, out.shape, strict=True))
    return not broadcast or runs_otherwise(src, out)


def runs_otherwise(src: TensorMeta, out: TensorMeta) -> bool:
    """Over the dims of size > 1 that ``src`` and ``out`` share by position, their memory runs in
    another order (a convolution re-lays such an input; an op writing channels_last reads it across).
    A dim ``src`` broadcasts (stride 0) holds nothing in memory, so no order: a map expanded along H
    (N x C x 1 x W in memory) runs in NCHW's order, not N, C, W, H."""
    both = [d for d in memory_order(src, held=True) if d < out.rank and out.shape[d] > 1]
    return both != [d for d in memory_order(out) if d in both]
