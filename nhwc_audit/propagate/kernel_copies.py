"""What a kernel copies inside, where the ops it calls never reach a dispatch mode.

An op is one call at the dispatch level: the ATen ops its kernel calls never reach a dispatch
mode, which is popped while it handles the op. :func:`kernel_copies` runs two kinds of op by their
backend kernel with a recording mode pushed, so the ATen ops the kernel calls come back to it:

- an op registered by a library (torchvision's ``roi_align``, ``roi_pool``, ``ps_roi_align``,
  ``deform_conv2d``; a C++ extension's). torchvision's CPU ``roi_align`` calls
  ``input.contiguous()``: on a channels_last feature map that copies the whole map into NCHW,
  every call, where the op's own layouts (an NHWC map in, an NCHW stack of crops out) show only a
  revert of the crops' size. Its layout copies are the op's hidden copies
  (:func:`~nhwc_audit.channels.hidden_copy`), as a node's are.
- an ATen op given a 4D/5D input not dense in memory (not
  :func:`~nhwc_audit.channels.laid_out`): a channel slice of a channels_last map (``torch.split``,
  ``chunk``), which a convolution, a pool, a norm or an upsample copies whole first
  (``contiguous()``), where NCHW memory holds one sample's slice densely and reads it in place.
  Kept: :func:`~nhwc_audit.channels.kernel_copy`. An op such a kernel calls on such a tensor is run
  the same way (a convolution's ``_convolution``).

A backward's convolution is run this way too, whatever its inputs, and every op its kernel calls
(:mod:`.backward_kernels`): on the CPU a channels_last convolution's backward computes its weight
gradient in NCHW and copies it into channels_last every step (``grad_weight.to(...)`` in the oneDNN
kernel), where strides show nothing. Kept: every copy it makes (:func:`_watched_copy`). Other ATen
kernels on dense inputs are not run this way (their internal copies stay unseen: one more mode per
op would cost every audit for the few kernels that copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_map

from ..channels import COPY_OPS, hidden_copy, kernel_copy, laid_out, layout_change, permuted
from ..errors import NhwcAuditError
from ..layout import reorders, tensor_meta
from ..records import ALLOCATING_OPS, HiddenCopy
from ..tensors import iter_tensors

__all__ = [
    "PROBE_NUMEL",
    "Asked",
    "asked_on_zeros",
    "callers_modes_note",
    "computes",
    "fake_below",
    "kernel_copies",
    "library_op",
    "probed",
    "RowMajor",
    "signature",
]

_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}
_COMPOSITE = (torch._C.DispatchKey.CompositeExplicitAutograd, torch._C.DispatchKey.CompositeImplicitAutograd)
_OWN = frozenset({"aten", "prim", "prims"})


@functools.cache
def library_op(func: Any) -> bool:
    """``func`` is an op of a library's namespace (not ATen's)."""
    return str(getattr(func, "namespace", "aten")) not in _OWN


Guard = Callable[[Any, Any, Any], None]


class _Inside(TorchDispatchMode):
    """Sees the ATen ops a kernel calls; keeps their copies and guards the user's weights as the
    mode it runs under does (``guard``: its check of each op before it runs): a library op's kernel's
    layout copies, an ATen kernel's (``aten``) copies of a tensor not dense in memory made dense
    (:func:`~nhwc_audit.channels.kernel_copy`). With ``activations`` (a backward convolution's
    gradient and input, :mod:`.backward_kernels`): every copy the kernel makes, and the ops it calls
    run the same way (:func:`_watched_copy`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # (as the audit's other modes: never under torch.compile)

    def __init__(self, guard: Guard, aten: bool, activations: Sequence[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.guard = guard
        self.aten = aten
        self.activations = activations
        self.copies: list[HiddenCopy] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.guard(func, args, kwargs)
        inner = probed(func, args, kwargs, self.guard, self.activations) if self.aten else None
        if inner is not None:  # an op of this kernel's on a tensor not dense (or watched): its own kernel's copies
            self.copies += inner[1]
            return inner[0]
        out = func(*args, **kwargs)
        if self.activations is not None:
            copy = _watched_copy(func, args, out, self.activations)
        else:
            copy = kernel_copy(func, args, out) if self.aten else hidden_copy(func, args, out)
        if copy is not None:
            self.copies.append(copy)
        return out


Asked = dict[str, list[HiddenCopy]]
"""What a fake run's kernels were asked, by op and arguments (their shapes, strides, dtypes and
plain values): one run asks each once (a ResNet's blocks repeat their shapes)."""


def kernel_copies(
    func: Any, args: Any, kwargs: dict[str, Any], guard: Guard, asked: Asked | None = None
) -> tuple[Any, list[HiddenCopy]] | None:
    """``(output, copies its kernel made)`` of a library op (:func:`library_op`), or of an ATen op
    given a 4D/5D tensor not dense in memory, called from a dispatch mode's handler and run by its
    CPU or CUDA kernel. None, and nothing run, for other ops (ATen's copies among them), tensors that
    are not plain (FakeTensors: the op runs fake, and its CPU kernel is asked what it copies on
    zeros, :func:`asked_on_zeros`), tensors on several devices or on another, an op with no kernel
    of its own for the device nor one for every device (``CompositeExplicitAutograd``, a
    ``torch.library.custom_op`` without ``device_types``; a CompositeImplicit one's ATen ops reach
    the mode anyway), or another mode below the caller's, which the kernel run would skip.
    ``asked``: the run's answers of kernels asked on zeros, kept there."""
    tensors = iter_tensors((args, kwargs))
    if not _asks(func, tensors):
        return None
    if any(isinstance(t, FakeTensor) for t in tensors) or fake_below():  # a fake run: its CPU kernel asked on zeros
        key = repr((func, tree_map(signature, (args, kwargs))))
        got = asked.get(key) if asked is not None else None
        if got is None:
            got = asked_on_zeros(func, args, kwargs, guard, tensors) or []
            if asked is not None:
                asked[key] = got
        return func(*args, **kwargs), got
    if torch._C._len_torch_dispatch_stack() > 0 or not tensors:
        return None
    return probed(func, args, kwargs, guard)


def signature(v: Any) -> Any:
    """What a kernel's copies depend on, of one argument: a tensor's shape, strides, dtype and device."""
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.stride(), v.dtype, v.device.type)
    return v


def _asks(func: Any, tensors: list[torch.Tensor]) -> bool:
    """``func`` is run by its kernel to see its copies: a library's op, or an ATen op that computes
    on a tensor not :func:`~nhwc_audit.channels.laid_out`."""
    return library_op(func) or (not all(map(laid_out, tensors)) and computes(func))


@functools.cache
def computes(func: Any) -> bool:
    """An ATen op that computes a new tensor from its inputs' values: not a copy, a view or an
    in-place op (their outputs alias an input), nor an allocation."""
    if func in COPY_OPS or any(r.alias_info is not None for r in func._schema.returns):
        return False
    return str(func.overloadpacket.__name__) not in ALLOCATING_OPS


@functools.cache
def _writes_out(func: Any) -> bool:
    """An ATen op's ``out=`` variant (``median.dim_values``, which ``median.dim`` calls): a watched
    kernel's op that computes into a tensor its caller allocated."""
    return any(a.is_out for a in func._schema.arguments)


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose backend kernel runs as dispatch would run it: no subclass, no quantized
    dtype (QuantizedCPU kernels), no conjugate or negative bit (their keys resolve them first)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not (t.is_quantized or t.is_conj() or t.is_neg())


def callers_modes_note(mode: str) -> str | None:
    """What to tell a user who runs a real-mode audit inside a dispatch mode of their own: the
    kernels are not run by the audit's recording mode (they would skip it), so what they copy inside
    (a slow backend's weight, a kernel's copy of its whole input) goes unseen. None where no such
    mode is active, or for a fake audit (its kernels are asked on zeros, every mode off)."""
    outer = [type(m).__name__ for m in _get_current_dispatch_mode_stack()]
    if not outer or mode == "fake":
        return None
    return (
        f"a dispatch mode of the caller's is active ({', '.join(outer)}): kernels were not run to see what "
        "they copy inside (a slow convolution backend's weight, a kernel's copy of its whole input), so such "
        "copies are not charged; audit outside it, or with --mode fake"
    )


def fake_below() -> bool:
    """A FakeTensorMode is on the dispatch stack below the caller's mode (a fake run meeting a
    real tensor: a constant the graph made)."""
    return any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack())


def probed(
    func: Any, args: Any, kwargs: dict[str, Any], guard: Guard, activations: Sequence[torch.Tensor] | None = None
) -> tuple[Any, list[HiddenCopy]] | None:
    """:func:`kernel_copies` of an op on plain tensors, whatever the modes below (a kernel's own
    op is handled inside its mode); with ``activations`` (:class:`_Inside`), any ATen op that computes."""
    tensors = iter_tensors((args, kwargs))
    asks = (
        (computes(func) or _writes_out(func)) and not library_op(func)
        if activations is not None
        else _asks(func, tensors)
    )
    if not asks or not tensors or not all(map(_plain, tensors)):
        return None
    devices = {t.device.type for t in tensors}
    key = _KEYS.get(devices.pop()) if len(devices) == 1 else None
    if key is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
        # torch.library.custom_op without device_types, an ATen op made of others: one kernel for every device
        # (made of ATen ops only, ``slow_conv3d``'s, below autograd: the ops it calls come to the mode)
        key = next((k for k in _COMPOSITE if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), k)), None)
    if key is None:
        return None
    refused: list[BaseException] = []

    def guarded(f: Any, a: Any, k: Any) -> None:
        try:
            guard(f, a, k)
        except BaseException as e:  # (a library kernel hands it back as a RuntimeError: torch's stable ABI)
            refused.append(e)
            raise

    inside = _Inside(guarded, aten=not library_op(func), activations=activations)
    try:
        with inside:
            out = func._op_dk(key, *args, **kwargs)
    except NhwcAuditError:
        raise  # the audit's own (a nested mode's): not the kernel's
    except Exception:
        if refused:  # the guard refused an op the kernel calls (a write to the user's weights)
            raise refused[0] from None
        # a kernel run by its key that refuses what the mode hands back to it: a CompositeExplicit
        # Scalar overload (``fmod.Scalar``, ``remainder.Scalar``, ``copysign.Scalar``) calls its
        # Tensor overload with the scalar wrapped, which a mode is given unwrapped. Not probed: the
        # caller runs the op (an error of the op's own is raised there)
        return None
    return out, inside.copies


