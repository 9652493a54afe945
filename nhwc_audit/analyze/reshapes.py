"""Copies a reshape call makes: ATen's ``reshape`` of a tensor it cannot view is a copy then
``_unsafe_view``, which the eager capture sees as two ops. Which shape such a copy is read as,
and whether it is an exit out of the spatial ranks (a flatten before a classifier)."""

from __future__ import annotations

from ..records import Layout, NodeRecord, TensorMeta

__all__ = ["exits_spatial", "folds_tokens", "is_reshape", "viewed_as"]


_RESHAPE_COPIES = ("clone", "contiguous", "_reshape_copy", "reshape", "flatten")
"""Copies a ``reshape`` that cannot view decomposes into (then ``_unsafe_view``), as ATen names
them or as the eager capture labels them (by the call the model made)."""


_RESHAPES = frozenset({"reshape", "flatten", "unflatten", "view", "_unsafe_view", "_reshape_copy"})
"""Calls that change a tensor's shape and nothing else (lower case: ``nn.Flatten`` too), as the eager
capture's exits are named (``reshape_as`` is not one: its copy is counted, as eager counts it)."""


def is_reshape(r: NodeRecord) -> bool:
    """``r`` is a reshape call, whose copy out of the spatial ranks is an exit (as the eager
    capture counts one); an op that computes (a matmul, an einsum, a tensordot over H and W)
    copies an NHWC operand it cannot read as it is, into a lower-rank output too, and that copy
    is the layout's (eager's channels_last run clones it, the NCHW run views it)."""
    return r.op_name.lower() in _RESHAPES


def _reshape_view(r: NodeRecord, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> NodeRecord | None:
    """For a copy that keeps its input's shape and whose one user views it as another shape of
    the same size (ATen's ``reshape`` is ``clone`` then ``_unsafe_view``: the eager capture sees
    the copy and the new shape as two ops), that view."""
    if len(r.users) != 1 or not reverted or r.op_name not in _RESHAPE_COPIES:
        return None
    if not any(i.meta.shape == reverted[0].shape for i in r.activation_inputs):
        return None
    user = by_name.get(r.users[0])
    if user is None or not user.aliases_input or not user.outputs:
        return None
    return user if user.outputs[0].numel == reverted[0].numel else None


def viewed_as(r: NodeRecord, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> list[TensorMeta]:
    """The shape a copy is read as: its own, or, for the copy of a reshape to another spatial
    shape (:func:`_reshape_view`), that one (a graph's ``reshape`` node already has its shape)."""
    user = _reshape_view(r, reverted, by_name)
    return [user.outputs[0]] if user is not None and user.outputs[0].is_spatial else reverted


def exits_spatial(r: NodeRecord, reverted: list[TensorMeta], by_name: dict[str, NodeRecord]) -> bool:
    """The copy of one reshape call out of the spatial ranks (``torch.flatten(x, 1)`` before a
    classifier, as the eager capture records it: a copy, then a view to 2D, both made by that
    call, at its line): an exit, which a graph records as one node with a non-spatial output. A
    copy the model asks for itself (``.contiguous()``) that a later call flattens stays a copy,
    and so does a weight reshaped in forward (weight standardisation: :func:`_reshape_view` reads
    activations only)."""
    user = _reshape_view(r, reverted, by_name)
    # below rank 4 only, as a graph's hidden copy counts (a 6D reshape that copies stays a revert)
    return user is not None and user.outputs[0].rank < 4 and user.op_name == r.op_name and user.source == r.source


def folds_tokens(r: NodeRecord | None) -> bool:
    """``r`` reshapes values of fewer dims into an NCHW map: ``out.view(b, c, h, w)`` of a matmul's
    (b, c, h * w) result, channel-major, which a (b, h * w, c) result transposed would make channels_last."""
    if r is None or not is_reshape(r) or not r.outputs or not r.inputs:
        return False
    out = r.outputs[0]
    return out.rank in (4, 5) and r.inputs[0].meta.rank < out.rank and out.layout is Layout.CONTIGUOUS
