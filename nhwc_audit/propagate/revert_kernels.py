"""What a kernel that reverts copies of its input: asked once per signature.

An op that writes NCHW from a channels_last input is a revert, charged what it moves into the
output's order: at most the smaller of its input and output. Some CPU kernels copy the whole input
into NCHW first (``input.contiguous()``) and compute from the copy: ``avg_pool3d`` has no
channels_last_3d kernel (torch 2.14.1), ``fractional_max_pool2d``, ``index_select`` over the
channels. Their output is smaller than their input (a 2 x 2 x 2 pool's is an eighth), so the rule
charges an eighth of what the kernel copies; one whose output has a lower rank (``F.unfold``'s
im2col, ``median`` along a dim) no rule charges at all, nor a kernel's row-major copy of a 3D view
of a map (a GroupNorm of its ``flatten(2)``). :func:`revert_copies` runs such an op again by its
kernel with a recording mode (:func:`~.kernel_copies.probed`) the first time its signature is met,
and keeps the copies of its inputs whole into another order, unless the kernel copies the same
inputs made row-major too (``kthvalue``); the node is then charged what they moved
(:func:`~nhwc_audit.analyze.moves.revert_bytes`: a node that copied its inputs whole, then computed
from the copies). A fake run asks the CPU kernel on zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_map

from ..channels import permuted
from ..prepare.copy import memory_format_for_rank
from ..records import HiddenCopy
from ..tensors import iter_tensors
from .conv_kernels import CONVOLUTION
from .kernel_copies import Asked, Guard, RowMajor, asked_on_zeros, computes, fake_below, library_op, probed, signature

__all__ = ["revert_copies"]


def _reverted(func: Any, tensors: list[torch.Tensor], out: Any) -> bool:
    """An ATen op that computes (no convolution: its re-lay is its own rule's, nor a random op: run
    again, it would draw again) wrote its first output dense row-major: from an input of its rank
    dense in channels_last order only and holding more elements (a revert; where the output holds
    as many, the rule already charges the whole input: a layer norm's copy of it is the revert's
    bytes), or from a 3D view dense in another order (:func:`~nhwc_audit.channels.permuted`: a
    channels_last map's ``flatten(2)``), which no layout shows."""
    first = next(iter(iter_tensors(out)), None)
    if first is None or first.layout is not torch.strided:
        return False
    if not first.is_contiguous():  # (one dense in another order: the kernel kept it)
        return False
    if library_op(func) or func is CONVOLUTION or not computes(func):
        return False
    if torch.Tag.nondeterministic_seeded in func.tags:
        return False
    if any(map(permuted, tensors)):
        return True
    n = first.numel()
    return any(
        (t.dim() > first.dim() or t.numel() > n) and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)
        for t in tensors
        if (fmt := memory_format_for_rank(t.dim())) is not None and t.dim() >= first.dim()
    )


def _whole_copied(t: torch.Tensor) -> bool:
    """A 4D/5D tensor, or a 3D view in another order than row-major: what a kernel may copy whole."""
    return t.dim() in (4, 5) or permuted(t)


def _maps(args: Any) -> list[torch.Tensor]:
    """An op's tensor arguments a kernel may copy whole (:func:`_whole_copied`)."""
    return [t for t in iter_tensors(args) if _whole_copied(t)]


def revert_copies(
    func: Any, args: Any, kwargs: dict[str, Any], out: Any, guard: Guard, asked: Asked
) -> list[HiddenCopy]:
    """The copies of its inputs whole into another order that the kernel of ``func`` made, where it
    reverted (wrote ``out`` NCHW from a channels_last input), asked once per signature in ``asked``
    (run again by its kernel; a fake run's asked on zeros); none for other ops, for a kernel that
    copies its input whole from NCHW too (``kthvalue`` clones it in either layout: the same bytes,
    which the rule's revert charges as before), or where another mode is below the caller's."""
    tensors = iter_tensors((args, kwargs))
    if not _reverted(func, tensors, out):
        return []
    key = repr(("revert", func, tree_map(signature, (args, kwargs))))
    got = asked.get(key)
    if got is None:
        found = [c for c in _asked(func, args, kwargs, guard, tensors) or () if c.computed and not c.densified]
        if found:  # (as NCHW: the maps and views made row-major, the rest as they are)
            nchw = tree_map(lambda v: v.contiguous() if isinstance(v, torch.Tensor) and _whole_copied(v) else v, args)
            again = _asked(func, nchw, kwargs, guard, iter_tensors((nchw, kwargs)), _rows)
            found = [] if again is None or any(c.computed for c in again) else found
        got = asked[key] = found
    return got


def _rows(args: Any) -> RowMajor:
    """An op's 3D to 5D tensor arguments, the maps and views made row-major among them: in a second
    ask, any copy of one counts (``kthvalue`` clones a row-major view too)."""
    return RowMajor(t for t in iter_tensors(args) if t.dim() in (3, 4, 5))


def _asked(
    func: Any,
    args: Any,
    kwargs: dict[str, Any],
    guard: Guard,
    tensors: list[torch.Tensor],
    watched: Callable[[Any], list[torch.Tensor]] = _maps,
) -> Any:
    """What ``func``'s kernel copies of its ``watched`` arguments, run again on ``args`` (None: not asked)."""
    if any(isinstance(t, FakeTensor) for t in tensors) or fake_below():
        return asked_on_zeros(func, args, kwargs, guard, tensors, watched)
    if torch._C._len_torch_dispatch_stack() > 0:
        return None
    try:  # (run again as dispatch ran it; an op its kernel refuses so is charged by the rule)
        ran = probed(func, args, kwargs, guard, watched(args))
    except Exception:
        return None
    return ran[1] if ran is not None else None