PROBE_NUMEL = 1 << 22
"""A fake run asks a kernel on zeros of its arguments up to this many elements each."""


def asked_on_zeros(
    func: Any,
    args: Any,
    kwargs: dict[str, Any],
    guard: Guard,
    tensors: list[torch.Tensor],
    watched: Callable[[Any], Sequence[torch.Tensor]] | None = None,
) -> list[HiddenCopy] | None:
    """The copies an op's CPU kernel makes, for a fake run on the CPU: the op run for real,
    with every mode off, on zeros laid out as its FakeTensor arguments (shapes, strides, dtypes;
    zero boxes, offsets and indices are valid arguments). None (not asked) off the CPU, above
    :data:`PROBE_NUMEL`, or where the kernel refuses zeros. ``watched``: the activations among the
    real arguments, for :func:`probed`."""
    if any(t.device.type != "cpu" or t.numel() > PROBE_NUMEL for t in tensors):
        return None

    def zeros(v: Any) -> Any:
        if not isinstance(v, FakeTensor):
            return v
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype).zero_()

    try:
        with _disable_current_modes(), unset_fake_temporarily(), torch.no_grad():
            real_args, real_kwargs = tree_map(zeros, (args, kwargs))
            got = probed(func, real_args, real_kwargs, guard, watched(real_args) if watched else None)
    except Exception:
        return None
    return got[1] if got is not None else None


