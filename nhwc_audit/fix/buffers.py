"""A repaired model reads the views forward makes of its buffers through the buffers.

torch's Tracer runs what forward computes from a buffer and stows the result as a tensor of the
graph's own (``_tensor_constant0``): torchvision MaxViT's ``self.relative_position_index.view(-1)``,
a scale buffer viewed to broadcast. In a repaired model those were state of its own: its state_dict
had keys the model's has not (22 for maxvit_t), a strict ``load_state_dict`` of the model's weights
raised, and one not strict left the old values in use. The trace marks each such constant
(:data:`~nhwc_audit.capture.constants.BUFFER_VIEW_KEY`); here it is read from its buffer again, the
same view of the same memory (a buffer is not a map, which the conversion would restride)."""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..capture.constants import BUFFER_VIEW_KEY

__all__ = ["read_through"]


def read_through(graph: torch.fx.Graph) -> bool:
    """Read each stowed view of a buffer in ``graph`` through the buffer; True when the graph changed
    (a GraphModule made of it then holds the buffers, and no longer the constants)."""
    changed = False
    for n in list(graph.nodes):
        view = n.meta.get(BUFFER_VIEW_KEY) if n.op == "get_attr" else None
        if view is None:
            continue
        name, shape, stride, offset = view
        with graph.inserting_before(n):
            held = graph.create_node("get_attr", name)  # (owned by the GraphModule made after)
            own = graph.call_method("storage_offset", (held,))
            start = graph.call_function(operator.add, (own, offset))
            read = graph.call_method("as_strided", (held, shape, stride, start))
        read.meta.update({k: v for k, v in n.meta.items() if k != BUFFER_VIEW_KEY})
        for made in (held, own, start):
            made.meta.update(read.meta)
        n.replace_all_uses_with(read)
        graph.erase_node(n)
        changed = True
    return changed
