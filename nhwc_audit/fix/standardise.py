"""The ``standardise-weight`` rewrite: a convolution weight standardised in forward through a
reshape to (1, O, -1), ``F.batch_norm`` with batch statistics and a ``reshape_as`` back (timm's
StdConv2d and ScaledStdConv2d in NFNets, BiT, ResNetV2) becomes the same standardisation over
dims (1, 2, 3) with ``keepdim``: ``(w - w.mean(...)) * rsqrt(w.var(..., correction=0) + eps)``,
times the batch norm's weight and plus its bias as ``(O, 1, 1, 1)`` views. The reshape copies a
channels_last weight into NCHW order on every call and the convolution re-lays the result; the
reductions keep the weight's strides, and nothing moves. ``F.batch_norm`` in training normalises
each channel of (1, O, K) over its K elements with the biased variance: the same numbers up to
rounding, which the repair's check compares in float64."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["standardisation"]


def _arg(n: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


def _chain(reshape: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """(weight, batch_norm, reshape_as) when ``reshape`` starts a standardisation, else None."""
    if reshape.op != "call_method" or reshape.target != "reshape" or len(reshape.users) != 1:
        return None
    weight, *shape = reshape.args
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    if len(shape) != 3 or shape[0] != 1 or shape[2] != -1:
        return None
    norm = next(iter(reshape.users))
    if norm.op != "call_function" or norm.target is not F.batch_norm or norm.args[:1] != (reshape,):
        return None
    stats = (_arg(norm, 1, "running_mean", None), _arg(norm, 2, "running_var", None))
    if stats != (None, None) or _arg(norm, 5, "training", False) is not True or len(norm.users) != 1:
        return None
    back = next(iter(norm.users))
    if back.op != "call_method" or back.target != "reshape_as" or back.args != (norm, weight):
        return None
    return weight, norm, back


def standardisation(gm: torch.fx.GraphModule, name: str) -> bool:
    """Is the node ``name`` of ``gm`` the reshape of a weight standardisation this rewrite takes?"""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    return node is not None and _chain(node) is not None


def standardise(gm: torch.fx.GraphModule, name: str) -> None:
    """Rewrite the standardisation that starts at the reshape ``name`` (:func:`standardisation`)."""
    reshape = next(n for n in gm.graph.nodes if n.name == name)
    found = _chain(reshape)
    assert found is not None
    weight, norm, back = found
    rank = gm.get_parameter(str(weight.target)).dim() if isinstance(weight.target, str) else 4
    dims = tuple(range(1, rank))
    ones = (1,) * (rank - 1)
    eps = _arg(norm, 7, "eps", 1e-5)
    scale, shift = _arg(norm, 3, "weight", None), _arg(norm, 4, "bias", None)
    g = gm.graph
    with g.inserting_before(back):
        mean = g.call_method("mean", (weight,), {"dim": dims, "keepdim": True})
        var = g.call_method("var", (weight,), {"dim": dims, "correction": 0, "keepdim": True})
        inv = g.call_function(torch.rsqrt, (g.call_function(operator.add, (var, eps)),))
        out = g.call_function(operator.mul, (g.call_function(operator.sub, (weight, mean)), inv))
        if scale is not None:
            out = g.call_function(operator.mul, (out, g.call_method("view", (scale, -1, *ones))))
        if shift is not None:
            out = g.call_function(operator.add, (out, g.call_method("view", (shift, -1, *ones))))
    back.replace_all_uses_with(out)
    for n in (back, norm, reshape):
        g.erase_node(n)
