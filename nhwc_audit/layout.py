"""The layout rule, in one place: tensor (shape, strides) -> :class:`Layout`.

The checks follow PyTorch's own ``is_contiguous`` semantics (dims of size 1 place no
constraint on their stride) and run in a fixed order, so a tensor that is dense in both
NCHW and NHWC order (C == 1, H == W == 1, ...) is always reported ``AMBIGUOUS``, never
labelled by chance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .records import Layout, TensorMeta

if TYPE_CHECKING:
    import torch

__all__ = [
    "channel_dims",
    "channels_innermost",
    "classify",
    "classify_strides",
    "innermost_dim",
    "is_dense_in_order",
    "leans_channels_last",
    "memory_order",
    "reorders",
    "row_major",
    "strides_like_channels_last",
    "tensor_meta",
]

# Dimension orders from innermost (stride 1) to outermost.
_NCHW_ORDER = {4: (3, 2, 1, 0), 5: (4, 3, 2, 1, 0)}
_NHWC_ORDER = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}


def is_dense_in_order(shape: Sequence[int], strides: Sequence[int], order: Sequence[int]) -> bool:
    """True when the tensor is dense with ``order[0]`` innermost, as PyTorch checks it.

    >>> is_dense_in_order((1, 3, 4, 4), (48, 1, 12, 3), (1, 3, 2, 0))
    True
    """
    if any(s == 0 for s in shape):
        return True
    expected = 1
    for d in order:
        size = shape[d]
        if size != 1:
            if strides[d] != expected:
                return False
            expected *= size
    return True


def classify_strides(shape: Sequence[int], strides: Sequence[int]) -> Layout:
    """Classify a tensor by its shape and strides.

    >>> classify_strides((2, 3, 4, 4), (48, 16, 4, 1)).value
    'contiguous'
    >>> classify_strides((2, 3, 4, 4), (48, 1, 12, 3)).value
    'channels_last'
    >>> classify_strides((2, 1, 4, 4), (16, 16, 4, 1)).value
    'ambiguous'
    """
    rank = len(shape)
    if rank not in (4, 5):
        return Layout.NOT_SPATIAL
    nchw = is_dense_in_order(shape, strides, _NCHW_ORDER[rank])
    nhwc = is_dense_in_order(shape, strides, _NHWC_ORDER[rank])
    if nchw and nhwc:
        return Layout.AMBIGUOUS
    if nchw:
        return Layout.CONTIGUOUS
    if nhwc:
        return Layout.CHANNELS_LAST
    return Layout.STRIDED


def classify(t: torch.Tensor) -> Layout:
    """Classify a tensor's layout.

    >>> import torch
    >>> classify(torch.zeros(1, 3, 8, 8).to(memory_format=torch.channels_last)).value
    'channels_last'
    """
    return classify_strides(tuple(t.shape), t.stride())


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    """Extract the plain-value record of a tensor (no data is read)."""
    shape = tuple(t.shape)
    try:
        strides: tuple[int, ...] = tuple(t.stride())
    except (RuntimeError, NotImplementedError):  # sparse, nested: no strides to judge
        strides = ()
    return _meta(shape, strides, t.dtype)


@functools.lru_cache(maxsize=4096)
def _meta(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype) -> TensorMeta:
    """TensorMeta is a pure function of these (and frozen): models repeat a few shapes many
    times, so each is classified once."""
    layout = classify_strides(shape, strides) if len(strides) == len(shape) else Layout.NOT_SPATIAL
    return TensorMeta(
        shape=shape, strides=strides, dtype=str(dtype).removeprefix("torch."), itemsize=dtype.itemsize, layout=layout
    )


def strides_like_channels_last(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """PyTorch's ``suggest_memory_format() == channels_last(_3d)`` test on raw strides
    (``is_channels_last_strides_2d/3d`` in c10): which way an *ambiguous* tensor leans.
    Kernels follow it, so a 1x1 weight or a C == 1 input converted with
    ``.to(memory_format=torch.channels_last)`` steers a conv's output layout.

    >>> strides_like_channels_last((8, 4, 1, 1), (4, 1, 4, 4))
    True
    >>> strides_like_channels_last((8, 4, 1, 1), (4, 1, 1, 1))
    False
    """
    rank = len(shape)
    if rank not in (4, 5) or len(strides) != rank or strides[1] == 0:
        return False
    low = 0
    for d in _NHWC_ORDER[rank]:
        if shape[d] == 0 or strides[d] < low:
            return False
        if d == 0 and low == strides[1]:
            return False
        low = strides[d] * (shape[d] if shape[d] > 1 else 1)
    return True


def leans_channels_last(meta: TensorMeta) -> bool:
    """Channels_last, or ambiguous with strides PyTorch reads as channels_last."""
    if meta.layout is Layout.CHANNELS_LAST:
        return True
    return meta.layout is Layout.AMBIGUOUS and strides_like_channels_last(meta.shape, meta.strides)


def innermost_dim(meta: TensorMeta) -> int | None:
    """The dim of size > 1 with stride 1: where the tensor's memory runs (None if none)."""
    if len(meta.strides) != meta.rank:
        return None
    for d, (size, stride) in enumerate(zip(meta.shape, meta.strides, strict=True)):
        if size > 1 and stride == 1:
            return d
    return None


