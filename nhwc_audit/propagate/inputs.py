"""The sample as a graph takes it (positional and keyword inputs in placeholder order), and the
operands a node takes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg

from ..errors import PropagationError
from ..records import NodeInput

__all__ = ["operands", "positional_inputs", "versions_of", "written"]


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
