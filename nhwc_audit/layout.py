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

__all__ = ["classify", "classify_strides", "is_dense_in_order", "tensor_meta"]

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
