"""What a report keeps of an audit's fx capture (the graph and the tensors its get_attr nodes
read that the tracer made), and reading those attributes from a root."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .fx import Capture

__all__ = ["KeptGraph", "attribute", "graph_attributes", "holds", "kept", "made_attributes", "put_back"]


def holds(root: nn.Module, name: str, kind: str) -> Any:
    """The parameter ('p') or buffer ('b') ``root`` holds under ``name`` now (read from the
    module tables: ``getattr`` on a module is fx's patched one while it traces)."""
    *path, leaf = name.split(".")
    module: nn.Module | None = root
    for part in path:
        module = module._modules.get(part) if module is not None else None
    if module is None:
        return None
    table = module._parameters if kind == "p" else module._buffers  # (a ScriptModule's: no .get)
    return table[leaf] if leaf in table else None


def attribute(root: nn.Module, target: str) -> Any:
    """What a get_attr node with ``target`` reads from ``root`` (None when it is not there)."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def graph_attributes(cap: Capture) -> list[tuple[str, Any]]:
    """(target, value) of each get_attr node of ``cap``'s graph, read from its root."""
    return [(str(n.target), attribute(cap.root, str(n.target))) for n in cap.graph.nodes if n.op == "get_attr"]


def made_attributes(cap: Capture) -> list[tuple[str, Any]]:
    """(target, value) of each get_attr node of ``cap``'s graph that reads no parameter or buffer
    of its root: a tensor the tracer made (``torch.ones(...)`` in forward) or a plain attribute,
    which ``model.to(memory_format=...)`` leaves as they are."""
    root = cap.root
    return [(t, v) for t, v in graph_attributes(cap) if holds(root, t, "p") is None and holds(root, t, "b") is None]


@dataclass(frozen=True)
class KeptGraph:
    """What a report keeps of an audit's fx capture for a repair or a measurement: the graph and
    what its get_attr nodes read. Not its root, the audit's private copy of the model, which
    goes when the audit ends (a copy of the weights too, for a model that writes to its own)."""

    graph: torch.fx.Graph
    attributes: tuple[tuple[str, Any], ...]
    """(target, value) of each get_attr node (:func:`graph_attributes`)."""
    checked: bool = True
    """The graph was checked against eager (a forced or unverified capture is not)."""
    traced_writes: tuple[str, ...] = ()
    """Buffers forward wrote while traced (:attr:`~.fx.Capture.traced_writes`)."""


def kept(cap: Capture | None, *, checked: bool = True) -> KeptGraph | None:
    """What a report keeps of an fx ``cap``: its graph (copied when a GraphModule, which holds the
    modules, owns it) and the tensors its get_attr nodes read that the tracer made (not weights)."""
    if cap is None or cap.method != "fx":
        return None
    graph = copy.deepcopy(cap.graph) if cap.graph.owning_module is not None else cap.graph
    return KeptGraph(graph, tuple(made_attributes(cap)), checked, cap.traced_writes)


def put_back(root: nn.Module, attributes: list[tuple[str, Any]]) -> None:
    """Set each attribute the graph reads that ``root`` no longer has."""
    for target, value in attributes:
        owner, _, name = target.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        if value is not None and not hasattr(module, name):
            setattr(module, name, value)
