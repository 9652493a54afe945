"""The ``functools`` caches of a model's own code, emptied around a fake run.

Models cache what they compute from shapes alone: transformers' MaskFormer keeps its sine
position embedding in an ``lru_cache`` keyed on (shape, device, dtype), shared by every
instance. A fake run would leave a FakeTensor there for the user's next real forward (which
then raises), and would read back a real tensor a real run left (an error under fake mode); a
torch.export trace runs on fake tensors in either mode, an fx trace on proxies. The caches the
model's classes and their modules define are emptied before and after each capture and each
fake run: the user's next call recomputes an entry, and nothing else changes.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["code_caches", "emptied"]

_CACHE = functools._lru_cache_wrapper


def _caches_in(value: Any) -> Iterator[Any]:
    """The lru caches ``value`` is or wraps: a cached function or method, a static or class
    method of one, or a wrapper that holds one in its closure (transformers'
    ``compile_compatible_method_lru_cache``)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, _CACHE):
        yield value
        return
    for cell in getattr(value, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(inner, _CACHE):
            yield inner


def code_caches(model: nn.Module) -> tuple[Any, ...]:
    """The lru caches defined by the classes of ``model``'s modules (outside torch) and by the
    functions of the Python modules those classes come from."""
    found: dict[int, Any] = {}
    classes = {cls for m in model.modules() for cls in type(m).__mro__}
    sources = set()
    for cls in classes:
        if cls.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        sources.add(cls.__module__)
        for value in vars(cls).values():
            found.update((id(c), c) for c in _caches_in(value))
    for name in sources:
        for value in getattr(sys.modules.get(name), "__dict__", {}).values():
            if getattr(value, "__module__", None) == name:
                found.update((id(c), c) for c in _caches_in(value))
    return tuple(found.values())


@contextlib.contextmanager
def emptied(caches: tuple[Any, ...]) -> Iterator[None]:
    """``caches`` emptied on entry and on exit (a fake run's entries do not outlive it)."""
    for c in caches:
        c.cache_clear()
    try:
        yield
    finally:
        for c in caches:
            c.cache_clear()
