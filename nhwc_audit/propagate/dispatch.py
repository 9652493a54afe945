"""Dispatch-level recording: the ATen ops a node (or an eager run) dispatches. Layout-changing
copies made inside a kernel (:func:`~nhwc_audit.channels.hidden_copy`), in-place writes (:func:`written_tensors`)
and the guard that refuses writes to the user's weights the audit reads in place
(:func:`check_shared_write`), and the guard that stops a run before an op whose output shape
depends on the values of weights read restrided (:func:`check_value_shape`). Used by the
interpreter, the eager recorder and every checking run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..channels import hidden_copy
from ..errors import SharedWeightWrite, ValueDependentShapes
from ..records import HiddenCopy
from ..tensors import iter_tensors, on_shared
from .conv_kernels import Kernels, own_copies
from .fake_views import view_strides
from .kernel_copies import Asked, kernel_copies, library_op
from .order import forward_reorders
from .relays import Relay, computed_relay, first_output, inner_copies, is_alias_of
from .revert_kernels import revert_copies

__all__ = [
    "LogicalDraws",
    "CopyRecorder",
    "GuardedMode",
    "RecordingMode",
    "check_shared_write",
    "check_value_shape",
    "inner_copies",
    "is_alias_of",
    "out_tensors",
    "written_tensors",
]


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


def out_tensors(func: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors an ATen op call writes its result into by keyword (``out=``): written, not read."""
    named = [name for i, name in _written_args(func) if func._schema.arguments[i].kwarg_only]
    return [t for name in named for t in iter_tensors((kwargs or {}).get(name))]


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


_VIEWS = frozenset({torch.ops.aten.view, torch.ops.aten._reshape_alias})
"""ATen's views whose strides eager computes (``computeStride``) and FakeTensor's do not for size-1 dims."""


class CopyRecorder(GuardedMode):
    """Sees the ATen ops a node runs, keeps the copies that change layout and refuses
    writes to the weights the audit shares with the user's model (``shared``)."""

    def __init__(
        self,
        shared: frozenset[int] = frozenset(),
        *,
        relays: bool = False,
        recording: bool = True,
        reordering: set[str] | None = None,
    ) -> None:
        super().__init__(shared)
        self.copies: list[HiddenCopy] = []
        self.relays = relays
        """Keep the layout changes of ops that compute too (:func:`computed_relay`, in
        ``relayed``): a graph's node runs several ATen ops, whose moves its own layouts may not
        show."""
        self.relayed: list[Relay] = []
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
        self.reordering = reordering
        """Where a set: the ATen ops the nodes ran that may not keep NCHW order
        (:func:`~.order.forward_reorders`), by name (the NCHW baseline's plan)."""
        self.eager: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """A fake run's views made inside the node, by ``id()``: (the view, itself strided as eager
        strides it, :func:`~.fake_views.view_strides`), what a kernel asked on zeros is given."""

    def start(self, boundary: frozenset[int], recording: bool) -> None:
        """Begin a node: nothing kept yet; ``boundary``, the ``id()`` of its inputs."""
        self.copies, self.own, self.relayed, self.unsure, self.deferred, self.eager = [], [], [], set(), [], {}
        self.boundary, self.recording = boundary, recording

    def settled(self, result: Any) -> list[Relay]:
        """``relayed``, and the relays of the ops that read only the node's inputs and did not
        make its result (the first of F.normalize's: its norm), judged now the result is known."""
        outs = {id(t) for t in iter_tensors(result)}
        late = [computed_relay(f, a, o, self.unsure) for f, a, o in self.deferred if id(first_output(o)) not in outs]
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
        if self.recording and self.reordering is not None and forward_reorders(func, args, kw, out):
            self.reordering.add(func.overloadpacket.__name__)
        own: list[HiddenCopy] = []  # a convolution's copies of its weight (a slow backend's)
        if inside is not None and inside[1]:  # what its kernel copied: a library's (roi_align: its input), a slice's
            if self.recording:
                self.copies += [c for c in inside[1] if not c.result]
                own = [c for c in inside[1] if c.result]
            if library_op(func):  # it computed from its copies: its output is no relay of its inputs
                self.own += own
                return out
        elif self.recording and (whole := revert_copies(func, self._as_eager(args), kw, out, self.guard, self.asked)):
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
                if relay.weight:  # a weight computed in forward: the rule's re-lay is its kernel's copy of it
                    own = [c for c in own if c.shape != tuple(args[1].shape)]
        self.own += own
        if func.overloadpacket in _VIEWS and isinstance(out, FakeTensor):  # (bmm's copy reads them)
            if (eager := view_strides(args[0], out, backward=False)) is not out:
                self.eager[id(out)] = (out, eager)
        return out

    def _as_eager(self, args: Any) -> Any:
        """``args`` with the fake views made in the node strided as eager's (:attr:`eager`)."""
        if not self.eager:
            return args
        seen = self.eager
        return tree_map(lambda v: seen[id(v)][1] if id(v) in seen and seen[id(v)][0] is v else v, args)
