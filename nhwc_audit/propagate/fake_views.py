"""A fake run's views strided as eager strides them: FakeTensor's view does not run ATen's
``computeStride`` for dims of size 1, and a kernel after the view reads them to pick a layout
(a batch-1 map viewed back from tokens). The label says so in the report
(:class:`~.corrections.Corrections`)."""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .relays import is_alias_of

__all__ = ["VIEWS", "VIEW_STRIDES", "view_node", "view_strides"]


VIEWS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view", "_reshape_alias"}
)
"""Ops (as recorded, lower-cased) whose eager strides come from ATen's ``computeStride``."""


def view_node(n: torch.fx.Node) -> bool:
    """``n`` calls one of the :data:`VIEWS` (an fx method or function, or torch.export's ATen op):
    what a run that has no node contexts (a backward's forward) restrides."""
    target = getattr(n.target, "overloadpacket", n.target)  # an ATen op of torch.export's graph: its name
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return n.op in ("call_method", "call_function") and name.lower() in VIEWS


VIEW_STRIDES = (
    "view/reshape: size-1 dims strided as eager strides them, where FakeTensor's view does not; "
    "kernels read them to pick channels_last, as after x.transpose(1, 2).view(1, C, H, W)"
)


def view_strides(source: torch.Tensor, out: torch.Tensor, *, backward: bool = True) -> torch.Tensor:
    """``out`` (a view of ``source`` made under fake tensors) with the strides eager gives it:
    the meta device runs ATen's own stride computation, which FakeTensor's view does not for
    dims of size 1 (batch 1: 2048 where eager has 32). A size-1 dim's stride addresses no other
    element, so only those are changed; ``out`` itself when they agree. ``backward``: a backward
    pass may follow the run (then a view that needs a gradient is restrided in place)."""
    if out is source or not is_alias_of(out, source) or out.numel() != source.numel():
        return out  # (flatten(y, d, d) returns y itself: eager keeps its strides)
    if out.dim() not in (3, 4, 5) or 1 not in out.shape:  # 3D too: tokens (B, C, N) a 1D pool unsqueezes
        return out
    try:
        with unset_fake_temporarily():  # the meta device itself, not a FakeTensor on it
            meta = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device="meta")
            strides = tuple(meta.view(out.shape).stride())
    except RuntimeError:  # not viewable: eager copies (contiguous strides)
        return out
    if strides == tuple(out.stride()) or any(
        a != b and n != 1 for a, b, n in zip(strides, out.stride(), out.shape, strict=True)
    ):
        return out
    if backward and out.requires_grad:  # as_strided's backward would hand the gradient the source's strides:
        return _restrided_in_place(out, strides)  # the view keeps its own backward (a view's, as eager's)
    return out.as_strided(out.shape, strides, out.storage_offset())


def _restrided_in_place(out: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """``out`` given ``strides`` in place, outside autograd, with the version counter it shares with
    its source put back: autograd's check of the tensors it saved would take this for a write."""
    reset = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if reset is None:
        return out
    version = out._version
    with torch.no_grad():
        out.as_strided_(out.shape, strides, out.storage_offset())
    reset((out,), (version,))
    return out
