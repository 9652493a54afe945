"""The dims a reduction reduces, read from its call's arguments (a graph node's or an ATen op's):
what tells whether it reads its input across orders (:func:`~nhwc_audit.analyze.reductions.reduces_across`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REDUCTIONS", "reduced_dims"]


REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "prod", "nansum", "nanmean", "logsumexp"})
"""Reductions whose second argument (or ``dim=``) names the dims they reduce, as torch and ATen call them."""


def reduced_dims(op: str, args: Any, kwargs: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The dims a :data:`REDUCTIONS` call reduces, from 0 (``x.sum(-1)`` of a 5D tensor: (4,)); None for
    another op, a reduction over every dim, or arguments not read here."""
    if op not in REDUCTIONS or not args or not hasattr(args[0], "dim"):
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dims = (dim,) if type(dim) is int else tuple(dim) if isinstance(dim, (tuple, list)) else ()
    rank = args[0].dim()
    if not dims or not rank or not all(type(d) is int and -rank <= d < rank for d in dims):
        return None
    return tuple(sorted({d % rank for d in dims}))
