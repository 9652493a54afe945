"""Conversion to channels_last: the user's ``convert()``, and the audit's private copy.

``module.to(memory_format=torch.channels_last)`` raises on any 5D parameter (Conv3d), so
both convert parameter by parameter, by rank: 4D -> channels_last, 5D -> channels_last_3d,
others unchanged. Conversion uses ``Tensor.to(memory_format=...)`` exactly like
``Module.to``: that call restrides 1x1 and depthwise weights (which ``.contiguous(...)``
would leave alone), and those strides decide a conv's output layout.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConversionError, UsageError

__all__ = ["convert", "memory_format_for_rank", "model_device", "prepare_audit_copy", "prepare_inputs"]


def memory_format_for_rank(rank: int) -> torch.memory_format | None:
    """channels_last for 4D, channels_last_3d for 5D, None for other ranks."""
    if rank == 4:
        return torch.channels_last
    if rank == 5:
        return torch.channels_last_3d
    return None


def _converted(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None) -> torch.Tensor:
    fmt = memory_format_for_rank(t.dim())
    target_dtype = dtype if (dtype is not None and t.is_floating_point()) else None
    kwargs: dict[str, Any] = {}
    if target_dtype is not None:
        kwargs["dtype"] = target_dtype
    if device is not None:
        kwargs["device"] = device
    if fmt is not None:
        kwargs["memory_format"] = fmt
    return t.to(**kwargs) if kwargs else t


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor, bool]]:
    for name, p in model.named_parameters(remove_duplicate=True):
        yield name, p, True
    for name, b in model.named_buffers(remove_duplicate=True):
        yield name, b, False


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu for a stateless model)."""
    for _, t, _ in _tensors(model):
        return t.device
    return torch.device("cpu")


def convert(model: nn.Module) -> nn.Module:
    """Return a channels_last copy of ``model`` (channels_last_3d for 5D weights).

    The copy is independent: training it never touches ``model``.

    >>> import torch
    >>> m = convert(torch.nn.Conv3d(2, 4, 3))
    >>> m.weight.is_contiguous(memory_format=torch.channels_last_3d)
    True
    """
    try:
        new = copy.deepcopy(model)
    except Exception as e:
        raise ConversionError(
            f"cannot copy {type(model).__name__} ({type(e).__name__}: {e}); "
            "nhwc-audit never converts your model in place"
        ) from e
    with torch.no_grad():
        for _, t, _ in _tensors(new):
            fmt = memory_format_for_rank(t.dim())
            if fmt is not None:
                t.data = t.data.to(memory_format=fmt)
    return new


def prepare_audit_copy(
    model: nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> nn.Module:
    """A channels_last copy for auditing, cheap on weights.

    Spatial (4D/5D) parameters are converted (as ``convert`` does); other parameters are
    shared with ``model`` read-only (the audit runs under ``no_grad``); buffers are
    copied, so BatchNorm running statistics in train mode never reach the user's model.
    """
    for name, t, _ in _tensors(model):
        if t.device.type == "meta":
            raise ConversionError(
                f"{type(model).__name__} has tensors on the meta device (e.g. {name!r}); "
                "a real-mode audit needs real weights: build the model on cpu/cuda, or audit it with "
                "--mode fake (API: mode='fake')"
            )
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for _, t, is_param in _tensors(model):
            new = _converted(t.detach(), dtype, device)
            if not is_param and _same_storage(new, t):
                new = new.clone()  # buffers may be updated in place (BatchNorm stats)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:
        raise ConversionError(
            f"cannot copy {type(model).__name__} for the audit ({type(e).__name__}: {e}); "
            "nhwc-audit never converts your model in place"
        ) from e


def prepare_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, dtype: torch.dtype | None, device: torch.device
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Copy the sample: 4D/5D tensors to channels_last(_3d), others unchanged but copied."""

    def conv(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.device.type == "meta":
            raise UsageError("example inputs are on the meta device: a real-mode audit needs real tensors")
        fmt = memory_format_for_rank(v.dim()) or torch.preserve_format
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        out = v.detach().to(device=device, dtype=target_dtype)
        return out.clone(memory_format=fmt)

    from torch.utils._pytree import tree_map

    return tuple(tree_map(conv, a) for a in args), {k: tree_map(conv, v) for k, v in kwargs.items()}