_TO = torch.ops.aten.to


def _watched_copy(func: Any, args: Any, out: Any, activations: Sequence[torch.Tensor]) -> HiddenCopy | None:
    """A copy a watched kernel (a backward convolution's) made of a 4D/5D tensor (``to``: a copy
    unless it returns its input): of one of its ``activations`` whole (the gradient, the input: a
    re-lay into the order it computes in) or of a part of one not dense in memory (a slice made
    dense), or else (``result``) of a tensor it made itself, of its weight, or of its own view of
    a dense activation (on the CPU a channels_last convolution computes its weight gradient in NCHW
    and copies it into channels_last; the slow backends copy a channels_last weight into NCHW, a
    grouped convolution each group's gradient)."""
    if not (func in COPY_OPS or func.overloadpacket is _TO) or not args or not isinstance(out, torch.Tensor):
        return None
    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
    if not isinstance(src, torch.Tensor) or torch._C._is_alias_of(out, src):  # type: ignore[attr-defined]
        return None
    sm, dm = tensor_meta(src), tensor_meta(out)
    nbytes, name = 2 * min(sm.stored_nbytes, dm.nbytes), str(func.overloadpacket.__name__)
    of = next((t for t in activations if torch._C._is_alias_of(src, t)), None)  # type: ignore[attr-defined]
    if src.dim() not in (4, 5):  # a watched view's order copied row-major: no layout's, the map's doing
        rows = isinstance(activations, RowMajor) and of is not None  # (a second ask's: any copy of one)
        whole = rows or (of is not None and permuted(of) and out.is_contiguous() and not src.is_contiguous())
        return HiddenCopy(name, sm.layout, dm.layout, dm.shape, nbytes, computed=True, reorder=True) if whole else None
    if of is None or (laid_out(of) and not _whole(src, of)):  # (a group's view of a dense gradient: its own)
        return HiddenCopy(name, sm.layout, dm.layout, dm.shape, nbytes, result=True)
    same = not (layout_change(sm, dm) or reorders(sm, dm))
    return HiddenCopy(name, sm.layout, dm.layout, dm.shape, nbytes, computed=True, densified=same)


class RowMajor(list[torch.Tensor]):
    """Watched tensors made row-major, for a second ask of a kernel found copying (what the NCHW
    model's kernel does, :mod:`.revert_kernels`): any copy of one, of a view's too, counts."""


def _whole(view: torch.Tensor, t: torch.Tensor) -> bool:
    """``view`` is all of ``t``: the same shape, strides and offset."""
    return bool(view.shape == t.shape and view.stride() == t.stride() and view.storage_offset() == t.storage_offset())