def channels_innermost(meta: TensorMeta, channels: frozenset[int] = frozenset({1})) -> bool:
    """A rank >= 4 tensor whose memory runs along its channel dims (dim 1 unless told, see
    :func:`channel_dims`), as in an NHWC tensor or any view of one (a channel slice, channel
    shuffle's 5D view, an unfold's 6D view, NHWC maps stacked along a new dim 0).

    Copying such a tensor into row-major order is an NHWC -> NCHW transpose. Tensors whose
    memory runs along another dim (attention's transposed keys, B x heads x N x d) are not
    image layouts and never count, nor do channels split over dims that are not all innermost
    (LaMa's FFT: real and imaginary parts stacked last, then merged into the channels).
    Ambiguous and row-major tensors never count.

    >>> import torch
    >>> channels_innermost(tensor_meta(torch.zeros(1, 4, 3, 3).to(memory_format=torch.channels_last)))
    True
    """
    if meta.rank < 4 or meta.layout is Layout.AMBIGUOUS or row_major(meta):
        return False
    held = [(d, st) for d, (n, st) in enumerate(zip(meta.shape, meta.strides, strict=True)) if n > 1 and st]
    below = min((st for d, st in held if d not in channels), default=meta.numel)
    return innermost_dim(meta) in channels and all(st < below for d, st in held if d in channels)


def channel_dims(src: TensorMeta, out: TensorMeta, *, either: bool = False) -> frozenset[int] | None:
    """The dims of ``src`` that hold the channels of ``out``, a spatial tensor copied or
    reduced from it; None when the shapes do not say.

    Dim 1 at the same shape. A reshape that merges dims into the channels (an attention block's
    ``v.reshape(B, C, H, W)`` of a (B, heads, d, H*W) view: channels are dims 1 and 2) is read
    from the shapes' factorisation. A source one rank higher reduced into ``out``
    (``torch.stack(maps).sum(0)``: a new dim 0 stacks NCHW maps, so the channels are dim 2) is
    the dim that ``out``'s dim 1 comes from, when dropping one dim of ``src`` gives ``out``'s
    shape one way only (``either``: every dim it may come from, where several ways do).

    >>> import torch
    >>> def meta(*shape): return tensor_meta(torch.empty(shape))
    >>> sorted(channel_dims(meta(4, 1, 8, 5, 5), meta(1, 8, 5, 5)))
    [2]
    >>> sorted(channel_dims(meta(1, 2, 64, 100), meta(1, 128, 10, 10)))
    [1, 2]
    >>> channel_dims(meta(4, 8, 8, 5, 5), meta(4, 8, 5, 5)) is None
    True
    """
    if src.shape == out.shape:
        return frozenset({1})
    if src.rank == out.rank and src.numel != out.numel:  # reduced with keepdim: each dim keeps its place
        return frozenset({1}) if all(b in (a, 1) for a, b in zip(src.shape, out.shape, strict=True)) else None
    if not out.is_spatial:
        return None
    if src.numel == out.numel:
        groups = _factor_groups(src.shape, out.shape)
        return next((frozenset(a) for a, b in groups if 1 in b), None) if groups else None
    if src.rank != out.rank + 1:
        return None
    found = {1 if d > 1 else 2 for d in range(src.rank) if src.shape[:d] + src.shape[d + 1 :] == out.shape}
    return frozenset(found) if len(found) == 1 or (either and found) else None


