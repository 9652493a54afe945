"""Dispatch-level recording: the ATen ops a node (or an eager run) dispatches. Layout-changing
copies made inside a kernel (:func:`hidden_copy`), in-place writes (:func:`written_tensors`)
and the guard that refuses writes to the user's weights the audit reads in place
(:func:`check_shared_write`). Used by the interpreter, the eager recorder and every checking
run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import SharedWeightWrite
from ..layout import innermost_dim, tensor_meta
from ..records import HiddenCopy, TensorMeta
from ..tensors import iter_tensors, on_shared

__all__ = [
    "CopyRecorder",
    "RECORDER_BLIND",
    "recorder_blind",
    "RecordingMode",
    "check_shared_write",
    "hidden_copy",
    "is_alias_of",
    "layout_change",
    "written_tensors",
]


_COPY_OPS = frozenset(
    {
        torch.ops.aten.clone.default,
        torch.ops.aten.copy_.default,
        torch.ops.aten._to_copy.default,
        torch.ops.aten.contiguous.default,
    }
)


def layout_change(src: TensorMeta, dst: TensorMeta) -> bool:
    """A copy from ``src`` to ``dst`` (rank >= 4, same shape) moves the innermost memory dim
    between the channels (dim 1, NHWC) and the last dim (NCHW): a layout transpose. Copies
    between other dims (attention's B x heads x N x d transposes) are not layout changes."""
    if src.rank < 4 or src.shape != dst.shape:
        return False
    last = max((i for i, s in enumerate(src.shape) if s > 1), default=None)
    pair = {innermost_dim(src), innermost_dim(dst)}
    return last is not None and last != 1 and pair == {1, last}


def hidden_copy(func: Any, args: Any, out: Any) -> HiddenCopy | None:
    """The record of an ATen copy (clone, copy_, _to_copy, contiguous) that changes layout."""
    if func not in _COPY_OPS:
        return None
    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() >= 4):
        return None
    sm, dm = tensor_meta(src), tensor_meta(out)
    if not layout_change(sm, dm):
        return None
    name = str(func.overloadpacket.__name__)
    return HiddenCopy(op=name, layout_in=sm.layout, layout_out=dm.layout, shape=dm.shape, bytes=2 * dm.nbytes)


@functools.cache
def _written_args(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an ATen op writes to (``self`` of ``add_``, ``out=``)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return ()
    return tuple(
        (i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
    )


def written_tensors(func: Any, args: Any, kwargs: Any) -> Iterator[torch.Tensor]:
    """The tensors an ATen op call is about to write to in place."""
    for i, name in _written_args(func):
        value = args[i] if i < len(args) else (kwargs or {}).get(name)
        yield from (value,) if isinstance(value, torch.Tensor) else iter_tensors(value)


def check_shared_write(func: Any, args: Any, kwargs: Any, shared: frozenset[int]) -> None:
    """Raise :class:`SharedWeightWrite` before ``func`` writes to a storage in ``shared``."""
    if not shared:
        return
    for t in written_tensors(func, args, kwargs):
        if on_shared(t, shared):
            raise SharedWeightWrite(str(func))


class RecordingMode(TorchDispatchMode):
    """The base of the audit's dispatch-level recorders. torch wraps every subclass's
    ``__torch_dispatch__`` in ``torch._disable_dynamo`` (so that torch.compile never traces
    into it): that wrapper alone costs ~0.7 ms per ATen op on this project's CPU, 7x the op
    itself for a small convolution. The audit's modes never run under torch.compile, so they
    opt out (``_should_skip_dynamo``, torch's own switch)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class CopyRecorder(RecordingMode):
    """Sees the ATen ops a node runs, keeps the copies that change layout and refuses
    writes to the weights the audit shares with the user's model (``shared``)."""

    def __init__(self, shared: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.copies: list[HiddenCopy] = []
        self.shared = shared
        self.recording = True
        """Keep copies (False while the caller runs ops of its own under the mode)."""
        self.on_stack = False
        """Pushed on torch's dispatch stack (the interpreter takes it off for nodes it cannot
        see into: :func:`recorder_blind`)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if _written_args(func):  # in-place and out= ops only
            check_shared_write(func, args, kwargs, self.shared)
        out = func(*args, **(kwargs or {}))
        if self.recording:
            copy = hidden_copy(func, args, out)
            if copy is not None:
                self.copies.append(copy)
        return out


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
        nn.AvgPool3d,
        nn.AdaptiveAvgPool2d,
        nn.Dropout,
    }
)
"""torch.nn leaf modules in which :class:`CopyRecorder` can find nothing on the CPU: their
forward dispatches no ATen copy (clone, copy_, _to_copy, contiguous) above the kernels and
writes nothing but its own output and buffers (buffers are the audit's private copies), for any
input layout (``tests/propagate/test_dispatch.py`` runs each under the recorder). Kernels'
own copies (a convolution re-laying its input) are below the recorder anyway: the records
show them as a layout change from input to output."""


def recorder_blind(module: nn.Module) -> bool:
    """The recorder cannot see anything in a call of ``module`` on the CPU (without
    autocast, whose casts are ATen copies): a :data:`RECORDER_BLIND` type itself (a subclass
    may override forward), its own forward, zero padding, not in place, and no hooks."""
    return (
        type(module) in RECORDER_BLIND
        and "forward" not in module.__dict__
        and getattr(module, "padding_mode", "zeros") == "zeros"
        and not getattr(module, "inplace", False)
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (
            nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
            or nn.modules.module._global_forward_hooks_always_called
        )
    )


def is_alias_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` shares storage with ``b`` (works for FakeTensors, unlike data_ptr)."""
    return bool(torch._C._is_alias_of(a, b))  # type: ignore[attr-defined]
