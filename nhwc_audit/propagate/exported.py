"""torch.export's capture traced as eager lays tensors out (:class:`EagerLayouts`): export runs
the model on fake tensors and writes into its graph only the copies those need."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

from ..capture.export import export
from ..capture.fx import Capture
from ..errors import TraceError, first_line
from ..layout import strides_like_channels_last
from .dispatch import RecordingMode
from .fake_strides import eager_cpu_strides

__all__ = ["EagerLayouts", "exported"]


class EagerLayouts(RecordingMode):
    """For torch.export's trace, which runs the model on fake tensors: an op's 4D/5D output that
    the fake kernel makes row-major from an input strided channels_last gets the strides the CPU
    kernel gives it (asked on zeros: :func:`eager_cpu_strides`, small ops only). Export writes a
    ``.contiguous()`` into its graph only where the fake tensor is not contiguous already: a
    channels_last Conv3d's output at batch 2, NCDHW in export's trace and channels_last_3d in
    eager, lost the copy eager makes after it (and so did GroupNorm's, ``torch.roll``'s). Export
    turns oneDNN off while it traces (the CPU convolutions then pick NCDHW too): the kernels are
    asked with the settings the model runs with, as they were when the mode was made."""

    def __init__(self) -> None:
        super().__init__()
        self.mkldnn = torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
        self.asked: dict[tuple[Any, ...], tuple[int, ...] | None] = {}
        """The kernels' answers by op and arguments (shapes, strides, dtypes; other values as
        written): a network's blocks repeat them, and a Conv3d's answer costs a real Conv3d."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(first, torch.Tensor) or first.dim() not in (4, 5) or not first.is_contiguous():
            return out
        if func._schema.is_mutable or func._schema.returns[0].alias_info is not None:
            return out  # in place, or a view: strided by its input
        rank = first.dim()
        if not any(
            isinstance(t, torch.Tensor) and t.dim() == rank and strides_like_channels_last(t.shape, t.stride())
            for t in tree_leaves((args, kwargs))
        ):
            return out  # (a kernel picks channels_last by its inputs' suggest_memory_format(): C == 1 too)
        key = (func, *(_described(v) for v in tree_leaves((args, kwargs))))
        if key not in self.asked:
            # the flags' restore on the way out warns of oneDNN's TF32 on Intel GPUs: torch's, not the user's
            with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=self.mkldnn):
                warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
                self.asked[key] = eager_cpu_strides(func, args, kwargs, first)
        strides = self.asked[key]
        if strides is None or strides == tuple(first.stride()):
            return out
        fixed = torch.empty_strided(first.shape, strides, dtype=first.dtype, device=first.device)
        return fixed if first is out else type(out)([fixed, *out[1:]])


def _described(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), tuple(v.stride()), v.dtype)
    return repr(v)


def exported(
    model: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: str,
    notes: list[str],
    amp: contextlib.AbstractContextManager[None] | None = None,
) -> Capture:
    """torch.export's capture, traced under :class:`EagerLayouts` on the CPU and under ``amp``
    (the audit's autocast, :meth:`.runner.Runner.amp`). Where that trace raises (a view that
    eager cannot make either: a break), the trace on the fake tensors' own layouts, with a note
    in ``notes``. A fake run's export that meets two fake modes (forward reassigns a tensor kept as
    a plain attribute, which the fake copy holds as a fake tensor of the audit's mode: monai
    GlobalNet's ``self.grid = self.grid.to(...)``) is traced again with those attributes real, as
    export takes them (a small one's value, a larger one's zeros; the graph's constants are made
    fake after the capture)."""
    with amp if amp is not None else contextlib.nullcontext():
        try:
            return _traced(model, args, kwargs, device, notes)
        except TraceError as e:
            if "doesn't match mode" not in str(e):
                raise
            held = [
                (m, k, v, real)
                for m in model.modules()
                for k, v in vars(m).items()
                if (real := _stand_in(v)) is not None
            ]
            if not held:
                raise
        try:  # (under amp still)
            for m, k, _, real in held:
                m.__dict__[k] = real
            return _traced(model, args, kwargs, device, notes)
        finally:
            for m, k, v, _ in held:
                m.__dict__[k] = v


def _stand_in(v: Any) -> torch.Tensor | None:
    """A real tensor for a fake one a module keeps as a plain attribute: its constant's value, or zeros
    strided as it is on the CPU (up to 16 M elements); None for anything else."""
    if not isinstance(v, FakeTensor) or isinstance(v, torch.nn.Parameter):
        return None
    if v.constant is not None:
        return v.constant
    if v.device.type != "cpu" or v.numel() > 1 << 24:
        return None
    return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype).zero_()


def _traced(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], device: str, notes: list[str]) -> Capture:
    if device != "cpu":
        return export(model, args, kwargs)
    try:
        with EagerLayouts():
            return export(model, args, kwargs)
    except TraceError as e:
        cap = export(model, args, kwargs)
        notes.append(
            f"export: traced on fake tensors' layouts, as eager's made the trace raise ({first_line(e)}): a copy "
            "torch.export writes only where the fake tensor needs it (.contiguous(), a reshape) may be missing"
        )
        return cap
