"""Ground truth for the bytes an audit charges: what channels_last adds in eager PyTorch.

Independent of the audit on purpose (nothing here imports ``nhwc_audit``): the model runs
eagerly twice, once as built (NCHW) and once converted to channels_last, under a
``TorchDispatchMode`` that sees every ATen op. An op *transposes* an input when the input's
memory order (its dims of size > 1 sorted by stride) disagrees with the output's on the
dims both have; it pays ``2 x`` the smaller of the two tensors (read and write of the moved
data; a broadcast input counts what it stores). Ops that read only an input's shape
(``new_empty``, ``zeros_like``) move nothing, and neither does an exit: the copy a reshape
makes out of the spatial ranks (``torch.flatten(x, 1)`` of an NHWC map before a classifier,
seen as a copy then a view to 2D by one flatten or reshape call), which the audit does not count either
(exits are not findings); a weight reshaped in forward (weight standardisation) is not an exit. A convolution whose input is re-laid to its output's layout pays twice its input;
where its output is dense in both orders (one channel), the format it computed in is read from the output's strides.
Views move nothing. A kernel given an input that is not dense in memory (a channel slice of a
channels_last map: ``torch.split``, ``chunk``; dense in NCHW at batch 1) copies it whole first, with
``contiguous()``: such an op is run by its backend kernel with a mode that sees that copy.
What channels_last adds is, per source line of the model, the channels_last
run's bytes minus the NCHW run's: copies a model makes in either layout cancel.

A backward's convolution is run by its kernel while its autograd node runs, with a mode that sees
every copy that kernel and the ops it calls make (:class:`_ConvBackwardCall`), in place of the rule
above for it: an activation's (the gradient re-laid, a saved channel slice made dense), charged to
the line, or the kernel's own (on the CPU, a channels_last convolution computes its weight gradient
in NCHW and copies it into channels_last, ``grad_weight.to(...)``), charged to the call.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import re
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._prims_common import is_non_overlapping_and_dense_or_false, suggest_memory_format
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["EagerBytes", "Transpose", "backward_transposes", "eager_backward_bytes", "eager_bytes", "transposes"]


@dataclass(frozen=True)
class Transpose:
    op: str
    shape: tuple[int, ...]
    nbytes: int
    site: str
    """The model's source line that made the call (``file:line``, innermost frame outside torch)."""
    call: str = ""
    """Which call of that line (``file:line#k``) the move belongs to; '' where not known."""


_HERE = __file__.replace("\\", "/")
_TORCH = os.path.dirname(torch.__file__).replace("\\", "/") + "/"
"""torch's own package (a test of ``"/torch/" in path`` also skips every library installed under a
folder called torch, /opt/torch/venv/...: their lines all fell to the caller's, netted as one)."""


_GENERATED = re.compile(r"^<eval_with_key>\.\d+$")
"""A GraphModule's generated code: every copy of it (the two runs' deep copies) is compiled again
under a new ``<eval_with_key>.N``, the same lines of the same graph."""


def _site() -> str:
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not (path.startswith(_TORCH) or path == _HERE):
            return f"{_GENERATED.sub('<eval_with_key>', path)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def _order(t: torch.Tensor, dims: list[int]) -> list[int]:
    """Positions (into ``dims``) of ``t``'s dims, outermost memory first; dims of one stride (an
    overlapping view: ``unfold``'s windows and their positions) in their logical order, the order a
    read of that view walks memory in."""
    strides = t.stride()
    return sorted(range(len(dims)), key=lambda k: (-strides[dims[k]], k))


def _aligned(
    inp: torch.Tensor, out: torch.Tensor, reduced: list[int], new: int | None = None
) -> list[tuple[int, int]] | None:
    """Pairs (input dim, output dim) of the same data, or None when the shapes do not say;
    ``new``: the dim a stack adds (its ``dim`` argument)."""
    if inp.dim() == out.dim():
        return list(zip(range(inp.dim()), range(out.dim()), strict=True))
    if inp.dim() > out.dim() and reduced:
        kept = [d for d in range(inp.dim()) if d not in reduced]
        if len(kept) == out.dim() and all(inp.shape[a] == out.shape[b] for b, a in enumerate(kept)):
            return list(zip(kept, range(out.dim()), strict=True))
    if inp.dim() + 1 == out.dim() and new is not None:  # torch.stack, its dim known
        return list(zip(range(inp.dim()), [b for b in range(out.dim()) if b != new], strict=True))
    if inp.dim() + 1 == out.dim():  # a new dim, found when one way only says it
        ways = [
            [b for b in range(out.dim()) if b != new]
            for new in range(out.dim())
            if [n for b, n in enumerate(out.shape) if b != new] == list(inp.shape)
        ]
        if len(ways) == 1:
            return list(zip(range(inp.dim()), ways[0], strict=True))
    return None


def _reduced_dims(args: tuple[Any, ...], kwargs: dict[str, Any], rank: int, func: Any = None) -> list[int]:
    """The dims named by the op's ``dim`` argument, found by its schema (``linalg_vector_norm(x, ord, dim)``,
    ``quantile(x, q, dim)``: not always the second argument); the second argument where no schema is given."""
    at, default = 1, None
    if func is not None:
        names = [a.name for a in func._schema.arguments]
        at = names.index("dim") if "dim" in names else len(args)
        if at < len(names):  # a dim left at its default is not passed (``kthvalue(x, k)``: dim -1)
            default = func._schema.arguments[at].default_value
    dim = kwargs.get("dim", args[at] if len(args) > at else default)
    if isinstance(dim, int):
        return [dim % rank]
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return [d % rank for d in dim]
    return []


