"""What a convolution's kernel copies inside of its weight or of what it made, forward and back.

On the CPU (torch 2.14.1) a Conv3d at batch 1 runs on the slow backend (``slow_conv3d_forward``),
which computes NCDHW: it copies a channels_last_3d weight into NCDHW (``weight.contiguous()``) on
every call, where the op's own layouts show only its input's re-lay (its output is NCDHW). A
forward convolution on tensors dense in memory is run by its kernel with a recording mode
(:func:`~.kernel_copies.probed`) once per signature (its tensors' shapes, strides, dtypes, its
settings), keeping the copies of its weight and of what it made (:attr:`HiddenCopy.result`); its
copies of its input are the node's layout change, which its record shows. A fake run asks the CPU
kernel on zeros, and a problem too large to ask whole on a copy cut along its spatial dims
(:func:`cut`, the backward's too: :mod:`.backward_kernels`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from ..channels import laid_out
from ..records import HiddenCopy, Layout
from ..tensors import iter_tensors
from .kernel_copies import PROBE_NUMEL, Asked, Guard, asked_on_zeros, fake_below, probed, signature

__all__ = ["CONVOLUTION", "CONV_BACKWARD", "CONV_MODULES", "call_key", "cut", "own_copies", "unguarded"]

CONVOLUTION = torch.ops.aten.convolution.default
CONV_BACKWARD = torch.ops.aten.convolution_backward.default
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def unguarded(func: Any, args: Any, kwargs: Any) -> None:
    """No check before a kernel's ops run: a backward writes none of the user's weights, and a copy
    cut from zeros holds none."""


def _input(args: Any) -> list[torch.Tensor]:
    """A forward convolution's activation: its input (not its weight)."""
    return [args[0]] if isinstance(args[0], torch.Tensor) else []


def own_copies(
    func: Any, args: Any, kwargs: dict[str, Any], guard: Guard, asked: Asked
) -> tuple[Any, list[HiddenCopy]] | None:
    """``(output, the copies its kernel made of its weight or of what it made)`` of a forward
    convolution on tensors dense in memory (:func:`~nhwc_audit.channels.laid_out`; a channel slice's
    copy is :func:`~.kernel_copies.kernel_copies`'), its kernel run with a recording mode the first
    time its signature is met in ``asked`` (a fake run's: asked on zeros, or on a cut copy,
    :func:`cut`). None, and nothing run, for other ops, or where another mode is below the caller's."""
    if func is not CONVOLUTION:
        return None
    tensors = iter_tensors((args, kwargs))
    if not tensors or not all(map(laid_out, tensors)):
        return None
    fake = any(isinstance(t, FakeTensor) for t in tensors) or fake_below()
    if not fake and torch._C._len_torch_dispatch_stack() > 0:
        return None
    key = repr(("own", tree_map(signature, (args, kwargs))))
    known = asked.get(key)
    if known is not None:
        return func(*args, **kwargs), known
    if fake:
        whole = all(t.numel() <= PROBE_NUMEL for t in tensors)
        found = asked_on_zeros(func, args, kwargs, guard, tensors, _input) if whole else cut(func, args)
        out = func(*args, **kwargs)
    else:
        ran = probed(func, args, kwargs, guard, _input(args))
        if ran is None:  # a subclass, a quantized tensor: run as it is
            return None
        out, found = ran
    # (a bias broadcast into the output, in any layout, is no layout's copy)
    moved = [c for c in found or () if c.result and c.layout_in not in (c.layout_out, Layout.AMBIGUOUS)]
    asked[key] = [dataclasses.replace(c, op="convolution") for c in moved]
    return out, asked[key]


