"""Where fake tensors are known to be wrong: ops whose meta kernels return NCHW while the eager
kernel of the device keeps channels_last (torch 2.14.1). A fake audit follows the eager
behaviour there (:class:`Corrections`, labelled in the report) instead of feeding a revert
that never happens into the bytes, the hints and the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_leaves, tree_map

from ..layout import strides_like_channels_last, tensor_meta
from ..prepare.copy import memory_format_for_rank
from ..records import CONV_OPS, Layout
from .dispatch import RecordingMode, is_alias_of

__all__ = [
    "KNOWN_DIVERGENCES",
    "POINTWISE_STRIDES",
    "VIEW_STRIDES",
    "Corrections",
    "Divergence",
    "eager_cpu_strides",
    "known_divergence",
]


@dataclass(frozen=True, slots=True)
class Divergence:
    """An op whose meta kernel returns NCHW where eager ``device`` keeps channels_last."""

    ops: frozenset[str]
    """Op names as recorded, lower-cased: module types, functions, ATen ops."""
    device: str
    text: str
    ranks: frozenset[int] = frozenset({4, 5})
    modes: frozenset[str] | None = None
    """For ops with a mode (pad): the modes it concerns."""
    suggested: bool = False
    """The eager kernel picks its output's layout by its input's ``suggest_memory_format()``
    (:func:`~nhwc_audit.layout.strides_like_channels_last`): a channels_last input whose size-1
    batch dim has another stride (a view after a transpose) gets NCHW there."""


KNOWN_DIVERGENCES: tuple[Divergence, ...] = (
    Divergence(
        frozenset({"groupnorm", "group_norm", "native_group_norm"}),
        "cpu",
        "GroupNorm: fake/meta returns NCHW, eager CPU keeps channels_last",
        suggested=True,
    ),
    Divergence(
        frozenset({"roll"}),
        "cpu",
        "torch.roll: fake/meta returns NCHW, eager CPU keeps channels_last",
        modes=frozenset({""}),  # over dims; rolled flattened, eager copies to NCHW too
    ),
    Divergence(
        frozenset({"channelshuffle", "channel_shuffle", "native_channel_shuffle"}),
        "cpu",
        "nn.ChannelShuffle: fake/meta returns NCHW, eager CPU keeps channels_last",
    ),
    Divergence(
        frozenset({"pad", "reflection_pad3d", "replication_pad3d"}),
        "cpu",
        "5D reflect/replicate pad: fake/meta returns NCDHW, eager CPU keeps channels_last_3d",
        ranks=frozenset({5}),
        modes=frozenset({"reflect", "replicate", ""}),
    ),
)


def known_divergence(names: tuple[str, ...], detail: str, rank: int, device: str) -> Divergence | None:
    """The known divergence for an op called any of ``names`` (module type, function or ATen
    name), with mode ``detail``, at an output of ``rank``, on ``device``; None if none."""
    dev = device.split(":")[0]
    lowered = {n.lower() for n in names}
    for d in KNOWN_DIVERGENCES:
        if d.device == dev and rank in d.ranks and lowered & d.ops and (d.modes is None or detail in d.modes):
            return d
    return None


@dataclass
class Corrections:
    """Applies the known divergences of ``device`` to a fake run's outputs, and keeps what it
    changed: (node, what eager does there)."""

    device: str
    applied: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ops(self) -> frozenset[str]:
        """Every op name (lower-cased) of a known divergence on this device."""
        dev = self.device.split(":")[0]
        return frozenset().union(*(d.ops for d in KNOWN_DIVERGENCES if d.device == dev))

    def apply(self, node: str, names: tuple[str, ...], detail: str, inputs: list[torch.Tensor], out: object) -> object:
        """``out``, restrided to channels_last where eager keeps it: a known divergence, a
        channels_last input and an NCHW output of that rank; a view's size-1 dims strided as
        eager strides them (:func:`_view_strides`)."""
        if inputs and isinstance(out, torch.Tensor) and {n.lower() for n in names} & _VIEWS:
            viewed = _view_strides(inputs[0], out)
            if viewed is not out:
                self.applied.append((node, VIEW_STRIDES))
            return viewed
        spatial = [t for t in inputs if t.dim() in (4, 5)]
        exact = any(tensor_meta(t).layout is Layout.CHANNELS_LAST for t in spatial)
        suggests = any(strides_like_channels_last(t.shape, t.stride()) for t in spatial)  # a channel slice too
        if not (exact or suggests):
            return out

        def fix(t: torch.Tensor) -> torch.Tensor:
            d = known_divergence(names, detail, t.dim(), self.device)
            fmt = memory_format_for_rank(t.dim())
            if d is None or fmt is None or tensor_meta(t).layout is not Layout.CONTIGUOUS:
                return t
            if not (suggests if d.suggested else exact):
                return t
            self.applied.append((node, d.text))
            return t.contiguous(memory_format=fmt)

        if isinstance(out, torch.Tensor):
            return fix(out)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return type(out)([fix(out[0]), *out[1:]])  # native_group_norm: (out, mean, rstd)
        return out

    def note(self) -> str | None:
        """One line for the report, or None when nothing was corrected."""
        if not self.applied:
            return None
        strides = (VIEW_STRIDES, POINTWISE_STRIDES, BACKWARD_STRIDES)
        texts = sorted({text.split(":")[0] for _, text in self.applied if text not in strides})
        what = [f"{', '.join(texts)}: eager keeps channels_last there, the meta kernels return NCHW"] if texts else []
        what += [text for text in strides if any(t == text for _, t in self.applied)]
        return (
            f"prediction corrected at {len(self.applied)} node(s) to what eager {self.device} kernels do "
            f"({'; '.join(what)})"
        )

    def eager_strides(self) -> RecordingMode:
        """A dispatch mode to enter inside the fake mode: an op's N x C x 1 x 1 output gets the
        strides eager gives it (:class:`_PointwiseStrides`, :data:`POINTWISE_STRIDES`)."""
        return _PointwiseStrides(self)


POINTWISE_STRIDES = (
    "ops on N x C x 1 x 1 maps (dense in both orders) strided as eager strides them, where FakeTensor keeps "
    "the input's strides (pointwise ops, CPU batch and layer norms write NCHW); kernels read them to pick a "
    "layout, as F.interpolate after image pooling does"
)
BACKWARD_STRIDES = (
    "gradients of GLU, log_softmax and reflect/replicate pads strided as the CPU kernels stride them, "
    "where their meta kernels give other layouts; those of maximum, minimum and clamp with tensor bounds "
    "masked in place, as in training"
)
_PROBED_BACKWARDS = frozenset(
    {
        "glu_backward",
        "_log_softmax_backward_data",
        "native_batch_norm_backward",
        "native_layer_norm_backward",
        *(f"{act}_backward" for act in ("softplus", "hardtanh", "hardswish", "hardsigmoid")),
        *(f"{kind}_pad{d}d_backward" for kind in ("reflection", "replication") for d in (1, 2, 3)),
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
_UNTAGGED_POINTWISE = frozenset({"hardswish"})
"""TensorIterator kernels without ATen's ``pointwise`` tag."""
_PROBE_NUMEL = 1 << 22
"""Elements of all of an op's tensor arguments and its output together up to which the CPU
kernel itself is asked for the strides of an output (a fake run's N x C x 1 x 1 output: a
BatchNorm of 64 x 2048 pooled features is 131,072; an export's, :mod:`.exported`); above it, or
where the kernel raises, the fake tensor's (a fake run: the pointwise rule)."""


