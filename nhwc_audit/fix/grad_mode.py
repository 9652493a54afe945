"""The repaired graph runs forward's ``torch.no_grad()`` blocks as forward does.

torch.fx records the ops of a ``with torch.no_grad():`` block (or after ``torch.set_grad_enabled(False)``)
and not the block: a GraphModule run with autograd builds a backward through them, and a model
repaired from such a trace trained on gradients the model never has (a scale computed under
``no_grad`` from a conv's output sent its gradient into the conv: 2.8e-05 against 84.6). The trace
marks each node made inside such a block (:data:`~nhwc_audit.capture.context.NO_GRAD_KEY`); here
each run of them is put between nodes that turn autograd off and back to what it was.
"""

from __future__ import annotations

import torch
import torch.fx

from ..capture.context import NO_GRAD_KEY

__all__ = ["keep_grad_mode"]

_NOT_RUN = ("placeholder", "output")


def keep_grad_mode(graph: torch.fx.Graph) -> int:
    """Put each run of nodes traced inside a gradient-off block of forward between
    ``prev = torch.is_grad_enabled(); torch._C._set_grad_enabled(False)`` and
    ``torch._C._set_grad_enabled(prev)`` (so that a model run under ``torch.no_grad()`` stays
    so); the number of runs. Nodes made for the block once are left alone: this is idempotent."""
    nodes = [n for n in graph.nodes if n.op not in _NOT_RUN]
    if any(n.target is torch._C._set_grad_enabled for n in nodes):
        return 0
    runs: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    i = 0
    while i < len(nodes):
        if not nodes[i].meta.get(NO_GRAD_KEY):
            i += 1
            continue
        j = i
        while j + 1 < len(nodes) and nodes[j + 1].meta.get(NO_GRAD_KEY):
            j += 1
        runs.append((nodes[i], nodes[j]))
        i = j + 1
    for first, last in runs:
        with graph.inserting_before(first):
            prev = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (False,))
        with graph.inserting_after(last):
            graph.call_function(torch._C._set_grad_enabled, (prev,))
    return len(runs)
