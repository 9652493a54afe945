"""torch.export's blocks, inlined. Export turns forward's ``torch.no_grad()`` / ``set_grad_enabled``
and ``torch.autocast`` blocks into one higher-order node each (``wrap_with_set_grad_enabled``,
``wrap_with_autocast``) that calls a submodule's graph. The audit reads layouts per node: such a
node is one op to it, named after the wrapper, with no source line, whose inner copies are lost
or netted whole (timm's efficientvit at batch 2: 98,304 B where eager moves 294,912). Its nodes
are put back in the graph (:func:`inline_blocks`), each noted with the block it ran in, as the
fx tracer notes them (:data:`~.context.NO_GRAD_KEY`, :data:`~.context.AUTOCAST_KEY`); the
propagation enters those blocks per node (:func:`~nhwc_audit.propagate.breaks.as_traced`)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .context import AUTOCAST_KEY, FUNCTION_KEY, GRAD_ON_KEY, NO_GRAD_KEY

__all__ = ["inline_blocks"]


def _blocks() -> dict[Any, int]:
    """The block wrappers, by where their submodule argument is."""
    hop = torch.ops.higher_order
    return {hop.wrap_with_set_grad_enabled: 1, hop.wrap_with_autocast: 4}


def inline_blocks(gm: torch.fx.GraphModule) -> bool:
    """Inline every block of ``gm``'s graph (nested ones too); True when there was one."""
    wrappers, found = _blocks(), False
    while blocks := [n for n in gm.graph.nodes if n.op == "call_function" and n.target in wrappers]:
        found = True
        for n in blocks:
            _inline(gm, n, wrappers[n.target])
    if found:
        gm.graph.lint()
        gm.recompile()
    return found


def _inline(gm: torch.fx.GraphModule, n: torch.fx.Node, at: int) -> None:
    sub_node = n.args[at]
    assert isinstance(sub_node, torch.fx.Node) and sub_node.op == "get_attr"
    sub = gm.get_submodule(str(sub_node.target))
    assert isinstance(sub, torch.fx.GraphModule)
    env: dict[torch.fx.Node, Any] = {}
    operands = iter(n.args[at + 1 :])
    outs: Any = ()
    with gm.graph.inserting_before(n):
        for sn in sub.graph.nodes:
            if sn.op == "placeholder":
                env[sn] = next(operands)
                continue
            if sn.op == "output":
                outs = sn.args[0]
                continue
            new = gm.graph.node_copy(sn, lambda a: env[a])
            if sn.op == "get_attr":  # a nested block's submodule, or a constant: held by the root now
                new.target = _held(gm, sub, str(sn.target), f"{sub_node.target}_{sn.target}")
            _note(new, n, at)
            env[sn] = new
    results = [
        env[o] if isinstance(o, torch.fx.Node) else o for o in (outs if isinstance(outs, (list, tuple)) else [outs])
    ]
    for user in list(n.users):
        assert user.target is operator.getitem, user.format_node()
        user.replace_all_uses_with(results[user.args[1]])  # type: ignore[index]
        gm.graph.erase_node(user)
    gm.graph.erase_node(n)
    if not sub_node.users:
        gm.graph.erase_node(sub_node)
        gm.delete_submodule(str(sub_node.target))


def _held(gm: torch.fx.GraphModule, sub: torch.nn.Module, target: str, name: str) -> str:
    """``sub``'s attribute ``target`` set on ``gm`` under a fresh name made from ``name``."""
    value: Any = sub
    for part in target.split("."):
        value = getattr(value, part)
    base = fresh = name.replace(".", "_")
    i = 0
    while hasattr(gm, fresh):
        i += 1
        fresh = f"{base}_{i}"
    if isinstance(value, torch.nn.Module):
        gm.add_submodule(fresh, value)
    else:
        setattr(gm, fresh, value)
    return fresh


def _note(new: torch.fx.Node, block: torch.fx.Node, at: int) -> None:
    """Note on ``new``, a node of ``block``'s body, the blocks it runs in: the wrapper's own (``block``
    may itself be inlined from an outer one, and carries that one's notes)."""
    if AUTOCAST_KEY in block.meta and AUTOCAST_KEY not in new.meta:
        new.meta[AUTOCAST_KEY] = block.meta[AUTOCAST_KEY]
    if NO_GRAD_KEY in block.meta and NO_GRAD_KEY not in new.meta:
        new.meta[NO_GRAD_KEY] = block.meta[NO_GRAD_KEY]
    if at == 1:  # set_grad_enabled(enabled): unless a Function's forward made the node (its mode is the Function's)
        function = new.meta.get(FUNCTION_KEY)
        # (export's block is wrong where the code ran with grad on: :data:`~.context.GRAD_ON_KEY`)
        new.meta[NO_GRAD_KEY] = not (function[0] if function else bool(block.args[0]) or GRAD_ON_KEY in new.meta)
    else:
        device, dtype, on, cache = block.args[:4]
        new.meta[AUTOCAST_KEY] = (*block.meta.get(AUTOCAST_KEY, ()), (str(device), dtype, bool(on), bool(cache)))
