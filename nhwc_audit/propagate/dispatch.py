"""Dispatch-level recording: the ATen ops a node (or an eager run) dispatches. Layout-changing
copies made inside a kernel (:func:`~nhwc_audit.channels.hidden_copy`), in-place writes (:func:`written_tensors`)
and the guard that refuses writes to the user's weights the audit reads in place
(:func:`check_shared_write`), and the guard that stops a run before an op whose output shape
depends on the values of weights read restrided (:func:`check_value_shape`). Used by the
interpreter, the eager recorder and every checking run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..channels import COPY_OPS, broadcast_across, conv_layout, hidden_copy, relay_bytes, relays_view, runs_otherwise
from ..errors import SharedWeightWrite, ValueDependentShapes
from ..layout import tensor_meta
from ..records import ALLOCATING_OPS, CONV_OPS, GEMM_OPS, HiddenCopy, Layout
from ..tensors import iter_tensors, on_shared
from .conv_kernels import Kernels, own_copies
from .kernel_copies import Asked, kernel_copies, library_op
from .revert_kernels import revert_copies

__all__ = [
    "LogicalDraws",
    "CopyRecorder",
    "GuardedMode",
    "RecordingMode",
    "check_shared_write",
    "check_value_shape",
    "computed_relay",
    "inner_copies",
    "is_alias_of",
    "written_tensors",
]


_DECIDED = frozenset({Layout.CHANNELS_LAST, Layout.CONTIGUOUS})


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def computed_relay(func: Any, args: Any, out: Any, unsure: Collection[int] = ()) -> tuple[HiddenCopy, int, int] | None:
    """The record of an ATen op that is neither a copy nor a view and computes its 4D/5D output
    in NHWC from an NCHW input of its rank, or the other way (a convolution inside a
    circular-padding Conv2d re-lays the padded NCHW input; the 2D pool inside AvgPool1d reads a
    token map unsqueezed from an NHWC map and writes NCHW). Parameters are left to the weight
    rules. Bytes by :func:`~nhwc_audit.channels.relay_bytes`, summed over such inputs. With the
    ``id()`` of the first input it re-lays and of the output (a node's own op is its record's:
    :class:`CopyRecorder` judges an op that reads only the node's inputs once it knows the node's
    result). ``unsure``: the ``id()`` of tensors whose layouts are not to be trusted (made by meta
    kernels known to differ from eager)."""
    if func in COPY_OPS:
        return None
    result = _first(out)
    if not isinstance(result, torch.Tensor) or result.dim() < 4:
        return None
    om = tensor_meta(result)
    name = str(func.overloadpacket.__name__)
    if name in ALLOCATING_OPS:
        return None
    tensors = list(iter_tensors(args))
    conv = name in CONV_OPS
    if conv and om.layout is Layout.AMBIGUOUS:  # one output channel: the format the kernel computed in
        om = dataclasses.replace(om, layout=conv_layout(om, tuple(tensor_meta(t) for t in tensors[:2])))
    moved, first, source = 0, None, 0
    rank = result.dim()
    for t in tensors:
        if t.dim() != rank or isinstance(t, nn.Parameter) or id(t) in unsure:
            continue
        m = tensor_meta(t)
        if om.layout in _DECIDED and m.layout in _DECIDED and m.layout is not om.layout:
            layouts = (m.layout, om.layout)
        elif conv and om.layout in _DECIDED and m.layout is Layout.STRIDED and runs_otherwise(m, om):
            layouts = (m.layout, om.layout)  # a slice in another order (a pad's crop): the kernel re-lays it
        elif not conv and name not in GEMM_OPS and relays_view(t, m, om):  # they compute their output
            layouts = (Layout.CHANNELS_LAST, Layout.CONTIGUOUS)
        elif broadcast_across(m, om):  # F.normalize's norm, expanded back over the map
            layouts = (Layout.CONTIGUOUS, Layout.CHANNELS_LAST)
        else:
            continue
        if is_alias_of(result, t):
            return None  # a view, or written in place
        moved += relay_bytes(m, om, conv=conv)
        first, source = first or layouts, source or id(t)
    if first is None:
        return None
    copy = HiddenCopy(op=name, layout_in=first[0], layout_out=first[1], shape=om.shape, bytes=moved, computed=True)
    return copy, source, id(result)


@functools.cache
def _written_args(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an ATen op writes to (``self`` of ``add_``, ``out=``)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return ()
    return tuple(
        (i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
    )


def written_tensors(func: Any, args: Any, kwargs: Any) -> Iterator[torch.Tensor]:
    """The tensors an ATen op call is about to write to in place."""
    for i, name in _written_args(func):
        value = args[i] if i < len(args) else (kwargs or {}).get(name)
        yield from (value,) if isinstance(value, torch.Tensor) else iter_tensors(value)


def check_shared_write(func: Any, args: Any, kwargs: Any, shared: frozenset[int]) -> None:
    """Raise :class:`SharedWeightWrite` before ``func`` writes to a storage in ``shared``."""
    if not shared:
        return
    for t in written_tensors(func, args, kwargs):
        if on_shared(t, shared):
            raise SharedWeightWrite(str(func))


def check_value_shape(func: Any, args: Any, shared: frozenset[int]) -> None:
    """Raise :class:`ValueDependentShapes` before ``func`` computes a shape from tensor values
    (ATen's ``dynamic_output_shape`` tag; indexing by a boolean mask only) while ``shared``
    weights are read with their values permuted: the shapes of the rest of the run would not
    be the model's, so the audit stops there rather than at the end of the run."""
    if not getattr(shared, "permuted", False) or torch.Tag.dynamic_output_shape not in func.tags:
        return
    name = func.overloadpacket.__name__
    if name in ("index", "_unsafe_index") and not any(
        t.dtype in (torch.bool, torch.uint8) for t in iter_tensors(args[1:] if len(args) > 1 else ())
    ):
        return
    raise ValueDependentShapes(name)


class RecordingMode(TorchDispatchMode):
    """The base of the audit's dispatch-level recorders. torch wraps every subclass's
    ``__torch_dispatch__`` in ``torch._disable_dynamo`` (so that torch.compile never traces
    into it): that wrapper alone costs ~0.7 ms per ATen op on this project's CPU, 7x the op
    itself for a small convolution. The audit's modes never run under torch.compile, so they
    opt out (``_should_skip_dynamo``, torch's own switch)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class LogicalDraws(RecordingMode):
    """Random draws in the tensors' logical order (dims outermost first), whatever their memory
    layout. Dropout on the CPU draws its mask into ``empty_like(x)`` in memory order, so a model in
    NCHW and its channels_last conversion draw other masks from one seed: the repair's checks,
    which compare the two, would see a rewrite that moves a dropout's input to channels_last change
    the outputs. A draw in place into a tensor that is not contiguous is made into a contiguous
    one and copied in; one that makes a tensor of its first argument's shape is made from
    contiguous arguments and handed back in that argument's layout. ``drew``: whether a run under
    it drew at all (a model that does not, dropout off in eval mode, needs no such mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.drew = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        self.drew = True
        if not isinstance(first, torch.Tensor) or first.dim() < 2 or first.is_contiguous():
            return func(*args, **kwargs)
        rest = [a.contiguous() if isinstance(a, torch.Tensor) and a.shape == first.shape else a for a in args[1:]]
        written = func._schema.arguments[0].alias_info
        if written is not None and written.is_write:  # bernoulli_, uniform_, normal_: into ``first``
            tmp = torch.empty(first.shape, dtype=first.dtype, device=first.device)
            func(tmp, *rest, **kwargs)
            return first.copy_(tmp)
        out = func(first.contiguous(), *rest, **kwargs)  # bernoulli(p), rand_like, native_dropout

        def laid(o: Any) -> Any:
            return (
                torch.empty_like(first, dtype=o.dtype).copy_(o)
                if isinstance(o, torch.Tensor) and o.shape == first.shape
                else o
            )

        return type(out)(laid(o) for o in out) if isinstance(out, tuple) else laid(out)


class GuardedMode(RecordingMode):
    """A recording mode that refuses, before the op runs, a write to the weights the audit shares
    with the user's model (``shared``: :func:`check_shared_write`) and a shape made from their
    permuted values (:func:`check_value_shape`). A bare ``except:`` in the model's code may
    swallow the refusal and run on (down a fallback path, on permuted values): the mode keeps
    what it refused and raises it again when it exits."""

    def __init__(self, shared: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.shared = shared
        self.refused: list[SharedWeightWrite] = []

    def guard(self, func: Any, args: Any, kwargs: Any) -> None:
        try:
            if _written_args(func):  # in-place and out= ops only
                check_shared_write(func, args, kwargs, self.shared)
            check_value_shape(func, args, self.shared)
        except SharedWeightWrite as e:
            self.refused.append(e)
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.refused:
            raise self.refused[0]


class CopyRecorder(GuardedMode):
    """Sees the ATen ops a node runs, keeps the copies that change layout and refuses
    writes to the weights the audit shares with the user's model (``shared``)."""

    def __init__(self, shared: frozenset[int] = frozenset(), *, relays: bool = False, recording: bool = True) -> None:
        super().__init__(shared)
        self.copies: list[HiddenCopy] = []
        self.relays = relays
        """Keep the layout changes of ops that compute too (:func:`computed_relay`, in
        ``relayed``): a graph's node runs several ATen ops, whose moves its own layouts may not
        show."""
        self.relayed: list[tuple[HiddenCopy, int, int]] = []
        self.boundary: frozenset[int] = frozenset()
        """``id()`` of the running node's inputs (see :func:`computed_relay`)."""
        self.untrusted: frozenset[str] = frozenset()
        """ATen ops whose layout changes are not kept (a fake run's known meta errors), nor those of
        the ops reading their outputs (``unsure``: a fake 5D pad inside a Conv3d writes NCDHW)."""
        self.unsure: set[int] = set()
        self.deferred: list[tuple[Any, Any, Any]] = []
        self.recording = recording
        """Keep copies (False while the caller runs ops of its own under the mode)."""
        self.on_stack = False
        """Pushed on torch's dispatch stack (the interpreter takes it off for nodes it cannot
        see into: :func:`recorder_blind`)."""
        self.asked: Asked = {}
        """A fake run's kernels asked on zeros (:func:`~.kernel_copies.kernel_copies`)."""
        self.kernels: Kernels = {}
        """The convolutions' own copies by kernel path (:func:`~.conv_kernels.own_copies`)."""
        self.own: list[HiddenCopy] = []
        """The node's convolution kernels' copies of their weights or of what they made."""

    def start(self, boundary: frozenset[int], recording: bool) -> None:
        """Begin a node: nothing kept yet; ``boundary``, the ``id()`` of its inputs."""
        self.copies, self.own, self.relayed, self.unsure, self.deferred = [], [], [], set(), []
        self.boundary, self.recording = boundary, recording

    def settled(self, result: Any) -> list[tuple[HiddenCopy, int, int]]:
        """``relayed``, and the relays of the ops that read only the node's inputs and did not
        make its result (the first of F.normalize's: its norm), judged now the result is known."""
        outs = {id(t) for t in iter_tensors(result)}
        late = [computed_relay(f, a, o, self.unsure) for f, a, o in self.deferred if id(_first(o)) not in outs]
        self.deferred = []
        return self.relayed + [r for r in late if r is not None]

    def off_stack(self) -> bool:
        """Take the mode off torch's dispatch stack (one C-level pop for a run of nodes it cannot
        see into, where entering and leaving the mode per node costs more than it saves); False,
        and the stack as it was, when another mode is on top of it."""
        if self.on_stack:
            top = torch._C._pop_torch_dispatch_stack(None)
            if top is not self:
                torch._C._push_on_torch_dispatch_stack(top)
                return False
            self.on_stack = False
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.guard(func, args, kwargs)
        kw = kwargs or {}
        inside = own_copies(func, args, kw, self.guard, self.kernels) or kernel_copies(
            func, args, kw, self.guard, self.asked
        )
        out = func(*args, **kw) if inside is None else inside[0]
        if inside is not None and inside[1]:  # what its kernel copied: a library's (roi_align: its input), a slice's
            if self.recording:
                self.copies += [c for c in inside[1] if not c.result]
                self.own += [c for c in inside[1] if c.result]  # a convolution's weight (a slow backend's)
            if library_op(func):  # it computed from its copies: its output is no relay of its inputs
                return out
        elif self.recording and (whole := revert_copies(func, args, kw, out, self.guard, self.asked)):
            self.copies += whole  # a kernel that reverted by copying its input whole (a CPU avg_pool3d)
            return out
        if self.recording:
            copy = hidden_copy(func, args, out)
            if copy is not None:
                self.copies.append(copy)
            elif self.relays and func.overloadpacket.__name__ in self.untrusted:
                self.unsure.update(id(t) for t in iter_tensors(out))
            elif self.relays and all(id(t) in self.boundary for t in iter_tensors(args)):
                self.deferred.append((func, args, out))  # the node's own op, if it made the node's result
            elif self.relays and (relay := computed_relay(func, args, out, self.unsure)) is not None:
                self.relayed.append(relay)
        return out


def is_alias_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` shares storage with ``b`` (works for FakeTensors, unlike data_ptr)."""
    return bool(torch._C._is_alias_of(a, b))  # type: ignore[attr-defined]


def inner_copies(
    relayed: list[tuple[HiddenCopy, int, int]], inputs: list[torch.Tensor], result: Any
) -> list[HiddenCopy]:
    """The layout changes computed inside a node (:attr:`CopyRecorder.relayed`), less its own
    op's (from one of its ``inputs`` to its ``result``: its record shows that one)."""
    ins = {id(t) for t in inputs}
    outs = {id(result)} if isinstance(result, torch.Tensor) else {id(t) for t in iter_tensors(result)}
    return [h for h, source, out in relayed if not (source in ins and out in outs)]
