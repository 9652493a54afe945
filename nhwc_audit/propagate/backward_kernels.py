"""What a backward's convolution kernel copies inside, seen while its autograd node runs.

On the CPU (oneDNN, torch 2.14.1) a channels_last convolution's backward computes its weight
gradient in NCHW and copies it into channels_last (``grad_weight.to(...)``), every step; an NCHW
strided 1 x 1 convolution's computes its input gradient channels_last and copies it back. No
stride shows either. :class:`KernelWatch` is pushed on the dispatch stack while a convolution's
autograd node runs (:mod:`.grad_hooks`), and runs the op by its kernel with a recording mode
(:func:`~.kernel_copies.probed`). A fake run asks the CPU kernel on zeros, once per signature, and
on a cut copy of the problem where it is too large to ask whole (:func:`~.conv_kernels.cut`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..records import HiddenCopy
from ..tensors import iter_tensors
from .conv_kernels import CONV_BACKWARD as _CONV_BACKWARD
from .conv_kernels import cut, unguarded
from .kernel_copies import PROBE_NUMEL, asked_on_zeros, fake_below, probed, signature

__all__ = ["Answers", "KernelWatch"]

Answers = dict[str, list[HiddenCopy] | None]
"""A fake run's backward convolutions asked on zeros, by arguments: their copies, None where not asked."""


class KernelWatch(TorchDispatchMode):
    """Pushed while one convolution's autograd node runs (between its hooks, :mod:`.grad_hooks`; the
    engine restores the dispatch stack after each node): runs the ``convolution_backward`` it calls
    by its kernel with a recording mode (:func:`~.kernel_copies.probed`), keeping every copy the
    kernel and the ops it calls make, under the op's name: its gradient's and input's
    (``computed``), and those of what it made itself or of its weight (``result``). ``ran``: the
    kernel was run, or asked (a fake op's CPU kernel on zeros, once per signature in ``asked``, or
    on a cut copy, :func:`~.conv_kernels.cut`): its copies are the node's, in place of the rules' estimate."""

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
                    asked_on_zeros(func, args, kwargs, unguarded, tensors, _activations) if whole else cut(func, args)
                )
            got = func(*args, **kwargs), self.asked[key]
        elif torch._C._len_torch_dispatch_stack() == 0:
            got = probed(func, args, kwargs, unguarded, _activations(args))
        if got is None or got[1] is None:
            return func(*args, **kwargs) if got is None else got[0]
        self.ran = True
        self.copies += [dataclasses.replace(c, op="convolution_backward") for c in got[1]]
        return got[0]


def _activations(args: Any) -> list[torch.Tensor]:
    """A ``convolution_backward``'s activations: its incoming gradient and its input (not its weight)."""
    return [t for t in args[:2] if isinstance(t, torch.Tensor)]
