"""Calls in which the dispatch recorder (:class:`~.dispatch.CopyRecorder`) can see nothing on
the CPU but the node's own op, so the interpreter runs them with the recorder off its stack (a
push and pop of a dispatch mode per node costs more than most of these ops)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..channels import laid_out, permuted
from ..prepare.copy import memory_format_for_rank
from ..tensors import iter_tensors, on_shared

__all__ = [
    "ANY_LAYOUT_FUNCTIONS",
    "IN_PLACE_FUNCTIONS",
    "PLAIN_FUNCTIONS",
    "RECORDER_BLIND",
    "RECORDER_BLIND_FUNCTIONS",
    "forward_hooked",
    "function_blind",
    "maybe_blind",
    "recorder_blind",
]

RECORDER_BLIND: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.Linear,
        nn.Identity,
        nn.ReLU,
        nn.ReLU6,
        nn.SiLU,
        nn.GELU,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Sigmoid,
        nn.Tanh,
        nn.LeakyReLU,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Dropout,
    }
)
"""torch.nn leaf modules in which :class:`CopyRecorder` can find nothing on the CPU: their
forward dispatches no ATen copy (clone, copy_, _to_copy, contiguous) above the kernels and
writes nothing but its own output and buffers (buffers are the audit's private copies; an
in-place activation writes its input, never a shared weight: :func:`recorder_blind`), for any
input dense in NCHW or channels_last order (a kernel copies any other whole first, a copy the
recorder must see: :mod:`.kernel_copies`; ``tests/propagate/test_dispatch.py`` runs each; not
AvgPool3d, whose CPU kernel copies a channels_last_3d input whole into NCDHW: :mod:`.revert_kernels`). Each runs
one computing ATen op on the node's own input and output, whose layout change the node's
record shows (the recorder keeps only changes inside a node: :func:`computed_relay`)."""


def recorder_blind(module: nn.Module, args: Any = (), shared: frozenset[int] | None = None) -> bool:
    """The recorder cannot see anything in a call of ``module`` on ``args`` (its arguments,
    positional and keyword, in any nesting) on the CPU (without autocast, whose casts are ATen
    copies): plain tensors (:func:`_plain`), dense in NCHW or channels_last order, in and on it, a
    :data:`RECORDER_BLIND` type itself (a
    subclass may override forward), its own forward, zero padding, no hooks, and in place
    (``ReLU(inplace=True)``) only on tensors not among the ``shared`` weights (None: never in
    place), whose write the recorder must refuse; a Linear on tokens, or on a row-major map (its
    matmul folds a 4D input with a reshape, a view of a row-major one, which copies a
    channels_last one: ConvNeXt's permuted NHWC map is row-major)."""
    kind = type(module)
    own = module.__dict__  # their settings are instance attributes: read without a failed lookup
    if (
        kind not in RECORDER_BLIND
        or "forward" in own
        or own.get("padding_mode", "zeros") != "zeros"
        or forward_hooked(module)
    ):
        return False
    ts = iter_tensors(args)
    held = [t for t in (*own["_parameters"].values(), *own["_buffers"].values()) if t is not None]
    return (
        _plain([*ts, *held])
        and all(map(_as_is, ts))  # a kernel copies a tensor not dense first (a channel slice): seen inside
        and (kind is not nn.Linear or all(t.dim() < 4 or t.is_contiguous() for t in ts))
        and (
            not own.get("inplace", False)
            or (shared is not None and not (shared and any(on_shared(t, shared) for t in ts)))
        )
    )


def forward_hooked(module: nn.Module) -> bool:
    """A forward hook or pre-hook runs around a call of ``module``: its own, or one torch.nn runs
    around every module's (``register_module_forward_hook``). Its code is the model's, unseen by a
    graph: a hook that lays the output channels_last dispatches nothing on a channels_last map."""
    every = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or every._global_forward_hooks
        or every._global_forward_pre_hooks
        or every._global_forward_hooks_always_called
    )


RECORDER_BLIND_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.cat,
        torch.add,
        torch.mul,
        torch.sigmoid,
        torch.relu,
        operator.add,
        operator.mul,
        operator.sub,
        operator.truediv,
    }
)
"""Functions that run one computing ATen op out of place (no copy, no write, no decomposition
above the kernel): on tensors of one dtype and one layout (:func:`function_blind`) the recorder
finds nothing in them (``tests/propagate/test_dispatch.py`` runs each under it)."""