def _factor_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Align two shapes of equal numel into groups of dims with equal products (a reshape's
    view of which dims become which), or None if they do not align."""
    i = j = 0
    groups: list[tuple[list[int], list[int]]] = []
    while i < len(a) or j < len(b):
        ga: list[int] = []
        gb: list[int] = []
        pa = pb = 1
        if i < len(a):
            ga.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gb.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gb.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        groups.append((ga, gb))
    return groups


def row_major(meta: TensorMeta) -> bool:
    """Dense with the last dim innermost (``is_contiguous()``), rank >= 4, not ambiguous."""
    if meta.rank < 4 or len(meta.strides) != meta.rank or meta.layout is Layout.AMBIGUOUS:
        return False
    return is_dense_in_order(meta.shape, meta.strides, tuple(range(meta.rank - 1, -1, -1)))


def along_w(meta: TensorMeta) -> bool:
    """NCHW (row-major), or dense with its memory running along the last dim in another order
    (a 1D FFT along W of a channels_last map leaves N, H, C, W in memory): between such a
    tensor and a channels_last one, a copy is a layout transpose. Slices are not dense."""
    if meta.layout is Layout.CONTIGUOUS:
        return True
    if meta.layout is not Layout.STRIDED or meta.rank < 4 or len(meta.strides) != meta.rank:
        return False
    order = memory_order(meta)
    return bool(order) and order[-1] == max(order) != 1 and is_dense_in_order(meta.shape, meta.strides, order[::-1])


def nchw_side(meta: TensorMeta) -> bool:
    """On the NCHW side of a layout transpose: :func:`along_w`, or a slice of an NCHW map
    (strided, :func:`nchw_ordered`, nothing broadcast), which a kernel writing channels_last
    reads across layouts."""
    if along_w(meta):
        return True  # a one-channel slice (gates[:, l:l + 1]) has the same order in either layout
    return meta.layout is Layout.STRIDED and meta.shape[1] > 1 and 0 not in meta.strides and nchw_ordered(meta)


def memory_order(meta: TensorMeta, *, held: bool = False) -> tuple[int, ...]:
    """The dims of size > 1 (``held``: and not broadcast), outermost in memory first (ties by dim index).

    >>> import torch
    >>> memory_order(tensor_meta(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last)))
    (0, 2, 3, 1)
    """
    if len(meta.strides) != meta.rank:
        return ()
    dims = [d for d in range(meta.rank) if meta.shape[d] > 1 and not (held and meta.strides[d] == 0)]
    return tuple(sorted(dims, key=lambda d: (-meta.strides[d], d)))


def reorders(src: TensorMeta, dst: TensorMeta, *, positional: bool = False) -> bool:
    """Writing ``src`` (rank >= 4) as ``dst``, element for element, reorders memory: any
    permutation of dims, a layout change or not (channel shuffle's transpose(1, 2).contiguous()
    in NCHW too; an H/W-transposed operand of a cat), or a reshape of a permuted view into
    row-major order (``x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)`` in MaxViT's window merge).
    Copying a slice, which keeps the order, does not; nor does reading a broadcast ``src`` (an
    index ``expand``-ed over the channels: stride 0), compared over the dims both hold in memory.
    A map a stack writes (``dst`` one rank up) is compared with its slot along the new dim.
    ``positional``: never a reshape (a transposed conv's backward: as many elements by chance)."""
    if src.rank < 4 or len(src.strides) != src.rank:
        return False
    held = list(memory_order(src, held=True))
    if src.rank == dst.rank and (positional or src.shape == dst.shape or src.numel != dst.numel):  # dims correspond
        return [d for d in held if dst.shape[d] > 1] != [d for d in memory_order(dst) if d in held]
    if dst.rank == src.rank + 1:  # one of the maps a stack writes: its dims are dst's but a new one
        ways = [[b for b in range(dst.rank) if b != new] for new in range(dst.rank)]
        ways = [to for to in ways if [dst.shape[b] for b in to] == list(src.shape)]  # each the shapes leave open
        mine = [[to[d] for d in held if dst.shape[to[d]] > 1] for to in ways]
        return bool(mine) and all(m != [d for d in memory_order(dst) if d in m] for m in mine)
    return src.numel == dst.numel and row_major(dst) and held != sorted(held)


def nchw_ordered(meta: TensorMeta) -> bool:
    """Laid out in NCHW order, dense or not (a slice of an NCHW tensor): rank >= 4 and the
    strides of the dims after the batch dim (those of size > 1, not broadcast) never grow from C
    to W.

    >>> from nhwc_audit.layout import tensor_meta
    >>> import torch
    >>> nchw_ordered(tensor_meta(torch.zeros(1, 4, 10, 10)[:, :, 1:-1, 1:-1]))
    True
    >>> nchw_ordered(tensor_meta(torch.zeros(1, 4, 10, 10).to(memory_format=torch.channels_last)[:, :, 1:-1]))
    False
    """
    if meta.rank < 4 or len(meta.strides) != meta.rank:
        return False
    strides = [st for size, st in zip(meta.shape[1:], meta.strides[1:], strict=True) if size > 1 and st != 0]
    return len(strides) > 1 and all(a >= b for a, b in zip(strides, strides[1:], strict=False))
