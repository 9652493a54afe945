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

import functools
from typing import Any

import torch.fx

__all__ = ["FreshArgs", "fresh", "holds_containers"]


def fresh(value: Any) -> Any:
    """``value`` with each list and dict in it (through lists, dicts and plain tuples) a new, plain,
    mutable one (fx's immutable ones, an ``OrderedDict``); anything else as it is. Also how the replay
    compares a graph's output with eager's (fx returns ``{...}`` where eager code returns an OrderedDict)."""
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fresh(v) for v in value]
    if type(value) is tuple:
        return tuple(fresh(v) for v in value)
    return value


def holds_containers(n: torch.fx.Node) -> bool:
    """A list or a dict is among ``n``'s arguments (in its args, or as a keyword's value)."""
    return _holds(n.args) or any(map(_holds, n.kwargs.values()))


def _holds(value: Any) -> bool:
    if isinstance(value, (list, dict)):
        return True
    return type(value) is tuple and any(map(_holds, value))


class FreshArgs(torch.fx.Interpreter):
    """An ``fx.Interpreter`` that hands each node fresh lists and dicts, as generated code does."""

    @functools.cached_property
    def _containers(self) -> frozenset[torch.fx.Node]:
        """The nodes with a list or a dict among their arguments: asked once per graph, not per run of a node."""
        return frozenset(n for n in self.graph.nodes if holds_containers(n))

    def fresh_args(self, n: torch.fx.Node, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """``n``'s ``args`` and ``kwargs`` with fresh lists and dicts where it has some."""
        return (fresh(args), fresh(kwargs)) if n in self._containers else (args, kwargs)

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.fresh_args(n, *super().fetch_args_kwargs_from_env(n))
