"""What a backward's convolution kernel copies inside, seen while its autograd node runs.

On the CPU (oneDNN, torch 2.14.1) a channels_last convolution's backward computes its weight
gradient in NCHW and copies it into channels_last (``grad_weight.to(...)``), every step; an NCHW
strided 1 x 1 convolution's computes its input gradient channels_last and copies it back. No
stride shows either. :class:`KernelWatch` is pushed on the dispatch stack while a convolution's
autograd node runs (:mod:`.grad_hooks`), and runs the op by its kernel with a recording mode
(:func:`~.kernel_copies.probed`). A fake run asks the CPU kernel on zeros, once per signature, and
on a cut copy of the problem where it is too large to ask whole (:func:`_cut`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map

from ..records import HiddenCopy
from ..tensors import iter_tensors
from .kernel_copies import PROBE_NUMEL, Asked, asked_on_zeros, computes, fake_below, library_op, probed, signature

__all__ = ["KernelWatch"]


def _unguarded(func: Any, args: Any, kwargs: Any) -> None:
    """A backward writes none of the user's weights: nothing to check before its kernels run."""


class KernelWatch(TorchDispatchMode):
    """Pushed while one autograd node runs (between its hooks, :mod:`.grad_hooks`; the engine
    restores the dispatch stack after each node): runs each ATen op that computes by its kernel
    with a recording mode (:func:`probed`), keeping the copies the kernel makes of tensors it
    computed and of tensors not dense in memory it was given, under the op's name. A fake op's
    CPU kernel is asked on zeros, once per signature (``asked``)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, asked: Asked) -> None:
        super().__init__()
        self.asked = asked
        self.copies: list[HiddenCopy] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = iter_tensors((args, kwargs))
        got: tuple[Any, list[HiddenCopy]] | None = None
        if not computes(func) or library_op(func):
            pass
        elif any(isinstance(t, FakeTensor) for t in tensors) or fake_below():
            key = repr(("made", func, tree_map(signature, (args, kwargs))))
            if (asked := self.asked.get(key)) is None:
                whole = all(t.numel() <= PROBE_NUMEL for t in tensors)
                if whole:
                    asked = asked_on_zeros(func, args, kwargs, _unguarded, tensors, results=True)
                else:
                    asked = _cut(args) if func is _CONV_BACKWARD else []
                self.asked[key] = asked
            got = func(*args, **kwargs), asked
        elif torch._C._len_torch_dispatch_stack() == 0:
            got = probed(func, args, kwargs, _unguarded, results=True)
        if got is None:
            return func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.copies += [dataclasses.replace(c, op=name) for c in got[1]]
        return got[0]


_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _laid(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``t`` is dense in (NCHW's first), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = _FORMATS.get(t.dim())
    return fmt if fmt is not None and t.is_contiguous(memory_format=fmt) else None


def _cut(args: Any) -> list[HiddenCopy]:
    """What a fake convolution's backward kernel, too large to ask whole (above
    :data:`~.kernel_copies.PROBE_NUMEL`), copies inside: asked on a copy cut along the spatial dims
    (halved until its input and gradient fit, never below the kernel's extent) that picks the same
    backend (``torch._C._select_conv_backend``). Its copies of the weight gradient are the
    whole problem's; those of a tensor shaped as the cut input or gradient are scaled up to
    theirs; others are dropped. Nothing where no such cut exists or the tensors are not dense."""
    go, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, _ = args
    formats = [_laid(t) for t in (go, x, w)]
    if any(f is None for f in formats) or x.device.type != "cpu" or w.numel() > 16 * PROBE_NUMEL:
        return []
    conv = (stride, padding, dilation, transposed, output_padding, groups)
    backend = torch._C._select_conv_backend(x, w, None, *conv, bias_sizes)
    extents = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:], strict=False)]
    shape = list(x.shape)
    with _disable_current_modes(), unset_fake_temporarily(), torch.no_grad():
        while max(math.prod(shape), go.numel() * math.prod(shape) // max(x.numel(), 1)) > PROBE_NUMEL:
            smaller = [max(n // 2, e) for n, e in zip(shape[2:], extents, strict=False)]
            if smaller == shape[2:]:
                return []
            shape[2:] = smaller
        try:
            cx = torch.zeros(shape, dtype=x.dtype).to(memory_format=formats[1])
            cw = torch.zeros(tuple(w.shape), dtype=w.dtype).to(memory_format=formats[2])
            out = torch.ops.aten.convolution(cx.to("meta"), cw.to("meta"), None, *conv)
            cgo = torch.zeros(tuple(out.shape), dtype=go.dtype).to(memory_format=formats[0])
            if torch._C._select_conv_backend(cx, cw, None, *conv, bias_sizes) != backend:
                return []
            got = probed(_CONV_BACKWARD, (cgo, cx, cw, *args[3:]), {}, _unguarded, results=True)
        except Exception:
            return []
    scaled = {tuple(cx.shape): tuple(x.shape), tuple(cgo.shape): tuple(go.shape)}
    copies = []
    for c in got[1] if got is not None else []:
        if c.shape == tuple(w.shape):
            copies.append(c)
        elif (whole := scaled.get(c.shape)) is not None:
            copies.append(dataclasses.replace(c, shape=whole, bytes=c.bytes * math.prod(whole) // math.prod(c.shape)))
    return copies