def _moved(
    inp: torch.Tensor,
    out: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    relaid: bool,
    name: str = "",
    func: Any = None,
) -> int:
    """Bytes moved to bring ``inp`` into ``out``'s memory order (0 when they agree). A
    convolution re-lays its whole input (``relaid``); other ops move the smaller tensor."""
    new = (_reduced_dims(args, kwargs, out.dim(), func) or [0]) if name == "stack" else []  # dim 0 unless given
    pairs = _aligned(inp, out, _reduced_dims(args, kwargs, inp.dim(), func), new[0] if new else None)
    if pairs is None:
        return 0
    # a broadcast input (stride 0: ``expand``) holds only its stored dims
    both = [(a, b) for a, b in pairs if inp.shape[a] > 1 and out.shape[b] > 1 and inp.stride(a) != 0]
    if len(both) < 2:
        return 0
    ins = _order(inp, [a for a, _ in both])
    outs = _order(out, [b for _, b in both])
    if ins == outs:
        return 0
    size_in = _stored_bytes(inp)
    return 2 * (size_in if relaid else min(size_in, out.numel() * out.element_size()))


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements ``t`` holds: a broadcast dim (stride 0, ``expand``) once."""
    return math.prod(n for n, st in zip(t.shape, t.stride(), strict=True) if st != 0) * t.element_size()


def _kernel_format(result: torch.Tensor, operands: tuple[torch.Tensor | None, ...]) -> torch.memory_format:
    """The memory format a convolution computed in: the one it allocated its output in, read from
    the output's strides as PyTorch's ``suggest_memory_format`` reads them (an output of one
    channel is dense in both orders; its strides still say which). Where both formats stride the
    output alike (N x 1 x 1 x 1), ATen's rule (``mkldnn_conv_use_channels_last``): channels_last
    when the input or the weight (``operands``) suggests it."""
    cl = torch.channels_last if result.dim() == 4 else torch.channels_last_3d
    if torch.empty(result.shape).stride() != torch.empty(result.shape, memory_format=cl).stride():
        return suggest_memory_format(result)
    suggested = [suggest_memory_format(t) for t in operands if t is not None and t.dim() == result.dim()]
    return cl if cl in suggested else torch.contiguous_format


def _relaid_weight(result: torch.Tensor, weight: torch.Tensor, activation: torch.Tensor | None) -> bool:
    """A convolution's weight not dense in the memory format the kernel computes in (its output's,
    :func:`_kernel_format`): the kernel copies it into that format (``weight.contiguous(format)``;
    a depthwise N x 1 x k x k weight dense in either order is not copied)."""
    if result.dim() != weight.dim() or weight.dim() < 4:
        return False
    return not weight.is_contiguous(memory_format=_kernel_format(result, (activation, weight)))


def _ambiguous(t: torch.Tensor) -> bool:
    """Dense in both NCHW and channels_last order (one channel, a 1 x 1 map)."""
    cl = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.dim() in (4, 5) and t.is_contiguous() and t.is_contiguous(memory_format=cl)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class _Calls(TorchFunctionMode):
    """The name of the outermost torch call running (``flatten``, ``linear``): ATen ops do not say
    which call of the model's made them; and which call of its source line it is (``key``,
    ``file:line#k``: the two runs make the same calls in the same order), so that a forward's moves
    can net per call (:attr:`EagerBytes.added_per_call`)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.key = ""
        self._counts: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        outer = self.current is None
        if outer:
            self.current = getattr(func, "__name__", None)
            site = _site()
            self._counts[site] = self._counts.get(site, 0) + 1
            self.key = f"{site}#{self._counts[site]}"
        try:
            return func(*args, **(kwargs or {}))
        finally:
            if outer:
                self.current, self.key = None, ""


_EXITING_CALLS = frozenset({"flatten", "reshape"})
"""Calls that leave the spatial ranks by copying an NHWC map (a view in NCHW)."""


def _laid_out(t: Any) -> bool:
    """Not a 4D/5D tensor, or one dense in NCHW or channels_last order: what a kernel reads as it is."""
    if not isinstance(t, torch.Tensor) or t.dim() not in (4, 5) or t.is_contiguous():
        return True
    return t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _copy_moves(name: str, src: Any, out: Any, aten: bool) -> int:
    """Bytes a copy inside a kernel moves, each read and written (a broadcast source: what it
    stores): a library kernel's into another memory order; an ATen kernel's (``aten``: what it
    re-lays into another order, the rules count) a ``contiguous()`` of a tensor not dense in memory
    (a channel slice of a channels_last map) into a dense one of the same order."""
    copying = name in ("clone", "contiguous", "copy_", "_to_copy")
    if not (copying and isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() >= 4):
        return 0
    dims = [d for d in range(src.dim()) if src.shape[d] > 1 and src.stride(d) != 0]
    if out is src:
        return 0
    nbytes = 2 * min(_stored_bytes(src), out.numel() * out.element_size())
    if len(dims) > 1 and _order(src, dims) != _order(out, dims):
        return 0 if aten else nbytes
    # (one dim held strided, a one-channel slice's row, is copied too)
    return nbytes if aten and name == "contiguous" and not _laid_out(src) else 0


