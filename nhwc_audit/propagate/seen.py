"""Calls the dispatch recorder has already seen (:class:`SeenCalls`).

A torch.nn module's forward is a function of its configuration, its weights' layouts and its
inputs' layouts: a second call of the same class, configuration and layouts runs the same ATen
ops. So is one of torch's own functions (``torch.cat``, ``F.interpolate``, an operator or a
method on tensors) of its arguments' layouts and plain values. When the first such call made no
layout copy and wrote to nothing but its own inputs (an in-place ReLU), the recorder's Python
dispatch mode (~5-20 us of torch's own machinery per ATen op, far more for some kernels) has
nothing to see in the next ones, and the propagation runs them without it, unless a call is
passed one of the user's weights the audit shares (the recorder's guard must see that write).
Only torch.nn's own classes qualify, without hooks (their own or global ones), children or
attributes other than plain values, and torch's own functions and tensor methods, with plain
tensors only, while no torch function or dispatch mode of the model's own is on; anything else
(a function of the model's, a method it set on a tensor, a tensor subclass, a callable
argument) is always recorded. A module's signature is read again when any of its attributes,
weights or hooks is not the object it was.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import types
from typing import Any

import torch
from torch import nn
from torch.fx.immutable_collections import immutable_list
from torch.nn.modules import module as _nn_module

from ..tensors import is_plain_dense

__all__ = ["SeenCalls", "global_module_hooks", "has_hooks"]

_TABLES = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
    }
)
_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks")
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
_EXACT = frozenset(_PLAIN)
"""The plain types by exact type (the fast path of a module's settings; a subclass of one
takes the slow path)."""
_SETTINGS = _EXACT | {tuple}


def _plain(v: Any) -> bool:
    """A module setting that cannot change unseen: a plain value or a tuple of them (a list
    could be changed in place after the signature was read)."""
    if isinstance(v, _PLAIN):
        return True
    return type(v) is tuple and all([isinstance(x, _PLAIN) for x in v])


def _settings_key(state: dict[str, Any]) -> Any:
    """A module's settings' part of its signature (its attributes other than the tables of
    weights, children and hooks), or :data:`_UNKEYED` when one is not plain. Most settings are
    ints, bools, strings and tuples of them: keyed as names, values and types in a few C-level
    steps (the types tell ``(1, True)`` from ``(1, 1)``, which compare equal as tuples); any
    other plain setting as :func:`_arg_key` keys it."""
    names = tuple([k for k in state if k not in _TABLES])
    values = tuple([state[k] for k in names])
    kinds = tuple(map(type, values))
    if _SETTINGS.issuperset(kinds):
        inner = tuple(map(type, itertools.chain.from_iterable([v for v in values if type(v) is tuple])))
        if _EXACT.issuperset(inner):
            return (names, values, kinds, inner)
    keys = tuple([_arg_key(v) if _plain(v) else _UNKEYED for v in values])
    return _UNKEYED if _UNKEYED in keys else (names, keys)


def _tensor_key(t: Any) -> Any:
    """A plain dense tensor's layout and what its kernels depend on (None for any other)."""
    if not is_plain_dense(t):
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def has_hooks(m: nn.Module) -> bool:
    """``m`` has forward or backward hooks of its own."""
    return any(m.__dict__.get(h) for h in _HOOKS)


