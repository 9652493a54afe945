"""What the kernel of a library's own op copies inside.

An op registered by a library (torchvision's ``roi_align``, ``roi_pool``, ``ps_roi_align``,
``deform_conv2d``; a C++ extension's) is one call at the dispatch level: the ATen ops its kernel
calls never reach a dispatch mode, which is popped while it handles the op. torchvision's CPU
``roi_align`` calls ``input.contiguous()``: on a channels_last feature map that copies the whole map
into NCHW, every call, where the op's own layouts (an NHWC map in, an NCHW stack of crops out)
show only a revert of the crops' size. :func:`library_kernel` runs such an op by its backend kernel
with a recording mode pushed, so the ATen ops the kernel calls come back to it: their layout
copies are the op's hidden copies (:func:`~nhwc_audit.channels.hidden_copy`), as a node's are.
ATen's own kernels are not run this way (their internal copies stay unseen: one more mode per op
would cost every audit for the few kernels that copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map

from ..channels import hidden_copy
from ..records import HiddenCopy
from ..tensors import iter_tensors

__all__ = ["library_kernel", "library_op"]

_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}
_EXPLICIT = torch._C.DispatchKey.CompositeExplicitAutograd
_OWN = frozenset({"aten", "prim", "prims"})


@functools.cache
def library_op(func: Any) -> bool:
    """``func`` is an op of a library's namespace (not ATen's)."""
    return str(getattr(func, "namespace", "aten")) not in _OWN


Guard = Callable[[Any, Any, Any], None]


class _Inside(TorchDispatchMode):
    """Sees the ATen ops a library kernel calls; keeps their layout copies and guards the user's
    weights as the mode it runs under does (``guard``: its check of each op before it runs)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # (as the audit's other modes: never under torch.compile)

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard
        self.copies: list[HiddenCopy] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.guard(func, args, kwargs)
        out = func(*args, **(kwargs or {}))
        copy = hidden_copy(func, args, out)
        if copy is not None:
            self.copies.append(copy)
        return out


def library_kernel(func: Any, args: Any, kwargs: dict[str, Any], guard: Guard) -> tuple[Any, list[HiddenCopy]] | None:
    """``(output, layout copies its kernel made)`` of a library op (:func:`library_op`) called
    from a dispatch mode's handler, run by its CPU or CUDA kernel. None, and nothing run, for
    ATen's ops, tensors that are not plain (FakeTensors: the op runs fake, and its CPU kernel is
    asked what it copies on zeros, :func:`_asked_on_zeros`), tensors on several devices or on another, an op with no kernel of its own for the device nor one for every
    device (``CompositeExplicitAutograd``, a ``torch.library.custom_op`` without ``device_types``; a
    CompositeImplicit one's ATen ops reach the mode anyway), or another mode below the caller's,
    which the kernel run would skip."""
    if not library_op(func):
        return None
    tensors = iter_tensors((args, kwargs))
    if tensors and all(isinstance(t, FakeTensor) for t in tensors):  # a fake run: its CPU kernel asked on zeros
        return func(*args, **kwargs), _asked_on_zeros(func, args, kwargs, guard, tensors)
    if torch._C._len_torch_dispatch_stack() > 0 or not tensors:
        return None
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return None
    return _run(func, args, kwargs, guard, tensors)


def _run(
    func: Any, args: Any, kwargs: dict[str, Any], guard: Guard, tensors: list[torch.Tensor]
) -> tuple[Any, list[HiddenCopy]] | None:
    devices = {t.device.type for t in tensors}
    key = _KEYS.get(devices.pop()) if len(devices) == 1 else None
    if key is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
        # torch.library.custom_op without device_types: one kernel for every device
        key = _EXPLICIT if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _EXPLICIT) else None
    if key is None:
        return None
    inside = _Inside(guard)
    with inside:
        out = func._op_dk(key, *args, **kwargs)
    return out, inside.copies


PROBE_NUMEL = 1 << 22
"""A fake run asks a library kernel on zeros of its arguments up to this many elements each."""


def _asked_on_zeros(
    func: Any, args: Any, kwargs: dict[str, Any], guard: Guard, tensors: list[torch.Tensor]
) -> list[HiddenCopy]:
    """The copies a library op's CPU kernel makes, for a fake run on the CPU: the op run for real,
    with every mode off, on zeros laid out as its FakeTensor arguments (shapes, strides, dtypes;
    zero boxes, offsets and indices are valid arguments). None asked (an empty list) off the CPU,
    above :data:`PROBE_NUMEL`, or where the kernel refuses zeros."""
    if any(t.device.type != "cpu" or t.numel() > PROBE_NUMEL for t in tensors):
        return []

    def zeros(v: Any) -> Any:
        if not isinstance(v, FakeTensor):
            return v
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype).zero_()

    try:
        with _disable_current_modes(), unset_fake_temporarily(), torch.no_grad():
            real_args, real_kwargs = tree_map(zeros, (args, kwargs))
            got = _run(func, real_args, real_kwargs, guard, list(iter_tensors((real_args, real_kwargs))))
    except Exception:
        return []
    return got[1] if got is not None else []
