"""The repaired graph runs forward's ``torch.no_grad()`` and ``torch.autocast(...)`` blocks as
forward does.

torch.fx records the ops of such a block and not the block. A GraphModule run with autograd
builds a backward through the ops of a ``with torch.no_grad():`` block (or after
``torch.set_grad_enabled(False)``): a model repaired from such a trace trained on gradients the
model never has (a scale computed under ``no_grad`` from a conv's output sent its gradient into
the conv: 84.6 against 2.8e-05). Run under autocast, it computes a head the model keeps in
float32 (``torch.autocast(..., enabled=False)``) in the autocast dtype. The trace marks each node
made inside such blocks (:data:`~nhwc_audit.capture.context.NO_GRAD_KEY`,
:data:`~nhwc_audit.capture.context.AUTOCAST_KEY`); here each run of them is put between nodes
that enter the block and leave it (autograd back to what it was, not on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from ..capture.context import AUTOCAST_KEY, NO_GRAD_KEY

__all__ = ["keep_blocks"]


def keep_blocks(graph: torch.fx.Graph) -> int:
    """Put forward's gradient-off and autocast blocks back around the nodes traced inside them;
    the number of runs of nodes put inside one. Idempotent: a graph that has such nodes is left."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    if any(n.target in (torch._C._set_grad_enabled, _enter_autocast) for n in nodes):
        return 0
    grad = _runs(nodes, lambda n: bool(n.meta.get(NO_GRAD_KEY)))
    for first, last, _ in grad:
        with graph.inserting_before(first):
            prev = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (False,))
        with graph.inserting_before(last.next):
            graph.call_function(torch._C._set_grad_enabled, (prev,))
    casts = _runs(nodes, lambda n: n.meta.get(AUTOCAST_KEY, ()))
    for first, last, blocks in casts:
        with graph.inserting_before(first):
            entered = [graph.call_function(_enter_autocast, tuple(b)) for b in blocks]
        with graph.inserting_before(last.next):
            for mode in reversed(entered):
                graph.call_function(_exit_autocast, (mode,))
    return len(grad) + len(casts)


def _runs(
    nodes: list[torch.fx.Node], key: Callable[[torch.fx.Node], Any]
) -> list[tuple[torch.fx.Node, torch.fx.Node, Any]]:
    """The maximal runs of consecutive ``nodes`` with one truthy ``key``: (first, last, key)."""
    runs: list[tuple[torch.fx.Node, torch.fx.Node, Any]] = []
    i = 0
    while i < len(nodes):
        k = key(nodes[i])
        if not k:
            i += 1
            continue
        j = i
        while j + 1 < len(nodes) and key(nodes[j + 1]) == k:
            j += 1
        runs.append((nodes[i], nodes[j], k))
        i = j + 1
    return runs
