"""Activation checkpointing kept in a repaired graph. A torch.fx graph records the ops of a
``torch.utils.checkpoint`` call's function, not the checkpoint: run as it is, a repaired model
would keep every activation of those blocks for its backward (the memory checkpointing saved) and
recompute none. Each block the capture saw (:data:`~nhwc_audit.capture.context.CHECKPOINT_KEY`) is
outlined into a small GraphModule of its own that ``torch.utils.checkpoint.checkpoint`` runs
(``use_reentrant=False``), nested checkpoints inside it. The outlined graph holds no parameters and
no modules: the modules its nodes call and the tensors they read come in as arguments, so the
repaired model's ``state_dict`` keeps the model's keys."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn

from ..capture.blocks import checkpoint_count
from ..capture.context import CHECKPOINT_KEY

__all__ = ["CHECKPOINTED", "with_checkpoints"]

CHECKPOINTED = "checkpointed"
"""The name (with a number) of each outlined block's GraphModule in the repaired model."""


def _region(n: torch.fx.Node, depth: int) -> int | None:
    open_ = n.meta.get(CHECKPOINT_KEY, ())
    return open_[depth] if len(open_) > depth else None


def _spans(graph: torch.fx.Graph, depth: int) -> list[list[torch.fx.Node]]:
    """Each outermost block at ``depth``: its nodes from the first the capture saw in it to the
    last, with the nodes the repair put between them (and no get_attr: those stay outside)."""
    order = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    firsts: dict[int, int] = {}
    lasts: dict[int, int] = {}
    for i, n in enumerate(order):
        if (k := _region(n, depth)) is not None:
            firsts.setdefault(k, i)
            lasts[k] = i
    spans = []
    for k in sorted(firsts, key=firsts.__getitem__):
        nodes = order[firsts[k] : lasts[k] + 1]
        if any(_region(n, depth) not in (k, None) for n in nodes):
            raise ValueError("checkpointed blocks interleave")
        spans.append([n for n in nodes if n.op != "get_attr"])
    return spans


def _outside(inside: set[torch.fx.Node]) -> Callable[[torch.fx.Node], bool]:
    return lambda u: u not in inside


def _outline(owner: nn.Module, graph: torch.fx.Graph, depth: int, counter: list[int]) -> None:
    """Replace each block at ``depth`` of ``graph`` (``owner``'s) by a checkpoint call of a
    GraphModule registered on ``owner``."""
    for span in _spans(graph, depth):
        inside = set(span)
        inputs: dict[torch.fx.Node, None] = {}
        modules: dict[str, None] = {}
        for n in span:
            inputs.update((a, None) for a in n.all_input_nodes if a not in inside)
            if n.op == "call_module":
                modules[str(n.target)] = None
        outputs = [n for n in span if any(u not in inside for u in n.users)]
        sub = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {a: sub.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
        held = {m: sub.placeholder(f"module_{i}") for i, m in enumerate(modules)}
        for n in span:
            if n.op == "call_module":
                args = tuple(torch.fx.node.map_arg(n.args, env.__getitem__))
                kwargs = dict(torch.fx.node.map_arg(n.kwargs, env.__getitem__))
                env[n] = sub.call_method("__call__", (held[str(n.target)], *args), kwargs)
                env[n].meta = copy.copy(n.meta)
            else:
                env[n] = sub.node_copy(n, env.__getitem__)
        sub.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
        holder = nn.Module()
        _outline(holder, sub, depth + 1, counter)
        counter[0] += 1
        name = f"{CHECKPOINTED}_{counter[0]}"
        owner.add_module(name, torch.fx.GraphModule(holder, sub, "Checkpointed"))
        with graph.inserting_before(span[-1].next):  # (every input is before it: outside, or a get_attr inside)
            refs = [graph.get_attr(m) for m in modules]
            call = graph.call_function(
                torch.utils.checkpoint.checkpoint,
                (graph.get_attr(name), *inputs, *refs),
                {"use_reentrant": False},
            )
            results = (
                [call]
                if len(outputs) == 1
                else [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
            )
        for o, r in zip(outputs, results, strict=True):
            o.replace_all_uses_with(r, delete_user_cb=_outside(inside))
        for n in reversed(span):
            graph.erase_node(n)


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
        new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
        _outline(new, new.graph, 0, [0])
        new.graph.lint()
        new.recompile()
        ok = same(new)
    except Exception as e:  # noqa: BLE001 (any failure keeps the flat graph, said in the log)
        ok, why = False, f": {type(e).__name__}: {e}"
    else:
        why = ": it did not compute what the graph computes"
    blocks = f"{count} torch.utils.checkpoint block{'s' if count != 1 else ''}"
    if ok:
        return new, f"{blocks} kept: each runs under torch.utils.checkpoint(use_reentrant=False) as before"
    return gm, (
        f"{blocks} not kept{why}; the repaired graph runs them without checkpointing (their activations are kept "
        "for backward): checkpoint the repaired model's blocks yourself, or repair each block"
    )
