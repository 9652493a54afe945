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
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from ..channels import dense_strides
from ..records import HiddenCopy
from ..tensors import iter_tensors
from .conv_kernels import CONV_BACKWARD as _CONV_BACKWARD
from .conv_kernels import cut, unguarded
from .kernel_copies import PROBE_NUMEL, asked_on_zeros, fake_below, probed, signature
from .onednn import stepped_around

__all__ = ["Answers", "Call", "KernelWatch", "Zeros", "counterpart"]

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
        self.calls: list[Call | None] = []
        """Each call's NCHW counterpart (:func:`counterpart`), None where none is known."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not _CONV_BACKWARD:
            return func(*args, **kwargs)
        with stepped_around(func, args):  # a oneDNN kernel that would crash the audit's process
            return self._watched(func, args, kwargs)

    def _watched(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
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
            self.calls.append(None)  # not asked: what it copies is the rules' estimate
            return func(*args, **kwargs) if got is None else got[0]
        self.ran = True
        self.copies += [dataclasses.replace(c, op="convolution_backward") for c in got[1]]
        self.calls.append(counterpart(args, kwargs))
        return got[0]


def _activations(args: Any) -> list[torch.Tensor]:
    """A ``convolution_backward``'s activations: its incoming gradient and its input (not its weight)."""
    return [t for t in args[:2] if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class Zeros:
    """A tensor argument of a call's NCHW counterpart: zeros of this shape, dtype and device, with
    PyTorch's row-major (NCHW) strides; or (``base``) that view of zeros shaped ``base``, laid out
    so, ``offset`` elements in (a channel slice of an NCHW map)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    base: tuple[int, ...] | None = None
    offset: int = 0

    def made(self) -> torch.Tensor:
        if self.base is None:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        base = torch.zeros(self.base, dtype=self.dtype, device=self.device)
        return base.as_strided(self.shape, base.stride(), self.offset)


Call = tuple[Any, dict[str, Any]]
"""A ``convolution_backward`` call's arguments and keywords, its tensors as :class:`Zeros`."""


def counterpart(args: Any, kwargs: dict[str, Any]) -> Call | None:
    """What the NCHW model's run hands the ``convolution_backward`` called with ``args`` and
    ``kwargs`` in a channels_last run of a model that reorders no dims: its weight (unless a slice:
    one dense channels_last only because it holds one output channel is not dense NCHW) and each
    activation dense in NCHW order, or an activation that is a slice of a dense map (a
    concatenation's gradient) the same slice of that map laid out NCHW. None where a tensor is
    neither (a broadcast gradient, a flattened view of a map): what the NCHW run's is then is
    its run's business."""
    grad, x, weight, *rest = args
    whole = weight._base is None or weight.numel() == weight._base.numel()  # (not a slice of a weight)
    made = [_activation(grad), _activation(x), _dense_zeros(weight) if whole else None]
    if any(m is None for m in made) or any(isinstance(v, torch.Tensor) for v in tree_leaves((rest, kwargs))):
        return None
    return (*made, *rest), dict(kwargs)


def _dense(t: torch.Tensor) -> bool:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t.is_contiguous() or (fmt is not None and t.is_contiguous(memory_format=fmt))


def _dense_zeros(t: torch.Tensor) -> Zeros | None:
    return Zeros(tuple(t.shape), t.dtype, t.device) if _dense(t) else None


def _activation(t: torch.Tensor) -> Zeros | None:
    """An activation's NCHW counterpart: a view of another tensor (a slice of the gradient a
    concatenation handed back, dense or not) as the same slice of that tensor laid out NCHW, where
    it takes that tensor's strides (no dim reordered or stepped) and that tensor is dense;
    another tensor made dense NCHW where it is dense, and so is a row-major view of a tensor of
    rank 3 or less (a pooled head's gradient unflattened: laid alike in either run) or of a
    row-major one (InstanceNorm's output, a view of the N*C map it computes: NCHW in either run)."""
    base = t._base
    if base is None or (t.is_contiguous() and (base.dim() < 4 or base.is_contiguous())):
        return _dense_zeros(t)
    if base.dim() != t.dim() or t.stride() != base.stride() or not _dense(base):
        return None
    left, at = int(t.storage_offset() - base.storage_offset()), [0] * t.dim()
    for d in sorted(range(t.dim()), key=lambda d: -int(base.stride()[d])):  # outermost first
        if base.shape[d] > 1:
            at[d], left = divmod(left, int(base.stride(d)))
    if left or any(a + n > m for a, n, m in zip(at, t.shape, base.shape, strict=True)):
        return None
    offset = sum(a * s for a, s in zip(at, dense_strides(base.shape, range(base.dim())), strict=True))
    return Zeros(tuple(t.shape), t.dtype, t.device, tuple(base.shape), offset)
