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
    "channels_innermost",
    "classify",
    "classify_strides",
    "innermost_dim",
    "is_dense_in_order",
    "leans_channels_last",
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


def channels_innermost(meta: TensorMeta) -> bool:
    """A rank >= 4 tensor whose memory runs along dim 1 (the channels), as in an NHWC tensor
    or any view of one (a channel slice, channel shuffle's 5D view, an unfold's 6D view).

    Copying such a tensor into row-major order is an NHWC -> NCHW transpose. Tensors whose
    memory runs along another dim (attention's transposed keys, B x heads x N x d) are not
    image layouts and never count. Ambiguous and row-major tensors never count.

    >>> from nhwc_audit.layout import tensor_meta
    >>> import torch
    >>> channels_innermost(tensor_meta(torch.zeros(1, 4, 3, 3).to(memory_format=torch.channels_last)))
    True
    """
    if meta.rank < 4 or meta.layout is Layout.AMBIGUOUS or row_major(meta):
        return False
    return innermost_dim(meta) == 1


def row_major(meta: TensorMeta) -> bool:
    """Dense with the last dim innermost (``is_contiguous()``), rank >= 4, not ambiguous."""
    if meta.rank < 4 or len(meta.strides) != meta.rank or meta.layout is Layout.AMBIGUOUS:
        return False
    return is_dense_in_order(meta.shape, meta.strides, tuple(range(meta.rank - 1, -1, -1)))


def nchw_ordered(meta: TensorMeta) -> bool:
    """Laid out in NCHW order, dense or not (a slice of an NCHW tensor): rank >= 4 and the
    strides of the dims after the batch dim (those of size > 1) never grow from C to W.

    >>> from nhwc_audit.layout import tensor_meta
    >>> import torch
    >>> nchw_ordered(tensor_meta(torch.zeros(1, 4, 10, 10)[:, :, 1:-1, 1:-1]))
    True
    >>> nchw_ordered(tensor_meta(torch.zeros(1, 4, 10, 10).to(memory_format=torch.channels_last)[:, :, 1:-1]))
    False
    """
    if meta.rank < 4 or len(meta.strides) != meta.rank:
        return False
    strides = [st for size, st in zip(meta.shape[1:], meta.strides[1:], strict=True) if size > 1]
    return len(strides) > 1 and all(a >= b for a, b in zip(strides, strides[1:], strict=False))
