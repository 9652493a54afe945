"""The ``softmax-nhwc`` rewrite: a softmax (or log-softmax) over the channels of a 4D/5D tensor
runs over the last dim of its (N, H, W, C) permutation, a view of a channels_last tensor, and is
permuted back (a view again): the same values, no transpose. It matches the calls fx records
(``x.softmax(1)``, ``torch.softmax(x, 1)``, ``F.softmax(x, dim=1)``) and the modules
(``nn.Softmax(dim=1)``, ``nn.LogSoftmax(dim=1)``, ``nn.Softmax2d()``, whose dim is -3)."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.fx.node import Argument
from torch.nn import functional as F

__all__ = ["softmax_last", "softmax_over_channels"]

_FUNCS = {"softmax", "log_softmax"}
_ORDER = {
    "x.softmax": ("dim", "dtype"),
    "torch.softmax": ("dim", "dtype"),
    "F.softmax": ("dim", "_stacklevel", "dtype"),
}
"""The positional arguments after the input, by how a softmax is called (fx records
``F.softmax(x, dim=1)`` as a call of ``F.softmax`` with ``_stacklevel`` among them)."""


def _call(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, Argument, Argument] | None:
    """(method, dim, dtype) of a softmax/log_softmax node; None for another node or call."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if type(m) is nn.Softmax2d:
            return "softmax", -3, None
        dim = getattr(m, "dim", None)
        if type(m) in (nn.Softmax, nn.LogSoftmax) and len(node.args) == 1 and not node.kwargs:
            # dim=None: torch's implicit choice, dim 1 of a 4D or 5D input
            return ("softmax" if type(m) is nn.Softmax else "log_softmax"), 1 if dim is None else int(dim), None
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in _FUNCS or node.op not in ("call_method", "call_function"):
        return None
    if node.op == "call_method":
        order = _ORDER["x.softmax"]
    elif node.target in (torch.softmax, torch.log_softmax):
        order = _ORDER["torch.softmax"]
    elif node.target in (F.softmax, F.log_softmax):
        order = _ORDER["F.softmax"]
    else:
        return None
    if len(node.args) > 1 + len(order) or not set(node.kwargs) <= set(order):
        return None
    given = {**dict(zip(order, node.args[1:], strict=False)), **node.kwargs}
    return str(name), given.get("dim"), given.get("dtype")


def softmax_over_channels(gm: torch.fx.GraphModule, node: torch.fx.Node, rank: int) -> bool:
    """``node`` is a softmax over dim 1 of a tensor of ``rank`` (4 or 5)."""
    call = _call(gm, node) if rank in (4, 5) else None
    return call is not None and isinstance(call[1], int) and call[1] % rank == 1


def softmax_last(gm: torch.fx.GraphModule, *, name: str, rank: int) -> None:
    """Rewrite the softmax node ``name`` (:func:`softmax_over_channels`) over the last dim of its
    input permuted channels-last, permuted back."""
    n = next(node for node in gm.graph.nodes if node.name == name)
    call = _call(gm, n)
    assert call is not None
    with gm.graph.inserting_before(n):
        p = gm.graph.call_method("permute", (n.args[0], 0, *range(2, rank), 1))
        s = gm.graph.call_method(call[0], (p,), {"dim": -1, "dtype": call[2]})
        back = gm.graph.call_method("permute", (s, 0, rank - 1, *range(1, rank - 1)))
    n.replace_all_uses_with(back)
    gm.graph.erase_node(n)
