"""The sample as a graph takes it (positional and keyword inputs in placeholder order), and the
operands a node takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg

from ..errors import PropagationError
from ..layout import tensor_meta
from ..records import NodeInput, TensorMeta
from ..tensors import iter_tensors

__all__ = [
    "PerNode",
    "keyword_metas",
    "operands",
    "own_weights",
    "positional_inputs",
    "sorted_users",
    "versions_of",
    "written",
]


class PerNode(dict):  # type: ignore[type-arg]
    """Node -> a value made on first use (a measurement of a rewrite runs a few of a graph's nodes)."""

    def __init__(self, make: Callable[[torch.fx.Node], Any]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, n: torch.fx.Node) -> Any:
        value = self[n] = self.make(n)
        return value


def positional_inputs(
    gm: torch.fx.GraphModule | torch.fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """Order positional and keyword inputs the way the graph's placeholders expect them."""
    graph = gm if isinstance(gm, torch.fx.Graph) else gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values: list[Any] = []
    unknown = set(kwargs) - {str(p.target).lstrip("*") for p in placeholders}
    if unknown:
        raise PropagationError(
            f"the model's forward has no parameter(s) {', '.join(sorted(unknown))}: check the example keyword inputs"
        )
    if len(args) > len(placeholders):
        raise PropagationError(
            f"{len(args)} positional inputs given but the model's forward takes "
            f"{len(placeholders)}: pass one --input per positional input"
        )
    for i, p in enumerate(placeholders):
        name = str(p.target).lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif p.args:
            values.append(p.args[0])
        else:
            raise PropagationError(
                f"the model's forward needs input {name!r} and none was given: pass one "
                "--input per positional input, or return (model, args, kwargs) from the build_fn"
            )
    return values


def operands(n: torch.fx.Node) -> list[torch.fx.Node]:
    """Every node ``n`` reads, once per use: ``y.scatter_add(1, idx, y)`` reads ``y`` twice
    (``Node.all_input_nodes`` lists it once)."""
    out: list[torch.fx.Node] = []
    map_arg((n.args, n.kwargs), out.append)
    return out


def versions_of(inputs: list[tuple[NodeInput, torch.Tensor]]) -> list[int]:
    """Each input's ``_version``; none when one is an inference tensor (``torch.inference_mode``),
    which keeps no version counter."""
    try:
        return [t._version for _, t in inputs]
    except RuntimeError:
        return []


def written(inputs: list[tuple[NodeInput, torch.Tensor]], versions: list[int]) -> bool:
    """Some input that is not a parameter has been written since its ``_version`` was
    ``versions`` (:func:`versions_of`, empty when unknown): a node that returns it ran in place."""
    return bool(versions) and any(
        t._version != v and not i.is_param for (i, t), v in zip(inputs, versions, strict=True)
    )


def sorted_users(n: torch.fx.Node, index: dict[torch.fx.Node, int]) -> tuple[str, ...]:
    """The names of ``n``'s users in graph order (``index``: each node's place)."""
    return tuple(u.name for u in sorted(n.users, key=index.__getitem__))


def own_weights(n: torch.fx.Node, callee: dict[torch.fx.Node, torch.nn.Module]) -> list[tuple[NodeInput, torch.Tensor]]:
    """The 4D/5D parameters and buffers of the leaf module ``n`` calls (``callee``: by node)."""
    sub = callee.get(n)
    if sub is None:
        return []
    own = {id(t): t for t in [*sub._parameters.values(), *sub._buffers.values()] if t is not None}
    return [(NodeInput(None, tensor_meta(t), is_param=True), t) for t in own.values() if t.dim() in (4, 5)]


def keyword_metas(kwargs: dict[str, Any]) -> tuple[tuple[str, TensorMeta], ...]:
    """The sample's keyword tensors for the report: ``(name, meta)``, ``name[i]`` for the i-th
    tensor of a keyword that holds several."""
    out: list[tuple[str, TensorMeta]] = []
    for key, value in kwargs.items():
        tensors = iter_tensors(value)
        out += [(key if len(tensors) == 1 else f"{key}[{i}]", tensor_meta(t)) for i, t in enumerate(tensors)]
    return tuple(out)
