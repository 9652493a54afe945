"""The module tree copied fast: ``copy.deepcopy`` of an ``nn.Module`` with the parameters and
buffers swapped for the caller's replacements (:func:`clone_modules`). The audit's private
copies, the fake copies and the repair's checking runs are all made this way.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .wrappers import wrapped_module

__all__ = ["ATOMIC_TYPES", "MODULE_TABLES", "clone_modules"]

MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})
"""A module's own tables of parameters, buffers and children (its other attributes are plain)."""

_ATOMIC = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.memory_format)
ATOMIC_TYPES = frozenset(_ATOMIC)
"""Immutable plain values (no tensor among them): shared by copies, skipped by tensor searches."""
_EMPTY_CONTAINERS = (dict, OrderedDict, set)


def _atomic(v: Any) -> bool:
    kind = type(v)
    if kind in ATOMIC_TYPES:  # the common case, without isinstance's walk
        return True
    if kind is tuple:
        return all(type(x) in ATOMIC_TYPES or isinstance(x, _ATOMIC) for x in v)
    return isinstance(v, _ATOMIC)


def _how(m: Any) -> str:
    """How :class:`_Cloner` copies an instance of ``m``'s class: 'plain' (its state, walked),
    'wrapper' (:func:`~.wrappers.wrapped_module`), 'script' (:func:`_script_copy`) or 'deep'."""
    if isinstance(m, nn.Module) and wrapped_module(m) is not None:
        return "wrapper"
    if isinstance(m, torch.jit.ScriptModule):
        return "script"
    return "plain" if _plain_copyable(type(m)) else "deep"


def _script_copy(m: torch.jit.ScriptModule, memo: dict[int, Any]) -> torch.jit.ScriptModule:
    """A TorchScript module's copy (its own ``__deepcopy__``, which copies its tensors whatever
    ``memo`` holds) with the parameters and buffers ``memo`` replaces put in: a scripted or traced
    conv inside a model keeps the channels_last weights the audit gives every other one."""
    new: torch.jit.ScriptModule = copy.deepcopy(m)
    memo[id(m)] = new
    for (_, old), (_, mine) in zip(m.named_modules(), new.named_modules(), strict=True):
        for table in ("_parameters", "_buffers"):
            for name, t in list(getattr(old, table).items()):
                if t is not None and id(t) in memo:
                    getattr(mine, table)[name] = memo[id(t)]
    return new


def _copied(t: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(t, memo)``, without its call when ``memo`` has ``t`` (a parameter or
    buffer replaced up front)."""
    got = memo.get(id(t), memo)
    return copy.deepcopy(t, memo) if got is memo else got


def _plain_copyable(cls: Any) -> bool:
    """``copy.deepcopy`` would copy an instance of ``cls`` through getstate/setstate."""
    base: Any = object
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is base.__reduce_ex__
        and cls.__reduce__ is base.__reduce__
        and not any("__slots__" in k.__dict__ for k in cls.__mro__[:-1])
    )


def clone_modules(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(model, memo)`` with a fast path for the module tree.

    ``memo`` maps ``id()`` of parameters and buffers to their replacements (as deepcopy's
    memo does; one missing from it is deep-copied). Modules are rebuilt through their own ``__getstate__``/``__setstate__``;
    numbers, strings and tuples of them are shared (immutable), empty containers (hook
    dicts) are new, anything else goes through ``copy.deepcopy`` with the same memo. A
    module class with its own ``__deepcopy__``/``__reduce__`` is deep-copied whole.
    About 6x faster than deepcopy on torchvision's resnet50 (161 modules).

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> c = clone_modules(m, {id(p): p.detach().clone() for p in m.parameters()})
    >>> c[0] is not m[0], c[0].weight.data_ptr() != m[0].weight.data_ptr()
    (True, True)
    """

    out: nn.Module = _Cloner(memo).one(model)
    return out


class _Cloner:
    """:func:`clone_modules`' walk of the tree. A class, not a closure calling itself: such a
    closure is a reference cycle (the function, its cell), and it would hold ``memo``, so the
    whole copy, until the cyclic collector ran."""

    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo
        self.plain: dict[type, str] = {}  # per class, asked once (:func:`_how`)

    def one(self, m: Any) -> Any:
        memo = self.memo
        if id(m) in memo:
            return memo[id(m)]
        cls: Any = type(m)
        how = self.plain.get(cls)
        if how is None:
            how = self.plain[cls] = _how(m)
        if how == "wrapper":  # torch.compile's module, DataParallel: the copy runs what they wrap
            memo[id(m)] = got = self.one(wrapped_module(m))
            return got
        if how == "script":
            return _script_copy(m, memo)
        if how == "deep":
            return copy.deepcopy(m, memo)
        new = cls.__new__(cls)
        memo[id(m)] = new
        state: dict[str, Any] = {}
        for k, v in m.__getstate__().items():
            kind = type(v)
            if kind in ATOMIC_TYPES:  # the common cases first, without isinstance's walk
                state[k] = v
            elif k in MODULE_TABLES:
                if k == "_modules":
                    state[k] = {n: (None if c is None else self.one(c)) for n, c in v.items()}
                else:
                    state[k] = {n: (None if t is None else _copied(t, memo)) for n, t in v.items()}
            elif kind in _EMPTY_CONTAINERS and not v:  # hook tables
                state[k] = kind()
            elif _atomic(v):
                state[k] = v
            else:
                state[k] = copy.deepcopy(v, memo)
        new.__setstate__(state)
        return new
