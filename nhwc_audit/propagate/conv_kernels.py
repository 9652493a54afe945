"""What a convolution's kernel copies inside of its weight or of what it made, forward and back.

On the CPU (torch 2.14.1) a Conv3d at batch 1 runs on the slow backend (``slow_conv3d_forward``),
which computes NCDHW: it copies a channels_last_3d weight into NCDHW (``weight.contiguous()``) on
every call, where the op's own layouts show only its input's re-lay (its output is NCDHW). A
forward convolution on tensors dense in memory is run by its kernel with a recording mode
(:func:`~.kernel_copies.probed`) once per kernel path (:func:`kernel_key`: its backend, formats,
dtypes, settings), keeping the copies of its weight and of what it made (:attr:`HiddenCopy.result`),
carried to the path's other calls at their sizes (:class:`Answer`); its copies of its input are the
node's layout change, which its record shows. A fake run asks the CPU
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

from ..channels import dense_strides, laid_out
from ..layout import strides_like_channels_last
from ..prepare.copy import memory_format_for_rank
from ..records import HiddenCopy, Layout
from ..tensors import iter_tensors
from .kernel_copies import PROBE_NUMEL, Guard, asked_on_zeros, fake_below, probed, signature

__all__ = [
    "BY_SIGNATURE",
    "CONVOLUTION",
    "CONV_BACKWARD",
    "CONV_MODULES",
    "Answer",
    "Kernels",
    "call_key",
    "cut",
    "kernel_key",
    "known",
    "own_copies",
    "unguarded",
]

CONVOLUTION = torch.ops.aten.convolution.default
CONV_BACKWARD = torch.ops.aten.convolution_backward.default
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def unguarded(func: Any, args: Any, kwargs: Any) -> None:
    """No check before a kernel's ops run: a backward writes none of the user's weights, and a copy
    cut from zeros holds none."""


def _input(args: Any) -> list[torch.Tensor]:
    """A forward convolution's activation: its input (not its weight)."""
    return [args[0]] if isinstance(args[0], torch.Tensor) else []


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a convolution's kernel copied of its own in one call, and that call's input, weight and
    output shapes: each copy is shaped as one of them, so a call of another size on the same kernel
    path copies the same tensors at its own sizes (:meth:`at`)."""

    copies: tuple[HiddenCopy, ...]
    shapes: tuple[tuple[int, ...], ...]

    def at(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> tuple[HiddenCopy, ...]:
        """The copies a call on ``x`` and ``w`` giving ``out`` makes."""
        if not self.copies:  # (most paths: every conv call of a channels_last model asks this)
            return ()
        now = (tuple(x.shape), tuple(w.shape), tuple(out.shape))
        if now == self.shapes:
            return self.copies
        role = dict(zip(self.shapes, now, strict=True))
        return tuple(
            dataclasses.replace(
                c, shape=role[c.shape], bytes=c.bytes * math.prod(role[c.shape]) // max(math.prod(c.shape), 1)
            )
            for c in self.copies
        )


Kernels = dict[Any, Answer | str]
"""A run's answers by kernel path (:func:`kernel_key`), or by signature where a copy was shaped as
none of the call's input, weight or output (the path key then holds :data:`BY_SIGNATURE`)."""

BY_SIGNATURE = "by signature"


def kernel_key(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: bool,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    groups: int,
) -> Any:
    """What a convolution kernel's own copies depend on but its tensors' sizes: the backend it runs
    on (``torch._C._select_conv_backend``, the dispatcher's own choice: the CPU's reads N x C x D x H),
    the formats its input and weight are dense in, their dtypes and device, and the settings that take
    other paths inside (transposed, grouped, strided, dilated, padded, a 1 x 1 kernel, a bias). None
    where no backend is chosen (padding given as a string: the call's own is then asked)."""
    try:
        backend = torch._C._select_conv_backend(
            x, w, None, stride, padding, dilation, transposed, [0] * len(stride), groups, [w.shape[0]] if bias else None
        )
    except Exception:
        return None
    ones = (all(s == 1 for s in stride), all(d == 1 for d in dilation), all(p == 0 for p in padding))
    return (
        "conv",
        backend,
        _form(x),
        _form(w),
        x.dtype,
        w.dtype,
        x.device.type,
        x.dim(),
        transposed,
        groups > 1,
        ones,
        all(k == 1 for k in w.shape[2:]),
        bias,
    )


