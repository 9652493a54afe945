"""The keys of the hints that name a cause rather than an op (:mod:`.hints` registers their texts;
the rules in :mod:`.findings` pick them)."""

from __future__ import annotations

__all__ = [
    "AMBIGUOUS_ORIGIN",
    "ACCUMULATE_GRAD",
    "BACKWARD_DENSE",
    "BACKWARD_POOLED",
    "BACKWARD_INSIDE",
    "FORWARD_GROUPS",
    "FORWARD_INSIDE",
    "COMPUTED_WEIGHT",
    "DENSE_COPY",
    "HEAD_FOLD",
    "HIDDEN",
    "ND_TRANSPOSE",
    "ONE_CHANNEL",
    "STACK_REDUCE",
    "LOW_RANK_TABLE",
    "STORED_OPERAND",
    "TOKENS_TO_MAP",
    "STORED_TABLE",
    "VIEW_COPY",
    "WEIGHT_RESHAPE",
    "WHOLE_COPY",
]

AMBIGUOUS_ORIGIN = "@ambiguous-origin"
"""Key of the conversion hint used when the NCHW tensor was made from ambiguous input."""

ONE_CHANNEL = "@one-channel"
"""Key of the conversion hint for a convolution to one channel that re-lays an NCHW input because
its weight is channels_last (its output is laid alike either way)."""

HIDDEN = "@hidden"
"""Key of the conversion hint for layout-changing copies made inside a node."""

HEAD_FOLD = "@head-fold"
"""Key of the hint for a matrix multiply that copies the heads of a channels_last map's view to
fold them with the batch (attention on ``conv(x).reshape(B, heads, d, H * W)``)."""

ND_TRANSPOSE = "@nd-transpose"
"""Key of the revert hint for a copy of a channels-innermost view that is not plain NHWC."""

STACK_REDUCE = "@stack-reduce"
"""Key of the revert hint for a reduction over a stack of channels_last maps."""

COMPUTED_WEIGHT = "@computed-weight"
"""Key of the mixed hint for a convolution whose weight is computed in forward and NCHW."""

STORED_OPERAND = "@stored-operand"
"""Key of the mixed hint for a parameter, buffer or tensor constant re-laid to meet an activation."""

LOW_RANK_TABLE = "@low-rank-table"
"""Key of the mixed hint for a 2D/3D tensor a pointwise op broadcasts onto a map (a stored one the
conversion leaves row-major: it re-lays 4D/5D tensors only)."""

WEIGHT_RESHAPE = "@weight-reshape"
"""Key of the revert hint for a weight reshaped in forward (a copy out of NHWC every call)."""

STORED_TABLE = "@stored-table"
"""Key of the revert hint for a 4D buffer or parameter that holds no image (a table of
coordinates, tokens) copied out of the channels_last strides the conversion gave it."""

DENSE_COPY = "@dense-copy"
"""Key of the conversion hint for a kernel's copy of a channel slice of a channels_last map, dense in
no memory format (dense in NCHW at batch 1), before it computes."""

VIEW_COPY = "@view-copy"
"""Key of the conversion hint for a copy into row-major order of a 3D view of a channels_last map
(``flatten(2)``: N x C x HW, dense in NHWC memory), by a kernel (a GroupNorm, a softmax, a Conv1d) or
``contiguous()``, where the NCHW map's view is row-major already."""

WHOLE_COPY = "@whole-copy"
"""Key of the revert hint for a kernel that copies its whole channels_last input into NCHW order first
and writes no map (``F.unfold``'s im2col, ``median`` along a dim)."""

BACKWARD_INSIDE = "@backward-inside"
"""Key of the backward hint for what a backward kernel copies inside of a tensor it computed, into another
layout (a CPU channels_last convolution's weight gradient, computed NCHW): intrinsic, no model change
removes it."""

ACCUMULATE_GRAD = "@accumulate-grad"
"""Key of the backward hint for autograd's copy of a 4D/5D parameter's gradient, computed in another
layout, into the parameter's strides (``AccumulateGrad``, at a training step's ``loss.backward()``)."""

BACKWARD_DENSE = "@backward-dense"
"""Key of the backward hint for what a backward kernel copies inside of a saved input not dense in memory
(a channel slice of a channels_last map) made dense, a weight gradient's copy beside it or not."""

BACKWARD_POOLED = "@backward-pooled"
"""Key of the backward hint for a global average pool's gradient (``mean`` over the spatial dims,
``AdaptiveAvgPool2d(1)``): its backward divides the broadcast gradient into a new NCHW tensor, which meets
channels_last maps at the pool's input (a pooled head, squeeze-excite); a sum divided after it keeps the
gradient a broadcast view."""

FORWARD_INSIDE = "@forward-inside"
"""Key of the revert (or conversion) hint for what a convolution's kernel copies inside of its weight or of
what it made (the CPU's slow backend for a Conv3d at batch 1 copies its channels_last weight into NCDHW):
intrinsic, no change to the model's ops removes it."""

FORWARD_GROUPS = "@forward-groups"
"""Key of the hint for a grouped convolution's kernel copying each group's channel slice of its input (the
CPU's slow backend for a grouped Conv2d at batch 1 runs one group at a time; a channel slice of a
channels_last map is dense in no order): intrinsic, no change to the model's ops removes it."""

TOKENS_TO_MAP = "@tokens-to-map"
"""Key of the conversion hint for a map made NCHW from values of fewer dims in channel-major order
(``out.view(b, c, h, w)`` of an attention's (b, c, h * w) result)."""
