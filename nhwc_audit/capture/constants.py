"""Tensor constants of an fx trace: those that are views of buffers, marked; those the graph writes
in place, made fresh in each run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .proxies import written_operand

__all__ = ["BUFFER_VIEW_KEY", "buffer_view", "fresh_constants"]


_CONSTANT = "_tensor_constant"
"""The prefix of the root attributes the tracer stows a tensor forward made in (:meth:`_Tracer._constant`)."""


BUFFER_VIEW_KEY = "nhwc_audit_buffer_view"
"""Node meta of a constant that is a view of one of the root's buffers but a map: (the buffer's name,
the view's shape, strides and storage offset from the buffer's), :func:`buffer_view`."""


def buffer_view(a: torch.Tensor, buffer_name: Callable[[torch.Tensor], str | None]) -> tuple[Any, ...] | None:
    """Where ``a`` is a view forward made of one of the root's buffers but a map (MaxViT's
    ``self.relative_position_index.view(-1)``; ``buffer_name``: its name in the root, or None):
    the buffer's name, the view's shape, strides and storage offset. torch's Tracer runs what forward
    computes from a buffer and stows the result, a tensor of the graph's own: the audit reads it as
    torch's graph does, a repaired model through its buffer (:func:`~nhwc_audit.fix.buffers.read_through`).
    A map (4D/5D) buffer is traced, or, where forward reads its values in Python, stowed as traced."""
    base = a._base
    if not isinstance(base, torch.Tensor) or base.dim() in (4, 5) or (name := buffer_name(base)) is None:
        return None
    # the offset from the buffer's own: the repaired model's buffer may start elsewhere in its storage
    return name, tuple(a.shape), a.stride(), a.storage_offset() - base.storage_offset()


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
