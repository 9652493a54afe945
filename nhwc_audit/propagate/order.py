"""Which ops keep NCHW order: handed tensors in NCHW order, they hand on tensors in NCHW order,
forward and backward. One list (:data:`KEEPS_ORDER`) named as autograd names its nodes; the
forward asks it by ATen op (:func:`forward_reorders`), whose names it spells the same way once
underscores and case are set aside (``native_batch_norm`` and ``NativeBatchNorm``,
``upsample_bilinear2d`` and ``UpsampleBilinear2D``, ``_to_copy`` and ``ToCopy``)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..tensors import iter_tensors

__all__ = ["KEEPS_ORDER", "forward_reorders"]

KEEPS_ORDER = frozenset(
    {
        # elementwise and activations: TensorIterator follows the input's strides
        *("Add", "Sub", "Mul", "Div", "Neg", "Pow", "Exp", "Log", "Sqrt", "Rsqrt", "Abs", "Reciprocal"),
        *("Clamp", "ClampMin", "ClampMax", "Relu", "Threshold", "Gelu", "Silu", "Sigmoid", "Tanh"),
        *("Hardsigmoid", "Hardswish", "Hardtanh", "LeakyRelu", "Elu", "PreluKernel", "Softplus", "Mish"),
        *("Where", "MaskedFill", "NativeDropout", "Softmax", "LogSoftmax"),
        # reductions over dims (keepdim or not), norms, convolutions, pools, pads, resampling
        *("Mean", "Sum", "Amax", "Amin", "Std", "Var", "LinalgVectorNorm", "Convolution"),
        *("NativeBatchNorm", "NativeGroupNorm", "NativeLayerNorm", "MaxPool2DWithIndices"),
        *("MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D"),
        *("AdaptiveMaxPool2D", "UpsampleNearest2D", "UpsampleNearest3D", "UpsampleBilinear2D"),
        *("UpsampleTrilinear3D", "UpsampleBicubic2D", "ConstantPadNd", "ReflectionPad2D"),
        *("ReplicationPad2D", "ReflectionPad3D", "ReplicationPad3D", "PixelShuffle", "PixelUnshuffle"),
        # joins, splits and views that keep the dims' order; copies into the same order
        *("Cat", "Stack", "Split", "SplitWithSizes", "Unbind", "Slice", "Select", "View", "UnsafeView"),
        *("ReshapeAlias", "Alias", "Expand", "Unsqueeze", "Squeeze", "Clone", "ToCopy", "CopySlices"),
        *("AsStrided", "Roll", "Flip", "Mm", "Addmm", "Bmm"),
    }
)
"""Autograd nodes (their names without the version digit) of ops that, handed tensors in NCHW
order, hand on tensors in NCHW order, forward and backward. A model all of whose nodes on tensors
of rank 3 and up are of these kinds (and whose graph asks for no channels_last memory format)
keeps every 4D/5D tensor of an NCHW run in NCHW order, so its backward moves nothing. Anything
else may not: a permute or transpose (a transpose of tokens reshaped back to a map is
channels_last-strided in an NCHW model), ``linalg.inv`` (column-major), an FFT over the channels,
an attention kernel; a Linear's ``weight.t()`` is rank 2. ``as_strided`` is here: autograd puts it
behind every in-place op on a view, and the audit on the weights it restrides."""

_FORWARD = frozenset(k.lower() for k in KEEPS_ORDER - {"AsStrided", "CopySlices"} | {"Detach"})
""":data:`KEEPS_ORDER` as the forward's ATen ops are asked (:func:`_kept`): not ``as_strided``,
which a forward may call to lay a tensor any way (autograd's and the audit's own are backward's
and the restrided weights', never a forward op of the model's), and no ``copy_`` (``CopySlices``
is autograd's), whose destination may be laid any way; ``detach`` too, a view as laid (autograd
detaches the output a softmax saves for its backward), which has no autograd node."""

_FORMATS = (torch.channels_last, torch.channels_last_3d)


@functools.cache
def _kept(func: Any) -> bool:
    """ATen op ``func`` is of a kind in :data:`KEEPS_ORDER` (``add_`` as ``add``, ``_softmax`` as
    ``Softmax``; a custom op named so, ``mylib::relu``, is not)."""
    return func.namespace == "aten" and func.overloadpacket.__name__.strip("_").replace("_", "").lower() in _FORWARD


def forward_reorders(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> bool:
    """Could ATen op ``func`` (called on ``args``/``kwargs``, giving ``out``) hand on a tensor in
    another order than NCHW in an NCHW run? Unless it is of a kind in :data:`KEEPS_ORDER` and asks
    for no channels_last memory format (a ``clone``'s), or makes no tensor (a fake tensor's
    ``prim.device``, a size), or reads and makes nothing of rank 3 and up (a Linear's rank-2 ``mm``)."""
    if _kept(func):
        return kwargs.get("memory_format") in _FORMATS
    made = iter_tensors(out)
    return bool(made) and (any(t.dim() >= 3 for t in made) or any(t.dim() >= 3 for t in iter_tensors((args, kwargs))))