def _broadcast_operands(func: Any, args: Any, kwargs: dict[str, Any], result: torch.Tensor) -> list[torch.Tensor]:
    """The 2D/3D operands of a pointwise op (ATen's ``pointwise`` tag) writing a 4D/5D map, which
    TensorIterator broadcasts against it from the right (a (C, H, W) table added to a map): each as
    its view with the missing leading dims, which the kernel reads as it reads a (1, C, H, W) table."""
    if torch.Tag.pointwise not in func.tags:
        return []
    out: list[torch.Tensor] = []
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and 2 <= t.dim() < 4:  # (a 4D one meets a 5D map as a new dim: :func:`_aligned`)
            lead = result.dim() - t.dim()
            if all(a in (b, 1) for a, b in zip(t.shape, result.shape[lead:], strict=True)):
                out.append(t[(None,) * lead])
    return out


def _computing(func: Any) -> bool:
    """An ATen op that computes a new tensor: no copy, view, in-place op or allocation."""
    name = func.overloadpacket.__name__
    return not (
        name in ("clone", "contiguous", "copy_", "_to_copy", "to")
        or any(r.alias_info is not None for r in func._schema.returns)
        or name.startswith(("new_", "empty", "zeros", "ones", "full"))
        or name.endswith("_like")
    )


def _kernel_key(func: Any, device: str) -> Any:
    """The dispatch key of ``func``'s kernel for ``device`` (cpu or cuda), or of its one kernel for
    every device (``CompositeExplicitAutograd``), or of its decomposition into other ATen ops
    (``CompositeImplicitAutograd``: ``slow_conv3d``, called from inside a kernel); None where it
    has none of them."""
    key = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}.get(device)
    if key is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
        keys = (torch._C.DispatchKey.CompositeExplicitAutograd, torch._C.DispatchKey.CompositeImplicitAutograd)
        key = next((k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), k)), None)
    return key


