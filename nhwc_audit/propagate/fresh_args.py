"""A graph node's arguments as the model's code hands them over.

torch.fx keeps the lists and dicts of a node's arguments immutable (``immutable_list``,
``immutable_dict``), and ``fx.Interpreter`` passes them so; a GraphModule's generated code, like the
model's own, builds them anew on every call. A function the graph calls whole that updates its list
argument in place (torchvision swin3d's ``_get_window_and_shift_size``, wrapped with
``torch.fx.wrap``, clips a window list to a small input) raised ``TypeError: 'immutable_list'
object does not support mutation`` under every interpreter here: the audit took the graph for
wrong and fell back to module hooks, and the repair blamed the model. Every interpreter of the
package (:class:`FreshArgs`, and the propagation's own loop) hands such a node fresh containers.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

__all__ = ["FreshArgs", "fresh", "holds_containers"]


def fresh(value: Any) -> Any:
    """``value`` with each list and dict in it (through lists, dicts and plain tuples) a new,
    mutable one; anything else as it is."""
    kind = type(value)
    if kind is immutable_list or kind is list:
        return [fresh(v) for v in value]
    if kind is immutable_dict or kind is dict:
        return {k: fresh(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(fresh(v) for v in value)
    return value


def holds_containers(n: torch.fx.Node) -> bool:
    """A list or a dict is among ``n``'s arguments (in its args, or as a keyword's value)."""
    return _holds(n.args) or any(_holds(v) or isinstance(v, (list, dict)) for v in n.kwargs.values())


def _holds(value: Any) -> bool:
    if isinstance(value, (list, dict)):
        return True
    return type(value) is tuple and any(map(_holds, value))


class FreshArgs(torch.fx.Interpreter):
    """An ``fx.Interpreter`` that hands each node fresh lists and dicts, as generated code does."""

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return (fresh(args), fresh(kwargs)) if holds_containers(n) else (args, kwargs)
