"""The dims a reduction reduces, read from its call's arguments (a graph node's or an ATen op's):
what tells whether it reads its input across orders (:func:`~nhwc_audit.analyze.reductions.reduces_across`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REDUCTIONS", "reduced_dims"]


_DIM_AT: dict[str, int] = {
    **dict.fromkeys(
        (
            "sum",
            "mean",
            "amax",
            "amin",
            "prod",
            "nansum",
            "nanmean",
            "logsumexp",
            "std",
            "var",
            "std_mean",
            "var_mean",
            "max",
            "min",
            "median",
            "nanmedian",
            "mode",
            "argmax",
            "argmin",
            "any",
            "all",
            "count_nonzero",
        ),
        1,
    ),
    **dict.fromkeys(("norm", "linalg_vector_norm", "linalg_norm", "kthvalue"), 2),
    "aminmax": -1,  # by keyword only
}
"""Where a reduction's ``dim`` is among its positional arguments, as torch and ATen call it
(``x.std(1)``; ``torch.norm(x, p, dim)``, ``kthvalue(x, k, dim)``); ``dim=`` is read for every one.
Not ``quantile``: a graph's one node for a sort, gathers and a lerp, whose moves its kept dims' order
does not tell (a cost volume's: 106,496 B in eager, 65,536 by that order; the layout rule says 106,496)."""

_DEFAULT_DIM = {"kthvalue": -1, "mode": -1}
"""A ``dim`` left at its default (``x.kthvalue(k)``; ATen is not passed it)."""

REDUCTIONS = frozenset(_DIM_AT)
"""Reductions that name the dims they reduce (``dim``), as torch and ATen call them."""


def reduced_dims(op: str, args: Any, kwargs: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The dims a :data:`REDUCTIONS` call reduces, from 0 (``x.sum(-1)`` of a 5D tensor: (4,)); None for
    another op, a reduction over every dim, or arguments not read here (``max(a, b)`` of two tensors, the
    boolean ``unbiased`` of ``x.std(True)``)."""
    at = _DIM_AT.get(op)
    if at is None or not args or not hasattr(args[0], "dim"):
        return None
    dim = kwargs.get("dim", args[at] if 0 < at < len(args) else _DEFAULT_DIM.get(op))
    dims = (dim,) if type(dim) is int else tuple(dim) if isinstance(dim, (tuple, list)) else ()
    rank = args[0].dim()
    if not dims or not rank or not all(type(d) is int and -rank <= d < rank for d in dims):
        return None
    return tuple(sorted({d % rank for d in dims}))
