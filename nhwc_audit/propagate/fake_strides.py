"""Strides of a fake run's outputs made to follow the eager CPU kernels where FakeTensor strides
them otherwise (torch 2.14.1) and a kernel after them reads them to pick a layout: size-1 dims of
pointwise outputs (:class:`PointwiseStrides`), backward ops whose meta kernels stride the
gradient by another operand (views' size-1 dims: :mod:`.fake_views`). The labels say in
the report what was corrected (:class:`~.corrections.Corrections` keeps the list).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_leaves, tree_map

from ..channels import dense_strides
from ..layout import is_dense_in_order
from ..records import CONV_OPS
from .dispatch import RecordingMode
from .fake_views import VIEW_STRIDES, view_strides

__all__ = [
    "PROBED_FORWARDS",
    "BACKWARD_STRIDES",
    "POINTWISE_STRIDES",
    "FORWARD_STRIDES",
    "PointwiseStrides",
    "eager_cpu_strides",
]


POINTWISE_STRIDES = (
    "ops on N x C x 1 x 1 maps (dense in both orders), and on batch-1 maps viewed back from tokens, strided "
    "as eager strides them, where FakeTensor strides them otherwise (pointwise ops, CPU batch and layer norms "
    "write NCHW; x / s keeps a view's batch stride); kernels read them to pick a layout, as F.interpolate "
    "after image pooling and GroupNorm after attention do"
)
BACKWARD_STRIDES = (
    "gradients of GLU, log_softmax, norms, ELU/LogSigmoid/RReLU, reflect/replicate pads and MSE/smooth L1/"
    "Huber/BCE losses strided as the "
    "CPU kernels stride them, where their meta kernels give other layouts; those of maximum, minimum and "
    "clamp with tensor bounds masked in place, as in training"
)
FORWARD_STRIDES = (
    "LogSigmoid, RReLU and a scalar raised to a tensor (2 ** x) strided as eager strides them (NCHW from a "
    "channels_last input), BatchNorm of a map in no memory format (a transposed or sliced one: NCHW), the angle of a "
    "complex map and isin (NCHW), and roll, channel_shuffle, 5D reflect/replicate pads, copysign and floor_divide by a "
    "broadcast operand and index_fill of a channel slice (channels_last kept), where FakeTensor does otherwise"
)
PROBED_FORWARDS = frozenset(
    {"log_sigmoid_forward", "rrelu_with_noise", "pow.Scalar", "roll", "channel_shuffle", "reflection_pad3d"}
    | {"replication_pad3d", "copysign", "floor_divide", "index_fill", "angle", "isin"}
)
"""Forward ops (by name, or name and overload) whose eager kernels stride their output otherwise
than FakeTensor (torch 2.14.1, each op run raw on a channels_last map, eager against fake);
``rrelu_with_noise`` writes its noise argument, not its output's source. The 5D pads too where no
node of their own shows them (a Conv3d's ``padding_mode='reflect'`` pads inside the module). copysign,
floor_divide, index_fill, angle and isin: sweeps of 144 elementwise ops and of every ATen op callable on a map, eager's strides against fake's, on
whole channels_last maps and their channel slices, with channel and row buffers."""
_PROBED_BACKWARDS = frozenset(
    {
        "glu_backward",
        "_log_softmax_backward_data",
        "native_batch_norm_backward",
        "native_layer_norm_backward",
        "native_group_norm_backward",
        "rrelu_with_noise_backward",
        "logit_backward",
        *(f"{act}_backward" for act in ("softplus", "hardtanh", "hardswish", "hardsigmoid", "elu", "log_sigmoid")),
        *(f"{kind}_pad{d}d_backward" for kind in ("reflection", "replication") for d in (1, 2, 3)),
        *(f"{loss}_backward" for loss in ("mse_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy")),
    }
)
"""Backward ops whose meta kernels stride the gradient otherwise than the CPU kernels (torch
2.14.1): the CPU kernel is asked (:func:`eager_cpu_strides`, up to :data:`_PROBE_NUMEL`)."""
_FILLED_IN_PLACE = frozenset(
    {"MaximumBackward0", "MinimumBackward0", "FmaxBackward0", "FminBackward0", "ClampBackward0"}
    | {"ClampMinBackward1", "ClampMaxBackward1"}
)
"""Autograd formulas that mask their gradient with ``masked_fill_`` (in place), and under any
dispatch mode (a fake run's) with ``masked_fill``, which copies to contiguous (torch 2.14.1,
``isTensorSubclassLike``): the fill keeps its input's strides, as in training."""
_VIEW_OPS = frozenset({"view", "_unsafe_view", "_reshape_alias"})
"""ATen's views by ``computeStride`` (:func:`~.fake_views.view_strides`), met at the dispatch level."""
_UNTAGGED_POINTWISE = frozenset({"hardswish"})
"""TensorIterator kernels without ATen's ``pointwise`` tag."""
_PROBE_NUMEL = 1 << 22
"""Elements of all of an op's tensor arguments and its output together up to which the CPU
kernel itself is asked for the strides of an output (a fake run's N x C x 1 x 1 output: a
BatchNorm of 64 x 2048 pooled features is 131,072; an export's, :mod:`.exported`); above it, or
where the kernel raises, the fake tensor's (a fake run: the pointwise rule)."""


class PointwiseStrides(RecordingMode):
    """Strides of a fake op's 3D-5D output with size-1 dims (an unfold's N x C*k*k x 1 too), which
    FakeTensor takes from the input where eager kernels may not: an N x C x 1 x 1 map is dense in
    both orders; a half-precision pointwise op with an expanded operand (:func:`_half_expanded`). On
    the CPU, and for pointwise ops on any device (TensorIterator's code strides them alike),
    the op runs once for real on zeros of its arguments' shapes, strides and dtypes (small ones,
    :data:`_PROBE_NUMEL`; not convolutions, which FakeTensor strides as eager does) and its
    output's strides are eager's. Elsewhere, and where the probe cannot tell, TensorIterator's
    fast setup: a pointwise op whose operands all have the output's shape and are all
    ``is_contiguous()`` allocates a contiguous output."""

    def __init__(self, device: str, applied: list[tuple[str, str]]) -> None:
        super().__init__()
        self.applied = applied
        """Where a correction goes: (node, label); the node is not known here ("")."""
        self.cpu = device.split(":")[0] == "cpu"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if func.overloadpacket is torch.ops.aten.masked_fill and _filled_in_place(args[0], first):
            self.applied.append(("", BACKWARD_STRIDES))
            return torch.empty_strided(first.shape, args[0].stride(), dtype=first.dtype, device=first.device)
        name = func.overloadpacket.__name__
        forward = name in PROBED_FORWARDS or func.__name__ in PROBED_FORWARDS or _odd_norm(name, args)
        probed = forward or name in _PROBED_BACKWARDS
        if not isinstance(first, torch.Tensor) or first.dim() not in (3, 4, 5):
            return out
        odd = first.shape[0] == 1 and _odd_batch(args)
        if not (probed or 1 in first.shape[1:] or odd or _half_expanded(func, args)):
            return out  # the common case, decided first: no size-1 dim to stride otherwise
        if name in _VIEW_OPS and isinstance(args[0], torch.Tensor):  # inside a composite too (einsum's)
            viewed = view_strides(args[0], first, backward=False)
            if viewed is not first:
                self.applied.append(("", VIEW_STRIDES))
            return viewed
        if (func._schema.is_mutable and not forward) or func._schema.returns[0].alias_info is not None:
            return out  # in place, or a view: strided by its input
        conv = func.overloadpacket.__name__ in CONV_OPS  # strided as FakeTensor strides them, and costly
        # TensorIterator strides a pointwise op's output by code that CPU and CUDA share: the CPU
        # kernel answers for every device there (a batch-1 map's odd batch stride, kept by ``x / s``),
        # but where dtypes mix (the CPU casts operands to a common dtype first, CUDA in the kernel)
        dtypes = {t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
        asked = self.cpu or (_pointwise(func) and len(dtypes) == 1)
        got = eager_cpu_outputs(func, args, kwargs, first) if asked and not conv else None
        strides = tuple(got[0].stride()) if got else None
        if strides is None and (probed or odd) and asked and not conv:  # too large to ask whole: on cut copies
            strides = _asked_on_cuts(func, args, kwargs, first)
        if strides is None and first.is_contiguous() and _fast_contiguous(func, args, kwargs, out):
            strides = dense_strides(first.shape, list(range(first.dim())))
        # the kernel's dtype too: a GroupNorm backward under autocast (bfloat16 input, float32 statistics)
        # gives the input's, where its meta kernel promotes to float32
        dtype = got[0].dtype if got and got[0].dtype.is_floating_point == first.dtype.is_floating_point else first.dtype
        if strides is None or (strides == tuple(first.stride()) and dtype == first.dtype):
            return out
        self.applied.append(("", FORWARD_STRIDES if forward else BACKWARD_STRIDES if probed else POINTWISE_STRIDES))
        fixed = torch.empty_strided(first.shape, strides, dtype=dtype, device=first.device)
        if first is out:
            return fixed
        rest = list(out[1:])
        if forward and got:  # what it saves for its backward too (log_sigmoid's buffer)
            rest = [_like(o, g) for o, g in zip(rest, got[1:], strict=False)] + rest[len(got) - 1 :]
        elif forward:  # (asked on cuts: an output of the first's shape strided as it)
            rest = [_like(o, fixed) if isinstance(o, torch.Tensor) and o.shape == first.shape else o for o in rest]
        return type(out)([fixed, *rest])


def _odd_norm(name: str, args: Any) -> bool:
    """A CPU BatchNorm of a map dense in no memory format (``x.transpose(2, 3)``, ``x[..., ::2]``): its kernel
    writes NCHW, FakeTensor keeps the input's strides (a map in a memory format: alike, never asked)."""
    if name != "native_batch_norm" or not args or not isinstance(x := args[0], torch.Tensor) or x.dim() not in (4, 5):
        return False
    formats = (torch.contiguous_format, torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return not any(x.is_contiguous(memory_format=f) for f in formats)


def _like(fake: Any, eager: Any) -> Any:
    """``fake`` strided as ``eager``, a CPU kernel's output of its shape and dtype."""
    if not isinstance(fake, torch.Tensor) or not isinstance(eager, torch.Tensor) or fake.shape != eager.shape:
        return fake
    return torch.empty_strided(fake.shape, eager.stride(), dtype=fake.dtype, device=fake.device)


def _odd_batch(args: Any) -> bool:
    """Some 3D-5D tensor argument is dense with a size-1 batch dim strided as no dense layout
    strides it (not the product of the other sizes): a batch-1 map viewed back from tokens
    (``t.transpose(-1, -2).reshape(1, C, H, W)``: strides (C, 1, W*C, C)). FakeTensor gives an
    op on it a dense output; the CPU kernel of an op whose operands differ in shape (``x / s``)
    keeps that stride, and a GroupNorm after it then picks NCHW (``suggest_memory_format``)."""
    for t in args:
        if isinstance(t, torch.Tensor) and t.dim() in (3, 4, 5) and t.shape[0] == 1:
            rest = t.shape[1:].numel()
            order = sorted(range(1, t.dim()), key=t.stride)  # innermost first
            if t.stride(0) != rest and rest > 1 and is_dense_in_order(t.shape, t.stride(), order):
                return True
    return False


def _half_expanded(func: Any, args: Any) -> bool:
    """A pointwise op in half precision with an expanded operand (a stride 0): FakeTensor computes
    it as its reference does, upcast to float32 first, and the cast of the expanded operand (dense
    NCHW) picks the output's layout, where eager's TensorIterator reads the other operands (``a[:,
    :1].expand_as(a) + a`` of a channels_last float16 ``a`` is channels_last)."""
    tensors = [t for t in args if isinstance(t, torch.Tensor) and t.dim() in (3, 4, 5)]
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    return half and _pointwise(func) and any(0 in t.stride() for t in tensors)


def _filled_in_place(filled: Any, out: torch.Tensor) -> bool:
    """``out``, a ``masked_fill`` of ``filled``, is a gradient that training fills in place."""
    node = torch._C._current_autograd_node()
    return type(node).__name__ in _FILLED_IN_PLACE and filled.shape == out.shape and filled.stride() != out.stride()


def _asked_on_cuts(func: Any, args: Any, kwargs: dict[str, Any], first: torch.Tensor) -> tuple[int, ...] | None:
    """For an op too large to ask whole (:data:`_PROBE_NUMEL`): the dim order the CPU kernel gives
    its first output on zeros of the arguments with their dims past the channels cut to 3, each
    tensor in its own dim order (a broadcast dim kept broadcast), as dense strides of ``first``'s
    shape; None when the kernel refuses the cuts or writes no dense output. A kernel's choice of
    layout follows its operands' dim orders, not the sizes of H and W. A kernel that refuses the
    cuts is asked again with the last dim, then the last two, whole: a layer norm over tokens'
    channels (``normalized_shape``, mvit's pooled keys) takes no cut there. A batch-1 map viewed
    back from tokens keeps its odd batch stride in the cut (its size-1 dim sits where its stride
    puts it in the dim order), and so does the output's strides when the kernel keeps it (``x /
    2``, not ``relu(x)``)."""

    def cut(v: Any, whole: int) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() < 3:
            return real_zeros(v)
        full = [n if d < 2 or d >= v.dim() - whole or n == 1 else min(n, 3) for d, n in enumerate(v.shape)]
        base = [1 if v.stride(d) == 0 else n for d, n in enumerate(full)]
        order = sorted(range(v.dim()), key=lambda d: (v.stride(d), d), reverse=True)  # outermost first
        small = torch.zeros([base[d] for d in order], dtype=v.dtype).permute([order.index(d) for d in range(v.dim())])
        return small.expand(full)

    out = None
    for whole in (0, 1, 2):
        made = functools.partial(cut, whole=whole)
        try:
            with unset_fake_temporarily():
                out = func(*tree_map(made, args), **tree_map(made, kwargs))
            break
        except Exception:
            continue
    if out is None:
        return None
    got = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(got, torch.Tensor) or got.dim() != first.dim():
        return None
    order = sorted(range(got.dim()), key=lambda d: (got.stride(d), d), reverse=True)
    if not is_dense_in_order(got.shape, got.stride(), order[::-1]):
        return None
    return dense_strides(first.shape, order)


def real_zeros(v: Any, dtype: torch.dtype | None = None) -> Any:
    """A real tensor of zeros strided as ``v`` (a fake one), in ``dtype`` (default: ``v``'s), or
    ``v`` itself when no tensor."""
    if not isinstance(v, torch.Tensor):
        return v
    span = 1 + sum((n - 1) * st for n, st in zip(v.shape, v.stride(), strict=True)) if v.numel() else 0
    return torch.zeros(span, dtype=dtype or v.dtype).as_strided(v.shape, v.stride())


def eager_cpu_strides(func: Any, args: Any, kwargs: dict[str, Any], first: torch.Tensor) -> tuple[int, ...] | None:
    """The strides the CPU kernel gives ``func``'s first output (:func:`eager_cpu_outputs`)."""
    got = eager_cpu_outputs(func, args, kwargs, first)
    return tuple(got[0].stride()) if got else None


def eager_cpu_outputs(func: Any, args: Any, kwargs: dict[str, Any], first: torch.Tensor) -> list[Any] | None:
    """The CPU kernel's outputs of ``func`` (a list, first first), on zeros of the arguments'
    shapes, strides and dtypes; None when the arguments and the output are large or the kernel
    raises. A kernel that refuses reduced-precision 1D or 2D arguments is asked again with them in
    float32: FakeTensor gives a bfloat16 batch or group norm's saved statistics its input's dtype,
    where the CPU kernel keeps them in float32 (and its backward refuses others: "mixed dtype")."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if sum(t.numel() for t in tensors) + first.numel() > _PROBE_NUMEL:
        return None

    def real(v: Any, stats: torch.dtype | None = None) -> Any:
        half = isinstance(v, torch.Tensor) and v.dim() in (1, 2) and v.dtype in (torch.float16, torch.bfloat16)
        return real_zeros(v, stats if half else None)

    # a batch norm's statistics are C, a group norm's N x G
    half_stats = any(t.dim() in (1, 2) and t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    out = None
    for stats in (None, torch.float32) if half_stats else (None,):
        try:
            with unset_fake_temporarily():
                made = functools.partial(real, stats=stats)
                out = func(*tree_map(made, args), **tree_map(made, kwargs))
            break
        except Exception:
            continue
    if out is None:
        return None
    results = list(out) if isinstance(out, (tuple, list)) else [out]
    if not results or not isinstance(results[0], torch.Tensor) or results[0].shape != first.shape:
        return None
    return results


def _pointwise(func: Any) -> bool:
    return torch.Tag.pointwise in func.tags or func.__name__.split(".")[0] in _UNTAGGED_POINTWISE


def _fast_contiguous(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> bool:
    if not isinstance(out, torch.Tensor):
        return False
    schema = func._schema
    if any(a.name == "memory_format" for a in schema.arguments):
        return False  # clone, _to_copy: preserve_format keeps the input's strides
    if schema.is_mutable or not _pointwise(func):
        return False
    operands = []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(arg.type, torch.TensorType) and value is not None:
            operands.append(value)
    return all(isinstance(t, torch.Tensor) and t.shape == out.shape and t.is_contiguous() for t in operands)
