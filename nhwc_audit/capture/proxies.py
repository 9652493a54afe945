"""The proxies of the fx capture's tracer (:mod:`.fx`): torch's, with two of its costs cut
(unpacking read from each function's bytecode once per trace; the tracer of a torch call's
arguments found without pytree's walks, which leave garbage for the cyclic collector)."""

from __future__ import annotations

import bisect
import dis
import operator
import sys
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.fx.proxy import Attribute, Proxy, TracerBase

from ..records.kinds import in_place_name

__all__ = [
    "WRITING_OPERATORS",
    "Disassembling",
    "TracerAttribute",
    "TracerProxy",
    "Unpacking",
    "node_writes",
    "written_operand",
]


class Disassembling(Protocol):
    """The tracer the proxies belong to: it disassembles each function once per trace."""

    def instructions(self, code: Any) -> tuple[list[int], list[dis.Instruction]]: ...

    def iter(self, obj: Any) -> Any: ...


class Unpacking:
    """fx's ``Proxy.__iter__`` reads the caller's bytecode to tell ``c, h, w = x.shape[1:]``
    (unpacking: one ``getitem`` node per name) from a loop: it disassembles the caller's whole
    function on every call, ~1 ms for a transformer block's forward. Here each function is
    disassembled once per trace and the instruction looked up the same way. The proxies are
    subclasses of torch's: code that tests ``type(x) is torch.fx.Proxy`` (no library in the
    zoo does; ``isinstance`` is unaffected) sees another type."""

    tracer: TracerBase

    def __iter__(self) -> Any:
        frame = sys._getframe(1)
        tracer = cast(Disassembling, self.tracer)
        offsets, insts = tracer.instructions(frame.f_code)
        if sys.version_info >= (3, 11):
            index = bisect.bisect_left(offsets, frame.f_lasti)
        else:
            index = frame.f_lasti // 2
        inst = insts[index]
        if inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))  # type: ignore[index]
        return tracer.iter(self)

    def __getattr__(self, k: str) -> Attribute:
        return TracerAttribute(self, k)  # type: ignore[arg-type]


class TracerProxy(Unpacking, Proxy):
    @classmethod
    def __torch_function__(
        cls, orig_method: Any, types: tuple[type, ...], args: Any = None, kwargs: Any = None
    ) -> Proxy:
        """torch's ``Proxy.__torch_function__``, which finds the tracer with two ``tree_map_``
        walks: each leaves a reference cycle behind (pytree's recursive closure, ~7 objects a
        call) for the cyclic collector. Arguments of tuples, lists, dicts and plain values are
        walked here; anything else (a named tuple, a ScriptMethod, a higher-order op, proxies of
        two tracers) goes to torch's own."""
        args = args if args else ()
        kwargs = kwargs if kwargs else {}
        tracers: dict[Any, None] = {}
        if (
            isinstance(orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator))
            or not _tracers_in(args, cls, tracers)
            or not _tracers_in(kwargs, cls, tracers)
            or len(tracers) != 1
        ):
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = next(iter(tracers))
        if torch.overrides.is_tensor_method_or_property(orig_method):
            return tracer.create_proxy("call_method", orig_method.__name__, args, kwargs)  # type: ignore[no-any-return]
        name = tracer.graph._target_to_str(orig_method.__name__)
        return tracer.create_proxy("call_function", orig_method, args, kwargs, name=name)  # type: ignore[no-any-return]


_NO_PROXY = frozenset(
    {int, float, bool, complex, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device, torch.Size}
    | {torch.memory_format, torch.layout}
)
"""Argument types that hold no proxy (pytree leaves, or ``torch.Size``: ints)."""


def _tracers_in(value: Any, cls: type, found: dict[Any, None]) -> bool:
    """Add the tracer of every ``cls`` proxy in ``value`` to ``found``; False when ``value``
    holds a container other than a tuple, list or dict (pytree may walk into it)."""
    kind = type(value)
    if kind is tuple or kind is list:
        return all(_tracers_in(v, cls, found) for v in value)
    if kind is dict:
        return all(_tracers_in(v, cls, found) for v in value.values())
    if isinstance(value, cls):
        found[value.tracer] = None  # type: ignore[attr-defined]
        return True
    return kind in _NO_PROXY or isinstance(value, (Proxy, torch.Tensor, nn.Module)) or callable(value)


