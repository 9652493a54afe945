"""Tensor constants of an fx trace that the graph writes in place, made fresh in each run."""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx

from ..records.kinds import in_place_name
from .proxies import in_place_operator

__all__ = ["fresh_constants"]


_CONSTANT = "_tensor_constant"
"""The prefix of the root attributes the tracer stows a tensor forward made in (:meth:`_Tracer._constant`)."""


def fresh_constants(graph: torch.fx.Graph) -> None:
    """Give each run its own copy of each tensor constant the graph writes in place. A tensor
    forward makes from no input (``t = torch.zeros(())``) is stowed as a constant by the trace,
    one for every run, where eager makes a fresh one per call: ``t += y.mean()`` wrote into that
    one, so that each run of the graph started from what the last left (and, in training, from
    its autograd history: a backward ran through the last run's graph). The first read of such a
    constant is followed by a ``clone`` that every read of it then reads."""
    first: dict[str, torch.fx.Node] = {}
    written: set[str] = set()
    for n in graph.nodes:
        if n.op == "get_attr" and str(n.target).startswith(_CONSTANT):
            first.setdefault(str(n.target), n)
        elif n.args and isinstance(n.args[0], torch.fx.Node) and _writes_first(n):
            target = n.args[0]
            if target.op == "get_attr" and str(target.target).startswith(_CONSTANT):
                written.add(str(target.target))
    for name in written:
        read = first[name]
        with graph.inserting_after(read):
            fresh = graph.call_method("clone", (read,))
        fresh.meta.update(read.meta)
        for n in [n for n in graph.nodes if n.op == "get_attr" and n.target == name]:
            n.replace_all_uses_with(fresh, delete_user_cb=functools.partial(operator.is_not, fresh))
            if n is not read:
                graph.erase_node(n)


def _writes_first(n: torch.fx.Node) -> bool:
    """Node ``n`` writes its first operand: ``x += y``, ``x.add_(y)``, ``x[i] = y``, ``inplace=True``."""
    if n.op not in ("call_function", "call_method") or n.kwargs.get("inplace"):
        return bool(n.kwargs.get("inplace"))
    if n.target is operator.setitem or in_place_operator(n.target):
        return True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return in_place_name(name)
