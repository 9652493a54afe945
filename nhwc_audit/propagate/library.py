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
from torch.utils._python_dispatch import TorchDispatchMode

from ..channels import hidden_copy
from ..records import HiddenCopy
from ..tensors import iter_tensors

__all__ = ["library_kernel", "library_op"]

_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}
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
    ATen's ops, tensors that are not plain (FakeTensors: a fake kernel copies nothing), tensors on
    several devices or on another, an op with no kernel of its own for the device (a composite
    one: the mode sees its ATen ops anyway), or another mode below the caller's, which the kernel
    run would skip."""
    if not library_op(func) or torch._C._len_torch_dispatch_stack() > 0:
        return None
    tensors = iter_tensors((args, kwargs))
    if not tensors or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return None
    devices = {t.device.type for t in tensors}
    key = _KEYS.get(devices.pop()) if len(devices) == 1 else None
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
        return None
    inside = _Inside(guard)
    with inside:
        out = func._op_dk(key, *args, **kwargs)
    return out, inside.copies