def global_module_hooks() -> bool:
    """Hooks registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    return any([getattr(_nn_module, name, None) for name in _GLOBAL_HOOKS])


_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


class SeenCalls:
    """Signatures of the calls of one propagation that made no layout copy and wrote to
    nothing but their own inputs (:attr:`quiet`), and each module's part of them."""

    def __init__(self, own_modes: int = 0) -> None:
        self.quiet: set[Any] = set()
        self._modules: dict[int, Any] = {}
        self._ids: dict[Any, int] = {}
        """Each distinct module signature's number: a call's signature holds the number, cheaper
        to hash on every lookup than the module's settings."""
        self._methods: dict[tuple[type, str], bool] = {}
        self._own_modes = own_modes
        """Dispatch modes the propagation itself keeps on the stack (its recorder)."""

    def module_key(self, m: nn.Module) -> Any:
        """The part of a call's signature that is the module's own, or None (never skipped);
        read once per module and propagation, and read again when code of the model's has set
        an attribute, a weight or a hook on it since."""
        got = self._modules.get(id(m))
        # (the module is kept, so its id is not reused)
        if got is not None and got[1] is not None and got[0] is m and not has_hooks(m) and _same_objects(m, got[2]):
            return None if global_module_hooks() else got[1]
        key = None
        cls = type(m)
        state = m.__dict__
        if (
            cls.__module__.startswith("torch.nn.modules.")
            and not state.get("_modules")
            and not has_hooks(m)
            and not global_module_hooks()
            and "forward" not in state
            and "_call_impl" not in state
        ):
            config = _settings_key(state)
            # plain settings and plain dense weights only (a tensor subclass: always recorded)
            weights = (*state["_parameters"].items(), *state["_buffers"].items())
            tensors = tuple((k, None if t is None else _tensor_key(t)) for k, t in weights)
            dense = all([t is None or tk is not None for (_, t), (_, tk) in zip(weights, tensors, strict=True)])
            if dense and config is not _UNKEYED:
                key = self._ids.setdefault((cls, config, tensors), len(self._ids))
        self._modules[id(m)] = (m, key, _objects(m))
        return key

    def key(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call's signature, or None when it must always be recorded."""
        if self._modes():
            return None
        base = self.module_key(m)
        return None if base is None else _signature(base, args, kwargs)

    def call_key(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The signature of a function or method node's call (``op``: the fx op), or None when
        it must always be recorded: torch's own functions (``torch.cat``, ``F.interpolate``),
        Python's operators on tensors and methods of plain tensors qualify; a function of the
        model's own (``torch.fx.wrap``, a method it set on a tensor) never does."""
        if self._modes():
            return None
        if op == "call_method":
            this = args[0] if args else None
            if not (isinstance(target, str) and isinstance(this, torch.Tensor) and is_plain_dense(this)):
                return None
            if target in this.__dict__:  # a function of the model's set on this tensor
                return None
            if not self._tensor_method(type(this), target):
                return None
            return _signature(("method", target), args, kwargs)
        if not _torch_function(target):
            return None
        return _signature(("function", target), args, kwargs)

    def _modes(self) -> bool:
        """A mode of the model's own is on: a torch function mode (torch's functions then run
        its code) or a dispatch mode (a skipped call, run with dispatch modes off, would skip it
        too)."""
        return bool(torch._C._len_torch_function_stack()) or torch._C._len_torch_dispatch_stack() > self._own_modes

    def _tensor_method(self, cls: type, name: str) -> bool:
        """``cls.<name>`` (``cls``: torch.Tensor or nn.Parameter) is torch's own (not a function
        of the model's set on the class)."""
        got = self._methods.get((cls, name))
        if got is None:
            attr = inspect.getattr_static(cls, name, None)
            got = self._methods[cls, name] = isinstance(attr, _DESCRIPTORS) or _torch_function(attr)
        return got


_DESCRIPTORS = (types.MethodDescriptorType, types.WrapperDescriptorType, types.GetSetDescriptorType)


def _torch_function(target: Any) -> bool:
    """``target`` is torch's own function (or Python's operator): a plain function or builtin
    defined in torch (not TorchScript, whose functions the model writes), or an ATen/prims op;
    a callable object, which takes ``__module__`` from its class (a user's custom op reads as
    ``torch._ops``), is not."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in ("aten", "prims")
    if isinstance(target, torch._ops.OpOverloadPacket):  # (its attributes are overload names)
        return str(target._qualified_op_name).split("::")[0] in ("aten", "prims")
    if not isinstance(target, (types.FunctionType, types.BuiltinFunctionType)):
        return False
    where = getattr(target, "__module__", None) or ""
    if where.startswith("torch.jit"):
        return False
    return where in ("_operator", "torch") or where.startswith("torch.")


def _objects(m: nn.Module) -> tuple[Any, ...]:
    """The objects a module's signature was read from: the names and the values of its
    attributes, parameters and buffers."""
    state = m.__dict__
    params, buffers = state["_parameters"], state["_buffers"]
    return (tuple(state), tuple(params), tuple(buffers)), (*state.values(), *params.values(), *buffers.values())


def _same_objects(m: nn.Module, before: tuple[Any, ...]) -> bool:
    """``m`` has the attributes, parameters and buffers it had, each the same object."""
    state = m.__dict__
    params, buffers = state["_parameters"], state["_buffers"]
    if (tuple(state), tuple(params), tuple(buffers)) != before[0]:
        return False
    return all(map(operator.is_, (*state.values(), *params.values(), *buffers.values()), before[1]))


def _signature(base: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    ins = tuple([_arg_key(v) for v in args])
    named = tuple([(k, _arg_key(v)) for k, v in kwargs.items()]) if kwargs else ()
    if _UNKEYED in ins or any([k is _UNKEYED for _, k in named]):
        return None
    return (base, ins, named, torch.is_grad_enabled())


_UNKEYED = object()
"""An argument no signature can stand for (a tensor subclass, a module, a callable)."""


def _arg_key(v: Any) -> Any:
    """An argument's part of a signature: each tensor's layout, plain values with their type
    (``1`` and ``True``, a list and a tuple of indices are different arguments), nested."""
    kind = type(v)
    if isinstance(v, torch.Tensor):
        if v.numel() == 1:  # torch may read its value as a number (a size, a dim): never keyed
            return _UNKEYED
        got = _tensor_key(v)
        return _UNKEYED if got is None else got
    if isinstance(v, _PLAIN):
        return (kind, v)
    if kind is tuple or kind is list or kind is immutable_list:  # (fx passes lists as its own)
        items = tuple([_arg_key(x) for x in v])
        return _UNKEYED if _UNKEYED in items else (kind, items)
    if kind is slice:
        parts = (_arg_key(v.start), _arg_key(v.stop), _arg_key(v.step))
        return _UNKEYED if any(k is _UNKEYED for k in parts) else (kind, parts)
    if v is Ellipsis:
        return (kind,)
    return _UNKEYED
