"""torch.fx capture: symbolic trace with the user's source line on every node. Never runs
the model.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
from torch import nn
from torch.fx.proxy import Proxy, Scope, TracerBase

from ..errors import TraceError
from .context import SOURCE_KEY
from .source import user_frame

__all__ = ["Capture", "GraphMethod", "attribute", "graph_attributes", "put_back", "trace"]

GraphMethod = Literal["fx", "export"]


@dataclass(frozen=True)
class Capture:
    """A captured graph and how it was obtained."""

    root: nn.Module
    """The module the graph's ``call_module``/``get_attr`` targets are paths into."""
    graph: torch.fx.Graph
    method: GraphMethod
    """'fx' (symbolic_trace) or 'export' (torch.export, non-strict, ATen-level graph)."""

    @property
    def flat_inputs(self) -> bool:
        """The graph takes the pytree leaves of (args, kwargs), as torch.export graphs do."""
        return self.method == "export"

    @functools.cached_property
    def gm(self) -> torch.fx.GraphModule:
        """The graph as a GraphModule, built on first use: generating its Python code costs
        about a third of a trace, and the audit itself runs ``graph`` on ``root`` directly."""
        if isinstance(self.root, torch.fx.GraphModule) and self.root.graph is self.graph:
            return self.root
        return torch.fx.GraphModule(self.root, self.graph, type(self.root).__name__)


_PLAIN_ARGS = frozenset({Proxy, tuple, list, dict, int, float, bool, str, type(None)})


class _ModuleStack(OrderedDict[str, Any]):
    """fx's stack of the modules being traced, copied into each node's meta
    (``nn_module_stack``): copied by its own ``__copy__`` (``copy.copy`` of a plain OrderedDict
    goes through ``__reduce_ex__``, ~3 us a node)."""

    def __copy__(self) -> _ModuleStack:
        return _ModuleStack(self)


class _Scope(Scope):
    """fx's current scope, copied on entering each module call: by its own ``__copy__``."""

    def __copy__(self) -> Scope:
        return Scope(self.module_path, self.module_type)


class _Tracer(torch.fx.Tracer):
    """fx Tracer that stores the user's source line of every node it creates."""

    def __init__(self) -> None:
        super().__init__()
        self.scope = _Scope("", None)
        self.module_stack = _ModuleStack()

    def create_arg(self, a: Any) -> Any:
        # a proxy, a plain value, a tuple, list or dict: torch's Tracer would find it is none of the
        # values it turns into get_attr nodes (parameters, buffers, modules, named tuples,
        # constants) by ~10 isinstance checks each before handing it to TracerBase, which
        # looks its exact type up in a table: go there directly
        if type(a) in _PLAIN_ARGS:
            return TracerBase.create_arg(self, a)
        return super().create_arg(a)

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[SOURCE_KEY] = user_frame()
        return node


def trace(model: nn.Module, *, concrete_args: dict[str, Any] | None = None) -> Capture:
    """Symbolically trace ``model``, recording each node's module stack and source line.

    Raises :class:`TraceError` naming the failure and what to do about it.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {msg} "
            "(data-dependent control flow or non-torch calls in forward; make that code "
            "traceable, e.g. wrap it with torch.fx.wrap, or audit a traceable submodule)"
        ) from e
    return Capture(root=tracer.root, graph=graph, method="fx")


def attribute(root: nn.Module, target: str) -> Any:
    """What a get_attr node with ``target`` reads from ``root`` (None when it is not there)."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def graph_attributes(cap: Capture) -> list[tuple[str, Any]]:
    """(target, value) of each get_attr node of ``cap``'s graph, read from its root."""
    return [(str(n.target), attribute(cap.root, str(n.target))) for n in cap.graph.nodes if n.op == "get_attr"]


def put_back(root: nn.Module, attributes: list[tuple[str, Any]]) -> None:
    """Set each attribute the graph reads that ``root`` no longer has."""
    for target, value in attributes:
        owner, _, name = target.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        if value is not None and not hasattr(module, name):
            setattr(module, name, value)