class _KernelCopies(TorchDispatchMode):
    """The copies a kernel makes of its inputs, seen by running the op's backend kernel with this
    mode on the dispatch stack: the ATen ops the kernel calls come back here. A library's own op
    (torchvision's ``roi_align`` calls ``input.contiguous()``: a channels_last feature map copied
    whole into NCHW): copies into another memory order (a ``contiguous()`` of a tensor already
    contiguous returns it). An ATen op given a 4D/5D input not dense in memory (a channel slice of
    a channels_last map, from ``torch.split`` or ``chunk``): the ``contiguous()`` its kernel asks
    for first, into a dense tensor of the same order (what a kernel re-lays into another order
    is counted by the rules, as for dense inputs). An op the kernel calls on such a
    tensor is run the same way (a convolution's ``_convolution``)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, aten: bool) -> None:
        super().__init__()
        self.aten = aten
        """An ATen op's kernel (else a library op's)."""
        self.copies: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inner = self.run(func, args, kwargs, within=True) if self.aten else None
        if inner is not None:
            self.copies += inner[1]
            return inner[0]
        out = func(*args, **kwargs)
        src = args[1] if name == "copy_" else args[0] if args else None
        if nbytes := _copy_moves(name, src, out, self.aten):
            self.copies.append((name, tuple(out.shape), nbytes))
        return out

    @classmethod
    def run(
        cls, func: Any, args: Any, kwargs: dict[str, Any], within: bool = False
    ) -> tuple[Any, list[tuple[str, tuple[int, ...], int]]] | None:
        """``(output, copies)`` of an op outside ATen, or of an ATen op (not a copy) given a
        4D/5D tensor not dense in memory, run by its CPU or CUDA kernel; None for other ops,
        other modes below this one (``within``: this mode's own, popped while it handles an op),
        or no such kernel (the caller runs it)."""
        aten = func.namespace in ("aten", "prim", "prims")
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if aten and (not _computing(func) or all(map(_laid_out, leaves))):
            return None
        if torch._C._len_torch_dispatch_stack() > 0 and not within:
            return None
        if aten and any(t.is_quantized or t.is_conj() or t.is_neg() for t in leaves):
            return None  # (their kernels are reached through other dispatch keys)
        devices = {t.device.type for t in leaves if type(t) in (torch.Tensor, nn.Parameter)}
        key = _kernel_key(func, devices.pop()) if len(devices) == 1 else None
        if key is None:
            return None
        mode = cls(aten)
        try:
            with mode:
                out = func._op_dk(key, *args, **kwargs)
        except RuntimeError:
            # a CompositeExplicit Scalar overload (fmod.Scalar) calls its Tensor overload with the
            # scalar wrapped, which the mode is given unwrapped and which refuses it: the caller runs it
            return None
        return out, mode.copies


def _view_in_other_order(t: torch.Tensor) -> bool:
    """A 2D/3D tensor dense in memory but not row-major: ``flatten(2)`` of a channels_last map."""
    return t.dim() in (2, 3) and not t.is_contiguous() and is_non_overlapping_and_dense_or_false(t)


class _ConvKernel(TorchDispatchMode):
    """Sees the ATen ops a convolution's kernel (forward's, or backward's) calls, and those the ops it calls call
    (``_slow_conv2d_backward`` copies each group's gradient): keeps every copy, as ``(whose, bytes)``:
    ``"activation"`` for one of ``acts`` whole (the gradient, the input: re-laid) or a part of one not
    dense (a slice made dense), ``"own"`` for what the kernel made itself, the weight, or its own
    view of a dense activation (a grouped convolution's group) (on the CPU, the weight gradient a
    channels_last convolution computes in NCHW, copied into channels_last)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, acts: list[torch.Tensor]) -> None:
        super().__init__()
        self.acts = acts
        self.copies: list[tuple[str, int]] = []
        self.views = [a for a in acts if _view_in_other_order(a)]
        """The 2D/3D ``acts`` in an order other than row-major: their copies whole are kept too."""
        self.any_order = False
        """``views`` made row-major (a second ask): any copy of one is kept."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        cpu = bool(leaves) and all(t.device.type == "cpu" for t in leaves)
        out_variant = any(a.is_out for a in func._schema.arguments)  # (median.dim's median.dim_values)
        key = (
            _kernel_key(func, "cpu") if cpu and func.namespace == "aten" and (_computing(func) or out_variant) else None
        )
        if key is not None:
            inner = _ConvKernel(self.acts)
            inner.views, inner.any_order = self.views, self.any_order
            with inner:
                out = func._op_dk(key, *args, **kwargs)
            self.copies += inner.copies
            return out
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        src = args[1] if name == "copy_" else args[0] if args else None
        if name not in ("clone", "contiguous", "copy_", "_to_copy", "to") or not isinstance(src, torch.Tensor):
            return out
        if not isinstance(out, torch.Tensor) or _storage(out) == _storage(src):
            return out
        if src.dim() < 4:  # a watched view of a map (flatten(2)) copied into row-major order, whole or by parts
            ordered = out.is_contiguous() and (self.any_order or not src.is_contiguous())
            if any(_storage(src) == _storage(v) for v in self.views) and ordered:
                self.copies.append(("activation", 2 * out.numel() * out.element_size()))
            return out
        if 0 in src.stride() or src.shape != out.shape:
            return out  # a bias broadcast into the output (slow_conv3d's: viewed C x 1 x 1 x 1): no layout's copy
        of = next((a for a in self.acts if _storage(src) == _storage(a)), None)
        part = of is not None and (src.shape, src.stride(), src.storage_offset()) != (
            of.shape,
            of.stride(),
            of.storage_offset(),
        )
        whose = "activation" if of is not None and not (part and _laid_out(of)) else "own"  # (a group's view: own)
        self.copies.append((whose, 2 * min(_stored_bytes(src), out.numel() * out.element_size())))
        return out


class _ConvBackwardCall(TorchDispatchMode):
    """Pushed while a ``ConvolutionBackward0`` node runs (from its pre hook; the autograd engine
    restores the dispatch stack after each node): runs the ``convolution_backward`` it calls by
    its kernel under :class:`_ConvKernel` (``ran``), noting each copy."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, int]] = []
        self.ran = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is not torch.ops.aten.convolution_backward.default or args[0].device.type != "cpu":
            return func(*args, **(kwargs or {}))
        inner = _ConvKernel([a for a in args[:2] if isinstance(a, torch.Tensor)])
        with inner:
            out = func._op_dk(_kernel_key(func, "cpu"), *args, **(kwargs or {}))
        self.copies += inner.copies
        self.ran = True
        return out


_OWN = "convolution_kernel"
"""The op named by a forward convolution kernel's copies of its own (:meth:`_Recorder._conv_kernel`)."""


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # never under torch.compile: skip the ~0.7 ms per-op wrapper

    def __init__(self, calls: _Calls, site: Any = None) -> None:
        super().__init__()
        self.seen: list[Transpose] = []
        self.calls = calls
        self.site = site or _site
        """Where the op was called from: the model's source line (a backward op: its forward's)."""
        self._last: tuple[int, int, int, str] | None = None
        """(storage, numel, transposes recorded, site) of the last copy a flatten or reshape made."""
        self._cast: dict[int, weakref.ref[torch.Tensor]] = {}
        """Copies of parameters in another dtype and their layout (autocast's casts): weights as the
        parameters are (a copy into another layout is re-laid by a conv as a computed weight is)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inside = _KernelCopies.run(func, args, kwargs) or self._conv_kernel(func, args, kwargs)
        if inside is not None:  # what its kernel copied: a library's op (torchvision's roi_align), a slice made dense
            out, copies = inside
            self.seen += [Transpose(name, shape, nbytes, self.site(), self.calls.key) for name, shape, nbytes in copies]
            if copies and func.namespace not in ("aten", "prim", "prims"):
                return out  # it computed from its copies: their orders are its output's
        else:
            out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter):
            if out.dtype != args[0].dtype and out.stride() == args[0].stride():  # a cast as autocast's
                self._cast[id(out)] = weakref.ref(out)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        last, self._last = self._last, None
        if outs and outs[0].dim() < 4 and last is not None:
            storage, numel, count, site = last
            if _storage(outs[0]) == storage and outs[0].numel() == numel and self.site() == site:
                del self.seen[-count:]  # the copy of a reshape out of the spatial ranks: an exit
        if outs and outs[0].dim() < 4:  # a view's copies; a map's whole, by a kernel that leaves the ranks
            maps = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 4]
            low = self._view_copies(func, args, kwargs, outs[0]) + self._whole_copies(func, args, kwargs, maps, outs[0])
            self.seen += [
                Transpose(func.overloadpacket.__name__, tuple(outs[0].shape), n, self.site(), self.calls.key)
                for n in low
            ]
        if not outs or outs[0].dim() < 4:
            return out
        result = outs[0]
        written = _storage(result)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 4]
        if any(_storage(t) == written and t.shape == result.shape for t in ins) and not func._schema.is_mutable:
            return out  # a view: moves nothing
        name = func.overloadpacket.__name__
        if name.startswith("new_") or name.endswith("_like"):
            return out  # new_empty, zeros_like: the input gives a shape, no data is read
        conv = name in ("convolution", "convolution_backward")  # the kernel re-lays its whole input, or gradient
        if conv and name == "convolution":
            weight = ins[1] if len(ins) > 1 else None
            ins = ins[:1]  # the activation; a parameter weight is re-laid once per call at most
            cast = self._cast.get(id(weight))
            stored = isinstance(weight, nn.Parameter) or (cast is not None and cast() is weight)
            if weight is not None and not stored and _relaid_weight(result, weight, ins[0] if ins else None):
                # a weight computed in forward (weight standardisation) in the other layout than the
                # kernel computes in (its output's): the kernel re-lays it every call; autocast's
                # cast of a channels_last weight is channels_last and re-laid by no one
                self.seen.append(
                    Transpose(
                        name,
                        tuple(weight.shape),
                        2 * weight.numel() * weight.element_size(),
                        self.site(),
                        self.calls.key,
                    )
                )
        whole = [] if conv else self._whole_copies(func, args, kwargs, ins, result)
        if whole:  # it copied an input whole into NCHW, then computed from the copy (a CPU avg_pool3d)
            self.seen += [Transpose(name, tuple(result.shape), nbytes, self.site(), self.calls.key) for nbytes in whole]
            return out
        before = len(self.seen)
        weights = False
        for t in [*ins, *_broadcast_operands(func, args, kwargs, result)]:
            if _storage(t) == written:
                continue  # the tensor written in place
            moved = _moved(t, result, tuple(args), kwargs, relaid=conv, name=name, func=func)
            if name == "convolution" and _ambiguous(result) and t.dim() == result.dim():
                # one output channel: the sizes say no order; the kernel re-lays an input not dense
                # in the format it computes in (a mask or depth head, CBAM's spatial attention), but
                # for a copy in the same order, of a tensor dense in no order: its kernel run saw that
                fmt = _kernel_format(result, (t, weight))
                seen = not _laid_out(t) and _copy_moves("contiguous", t, t.contiguous(memory_format=fmt), True)
                relaid = not t.is_contiguous(memory_format=fmt) and not seen
                moved = 2 * math.prod(t.shape) * t.element_size() if relaid else 0
            if moved:
                self.seen.append(Transpose(name, tuple(result.shape), moved, self.site(), self.calls.key))
                weights = weights or isinstance(t, nn.Parameter)
        exiting = self.calls.current in _EXITING_CALLS and not weights  # activations exit, not weights
        if len(self.seen) > before and exiting:
            self._last = (written, result.numel(), len(self.seen) - before, self.seen[-1].site)
        return out

    @staticmethod
    def _view_copies(func: Any, args: Any, kwargs: dict[str, Any], result: torch.Tensor) -> list[int]:
        """What an op that wrote ``result`` (2D/3D) row-major copied of a 2D/3D view of its inputs in
        another order (``flatten(2)`` of a channels_last map), read and written: a copy op's own
        (``contiguous()``), or a CPU kernel's, run again under :class:`_ConvKernel` (a GroupNorm's, a
        softmax's, a Conv1d's ``input.contiguous()``)."""
        if not result.is_contiguous() or result.device.type != "cpu" or torch._C._len_torch_dispatch_stack() > 0:
            return []
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        views = [t for t in leaves if _view_in_other_order(t)]
        if not views or func.namespace != "aten" or torch.Tag.nondeterministic_seeded in func.tags:
            return []
        name = func.overloadpacket.__name__
        if name in ("clone", "contiguous", "_to_copy", "to", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            same = isinstance(src, torch.Tensor) and _view_in_other_order(src) and src.shape == result.shape
            return [2 * result.numel() * result.element_size()] if same else []
        if name in ("convolution", "convolution_backward") or not _computing(func):
            return []  # (a convolution's kernel copies: :meth:`_conv_kernel`'s)
        if (key := _kernel_key(func, "cpu")) is None:
            return []
        watch = _ConvKernel(views)
        with watch:
            func._op_dk(key, *args, **kwargs)
        copies = [nbytes for whose, nbytes in watch.copies if whose == "activation"]
        if copies:  # the same op on the views made row-major: a kernel that copies there too (kthvalue) adds none
            rows = [a.contiguous() if isinstance(a, torch.Tensor) and _view_in_other_order(a) else a for a in args]
            again = _ConvKernel([])
            again.views, again.any_order = [a for a in rows if isinstance(a, torch.Tensor) and a.dim() < 4], True
            with again:
                func._op_dk(key, *rows, **kwargs)
            copies = [] if any(whose == "activation" for whose, _ in again.copies) else copies
        return copies

    @staticmethod
    def _whole_copies(func: Any, args: Any, kwargs: dict[str, Any], ins: list[torch.Tensor], result: Any) -> list[int]:
        """What the CPU kernel of an op that wrote ``result`` NCHW from a channels_last input (a
        revert; or a tensor of a lower rank: ``F.unfold``'s im2col, ``median`` along a dim) copied of
        its inputs whole, run again by its kernel under :class:`_ConvKernel` (a CPU ``avg_pool3d``
        has no channels_last_3d kernel: ``input.contiguous()``, then it pools the copy); none where
        the kernel copies the same inputs made row-major too (``kthvalue`` clones its input in
        either layout: the rules charge it)."""
        if not result.is_contiguous() or result.device.type != "cpu":  # (NCHW, or dense in both orders)
            return []
        n = result.numel()  # (an output as large, of the same rank: the rule charges the whole input)

        def cl_only(t: torch.Tensor) -> bool:
            fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
            return not t.is_contiguous() and t.is_contiguous(memory_format=fmt)

        cl = [t for t in ins if t.dim() in (4, 5) and (t.dim() > result.dim() or t.numel() > n) and cl_only(t)]
        if not cl or func.namespace != "aten" or not _computing(func) or torch.Tag.nondeterministic_seeded in func.tags:
            return []
        if torch._C._len_torch_dispatch_stack() > 0 or (key := _kernel_key(func, "cpu")) is None:
            return []
        watch = _ConvKernel(list(ins))
        with watch:
            func._op_dk(key, *args, **kwargs)
        copies = [nbytes for whose, nbytes in watch.copies if whose == "activation"]
        if copies:  # the same op on the maps made row-major
            rows = [a.contiguous() if isinstance(a, torch.Tensor) and a.dim() in (4, 5) else a for a in args]
            again = _ConvKernel([a for a in rows if isinstance(a, torch.Tensor) and a.dim() in (4, 5)])
            with again:
                func._op_dk(key, *rows, **kwargs)
            copies = [] if any(whose == "activation" for whose, _ in again.copies) else copies
        return copies

    def _conv_kernel(self, func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, list[Any]] | None:
        """A CPU convolution on tensors dense in memory run by its kernel under :class:`_ConvKernel`:
        its own copies (of its weight: the slow backends copy a channels_last weight into NCHW every
        call) noted per line apart from the rules' moves (``#own``); its input's re-lay is the rules'."""
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is not torch.ops.aten.convolution.default or torch._C._len_torch_dispatch_stack() > 0:
            return None
        if not all(t.device.type == "cpu" and type(t) in (torch.Tensor, nn.Parameter) for t in leaves):
            return None
        if not all(map(_laid_out, leaves)):
            return None
        weight = args[1]
        cast = self._cast.get(id(weight))
        stored = isinstance(weight, nn.Parameter) or (cast is not None and cast() is weight)
        watch = _ConvKernel([args[0]] if stored else [args[0], weight])  # a computed weight's re-lay: the rules'
        with watch:
            out = func._op_dk(_kernel_key(func, "cpu"), *args, **kwargs)
        site = self.site() + "#own"
        self.seen += [Transpose(_OWN, (), nbytes, site) for whose, nbytes in watch.copies if whose == "own"]
        if watch.views:  # a 1D convolution's input, a view of a map in another order: re-laid, no layout shows it
            self.seen += [
                Transpose(func.overloadpacket.__name__, tuple(out.shape), n, self.site(), self.calls.key)
                for w, n in watch.copies
                if w == "activation"
            ]
        return out, []


def transposes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> list[Transpose]:
    """Every transpose one eager forward of ``model`` makes (no_grad, eval as given)."""
    calls = _Calls()
    rec = _Recorder(calls)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with calls, rec:
            model(*args, **(kwargs or {}))
    return rec.seen


def _channels_last(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.to(memory_format=fmt)
    return t


def _channels_last_model(model: nn.Module) -> nn.Module:
    """A copy with every 4D parameter and buffer channels_last and every 5D one channels_last_3d,
    by ``Tensor.to`` as ``Module.to`` does it (which raises on a model with both ranks, such as a
    video UNet's Conv2d and Conv3d layers)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*out.parameters(), *out.buffers()]:
            converted = _channels_last(t)
            if converted is not t:
                t.data = converted
    return out


@dataclass(frozen=True)
class EagerBytes:
    nchw: list[Transpose] = field(default_factory=list)
    channels_last: list[Transpose] = field(default_factory=list)

    def by_site(self) -> dict[str, tuple[int, int]]:
        """Per source line: (bytes in the NCHW run, bytes in the channels_last run)."""
        sites: dict[str, tuple[int, int]] = {}
        for run, seen in ((0, self.nchw), (1, self.channels_last)):
            for t in seen:
                pair = list(sites.get(t.site, (0, 0)))
                pair[run] += t.nbytes
                sites[t.site] = (pair[0], pair[1])
        return sites

    @property
    def added(self) -> int:
        """The bytes channels_last adds: per source line, its transposes minus the NCHW run's
        where it makes more (a copy made in either layout cancels; savings elsewhere do not)."""
        return sum(max(0, cl - nchw) for nchw, cl in self.by_site().values())

    @property
    def added_per_call(self) -> int:
        """:attr:`added` with moves netted per call of a line, as the audit nets them per node: where
        two modules share a line (a block's norm run by two blocks; ``nn.Sequential``'s children all
        fall to its caller's line; a method called twice, MONAI SwinUNETR's decoder ``cat``), a copy
        only the NCHW model makes in one does not cancel a channels_last copy in the other (a forward's
        call: the outermost torch call, :class:`_Calls`). Not the tests' reference (:attr:`added` is): one
        copy met at another node of the same call (a conv, BatchNorm and SiLU on one line: NCHW copies
        at the norm's backward, channels_last at the conv's) nets per line, as the audit nets it
        (:mod:`nhwc_audit.analyze.displaced`); per call it would count twice."""
        keyed: dict[tuple[str, str], list[int]] = {}  # (a kernel's own copies, sited by call, net apart)
        for run, seen in ((0, self.nchw), (1, self.channels_last)):
            for t in seen:
                keyed.setdefault((t.call or t.site, t.site), [0, 0])[run] += t.nbytes
        return sum(max(0, cl - nchw) for nchw, cl in keyed.values())

    @property
    def relayed(self) -> int:
        """:attr:`added` but what convolution kernels copy inside of their own (a channels_last
        convolution's weight gradient in backward, its weight on a slow backend in forward)."""
        inside = ("convolution_backward", _OWN)
        return EagerBytes(
            [t for t in self.nchw if t.op not in inside], [t for t in self.channels_last if t.op not in inside]
        ).added

    @property
    def saved(self) -> int:
        """Transposes the NCHW model makes that channels_last removes (per source line)."""
        return sum(max(0, nchw - cl) for nchw, cl in self.by_site().values())


def eager_bytes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> EagerBytes:
    """Both eager runs of ``model`` (left untouched: each runs on its own copy)."""
    kwargs = kwargs or {}
    torch.manual_seed(0)
    nchw = transposes(copy.deepcopy(model), args, kwargs)
    cl_model = _channels_last_model(model)
    cl_args = tuple(_channels_last(a) for a in args)
    cl_kwargs = {k: _channels_last(v) for k, v in kwargs.items()}
    torch.manual_seed(0)
    return EagerBytes(nchw=nchw, channels_last=transposes(cl_model, cl_args, cl_kwargs))


class _Tagger(TorchFunctionMode):
    """Notes on every autograd node a torch call makes the model's source line of the call
    (``site``), and which call of that line it was (``call``: ``file:line#k``, k counting the
    line's calls that return a tensor with a gradient history; the two runs make the same calls in
    the same order). A backward's moves net per line; what a kernel copies inside nets per call,
    against what the same call's kernel copies in NCHW (a line run by several blocks, a ConvNeXt
    stage's depthwise convolution, is several calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        todo = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not todo:
            return out
        site = _site()
        self.calls[site] = self.calls.get(site, 0) + 1
        while todo:
            node = todo.pop()
            if node is None or "site" in node.metadata:
                continue
            node.metadata["site"], node.metadata["call"] = site, f"{site}#{self.calls[site]}"
            todo.extend(n for n, _ in node.next_functions)
        return out


def _backward_site() -> str:
    node = torch._C._current_autograd_node()
    return node.metadata.get("site", "?") if node is not None else "?"


def _saved(node: Any) -> list[torch.Tensor]:
    """The tensors an autograd node saved for its backward (``_saved_*``), parameters left out, and
    not those packed by saved-tensor hooks (a non-reentrant checkpoint unpacks each once)."""
    out: list[torch.Tensor] = []
    for name in dir(node):
        if name.startswith("_saved_") and hasattr(node, "_raw" + name):
            try:
                raw = getattr(node, "_raw" + name)
                if any(r.unpack_hook is not None for r in (raw if isinstance(raw, (list, tuple)) else (raw,))):
                    continue
                value = getattr(node, name)
            except RuntimeError:
                continue
            out += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    return out


class _NodeHooks:
    """Transposes of a backward seen from hooks on its autograd nodes, with no dispatch mode on
    (under one, some formulas take other code paths: ``maximum``'s backward masks out of place,
    into a contiguous copy, where training masks in place). A node transposes an input (the
    gradients arriving, the tensors it saved) that disagrees with its first 4D/5D gradient out,
    by :func:`_moved`; a gradient summed from several consumers moves each part that disagrees
    with the sum."""

    def __init__(self) -> None:
        self.seen: list[Transpose] = []
        self.parts: dict[tuple[int, int], list[tuple[torch.Tensor, str, str]]] = {}
        self.keep: list[Any] = []

    def hook_all(self, roots: list[Any]) -> None:
        todo, done = list(roots), set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in done or type(node).__name__ == "AccumulateGrad":
                continue
            done.add(id(node))
            self.keep.append(node)
            self._hook(node)
            todo.extend(n for n, _ in node.next_functions)

    def _hook(self, node: Any) -> None:
        site = node.metadata.get("site", "?")
        call = node.metadata.get("call", f"{site}#0")  # which call of the line (:attr:`EagerBytes.added_per_call`)
        state: dict[str, list[Any]] = {}

        conv = type(node).__name__.startswith("ConvolutionBackward")

        def pre(grad_outputs: Any) -> None:
            if conv:
                state["conv"] = [_ConvBackwardCall()]
                torch._C._push_on_torch_dispatch_stack(state["conv"][0])
            for nr, g in enumerate(grad_outputs):
                parts = self.parts.pop((id(node), nr), [])
                if isinstance(g, torch.Tensor) and len(parts) > 1:
                    for t, where, which in parts:
                        if moved := _moved(t, g, (), {}, relaid=False):
                            self.seen.append(Transpose("accumulate", tuple(g.shape), moved, where, which))
            state["saved"] = [t for t in _saved(node) if t.dim() >= 4]

        def post(grad_inputs: Any, grad_outputs: Any) -> None:
            outs = [g for g in grad_inputs if isinstance(g, torch.Tensor)]
            result = next((g for g in outs if g.dim() >= 4), None)
            kernel = conv and state["conv"][0].ran  # its kernel's copies, in place of the rule below
            if conv:
                depth = torch._C._len_torch_dispatch_stack()
                if depth and torch._C._get_dispatch_stack_at(depth - 1) is state["conv"][0]:
                    torch._C._pop_torch_dispatch_stack(None)
                for whose, n in state["conv"][0].copies:  # (an activation's copy is named as the rule names it)
                    op, where = (
                        ("ConvolutionBackward0", site) if whose == "activation" else ("convolution_backward", call)
                    )
                    self.seen.append(Transpose(op, tuple(grad_outputs[0].shape), n, where, call))
            if conv and grad_inputs[0] is None:  # the weight's gradient only: the kernel works in its input's layout
                result = next(iter(state.get("saved", [])), None)
            if result is not None and not kernel:
                ins = [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.dim() >= 4] + state.get("saved", [])
                for t in ins:
                    if t is result or t.dim() != result.dim() or _storage(t) == _storage(result):
                        continue  # a view (a permute's backward) moves nothing
                    if moved := _moved(t, result, (), {}, relaid=conv):
                        self.seen.append(Transpose(type(node).__name__, tuple(result.shape), moved, site, call))
            for g, (nxt, nr) in zip(grad_inputs, node.next_functions, strict=False):
                if isinstance(g, torch.Tensor) and nxt is not None:
                    self.parts.setdefault((id(nxt), nr), []).append((g, site, call))

        node.register_prehook(pre)
        node.register_hook(post)


def _seeded_loss(out: Any) -> torch.Tensor | int:
    """A fixed random linear loss on ``out``'s tensors that require grad (each seed gradient in its
    output's layout); 0 where none does."""
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.manual_seed(0)
    return sum((t * torch.randn_like(t)).sum() for t in outs)


def backward_transposes(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, hooked: bool = True
) -> list[Transpose]:
    """Every transpose one eager backward of ``model`` makes, from a fixed random linear loss on
    its floating outputs (each seed gradient in its output's layout) into the parameters, as
    training computes it (the sample needs no gradient); each charged to the source line of the
    forward call its autograd node belongs to. ``hooked``: seen from autograd node hooks
    (:class:`_NodeHooks`: what training's own backward does); else at dispatch level, where some
    formulas take other code paths."""
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        with _Tagger():
            out = model(*args, **(kwargs or {}))
        loss = _seeded_loss(out)
        wrt = [p for p in model.parameters() if p.requires_grad]
        if not isinstance(loss, torch.Tensor) or not wrt:
            return []  # nothing to train: no backward runs
        if hooked:
            hooks = _NodeHooks()
            hooks.hook_all([loss.grad_fn])
            torch.autograd.grad(loss, wrt, allow_unused=True)
            return hooks.seen + _accumulate_copies(model, args, kwargs or {})
        rec = _Recorder(_Calls(), site=_backward_site)
        with rec:
            torch.autograd.grad(loss, wrt, allow_unused=True)
        return rec.seen


def _accumulate_copies(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Transpose]:
    """The copies a training step's ``loss.backward()`` makes into the 4D/5D parameters' ``.grad``
    (``AccumulateGrad``: a gradient in another layout than its parameter's, or one another tensor
    holds too, is cloned into the parameter's strides), as the CPU profiler's ``aten::copy_`` under
    ``AccumulateGrad`` shows them in a forward and backward run again with no hook on the backward (a
    Python hook holding the gradient makes autograd copy what it would take as it is). Each is charged
    to the line of the first call that read its parameter (the ``AccumulateGrad`` node's tag); both
    runs make the same calls, so a copy made in either layout nets on its line."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    with _Tagger():
        out = model(*args, **kwargs)
    loss = _seeded_loss(out)
    assert isinstance(loss, torch.Tensor)
    sites: dict[int, list[tuple[nn.Parameter, str, str]]] = {}  # element count -> each 4D/5D parameter's
    todo, done = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in done:
            continue
        done.add(id(node))
        if type(node).__name__ == "AccumulateGrad" and node.variable.dim() >= 4:
            site = node.metadata.get("site", "?")
            call = node.metadata.get("call", f"{site}#0")
            sites.setdefault(node.variable.numel(), []).append((node.variable, site, call))
        todo.extend(n for n, _ in node.next_functions)
    del node
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.autograd.backward(loss, inputs=[p for p in model.parameters() if p.requires_grad])
    copies = [
        tuple(e.input_shapes[0])
        for e in prof.events()
        if e.name == "aten::copy_"
        and e.cpu_parent is not None
        and "AccumulateGrad" in e.cpu_parent.name
        and e.input_shapes
        and len(e.input_shapes[0]) >= 4
    ]
    del loss, out
    counts = collections.Counter(math.prod(shape) for shape in copies)
    if any(0 < counts[n] < len(sites.get(n, ())) for n in counts):  # which of same-sized parameters: asked
        relaid = _gradients_relaid(model, args, kwargs, [p for n in counts for p, _, _ in sites.get(n, ())])
        for group in sites.values():
            group.sort(key=lambda ps: id(ps[0]) not in relaid)  # (stable: graph order otherwise)
    seen = []
    for shape in copies:
        if sites.get(numel := math.prod(shape)):
            p, site, call = sites[numel].pop(0)
            seen.append(Transpose("AccumulateGrad", shape, 2 * numel * p.element_size(), site, call))
    for p in model.parameters():
        p.grad = None
    return seen


def _gradients_relaid(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], params: list[nn.Parameter]
) -> set[int]:
    """The parameters (by id) of ``params`` whose gradient arrives in another layout than theirs, seen by
    a hook on each in a forward and backward run again (the copies are matched to parameters by their
    element count: several parameters of one size share it, and the copies go to those re-laid)."""
    relaid: set[int] = set()

    def seen(p: nn.Parameter) -> Callable[[torch.Tensor], None]:
        return lambda g: relaid.add(id(p)) if g.stride() != p.stride() else None

    handles = [p.register_hook(seen(p)) for p in params]
    try:
        torch.manual_seed(0)
        loss = _seeded_loss(model(*args, **kwargs))
        assert isinstance(loss, torch.Tensor)
        torch.autograd.backward(loss, inputs=[p for p in model.parameters() if p.requires_grad])
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
    return relaid


def eager_backward_bytes(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, hooked: bool = True
) -> EagerBytes:
    """Both eager backwards of ``model`` (NCHW as built, and converted to channels_last), each on its
    own copy, per forward source line (``hooked``: see :func:`backward_transposes`)."""
    kwargs = kwargs or {}
    torch.manual_seed(0)
    nchw = backward_transposes(copy.deepcopy(model), args, kwargs, hooked=hooked)
    cl_model = _channels_last_model(model)
    cl_args = tuple(_channels_last(a) for a in args)
    cl_kwargs = {k: _channels_last(v) for k, v in kwargs.items()}
    torch.manual_seed(0)
    return EagerBytes(nchw=nchw, channels_last=backward_transposes(cl_model, cl_args, cl_kwargs, hooked=hooked))
