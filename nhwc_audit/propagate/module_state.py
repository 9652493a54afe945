"""A model's module state kept across a run that must leave none: :func:`attributes_restored` puts
every module's attribute tables, hooks, and the entries of the plain dicts and lists it holds back
as they were around a trace, an export, a replay on stand-ins or an NCHW baseline run."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import nn

__all__ = ["attributes_restored"]


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[list[str]]:
    """Every module's attributes (its parameter, buffer and submodule tables, and hooks) as they were
    before: a trace or an export runs ``forward`` on proxies or fake tensors, and models cache what
    they compute on themselves (Ultralytics' Detect keeps anchors and strides), which a later run
    would read back, or in a dict or list of their own (timm's EfficientFormer and LeViT keep their
    attention biases in ``attention_bias_cache``: a tensor of export's fake mode stayed there, and
    the next run mixed fake modes). Yields a list that names, on exit, the public attributes the run
    had set (``model.22.anchors``). The tables' keys and values are kept as two flat lists (built and
    compared in C, values by identity): most runs change nothing."""
    modules = [(n, m) for n, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)]
    tables = [t for _, m in modules for t in (m.__dict__, m._parameters, m._buffers, m._modules)]
    hooks = [t for _, m in modules for t in map(m.__dict__.get, _HOOKS) if t is not None]
    hooked = list(map(len, hooks))
    sizes = list(map(len, tables))
    keys = list(chain.from_iterable(tables))
    views = [t.values() for t in tables]
    values = list(chain.from_iterable(views))
    held = _containers(modules)
    changed: list[str] = []
    try:
        yield changed
    finally:
        same = (
            all(map(operator.is_, map(_OWN, (m for _, m in modules)), tables[::4]))  # no __dict__ replaced
            and list(map(len, tables)) == sizes
            and list(chain.from_iterable(tables)) == keys
            and all(map(operator.is_, chain.from_iterable(views), values))
        )
        if not same:
            changed += _restore(modules, tables, sizes, keys, values)
        changed += [name for name in _refilled(held) if name not in changed]
        if list(map(len, hooks)) != hooked:  # hooks a run registered go with the flag it set: cut off the end
            for table, size in zip(hooks, hooked, strict=True):
                while len(table) > size:
                    table.popitem()


def _restore(
    modules: list[tuple[str, nn.Module]], tables: list[Any], sizes: list[int], keys: list[str], values: list[Any]
) -> list[str]:
    """Put each module's four tables (``tables``: four per module, in order) back as they were
    (``sizes``, ``keys``, ``values``: their entries then, flat); the public attributes set."""
    changed: list[str] = []
    start = 0
    before: list[dict[str, Any]] = []
    for size in sizes:
        before.append(dict(zip(keys[start : start + size], values[start : start + size], strict=True)))
        start += size
    for i, (path, m) in enumerate(modules):
        now, then = tables[4 * i : 4 * i + 4], before[4 * i : 4 * i + 4]
        own = m.__dict__
        if own is not now[0]:  # replaced whole: the module's own goes back
            object.__setattr__(m, "__dict__", now[0])
        elif all(map(_unchanged, now, then)):
            continue
        attrs = then[0]
        changed += [
            f"{path}.{k}" if path else k
            for k, v in own.items()
            if not k.startswith("_") and (k not in attrs or _replaced(attrs[k], v))
        ]
        for table, saved in zip(now, then, strict=True):
            table.clear()
            table.update(saved)
    return changed


_OWN = operator.attrgetter("__dict__")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""A module's hook tables: a run that registers hooks (transformers' ``capture_outputs``, in forward,
with a flag saying so) has them cut back with the flag."""


def _unchanged(now: dict[str, Any], before: dict[str, Any]) -> bool:
    """``now`` holds the same keys, in the same order, with the same objects as ``before``."""
    return (
        len(now) == len(before)
        and tuple(now) == tuple(before)
        and all(map(operator.is_, now.values(), before.values()))
    )


def _replaced(old: Any, new: Any) -> bool:
    """``new`` is another value than ``old``: another tensor, or an unequal plain value (export
    rebuilds equal tuples such as a conv's ``padding``)."""
    if old is new:
        return False
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return True
    try:
        return not bool(old == new)
    except Exception:
        return True


_MODULE_OWN = frozenset(nn.Module().__dict__)
"""The attributes every torch Module has (its tables, hook dicts, flags): not a model's containers."""

_Held = tuple[str, dict[Any, Any] | list[Any], list[Any]]


def _containers(modules: list[tuple[str, nn.Module]]) -> list[_Held]:
    """Each plain ``dict`` or ``list`` a module holds as an attribute of its own, by its path, with
    its entries now (a dict's items, a list's elements)."""
    held: list[_Held] = []
    for path, m in modules:
        for k, v in m.__dict__.items():
            if (kind := type(v)) is dict or kind is list:
                if k not in _MODULE_OWN:
                    held.append((f"{path}.{k}" if path else k, v, list(v.items()) if kind is dict else list(v)))
    return held


def _refilled(held: list[_Held]) -> list[str]:
    """Put back the entries of each container of :func:`_containers` a run changed (keys and values by
    identity: a dict keyed by tensors compares none by value; writing an equal key keeps the dict's own);
    the public ones, by name."""
    changed = []
    for name, c, then in held:
        if type(c) is dict:
            now = list(c.items())
            if len(now) == len(then) and all(a[0] is b[0] and a[1] is b[1] for a, b in zip(now, then, strict=True)):
                continue
            c.clear()
            c.update(then)
        else:
            if len(c) == len(then) and all(map(operator.is_, c, then)):
                continue
            c[:] = then
        if not name.rsplit(".", 1)[-1].startswith("_"):
            changed.append(name)
    return changed