def own_copies(
    func: Any, args: Any, kwargs: dict[str, Any], guard: Guard, kernels: Kernels
) -> tuple[Any, list[HiddenCopy]] | None:
    """``(output, the copies its kernel made of its weight or of what it made)`` of a forward
    convolution on tensors dense in memory (:func:`~nhwc_audit.channels.laid_out`; a channel slice's
    copy is :func:`~.kernel_copies.kernel_copies`'), its kernel run with a recording mode the first
    time its kernel path is met in ``kernels`` (:func:`kernel_key`; a fake run's: asked on zeros, or on
    a cut copy, :func:`cut`). None, and nothing run, for other ops, or where another mode is below the
    caller's."""
    if func is not CONVOLUTION or kwargs:
        return None
    tensors = iter_tensors(args)
    if not tensors or not all(map(laid_out, tensors)):
        return None
    fake = any(isinstance(t, FakeTensor) for t in tensors) or fake_below()
    if not fake and torch._C._len_torch_dispatch_stack() > 0:
        return None
    x, w, b, stride, padding, dilation, transposed, _, groups = args
    key = kernel_key(x, w, b is not None, stride, padding, dilation, transposed, groups)
    if kernels.get(key) == BY_SIGNATURE:
        key = repr(tree_map(signature, args))
    answered = kernels.get(key)
    if isinstance(answered, Answer):
        out = func(*args)
        return out, list(answered.at(x, w, out))
    if fake:
        whole = all(t.numel() <= PROBE_NUMEL for t in tensors)
        found = asked_on_zeros(func, args, kwargs, guard, tensors, _input) if whole else cut(func, args)
        out = func(*args)
    else:
        ran = probed(func, args, kwargs, guard, _input(args))
        if ran is None:  # a subclass, a quantized tensor: run as it is
            return None
        out, found = ran
    # (a bias broadcast into the output, in any layout, is no layout's copy); a 1D convolution's
    # input, a view of a map in another order (``flatten(2)``), re-laid: no layout shows it
    moved = [
        c
        for c in found or ()
        if (c.result and c.layout_in not in (c.layout_out, Layout.AMBIGUOUS)) or (c.computed and c.reorder)
    ]
    answer = Answer(tuple(dataclasses.replace(c, op="convolution") for c in moved), _shapes(x, w, out))
    roles = len(set(answer.shapes)) == 3 or not answer.copies  # (an input shaped as the output: whose copy?)
    if key is not None and roles and all(c.shape in answer.shapes for c in answer.copies):
        kernels[key] = answer
    elif key is not None:  # a copy of a part (a group's): this call's own, by its signature
        kernels[key], kernels[repr(tree_map(signature, args))] = BY_SIGNATURE, answer
    return out, list(answer.copies)


def _shapes(*tensors: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tensors)


def call_key(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], weight: torch.Tensor | None = None
) -> Any:
    """:func:`kernel_key` of a call of a torch.nn convolution module on ``args`` (as its forward calls
    the op; ``weight`` in place of its own: an NCHW counterpart's); None for a call with more than its
    input (a ConvTranspose's ``output_size``), a padding given as a string, or a weight that is no
    parameter of its own (weight_norm's, prune's: made by a hook or a parametrization), asked each call."""
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        return None
    own = module.__dict__
    params = own["_parameters"]
    padding = own.get("padding")
    if isinstance(padding, str) or not isinstance(params.get("weight"), torch.Tensor):
        return None
    transposed = isinstance(module, _TRANSPOSED)
    return kernel_key(
        args[0],
        params["weight"] if weight is None else weight,
        params.get("bias") is not None,
        own["stride"],
        padding,
        own["dilation"],
        transposed,
        own["groups"],
    )