def call_key(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What a torch.nn convolution module's kernel copies depend on in a call of it on ``args``:
    its input's and weights' signatures and its settings (a call with more than its input, a
    ConvTranspose's ``output_size``: a key of its own, never met again)."""
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        return object()
    own = module.__dict__
    b = own["_parameters"].get("bias")
    return (
        type(module),
        signature(args[0]),
        signature(own["_parameters"]["weight"]),
        b is None,
        own.get("stride"),
        own.get("padding"),
        own.get("dilation"),
        own.get("groups"),
        own.get("output_padding"),
    )


_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _laid(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``t`` is dense in (NCHW's first), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = _FORMATS.get(t.dim())
    return fmt if fmt is not None and t.is_contiguous(memory_format=fmt) else None


def cut(func: Any, args: Any) -> list[HiddenCopy] | None:
    """What a fake convolution's kernel (``func``: forward, or ``convolution_backward``), too large
    to ask whole (above :data:`~.kernel_copies.PROBE_NUMEL`), copies inside: asked on a copy cut
    along the spatial dims (halved one dim at a time, W first, never below the kernel's extent,
    keeping a halving only where the cut still picks the same backend,
    ``torch._C._select_conv_backend``: the CPU's choice reads N x C x D x H) until its input and
    output fit. Its copies of a tensor shaped as the weight are the whole problem's; those laid
    over the cut input's or output's map (whole, or a group's channels) are scaled up to the whole
    map; others are dropped. None where no such cut exists or a tensor is not dense."""
    backward = func is CONV_BACKWARD
    if backward:
        go, x, w, bias_sizes, *conv = args[:10]
    else:
        x, w, b, *conv = args[:9]
        go, bias_sizes = None, None if b is None else list(b.shape)
    formats = [_laid(t) for t in (x, w, *(() if go is None else (go,)))]
    if any(f is None for f in formats) or x.device.type != "cpu" or w.numel() > 16 * PROBE_NUMEL:
        return None
    backend = torch._C._select_conv_backend(x, w, None, *conv, bias_sizes)
    dilation, out_of = conv[2], torch.ops.aten.convolution
    extents = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:], strict=False)]

    def problem(shape: list[int]) -> tuple[torch.Tensor, ...]:
        cx = torch.zeros(shape, dtype=x.dtype).to(memory_format=formats[0])
        cw = torch.zeros(tuple(w.shape), dtype=w.dtype).to(memory_format=formats[1])
        out = out_of(cx.to("meta"), cw.to("meta"), None, *conv)
        if backward:
            return cx, cw, torch.zeros(tuple(out.shape), dtype=go.dtype).to(memory_format=formats[2])
        return cx, cw, out

    shape, left = list(x.shape), list(range(x.dim() - 1, 1, -1))  # the spatial dims, W first
    try:
        with _disable_current_modes(), unset_fake_temporarily(), torch.no_grad():
            cx, cw, co = problem(shape)
            out_map = tuple(out_of(_meta(x), _meta(w), None, *conv).shape[2:])
            while max(cx.numel(), co.numel()) > PROBE_NUMEL:
                if not left:
                    return None
                d = left[0]
                smaller = [*shape[:d], max(shape[d] // 2, extents[d - 2]), *shape[d + 1 :]]
                trial = problem(smaller)
                if smaller == shape or torch._C._select_conv_backend(*trial[:2], None, *conv, bias_sizes) != backend:
                    left.pop(0)  # this dim cannot shrink further, or shrinking it changes the kernel
                    continue
                shape, (cx, cw, co) = smaller, trial
                left = left[1:] + left[:1]  # the next dim, in turn
            if torch._C._select_conv_backend(cx, cw, None, *conv, bias_sizes) != backend:
                return None
            if backward:
                got = probed(func, (co, cx, cw, *args[3:]), {}, unguarded, [co, cx])
            else:
                cb = None if bias_sizes is None else torch.zeros(bias_sizes, dtype=b.dtype)
                got = probed(func, (cx, cw, cb, *conv), {}, unguarded, [cx])
    except Exception:
        return None
    if got is None:
        return None
    # a copy laid over the cut input's or output's map (the whole tensor, or a group of its
    # channels) is scaled back to the whole map; one shaped as the weight is the whole problem's
    maps = {tuple(cx.shape[2:]): tuple(x.shape[2:]), tuple(co.shape[2:]): out_map}
    copies = []
    for c in got[1]:
        whole = maps.get(c.shape[2:]) if c.shape[:1] == tuple(x.shape[:1]) else None
        if c.shape == tuple(w.shape):
            copies.append(c)
        elif whole is not None:
            full = (*c.shape[:2], *whole)
            copies.append(dataclasses.replace(c, shape=full, bytes=c.bytes * math.prod(full) // math.prod(c.shape)))
    return copies


def _meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor shaped and strided as ``t`` (a FakeTensor too)."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
