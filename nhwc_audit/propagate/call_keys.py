"""How fx names a call, and how an eager torch function mode sees the same call: ``x + y``
reaches a mode as the method ``add``; fx records ``operator.add`` (or the method ``add`` for
``x.add(y)``); ``x += y`` reaches a mode as ``add_``, and the audit's tracer records it as
``operator.iadd`` (torch's own tracer as ``operator.add``). Used by the replay check
(:mod:`.replay`) to pair eager calls with graph nodes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.overrides import get_overridable_functions
from torch.utils._pytree import tree_flatten

from ..capture.proxies import IN_PLACE_OPERATORS
from ..records import in_place_name
from ..tensors import PLAIN_LEAVES

__all__ = [
    "Call",
    "call_name",
    "eager_calls",
    "is_method",
    "graph_call",
    "mapped",
    "tensor_methods",
    "tensors_in",
    "writes_first",
]


_IN_PLACE: set[str] = {"__setitem__"}
"""Eager calls that write to their first argument (filled with the table below)."""


def _family() -> dict[str, tuple[Any, bool]]:
    """Tensor method (as a torch function mode sees ``x + y``, ``x += y``, ``1 - x``) -> the
    ``operator`` function fx records for it, and whether fx has its arguments swapped."""
    table: dict[str, tuple[Any, bool]] = {}
    for op, methods in {
        "add": "add",
        "sub": "sub",
        "mul": "mul",
        "truediv": "div truediv",
        "floordiv": "floor_divide floordiv",
        "mod": "remainder mod",
        "pow": "pow",
        "matmul": "matmul",
        "and_": "bitwise_and and",
        "or_": "bitwise_or or",
        "xor": "bitwise_xor xor",
        "lshift": "bitwise_left_shift lshift",
        "rshift": "bitwise_right_shift rshift",
    }.items():
        for m in methods.split():
            for name, swapped in (
                (m, False),
                (f"{m}_", False),
                (f"__{m}__", False),
                (f"__i{m}__", False),
                (f"__r{m}__", True),
            ):
                table[name] = (getattr(operator, op), swapped)
            _IN_PLACE.update((f"{m}_", f"__i{m}__"))
    for op, methods in {
        "neg": "neg",
        "pos": "positive pos",
        "invert": "bitwise_not invert",
        "eq": "eq",
        "ne": "ne",
        "lt": "lt",
        "le": "le",
        "gt": "gt",
        "ge": "ge",
        "getitem": "getitem",
        "setitem": "setitem",
    }.items():
        for m in methods.split():
            table[m] = table[f"__{m}__"] = (getattr(operator, op), False)
    return table


_FAMILY = _family()
_IN_PLACE_FUNCTION = {name: op for op, aten in IN_PLACE_OPERATORS.items() for name in (aten, f"__{op.__name__}__")}
"""An in-place method as a torch function mode sees ``x += y`` (``add_``; ``__iand__`` for
``x &= y``) -> the ``operator`` function the audit's tracer records for it (``operator.iadd``)."""
_COMMUTATIVE = {operator.add, operator.mul, operator.and_, operator.or_, operator.xor, operator.eq, operator.ne}

Call = tuple[Any, tuple[Any, ...]]


def tensor_methods() -> frozenset[Any]:
    """Tensor's methods as a torch function mode receives them (``is_tensor_method_or_property``
    without its per-call warnings filter, ~10 us a call)."""
    return frozenset(get_overridable_functions()[torch.Tensor])


def is_method(func: Any, methods: frozenset[Any]) -> bool:
    """``func`` is a Tensor method (some, such as ``new_ones``, are not overridable)."""
    if func in methods:
        return True
    name = getattr(func, "__name__", None)
    return isinstance(name, str) and getattr(torch.Tensor, name, None) is func


def call_name(func: Any) -> str:
    """How a message names an eager call (a property by its own name)."""
    name = getattr(func, "__name__", str(func))
    if name in ("__get__", "__set__"):
        return f"{getattr(getattr(func, '__self__', None), '__name__', '?')} (a property)"
    return str(name)


def eager_calls(func: Any, args: tuple[Any, ...], methods: frozenset[Any]) -> list[Call]:
    """The keys fx may have recorded an eager torch call under, each with its arguments in
    fx's order (``x + y`` reaches a torch function mode as the method ``add``; fx records
    ``operator.add``, or the method ``add`` for ``x.add(y)``)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: x.T
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        return [(("getattr", prop), (args[0], prop))]
    if not is_method(func, methods):
        return [(("fn", func), args)]
    calls: list[Call] = [(("method", name), args)]
    family = _FAMILY.get(name)
    if family is not None:
        op, swapped = family
        calls.append((("fn", op), (args[1], args[0], *args[2:]) if swapped else args))
        in_place = _IN_PLACE_FUNCTION.get(name)
        if in_place is not None:  # x += y: the audit's tracer records operator.iadd
            calls.append((("fn", in_place), args))
        if op in _COMMUTATIVE and len(args) == 2:
            calls.append((("fn", op), (args[1], args[0])))
    return calls


def graph_call(n: torch.fx.Node, methods: frozenset[Any]) -> tuple[Any, tuple[Any, ...]]:
    """The key and arguments of a graph call, as :func:`eager_calls` gives them."""
    if n.op == "call_method":
        return ("method", n.target), n.args
    if n.op == "call_module":
        return ("module", n.target), n.args
    if n.target is getattr:
        return ("getattr", n.args[1]), n.args
    if callable(n.target) and is_method(n.target, methods):
        return ("method", getattr(n.target, "__name__", "")), n.args
    return ("fn", n.target), n.args


def writes_first(func: Any, methods: frozenset[Any]) -> bool:
    """The eager call writes to its first argument (``x.add_(y)``, ``x += y``, ``x[i] = v``)."""
    name = getattr(func, "__name__", "")
    if name in _IN_PLACE:
        return True
    return in_place_name(name) and is_method(func, methods)


def tensors_in(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors in a call's arguments (in tuples, lists and dicts), in order."""
    out: list[torch.Tensor] = []
    for a in args:
        _walk(a, out)
    if kwargs:
        _walk(kwargs, out)
    return out


def _walk(v: Any, out: list[torch.Tensor]) -> None:
    # a module-level function, not a closure: a recursive closure is a reference cycle (the
    # function and its cell) left for the cyclic collector, per call
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for x in v:
            _walk(x, out)
    elif isinstance(v, dict):
        for x in v.values():
            _walk(x, out)


def mapped(value: Any, fn: Any) -> Any:
    """``value`` (arguments: tuples, lists, dicts) with ``fn`` applied to each pytree leaf.
    Plain tuples, lists and dicts are rebuilt here; any other container (a named tuple, an
    OrderedDict, a registered pytree node) by pytree (torch's flatten makes a recursive
    closure per call: a reference cycle for the collector)."""
    kind = type(value)
    if kind is tuple or kind is list:
        return kind(mapped(v, fn) for v in value)
    if kind is dict:
        return {k: mapped(v, fn) for k, v in value.items()}
    if kind in PLAIN_LEAVES or isinstance(value, torch.Tensor):
        return fn(value)
    leaves, spec = tree_flatten(value)
    return spec.unflatten([fn(v) for v in leaves])
