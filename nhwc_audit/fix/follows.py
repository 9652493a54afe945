"""A rewrite that saves nothing alone but exposes one that does: together they remove bytes.

Replacing an InstanceNorm by a GroupNorm keeps channels_last, and a ``.contiguous()`` after it then
copies the map back into NCHW (where InstanceNorm's NCHW output made it a no-op): alone the norm's
rewrite moves the revert one node on, and the ``.contiguous()`` has no rewrite until the norm keeps
channels_last. :func:`exposed_pair` tries, on a candidate's trial graph, each candidate that was not
there before, and keeps the first that removes bytes with it (the repair keeps the two as one step).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch.fx

from ..records import Summary
from .islands import rewritten_nodes
from .measure import Measured
from .rewrites import PRIORITY, Candidate, candidates, rewritable_copy

__all__ = ["exposed_pair"]


def exposed_pair(
    cand: Candidate,
    trial: torch.fx.GraphModule,
    measured: Measured,
    seen: Collection[tuple[str, str]],
    before: Summary,
    measure: Callable[[torch.fx.GraphModule, Measured, Any], Measured],
) -> tuple[Candidate, torch.fx.GraphModule, Measured] | None:
    """``cand`` and a rewrite its ``trial`` graph (``measured``) exposes, as one candidate, with their
    graph and measurement, where together they move fewer bytes than the graph without them
    (``before``) and raise no more often; None where no new candidate (not among ``seen``: (node,
    kind)) does. ``measure(graph, base, changed)``: a graph measured from its nodes ``changed`` on."""
    new = [c for c in candidates(trial, measured.records, measured.analysis) if (c.node, c.kind) not in seen]
    for follow in sorted(new, key=lambda c: PRIORITY.index(c.kind)):
        both = rewritable_copy(trial)
        try:
            follow.apply(both)
            both.graph.lint()
            got = measure(both, measured, rewritten_nodes(both, trial))
        except Exception:
            continue
        summary = got.analysis.summary
        if summary.bytes_moved < before.bytes_moved and summary.breaks <= before.breaks:
            pair = Candidate(
                cand.node,
                cand.kind,
                f"{cand.reason}; with {follow.kind} at {follow.node}: {follow.reason}",
                _both(cand, follow),
            )
            return pair, both, got
    return None


def _both(first: Candidate, then: Candidate) -> Callable[[torch.fx.GraphModule], None]:
    def apply(gm: torch.fx.GraphModule) -> None:
        first.apply(gm)
        then.apply(gm)

    return apply
