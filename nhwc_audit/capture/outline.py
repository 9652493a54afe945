"""Activation checkpoints put back into a captured graph. A torch.fx graph records the ops of a
``torch.utils.checkpoint`` call's function, not the checkpoint. Each block the capture saw
(:data:`~.context.CHECKPOINT_KEY`) is outlined into a small GraphModule of its own that
``torch.utils.checkpoint.checkpoint`` runs with the checkpoint's own arguments, nested checkpoints
inside it.
The outlined graph holds no parameters and no modules: the modules its nodes call and the tensors
they read come in as arguments, so the outer graph's ``state_dict`` keeps its keys. Each node
copied into a block keeps the name of the node it copies (:data:`ORIGIN_KEY`). Used by the repair
(the repaired model keeps the model's checkpoints) and by a train audit, which counts how many
times a training step runs each node (:mod:`~nhwc_audit.propagate.recompute`)."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn

from .context import CHECKPOINT_KEY, CHECKPOINT_OPTIONS_KEY, reentrant

__all__ = ["CHECKPOINTED", "ORIGIN_KEY", "Block", "outlined"]

ORIGIN_KEY = "nhwc_audit_origin"
"""Set on a node copied into an outlined block: the name of the captured graph's node it copies."""

Block = Callable[[torch.fx.GraphModule], nn.Module]
"""What runs an outlined block's GraphModule (the repair: the GraphModule itself)."""

CHECKPOINTED = "checkpointed"
"""The name (with a number) of each outlined block's GraphModule in the repaired model."""


def _region(n: torch.fx.Node, depth: int) -> int | None:
    open_ = n.meta.get(CHECKPOINT_KEY, ())
    return open_[depth] if len(open_) > depth else None


def _spans(graph: torch.fx.Graph, depth: int) -> list[tuple[int, list[torch.fx.Node]]]:
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
        spans.append((k, [n for n in nodes if n.op != "get_attr"]))
    return spans


def _outside(inside: set[torch.fx.Node]) -> Callable[[torch.fx.Node], bool]:
    return lambda u: u not in inside


_LITERALS = (bool, int, float, str, type(None))


def _outline(
    owner: nn.Module, graph: torch.fx.Graph, depth: int, counter: list[int], block: Block, variant: bool
) -> None:
    """Replace each block at ``depth`` of ``graph`` (``owner``'s) by a checkpoint call of a
    GraphModule registered on ``owner`` (run by what ``block`` makes of it), with the checkpoint's
    own arguments (:data:`~.context.CHECKPOINT_OPTIONS_KEY`: a selective checkpoint's policy); a
    reentrant one stays reentrant where ``variant``, else it runs non-reentrant."""
    for k, span in _spans(graph, depth):
        marked = next(n for n in span if _region(n, depth) == k)
        options = marked.meta.get(CHECKPOINT_OPTIONS_KEY, {}).get(k, {})
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
            origin = n.meta.get(ORIGIN_KEY, n.name)
            if n.op == "call_module":
                args = tuple(torch.fx.node.map_arg(n.args, env.__getitem__))
                kwargs = dict(torch.fx.node.map_arg(n.kwargs, env.__getitem__))
                env[n] = sub.call_method("__call__", (held[str(n.target)], *args), kwargs)
                env[n].meta = copy.copy(n.meta)
            else:
                env[n] = sub.node_copy(n, env.__getitem__)
            env[n].meta[ORIGIN_KEY] = origin
        sub.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
        holder = nn.Module()
        _outline(holder, sub, depth + 1, counter, block, variant)
        counter[0] += 1
        name = f"{CHECKPOINTED}_{counter[0]}"
        owner.add_module(name, block(torch.fx.GraphModule(holder, sub, "Checkpointed")))
        with graph.inserting_before(span[-1].next):  # (every input is before it: outside, or a get_attr inside)
            refs = [graph.get_attr(m) for m in modules]
            asked: dict[str, torch.fx.node.Argument] = {"use_reentrant": reentrant(k) and variant}
            for opt, value in options.items():  # (a value no literal writes: an attribute of the owner)
                if not isinstance(value, _LITERALS):
                    setattr(owner, f"{name}_{opt}", value)
                    with warnings.catch_warnings():  # (fx warns of a get_attr of no module, parameter or buffer)
                        warnings.simplefilter("ignore")
                        value = graph.get_attr(f"{name}_{opt}")
                asked[opt] = value
            call = graph.call_function(torch.utils.checkpoint.checkpoint, (graph.get_attr(name), *inputs, *refs), asked)
            results = (
                [call]
                if len(outputs) == 1
                else [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
            )
        for o, r in zip(outputs, results, strict=True):
            o.replace_all_uses_with(r, delete_user_cb=_outside(inside))
        for n in reversed(span):
            graph.erase_node(n)


def outlined(gm: torch.fx.GraphModule, block: Block | None = None, variant: bool = True) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its modules and tensors) whose checkpointed blocks run under
    ``torch.utils.checkpoint`` again, each with its own arguments (``variant``: a reentrant one
    stays reentrant); raises where the blocks cannot be outlined."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    _outline(new, new.graph, 0, [0], block or (lambda g: g), variant)
    new.graph.lint()
    new.recompile()
    return new