IN_PLACE_FUNCTIONS: frozenset[Any] = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})
"""Python's in-place arithmetic on a tensor (``out += identity`` closing torchvision's ResNet blocks):
one computing ATen op writing its first operand (``add_``), blind as :data:`RECORDER_BLIND_FUNCTIONS`
are where no operand holds a user's weight the audit reads in place (the recorder refuses that write)."""

ANY_LAYOUT_FUNCTIONS: frozenset[Any] = frozenset({F.batch_norm, F.layer_norm, F.gelu, F.silu, F.relu, F.hardswish})
"""The functional forms of :data:`RECORDER_BLIND` modules (timm's norm-and-activation layers call
them): blind on tensors of one dtype in either layout, out of place, and ``batch_norm`` without
updating running statistics (its write would go unguarded)."""

PLAIN_FUNCTIONS: frozenset[Any] = frozenset(
    {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.getitem, torch._assert}
)
"""Functions that dispatch nothing on values holding no tensor (sizes, flags: ``torch._assert(x.ndim
== 4)``), and ``getattr`` of :data:`METADATA` (a tensor's sizes, read without dispatch)."""

METADATA = frozenset({"shape", "ndim", "dtype", "device"})


def maybe_blind(target: Any) -> bool:
    """``target`` is a function :func:`function_blind` may find blind (decided once per node)."""
    try:
        return target is getattr or any(
            target in s for s in (RECORDER_BLIND_FUNCTIONS, IN_PLACE_FUNCTIONS, ANY_LAYOUT_FUNCTIONS, PLAIN_FUNCTIONS)
        )
    except TypeError:  # an unhashable callable
        return False


def function_blind(target: Any, args: Any, kwargs: dict[str, Any], shared: frozenset[int] | None = None) -> bool:
    """The recorder cannot see anything in ``target(*args, **kwargs)`` on the CPU (without
    autocast): a :data:`PLAIN_FUNCTIONS` function on no tensor, ``getattr`` of
    :data:`METADATA`, an :data:`ANY_LAYOUT_FUNCTIONS` function on tensors of one dtype, or a
    :data:`RECORDER_BLIND_FUNCTIONS` one on tensors of one dtype, all row-major or all
    channels_last maps of one rank; an :data:`IN_PLACE_FUNCTIONS` one so too, on none of the
    ``shared`` weights (None: never)."""
    ts = list(iter_tensors((args, kwargs)))
    if not _plain(ts):
        return False
    if target is getattr:
        return len(args) == 2 and args[1] in METADATA and not kwargs
    if target in PLAIN_FUNCTIONS:
        return not ts
    if "out" in kwargs or _in_place(target, args, kwargs) or not ts or any(t.dtype != ts[0].dtype for t in ts):
        return False
    if target in ANY_LAYOUT_FUNCTIONS:  # (on tensors dense in memory: a kernel copies others first)
        return all(map(_as_is, ts)) and (target is not F.batch_norm or not _updates_statistics(args, kwargs))
    if target in IN_PLACE_FUNCTIONS:
        if shared is None or (shared and any(on_shared(t, shared) for t in ts)):
            return False
    elif target not in RECORDER_BLIND_FUNCTIONS:
        return False
    if all(t.is_contiguous() for t in ts):
        return True
    rank = ts[0].dim()
    fmt = memory_format_for_rank(rank)
    return fmt is not None and all(t.dim() == rank and t.is_contiguous(memory_format=fmt) for t in ts)


def _as_is(t: torch.Tensor) -> bool:
    """A tensor a kernel reads as it is: :func:`~nhwc_audit.channels.laid_out`, and no 3D view
    in another order than row-major (:func:`~nhwc_audit.channels.permuted`: a GroupNorm copies a
    channels_last map's ``flatten(2)``)."""
    return laid_out(t) and not permuted(t)


def _updates_statistics(args: Any, kwargs: dict[str, Any]) -> bool:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)`` writes its
    running statistics."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    return bool(given.get("training", False)) and given.get("running_mean") is not None


def _in_place(target: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """The call writes its input: ``inplace=True``, by keyword or (``F.relu(x, True)``, ``F.silu``,
    ``F.hardswish``) as the second argument."""
    positional = target in (F.relu, F.silu, F.hardswish) and len(args) > 1 and args[1] is True
    return bool(kwargs.get("inplace")) or positional


def _plain(ts: list[torch.Tensor]) -> bool:
    """Strided tensors whose calls reach the kernels as they are: no ``__torch_function__`` of a
    subclass (its code may copy; a Parameter's and a FakeTensor's do not count), no sparse layout."""
    return all(t.layout is torch.strided for t in ts) and not torch.overrides.has_torch_function(ts)