def _in_place(op: Any) -> Any:
    def method(self: Proxy, rhs: Any) -> Proxy:
        return self.tracer.create_proxy("call_function", op, (self, rhs), {})

    method.__name__ = f"__{op.__name__}__"
    return method


IN_PLACE_OPERATORS: dict[Any, str] = {
    getattr(operator, f"i{name}"): aten
    for name, aten in {
        "add": "add_",
        "sub": "sub_",
        "mul": "mul_",
        "truediv": "div_",
        "floordiv": "floor_divide_",
        "mod": "remainder_",
        "pow": "pow_",
        "and": "bitwise_and_",
        "or": "bitwise_or_",
        "xor": "bitwise_xor_",
        "lshift": "bitwise_left_shift_",
        "rshift": "bitwise_right_shift_",
    }.items()
}
"""``x += y`` and its kin as the tracer records them (``operator.iadd``), with the name of the
ATen op that runs them on tensors (``add_``: what the other captures record). torch's Proxy
has no ``__iadd__``, so Python falls back to ``x + y`` and fx records an out-of-place add;
eager writes ``x``: other names for it (``shortcut = x`` before) see the write, and autograd
records a write into a view (``out[:, :c] += y``: CopySlices), whose backward a train audit
must run. fx generates ``x += y`` for these nodes. Not ``@=``: a tensor has no ``__imatmul__``,
and Python runs ``x = x @ y``."""

OUT_OF_PLACE: dict[Any, Any] = {
    op: getattr(operator, op.__name__[1:] if op.__name__[1:] not in ("and", "or") else op.__name__[1:] + "_")
    for op in IN_PLACE_OPERATORS
}
"""Each in-place operator's out-of-place one (``operator.iadd`` -> ``operator.add``)."""

_MUTABLE = (torch.Tensor, list, dict, set, bytearray)


def in_place_operator(target: Any) -> bool:
    """``target`` (a call_function node's) is one of :data:`IN_PLACE_OPERATORS` (a callable that
    defines ``__eq__`` but not ``__hash__`` is none)."""
    return type(target) is type(len) and target in OUT_OF_PLACE


WRITING_OPERATORS = frozenset(
    {
        operator.setitem,
        operator.delitem,
        *(getattr(operator, n) for n in dir(operator) if n.startswith("i") and n[1:] in dir(operator)),
    }
)
"""``x[i] = v`` (returns None: no view of its input shows the write), ``del x[i]``, ``x += y``
and the like: the operators that write their first operand."""


def node_writes(n: torch.fx.Node) -> bool:
    """Call ``n`` writes a tensor in place: ``inplace=True``, ``out=``, a writing operator
    (:data:`WRITING_OPERATORS`; ``x[i] = v`` also as the method ``__setitem__``, which the tracer
    records on a tensor forward made), or an in-place method (``add_``)."""
    if n.op not in ("call_function", "call_method"):
        return False
    if n.kwargs.get("inplace") or "out" in n.kwargs:
        return True
    if type(n.target) is type(len) and n.target in WRITING_OPERATORS:
        return True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name == "__setitem__" or in_place_name(name)


def written_operand(n: torch.fx.Node) -> Any:
    """What call ``n`` writes in place (:func:`node_writes`): its ``out=``, else its first operand;
    None for a call that writes nothing."""
    if not node_writes(n):
        return None
    return n.kwargs["out"] if "out" in n.kwargs else n.args[0] if n.args else None


def settle_in_place(n: torch.fx.Node, first: Any) -> bool:
    """Make ``n``, an in-place operator node whose first operand's value is ``first``, its
    out-of-place operator when that value is one Python rebinds (an int, a tuple: ``size //= 2``
    on a proxy of ``x.size(-1)``): what it computes is the same, but torch.fx generates
    ``a //= 2;  ifloordiv = a`` for it, which rebinds ``a`` for the nodes after it that read
    the value before. True when it changed ``n``."""
    if not in_place_operator(n.target) or isinstance(first, _MUTABLE):
        return False
    n.target = OUT_OF_PLACE[n.target]
    if isinstance(n.graph.owning_module, torch.fx.GraphModule):
        n.graph.owning_module.recompile()  # its code was generated with the in-place form
    return True


class TracerAttribute(Unpacking, Attribute):
    pass


for _op in IN_PLACE_OPERATORS:  # an attribute too: v = y.mT; v += 1 writes y
    setattr(TracerProxy, f"__{_op.__name__}__", _in_place(_op))
    setattr(TracerAttribute, f"__{_op.__name__}__", _in_place(_op))
