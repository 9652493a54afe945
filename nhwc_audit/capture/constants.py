"""Tensor constants of an fx trace that the graph writes in place, made fresh in each run."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from .proxies import written_operand

__all__ = ["fresh_constants"]


_CONSTANT = "_tensor_constant"
"""The prefix of the root attributes the tracer stows a tensor forward made in (:meth:`_Tracer._constant`)."""


def fresh_constants(graph: torch.fx.Graph, root: torch.nn.Module) -> None:
    """Give each run its own copy of each tensor constant the graph writes in place. A tensor
    forward makes from no input (``t = torch.zeros(())``) is stowed as a constant by the trace,
    one for every run, where eager makes a fresh one per call: ``t += y.mean()`` wrote into that
    one, so that each run of the graph started from what the last left (and, in training, from
    its autograd history: a backward ran through the last run's graph). Before the first read of
    such a constant, a ``clone`` is made that every read of it then reads. Constants that share
    memory (the trace indexes a tensor it made itself: ``z[:, :4] += y`` stows ``z[:, :4]`` and
    ``z`` apart) are read as views of one clone of the one that holds the whole memory, so that
    a write into one still reaches the others; left as they are when none does."""
    reads: dict[str, list[torch.fx.Node]] = {}
    written: set[str] = set()
    for n in graph.nodes:
        if n.op == "get_attr" and str(n.target).startswith(_CONSTANT):
            reads.setdefault(str(n.target), []).append(n)
        elif isinstance(target := written_operand(n), torch.fx.Node):
            if target.op == "get_attr" and str(target.target).startswith(_CONSTANT):
                written.add(str(target.target))
    shared: dict[int, list[str]] = {}
    for name in reads:
        if isinstance(t := getattr(root, name, None), torch.Tensor):
            shared.setdefault(t.untyped_storage()._cdata, []).append(name)  # a fake one has no data_ptr
    for names in shared.values():
        whole = [n for n in names if _whole(getattr(root, n))]
        if not whole or not written.intersection(names):
            continue
        first = min((r for n in names for r in reads[n]), key=_position(graph))
        with graph.inserting_before(first):
            fresh = graph.call_method("clone", (graph.get_attr(whole[0]),))
        fresh.meta.update(first.meta)
        for name in names:
            view = fresh
            if name != whole[0]:
                t = getattr(root, name)
                with graph.inserting_after(fresh):
                    view = graph.call_method("as_strided", (fresh, tuple(t.shape), t.stride(), t.storage_offset()))
                view.meta.update(first.meta)
            for n in reads[name]:
                n.replace_all_uses_with(view)
                graph.erase_node(n)


def _whole(t: torch.Tensor) -> bool:
    """``t`` holds its whole memory, dense in a memory format: a clone of it is laid alike."""
    formats = [torch.contiguous_format] + {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(t.dim(), [])
    whole = t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    return bool(whole and any(t.is_contiguous(memory_format=f) for f in formats))


def _position(graph: torch.fx.Graph) -> Callable[[torch.fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
