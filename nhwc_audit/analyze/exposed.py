"""Would fixing a revert expose a break at a view downstream of it? Pure functions on records.

Propagation re-runs a view of an NCHW activation on a channels_last copy (channels_last_3d at
rank 5) and records what it raises (``NodeRecord.latent_error``). A fix makes the reverting op
keep its input's layout, which is channels_last for a map, but not for a 5D view of one: a
softmax over a channel group of ``x.view(N, G, C // G, H, W)`` reverts, and kept in its input's
order its output views back to N x C x H x W without a copy. Where the revert wrote the view's
input from an input of the same shape, the view is re-tried here on that input's strides.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..records import NodeInput, NodeRecord

__all__ = ["exposed", "view_strides"]


def view_strides(shape: Sequence[int], strides: Sequence[int], new_shape: Sequence[int]) -> list[int] | None:
    """The strides of ``new_shape`` viewed over memory of ``shape`` and ``strides`` without a copy,
    or None when ``Tensor.view`` would raise (ATen's ``computeStride``).

    >>> view_strides((2, 4, 2, 3), (24, 2, 1, 8), (2, 8, 3))
    [24, 1, 8]
    >>> view_strides((2, 8, 3), (24, 1, 8), (2, 24)) is None
    True
    """
    if not shape or 0 in shape:  # a scalar, an empty tensor: any view of as many elements
        return [1] * len(new_shape)
    out = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    base = strides[-1]
    tensor_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != tensor_numel * base):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                out[view_d] = view_numel * base
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                base, tensor_numel, view_numel = strides[d - 1], 1, 1
    return out if view_d == -1 else None


def exposed(r: NodeRecord, viewed: NodeInput, revert: NodeRecord) -> bool:
    """Would ``r``, a view of ``viewed`` (the NCHW output of ``revert``) that raised on a
    channels_last copy, raise once ``revert`` keeps its input's layout? Re-tried on the strides of
    ``revert``'s activation input of ``viewed``'s shape; where it has none, the recorded error says."""
    same = [i.meta for i in revert.activation_inputs if i.meta.shape == viewed.meta.shape]
    if r.op_name not in ("view", "view_as") or not same or not r.outputs or len(same[0].strides) != same[0].rank:
        return True
    return view_strides(same[0].shape, same[0].strides, r.outputs[0].shape) is None
