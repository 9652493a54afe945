"""Activation checkpointing kept in a repaired graph. A torch.fx graph records the ops of a
``torch.utils.checkpoint`` call's function, not the checkpoint: run as it is, a repaired model
would keep every activation of those blocks for its backward (the memory checkpointing saved) and
recompute none. Each block is outlined (:mod:`~nhwc_audit.capture.outline`) and run by
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; the repaired model's ``state_dict``
keeps the model's keys."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx

from ..capture.blocks import checkpoint_count
from ..capture.context import CHECKPOINT_KEY, reentrant
from ..capture.outline import outlined

__all__ = ["with_checkpoints"]


def with_checkpoints(
    gm: torch.fx.GraphModule, same: Callable[[torch.fx.GraphModule], bool]
) -> tuple[torch.fx.GraphModule, str | None]:
    """``gm`` with the checkpoints its capture saw put back, and a note for the repair's log (None
    where it has none). ``same``: whether a graph computes what ``gm`` computes (outputs and
    gradients on the sample); a graph that does not, or cannot be built, is not handed back: then
    ``gm`` and a note that says so."""
    count = checkpoint_count(gm.graph)
    if not count:
        return gm, None
    try:
        new = outlined(gm, variant=False)
        ok = same(new)
    except Exception as e:  # noqa: BLE001 (any failure keeps the flat graph, said in the log)
        ok, why = False, f": {type(e).__name__}: {e}"
    else:
        why = ": it did not compute what the graph computes"
    blocks = f"{count} torch.utils.checkpoint block{'s' if count != 1 else ''}"
    if ok:
        any_reentrant = any(reentrant(k) for n in gm.graph.nodes for k in n.meta.get(CHECKPOINT_KEY, ()))
        how = "; the reentrant ones as non-reentrant, torch's recommended form" if any_reentrant else ""
        return new, (
            f"{blocks} kept: each runs under torch.utils.checkpoint(use_reentrant=False) with the model's own "
            f"arguments (a selective checkpoint's policy){how}"
        )
    return gm, (
        f"{blocks} not kept{why}; the repaired graph runs them without checkpointing (their activations are kept "
        "for backward): checkpoint the repaired model's blocks yourself, or repair each block"
    )
