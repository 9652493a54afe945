"""A oneDNN kernel that breaks channels_last training on the CPU, found and stepped around.

oneDNN's CPU kernel for the weight gradient of a 1 x 1 convolution with a stride above 1 reduces the
stride first into a workspace sized for whole channel blocks; with channels_last (NHWC) data and
fewer input channels than a block (16 with AVX-512, 8 with AVX2) it writes past that workspace
(uxlfoundation/oneDNN#6035). In torch 2.14.1 on an AVX-512 CPU, ``Conv2d(8, 8, 1, stride=2)``
trained channels_last at 1x8x64x64 segfaults, at 1x12x128x128 glibc aborts on a corrupted heap;
the NCHW model, padding 1, a stride of 1, 16 input channels, or a grouped convolution run.
Whether this PyTorch has the bug is asked once per process of a fresh interpreter
(:func:`present`: the smallest known crash, which would take the caller's process down with it).
Where it has, the audit runs such a convolution's backward without oneDNN (:func:`stepped_around`,
:class:`Guard`) and says so (:func:`note`): the model's own training would crash or corrupt memory."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Guard", "at_risk", "guarded", "ic_block", "note", "present", "stepped_around"]

_PROBE = """
import torch
torch.set_num_threads(1)
for _ in range(3):
    m = torch.nn.Conv2d(4, 8, 1, stride=2).to(memory_format=torch.channels_last)
    x = torch.randn(1, 4, 128, 128).to(memory_format=torch.channels_last)
    m(x).sum().backward()
"""
"""The smallest crash known on both AVX2 and AVX-512 (4 input channels, below either's block)."""

_CONV_BACKWARD = torch.ops.aten.convolution_backward.default


def ic_block() -> int | None:
    """oneDNN's block of input channels on this CPU: 16 with AVX-512 (or AMX), 8 with AVX2, as the
    hardware has them (``ATEN_CPU_CAPABILITY`` caps ATen's kernels, not oneDNN's) or as
    ``ONEDNN_MAX_CPU_ISA`` caps them; None on other CPUs."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    wide = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()
    if wide and (cap == "ALL" or any(isa in cap for isa in ("AVX512", "AMX", "AVX10"))):
        return 16
    if torch.cpu._is_avx2_supported() and (cap == "ALL" or "AVX" in cap):
        return 8
    return None


@functools.cache
def present() -> bool:
    """This PyTorch's oneDNN has the bug: the probe crashes, aborts or hangs a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        ran = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=120, env=env, check=False)
    except subprocess.TimeoutExpired:
        return True
    except OSError:
        return False
    return ran.returncode != 0


def at_risk(weight: torch.Tensor, stride: Any, padding: Any, groups: int, channels_last: bool) -> bool:
    """A CPU convolution of ``weight`` (float32, 1 x 1, fewer input channels than a block) with a
    stride above 1, no padding and no groups, computed channels_last, where oneDNN is on: its
    weight gradient is the kernel's case (whether this PyTorch has the bug aside, :func:`present`)."""
    if not (
        channels_last
        and weight.device.type in ("cpu", "meta")  # (a model built on meta, audited for the CPU)
        and weight.dtype == torch.float32
        and weight.dim() == 4
        and tuple(weight.shape[2:]) == (1, 1)
        and groups == 1
        and any(s > 1 for s in stride)
        and (padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding)))
    ):
        return False  # (the cheap questions first: every audit asks them of every convolution)
    block = ic_block()
    return block is not None and weight.shape[1] < block and torch._C._has_mkldnn and torch._C._get_mkldnn_enabled()


def _backward_at_risk(args: Any) -> bool:
    """``aten.convolution_backward``'s arguments ask for the kernel's case and its weight or bias gradient
    (oneDNN computes a bias gradient alone in the same kernel: a frozen weight's bias trained crashes too)."""
    _, x, w, _, stride, padding, _, transposed, _, groups, mask = args
    return bool(mask[1] or mask[2]) and _convolution_at_risk(x, w, stride, padding, transposed, groups)


def _convolution_at_risk(
    x: torch.Tensor, w: torch.Tensor, stride: Any, padding: Any, transposed: bool, groups: int
) -> bool:
    """A convolution of ``x`` by ``w`` is the kernel's case (:func:`at_risk`), computed channels_last
    where either suggests that format."""
    cl = torch.channels_last in (suggest_memory_format(x), suggest_memory_format(w))
    return not transposed and at_risk(w, stride, padding, groups, cl)


def stepped_around(func: Any, args: Any) -> contextlib.AbstractContextManager[Any]:
    """oneDNN off for one op where it is the kernel's case and this PyTorch has the bug (the slow
    backend computes it), else nothing."""
    if func is _CONV_BACKWARD and _backward_at_risk(args) and present():
        return _without_onednn()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN's switch alone off (``torch.backends.mkldnn.flags`` resets its other settings too)."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


