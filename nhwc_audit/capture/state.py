"""What forward may change on a model's modules, kept to put back: their attributes, and the
items of their dict and list attributes (a cache forward fills). A trace that fails after
forward cached a proxy there would leave the next trace reading it."""

from __future__ import annotations

import copy
from typing import Any

import torch.fx
from torch import nn

__all__ = ["ModuleState", "module_state", "put_back_proxied", "put_back_state"]

ModuleState = list[tuple[nn.Module, dict[str, Any], list[tuple[Any, Any]]]]


def module_state(model: nn.Module) -> ModuleState:
    """Each module of ``model``: its attributes, and a copy of each dict or list it holds.

    >>> m = nn.Linear(2, 2)
    >>> m.cache = {}
    >>> state = module_state(m)
    >>> m.cache["k"], m.extra = 1, 2
    >>> put_back_state(state)
    >>> m.cache, hasattr(m, "extra")
    ({}, False)
    """
    state: ModuleState = []
    for m in model.modules():
        attrs = dict(vars(m))
        state.append((m, attrs, [(v, copy.copy(v)) for v in attrs.values() if type(v) in (dict, list)]))
    return state


def put_back_state(state: ModuleState) -> None:
    """Every module as :func:`module_state` found it."""
    for m, attrs, held in state:
        vars(m).clear()
        vars(m).update(attrs)
        for container, items in held:
            _refill(container, items)


def put_back_proxied(state: ModuleState) -> None:
    """Put back, as :func:`module_state` found them, the attributes and containers of the modules
    that now hold a trace's proxy (``self.pos = self.pos * 1.0`` of a traced buffer puts one in
    the module's buffers; a cache filled in forward, in the cache): nothing else the trace left."""
    for m, attrs, held in state:
        for key in [k for k, v in vars(m).items() if isinstance(v, torch.fx.Proxy)]:
            if key in attrs:
                vars(m)[key] = attrs[key]
            else:
                del vars(m)[key]
        for container, items in held:
            if any(
                isinstance(v, torch.fx.Proxy) for v in (container.values() if type(container) is dict else container)
            ):
                _refill(container, items)


def _refill(container: Any, items: Any) -> None:
    container.clear()
    if type(container) is dict:
        container.update(items)
    else:
        container.extend(items)
