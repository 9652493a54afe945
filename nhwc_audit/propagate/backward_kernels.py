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
from .kernel_copies import PROBE_NUMEL, asked_on_zeros, fake_below, probed, signature

__all__ = ["Answers", "KernelWatch"]

Answers = dict[str, list[HiddenCopy] | None]
"""A fake run's backward convolutions asked on zeros, by arguments: their copies, None where not asked."""


def _unguarded(func: Any, args: Any, kwargs: Any) -> None:
    """A backward writes none of the user's weights: nothing to check before its kernels run."""


class KernelWatch(TorchDispatchMode):
    """Pushed while one convolution's autograd node runs (between its hooks, :mod:`.grad_hooks`; the
    engine restores the dispatch stack after each node): runs the ``convolution_backward`` it calls
    by its kernel with a recording mode (:func:`~.kernel_copies.probed`), keeping every copy the
    kernel and the ops it calls make, under the op's name: its gradient's and input's
    (``computed``), and those of what it made itself or of its weight (``result``). ``ran``: the
    kernel was run, or asked (a fake op's CPU kernel on zeros, once per signature in ``asked``, or
    on a cut copy, :func:`_cut`): its copies are the node's, in place of the rules' estimate."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, asked: Answers) -> None:
        super().__init__()
        self.asked = asked
        self.copies: list[HiddenCopy] = []
        self.ran = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not _CONV_BACKWARD:
            return func(*args, **kwargs)
        tensors = iter_tensors((args, kwargs))
        got: tuple[Any, list[HiddenCopy] | None] | None = None
        if any(isinstance(t, FakeTensor) for t in tensors) or fake_below():
            key = repr(("watched", tree_map(signature, (args, kwargs))))
            if key not in self.asked:
                whole = all(t.numel() <= PROBE_NUMEL for t in tensors)
                self.asked[key] = (
                    asked_on_zeros(func, args, kwargs, _unguarded, tensors, _activations) if whole else _cut(args)
                )
            got = func(*args, **kwargs), self.asked[key]
        elif torch._C._len_torch_dispatch_stack() == 0:
            got = probed(func, args, kwargs, _unguarded, _activations(args))
        if got is None or got[1] is None:
            return func(*args, **kwargs) if got is None else got[0]
        self.ran = True
        self.copies += [dataclasses.replace(c, op="convolution_backward") for c in got[1]]
        return got[0]


def _activations(args: Any) -> list[torch.Tensor]:
    """A ``convolution_backward``'s activations: its incoming gradient and its input (not its weight)."""
    return [t for t in args[:2] if isinstance(t, torch.Tensor)]


_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _laid(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``t`` is dense in (NCHW's first), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = _FORMATS.get(t.dim())
    return fmt if fmt is not None and t.is_contiguous(memory_format=fmt) else None


def _cut(args: Any) -> list[HiddenCopy] | None:
    """What a fake convolution's backward kernel, too large to ask whole (above
    :data:`~.kernel_copies.PROBE_NUMEL`), copies inside: asked on a copy cut along the spatial dims
    (halved one dim at a time, W first, never below the kernel's extent, keeping a halving only
    where the cut still picks the same backend, ``torch._C._select_conv_backend``: the CPU's choice
    reads N x C x D x H) until its input and gradient fit. Its copies of a tensor shaped as the
    weight are the whole problem's; those laid over the cut input's or gradient's map (whole, or a
    group's channels) are scaled up to the whole map; others are dropped. None where no such cut
    exists or a tensor is not dense."""
    go, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, _ = args
    formats = [_laid(t) for t in (go, x, w)]
    if any(f is None for f in formats) or x.device.type != "cpu" or w.numel() > 16 * PROBE_NUMEL:
        return None
    conv = (stride, padding, dilation, transposed, output_padding, groups)
    backend = torch._C._select_conv_backend(x, w, None, *conv, bias_sizes)
    extents = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:], strict=False)]

    def problem(shape: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cx = torch.zeros(shape, dtype=x.dtype).to(memory_format=formats[1])
        cw = torch.zeros(tuple(w.shape), dtype=w.dtype).to(memory_format=formats[2])
        out = torch.ops.aten.convolution(cx.to("meta"), cw.to("meta"), None, *conv)
        return cx, cw, torch.zeros(tuple(out.shape), dtype=go.dtype).to(memory_format=formats[0])

    shape, left = list(x.shape), list(range(x.dim() - 1, 1, -1))  # the spatial dims, W first
    try:
        with _disable_current_modes(), unset_fake_temporarily(), torch.no_grad():
            cx, cw, cgo = problem(shape)
            while max(cx.numel(), cgo.numel()) > PROBE_NUMEL:
                if not left:
                    return None
                d = left[0]
                smaller = [*shape[:d], max(shape[d] // 2, extents[d - 2]), *shape[d + 1 :]]
                trial = problem(smaller)
                if (
                    smaller == shape
                    or torch._C._select_conv_backend(trial[0], trial[1], None, *conv, bias_sizes) != backend
                ):
                    left.pop(0)  # this dim cannot shrink further, or shrinking it changes the kernel
                    continue
                shape, (cx, cw, cgo) = smaller, trial
                left = left[1:] + left[:1]  # the next dim, in turn
            if torch._C._select_conv_backend(cx, cw, None, *conv, bias_sizes) != backend:
                return None
            got = probed(_CONV_BACKWARD, (cgo, cx, cw, *args[3:]), {}, _unguarded, [cgo, cx])
    except Exception:
        return None
    if got is None:
        return None
    # a copy laid over the cut input's or gradient's map (the whole tensor, or a group of its
    # channels) is scaled back to the whole map; one shaped as the weight is the whole problem's
    maps = {tuple(cx.shape[2:]): tuple(x.shape[2:]), tuple(cgo.shape[2:]): tuple(go.shape[2:])}
    copies = []
    for c in got[1]:
        whole = maps.get(c.shape[2:]) if c.shape[:1] == tuple(x.shape[:1]) else None
        if c.shape == tuple(w.shape):
            copies.append(c)
        elif whole is not None:
            full = (*c.shape[:2], *whole)
            copies.append(dataclasses.replace(c, shape=full, bytes=c.bytes * math.prod(full) // math.prod(c.shape)))
    return copies
