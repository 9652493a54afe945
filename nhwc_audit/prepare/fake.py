"""Fake mode: propagate FakeTensors through the graph. No weights are materialised and no
compute runs, so a model built on the meta device can be audited on a laptop, and a CPU
machine can predict another device's layouts. Every layout is a prediction: the meta
kernels behind FakeTensors disagree with real kernels on some ops (see
:data:`nhwc_audit.analyze.divergence.KNOWN_DIVERGENCES`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import TraceError
from .clone import clone_modules
from .copy import memory_format_for_rank, plain_tensors

__all__ = ["fake_copy", "fake_inputs", "fake_mode", "fake_plain", "meta_failures_unlogged"]


class _MetaFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta")


@contextlib.contextmanager
def meta_failures_unlogged() -> Iterator[None]:
    """FakeTensorMode logs each kernel that raises under it, with a traceback, before the error
    reaches its caller (a model's own shape error: ~80 lines on stderr an op); the audit reports
    the error itself, in one line. A filter on torch's logger for the run, the logger's level
    and handlers untouched."""
    log, quiet = logging.getLogger("torch._subclasses.fake_tensor"), _MetaFailures()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def fake_mode(*, real_inputs: bool = False) -> Any:
    """A FakeTensorMode; with ``real_inputs``, one that takes real tensors (the weights and
    constants of a real model) as they come, converted on first use, no data read or copied.
    FakeTensorMode's dispatch cache (one for the process) is emptied first: its entries are keyed
    on the inputs' metadata, not on what a meta kernel reads besides, the thread count by which a
    CPU Conv3d picks its backend and so its output's layout (a fake audit at 4 threads after one at
    1 kept the 1-thread layouts of a MONAI SegResNet's 1x1x1 convolutions: 2,654,208 B where eager
    at 4 threads moves 0). A mode is made per audit and per NCHW baseline."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    FakeTensorMode.cache_clear()
    return FakeTensorMode(allow_non_fake_inputs=real_inputs)


def _fake_layout(
    t: torch.Tensor, dtype: torch.dtype | None, strides: dict[tuple[int, ...], tuple[int, ...]]
) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    """Shape, strides and dtype of ``t``'s fake stand-in: 4D/5D with the strides
    ``.to(memory_format=...)`` gives a new tensor of that shape (it restrides 1x1 weights too,
    as conversion.convert does), worked out on the meta device outside fake mode (each op
    under fake mode costs ~100 us) once per shape (``strides``); others as they are."""
    target_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    shape = tuple(t.shape)
    fmt = memory_format_for_rank(t.dim())
    if fmt is None:
        return shape, tuple(t.stride()), target_dtype
    got = strides.get(shape)
    if got is None:
        got = strides[shape] = tuple(torch.empty(shape, device="meta").to(memory_format=fmt).stride())
    return shape, got, target_dtype


def _fake_empty(
    mode: Any, layout: tuple[tuple[int, ...], tuple[int, ...], torch.dtype], device: torch.device
) -> torch.Tensor:
    """An uninitialised FakeTensor of ``layout`` on ``device``: the meta tensor wrapped as
    ``torch.empty_strided`` under ``mode`` wraps its meta kernel's output (~15 us; the op
    under fake mode costs ~80 us, and a model has hundreds of weights)."""
    from torch._subclasses.fake_tensor import FakeTensor

    shape, stride, dtype = layout
    return FakeTensor(mode, torch.empty_strided(shape, stride, dtype=dtype, device="meta"), device)


def _fake_parameter(fake: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """``nn.Parameter(fake)`` without its ``detach`` (another ~120 us under fake mode): a
    tensor subclass is a Parameter by the flag ``nn.Parameter`` itself sets on it."""
    fake.requires_grad_(requires_grad)
    fake._is_param = True
    if not isinstance(fake, nn.Parameter):  # a torch that marks parameters another way
        return nn.Parameter(fake, requires_grad=requires_grad)
    return fake


_CONSTANT_NUMEL = 4096
"""Plain tensor attributes up to this size become fake *constants*: code that reads them as
numbers (``stride[i].item()``) still runs under fake tensors."""


def fake_plain(t: torch.Tensor, mode: Any, device: torch.device) -> torch.Tensor:
    """A fake stand-in for a tensor the model keeps as a plain attribute: same strides and
    dtype (Module.to leaves such tensors alone), a constant when small and real."""
    if t.device.type != "meta" and device.type == t.device.type and t.numel() <= _CONSTANT_NUMEL:
        # a copy: fake mode runs in-place ops on a constant's real tensor too (self.count += 1)
        fake: torch.Tensor = mode.fake_tensor_converter.from_real_tensor(mode, _strided_copy(t), make_constant=True)
        return fake
    with mode:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides: ``clone`` makes a broadcast (``expand``, stride 0) or a
    slice dense, which kernels lay out otherwise; then its storage is copied, where it is small."""
    copied = t.detach().clone()
    storage = t.untyped_storage()
    if copied.stride() == t.stride() or storage.nbytes() > 16 * max(1, t.numel()) * t.element_size():
        return copied
    held = storage.clone()  # type: ignore[no-untyped-call]
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(held, t.storage_offset(), t.size(), t.stride())


def fake_copy(model: nn.Module, mode: Any, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are FakeTensors on ``device`` with
    channels_last strides for 4D/5D, and whose plain tensor attributes are fake too (see
    :func:`fake_plain`); the real (or meta) weights are never read or copied."""
    memo: dict[int, Any] = {}
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}
    params = [(p, _fake_layout(p, dtype, strides)) for p in model.parameters()]
    buffers = [(b, _fake_layout(b, dtype, strides)) for b in model.buffers()]
    for p, layout in params:
        memo[id(p)] = _fake_parameter(_fake_empty(mode, layout, device), p.requires_grad)
    for b, layout in buffers:
        memo[id(b)] = _fake_empty(mode, layout, device)
    for _, t in plain_tensors(model):
        if id(t) not in memo:
            memo[id(t)] = fake_plain(t, mode, device)
    try:
        return clone_modules(model, memo)
    except Exception as e:
        raise TraceError(f"cannot copy {type(model).__name__} for a fake-mode audit: {e}") from e


def fake_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], mode: Any, device: torch.device, dtype: torch.dtype | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """FakeTensor inputs of the sample's shapes: 4D/5D channels_last(_3d), others as given."""

    def conv(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        fmt = memory_format_for_rank(v.dim())
        out = torch.empty(v.shape, dtype=target_dtype, device=device)
        return out.to(memory_format=fmt) if fmt is not None else out

    with mode:
        return tuple(tree_map(conv, a) for a in args), {k: tree_map(conv, v) for k, v in kwargs.items()}