class _PointwiseStrides(RecordingMode):
    """Strides of a fake op's 3D-5D output with size-1 dims (an unfold's N x C*k*k x 1 too), which
    FakeTensor takes from the input where eager kernels may not: an N x C x 1 x 1 map is dense in
    both orders. On the CPU,
    the op runs once for real on zeros of its arguments' shapes, strides and dtypes (small ones,
    :data:`_PROBE_NUMEL`; not convolutions, which FakeTensor strides as eager does) and its
    output's strides are eager's. Elsewhere, and where the probe cannot tell, TensorIterator's
    fast setup: a pointwise op whose operands all have the output's shape and are all
    ``is_contiguous()`` allocates a contiguous output."""

    def __init__(self, corrections: Corrections) -> None:
        super().__init__()
        self.corrections = corrections
        self.cpu = corrections.device.split(":")[0] == "cpu"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if func.overloadpacket is torch.ops.aten.masked_fill and _filled_in_place(args[0], first):
            self.corrections.applied.append(("", BACKWARD_STRIDES))
            return torch.empty_strided(first.shape, args[0].stride(), dtype=first.dtype, device=first.device)
        probed = func.overloadpacket.__name__ in _PROBED_BACKWARDS
        if not isinstance(first, torch.Tensor) or first.dim() not in (3, 4, 5) or not (probed or 1 in first.shape[1:]):
            return out  # the common case, decided first: no size-1 dim to stride otherwise
        if func._schema.is_mutable or func._schema.returns[0].alias_info is not None:
            return out  # in place, or a view: strided by its input
        conv = func.overloadpacket.__name__ in CONV_OPS  # strided as FakeTensor strides them, and costly
        strides = eager_cpu_strides(func, args, kwargs, first) if self.cpu and not conv else None
        if strides is None and first.is_contiguous() and _fast_contiguous(func, args, kwargs, out):
            strides = _row_major_strides(first.shape)
        if strides is None or strides == tuple(first.stride()):
            return out
        self.corrections.applied.append(("", BACKWARD_STRIDES if probed else POINTWISE_STRIDES))
        fixed = torch.empty_strided(first.shape, strides, dtype=first.dtype, device=first.device)
        return fixed if first is out else type(out)([fixed, *out[1:]])