def known(kernels: Kernels, key: Any) -> Answer | None:
    """The answer a conv module's call of ``key`` (:func:`call_key`) has in ``kernels``: None where its
    kernel must be asked (a key never met, or one answered by signature)."""
    got = kernels.get(key) if key is not None else None
    return got if isinstance(got, Answer) else None


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _form(t: torch.Tensor) -> tuple[Any, ...]:
    """What a kernel reads of a tensor's layout to pick its path: the format it is dense in, whether it
    is dense in the other too (a size-1 dim: a one-channel map, a 1 x 1 weight), and which way PyTorch
    reads it then (``suggest_memory_format``): a bfloat16 1 x 1 convolution of a one-channel map copies
    its output (oneDNN, torch 2.14.1), one of a three-channel NCHW map to one channel does not."""
    fmt = memory_format_for_rank(t.dim())
    both = fmt is not None and t.is_contiguous() and t.is_contiguous(memory_format=fmt)
    return _laid(t), both, both and strides_like_channels_last(t.shape, t.stride())


def _laid(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``t`` is dense in (NCHW's first), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = memory_format_for_rank(t.dim())
    return fmt if fmt is not None and t.is_contiguous(memory_format=fmt) else None


def cut(func: Any, args: Any) -> list[HiddenCopy] | None:
    """What a fake convolution's kernel (``func``: forward, or ``convolution_backward``), too large to ask
    whole (above :data:`~.kernel_copies.PROBE_NUMEL`), copies inside: asked on a copy cut along the spatial
    dims (halved one dim at a time, W first, never below the kernel's extent, keeping a halving only where
    the cut still picks the same backend, ``torch._C._select_conv_backend``: the CPU's choice reads N x C x
    D x H) until its input and output fit, each laid as the op's (:func:`_zeros`). Its copies of a tensor
    shaped as the weight are the whole problem's; those over the cut input's or output's map (whole, or a
    group's channels) are scaled to the whole map; others dropped. None: no such cut, or a tensor not dense."""
    backward = func is CONV_BACKWARD
    if backward:
        go, x, w, bias_sizes, *conv = args[:10]
    else:
        x, w, b, *conv = args[:9]
        go, bias_sizes = None, None if b is None else list(b.shape)
    dense = all(_laid(t) is not None for t in (x, w, go) if t is not None)
    if not dense or x.device.type != "cpu" or w.numel() > 16 * PROBE_NUMEL:
        return None
    backend = torch._C._select_conv_backend(x, w, None, *conv, bias_sizes)
    dilation, out_of = conv[2], torch.ops.aten.convolution
    extents = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:], strict=False)]

    def problem(shape: list[int]) -> tuple[torch.Tensor, ...]:
        cx, cw = _zeros(x, shape), _zeros(w, list(w.shape))
        out = out_of(cx.to("meta"), cw.to("meta"), None, *conv)
        return (cx, cw, _zeros(go, list(out.shape))) if backward else (cx, cw, out)

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


def _zeros(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Zeros of ``shape`` in ``t``'s dim order, its size-1 dims' too: a 1 x 1 weight converted channels_last
    is dense in both orders, and the kernel picks its path by its strides (rebuilt NCHW, it computed NCHW)."""
    order = sorted(range(t.dim()), key=t.stride().__getitem__, reverse=True)  # (stable: ties keep dim order)
    return torch.zeros(math.prod(shape), dtype=t.dtype).as_strided(shape, dense_strides(shape, order))


def _meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor shaped and strided as ``t`` (a FakeTensor too)."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
