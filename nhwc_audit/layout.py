"""The layout rule, in one place: tensor (shape, strides) -> :class:`Layout`.

The checks follow PyTorch's own ``is_contiguous`` semantics (dims of size 1 place no
constraint on their stride) and run in a fixed order, so a tensor that is dense in both
NCHW and NHWC order (C == 1, H == W == 1, ...) is always reported ``AMBIGUOUS``, never
labelled by chance.
"""

from __future__ import annotations

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
    "row_major",
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
    if len(strides) == len(shape):
        layout = classify_strides(shape, strides)
    else:
        layout = Layout.NOT_SPATIAL
    return TensorMeta(
        shape=shape,
        strides=strides,
        dtype=str(t.dtype).removeprefix("torch."),
        itemsize=t.element_size(),
        layout=layout,
    )


def innermost_dim(meta: TensorMeta) -> int | None:
    """The dim of size > 1 with stride 1: where the tensor's memory runs (None if none)."""
    if len(meta.strides) != meta.rank:
        return None
    for d, (size, stride) in enumerate(zip(meta.shape, meta.strides, strict=True)):
        if size > 1 and stride == 1:
            return d
    return None


def channels_innermost(meta: TensorMeta) -> bool:
    """A rank >= 4 tensor whose memory runs along a dim other than its last one, as in an
    NHWC tensor or any view of one (a channel slice, channel shuffle's 5D view).

    Copying such a tensor into row-major order is a layout transpose. Ambiguous and
    row-major tensors are never channels-innermost.

    >>> from nhwc_audit.layout import tensor_meta
    >>> import torch
    >>> channels_innermost(tensor_meta(torch.zeros(1, 4, 3, 3).to(memory_format=torch.channels_last)))
    True
    """
    if meta.rank < 4 or len(meta.strides) != meta.rank or meta.layout is Layout.AMBIGUOUS:
        return False
    if row_major(meta):
        return False
    d = innermost_dim(meta)
    last = max((i for i, s in enumerate(meta.shape) if s > 1), default=None)
    return d is not None and d != last


def row_major(meta: TensorMeta) -> bool:
    """Dense with the last dim innermost (``is_contiguous()``), rank >= 4, not ambiguous."""
    if meta.rank < 4 or len(meta.strides) != meta.rank or meta.layout is Layout.AMBIGUOUS:
        return False
    return is_dense_in_order(meta.shape, meta.strides, tuple(range(meta.rank - 1, -1, -1)))