def _filled_in_place(filled: Any, out: torch.Tensor) -> bool:
    """``out``, a ``masked_fill`` of ``filled``, is a gradient that training fills in place."""
    node = torch._C._current_autograd_node()
    return type(node).__name__ in _FILLED_IN_PLACE and filled.shape == out.shape and filled.stride() != out.stride()


def eager_cpu_strides(func: Any, args: Any, kwargs: dict[str, Any], first: torch.Tensor) -> tuple[int, ...] | None:
    """The strides the CPU kernel gives ``func``'s first output, on zeros of the arguments'
    shapes, strides and dtypes; None when the arguments and the output are large or the kernel
    raises."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if sum(t.numel() for t in tensors) + first.numel() > _PROBE_NUMEL or any(t.device.type != "cpu" for t in tensors):
        return None

    def real(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        span = 1 + sum((n - 1) * st for n, st in zip(v.shape, v.stride(), strict=True)) if v.numel() else 0
        return torch.zeros(span, dtype=v.dtype).as_strided(v.shape, v.stride())

    try:
        with unset_fake_temporarily():
            out = func(*tree_map(real, args), **tree_map(real, kwargs))
    except Exception:
        return None
    result = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(result, torch.Tensor) or result.shape != first.shape:
        return None
    return tuple(result.stride())


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _fast_contiguous(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> bool:
    if not isinstance(out, torch.Tensor):
        return False
    schema = func._schema
    if any(a.name == "memory_format" for a in schema.arguments):
        return False  # clone, _to_copy: preserve_format keeps the input's strides
    if schema.is_mutable or not (
        torch.Tag.pointwise in func.tags or func.__name__.split(".")[0] in _UNTAGGED_POINTWISE
    ):
        return False
    operands = []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(arg.type, torch.TensorType) and value is not None:
            operands.append(value)
    return all(isinstance(t, torch.Tensor) and t.shape == out.shape and t.is_contiguous() for t in operands)


_VIEWS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view", "_reshape_alias"}
)
"""Ops (as recorded, lower-cased) whose eager strides come from ATen's ``computeStride``."""

VIEW_STRIDES = (
    "view/reshape: size-1 dims strided as eager strides them, where FakeTensor's view does not; "
    "kernels read them to pick channels_last, as after x.transpose(1, 2).view(1, C, H, W)"
)


def _view_strides(source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (a view of ``source`` made under fake tensors) with the strides eager gives it:
    the meta device runs ATen's own stride computation, which FakeTensor's view does not for
    dims of size 1 (batch 1: 2048 where eager has 32). A size-1 dim's stride addresses no other
    element, so only those are changed; ``out`` itself when they agree."""
    if out.requires_grad or not is_alias_of(out, source) or out.numel() != source.numel():
        # not in a train run, where as_strided's backward would hand the gradient the source's strides
        return out
    if out.dim() not in (3, 4, 5) or 1 not in out.shape:  # 3D too: tokens (B, C, N) a 1D pool unsqueezes
        return out
    try:
        with unset_fake_temporarily():  # the meta device itself, not a FakeTensor on it
            meta = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device="meta")
            strides = tuple(meta.view(out.shape).stride())
    except RuntimeError:  # not viewable: eager copies (contiguous strides)
        return out
    if strides == tuple(out.stride()) or any(
        a != b and n != 1 for a, b, n in zip(strides, out.stride(), out.shape, strict=True)
    ):
        return out
    return out.as_strided(out.shape, strides, out.storage_offset())