class Guard(TorchDispatchMode):
    """Pushed around a backward the audit runs outside its own watch (a repair's checks): each
    ``convolution_backward`` of the kernel's case runs without oneDNN (:func:`stepped_around`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # (as the audit's other modes: never under torch.compile)

    def __init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        with stepped_around(func, args):
            return func(*args, **(kwargs or {}))


def guarded(params: Sequence[torch.Tensor], loss: torch.Tensor | None = None) -> contextlib.AbstractContextManager[Any]:
    """A :class:`Guard` around a backward into ``params`` where one could be the weight of the
    kernel's case and this PyTorch has the bug; else nothing (a mode on the stack costs every op its
    dispatch). With ``loss``, the backward's own convolutions say whether one is the kernel's case
    (their strides and paddings, saved by autograd): the probe of this PyTorch (:func:`present`, a
    fresh interpreter, ~2.7 s) runs only then, not for every model with a 1 x 1 convolution of few
    input channels (a squeeze-excitation block's: timm regnety_002's repair, 27 s against a 3 s audit)."""
    block = ic_block()
    could = block is not None and any(
        p.dim() == 4 and tuple(p.shape[2:]) == (1, 1) and p.shape[1] < block and p.dtype == torch.float32
        for p in params
    )
    if could and loss is not None:
        could = _graph_at_risk(loss)
    return Guard() if could and present() else contextlib.nullcontext()


def _graph_at_risk(loss: torch.Tensor) -> bool:
    """Some convolution the backward of ``loss`` runs is the kernel's case (:func:`at_risk`)."""
    todo: list[Any] = [loss.grad_fn]
    seen: set[Any] = set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True  # an autograd.Function's backward (a reentrant checkpoint's) runs what the graph does not show
        if type(node).__name__ == "ConvolutionBackward0":
            try:  # (what autograd did not save, a frozen weight's input: asked as before)
                saved = (node._saved_input, node._saved_weight, node._saved_stride, node._saved_padding)
                risky = _convolution_at_risk(*saved, node._saved_transposed, node._saved_groups)
            except RuntimeError:
                return True
            if risky:
                return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def note(model: nn.Module, device: str, train: bool, dtype: torch.dtype | None) -> str | None:
    """The report's note where the model has convolutions of the kernel's case and this PyTorch has the
    bug: which, what happens, and what to change (and, in a ``train`` audit, how its backward ran).
    ``dtype``: what the convolutions compute in where the audit sets it (its dtype, or autocast's): the
    kernel's case is float32's."""
    if device != "cpu" or dtype not in (None, torch.float32):
        return None
    hit = [
        f"{path} ({m.in_channels} -> {m.out_channels}, stride {tuple(m.stride)})"
        for path, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and (w := _weight(m)) is not None
        and at_risk(w, m.stride, m.padding, m.groups, channels_last=True)
    ]
    if not hit or not present():
        return None
    block = ic_block()
    return (
        f"oneDNN: the channels_last weight gradient of a 1x1 strided convolution with fewer than {block} input "
        f"channels writes past its buffer on this CPU in this PyTorch (uxlfoundation/oneDNN#6035): training "
        f"{', '.join(hit[:3])}{' and more' if len(hit) > 3 else ''} channels_last here crashes or corrupts memory"
        f"{' (the audit ran its backward without oneDNN)' if train else ''}. Keep it NCHW, give it "
        f"{block} input channels, or write it as the same 1x1 convolution with stride 1 of x[:, :, ::s, ::s] (s its stride)"
    )


def _weight(m: nn.Conv2d) -> torch.Tensor | None:
    """``m``'s weight as :func:`at_risk` reads it (its shape, dtype and device), or None before a lazy
    module has one. A weight a parametrization computes (orthogonal, weight_norm) is not computed: that
    runs the parametrization on the audit's copy out of the run's modes (a fake audit's Cayley map made
    a real identity beside fake weights and raised) and updates its state (spectral_norm's power
    iteration); its shape is the convolution's own, in its first original tensor's dtype, on meta."""
    if not parametrize.is_parametrized(m, "weight"):
        w = m.weight
        return None if isinstance(w, nn.parameter.UninitializedParameter) else w
    plist = m.get_submodule("parametrizations.weight")  # (a ParametrizationList: its originals)
    first = next(iter(plist.parameters()), None)
    if first is None or isinstance(first, nn.parameter.UninitializedParameter):
        return None
    shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    return torch.empty(shape, dtype=first.dtype, device="meta")
