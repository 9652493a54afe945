"""What a failed torch.fx trace tells the user: what forward does that a symbolic trace cannot
follow, and what audits such a model instead."""

from __future__ import annotations

__all__ = ["RECORDED", "WHY", "unexportable", "untraceable"]

WHY = (
    ("item assignment", "fx cannot record an item assignment, x[...] = y"),
    ("cannot be iterated", "forward iterates over a traced value: an input list or *args, a shape unpacked"),
    ("control flow", "forward branches on a traced value: an if or assert on a shape or a tensor"),
    ("'len' is not supported", "forward calls len() on a traced value"),
    ("Proxy(", "forward uses a traced value as a Python one: a dict key, a shape in a Python list"),
)
"""What torch.fx's error says forward does that a symbolic trace cannot follow (first match)."""


RECORDED = "capture 'hooks' or 'auto', the default, records it from an eager run"
"""What audits a model torch.fx cannot trace."""


def untraceable(msg: str, *, audit: bool = True) -> str:
    """The hint for a failed trace whose error reads ``msg``: what forward does, and what audits it
    (``audit``) or what makes it traceable."""
    what = next((why for key, why in WHY if key in msg), "data-dependent control flow or non-torch calls in forward")
    return (
        f"{what}; {RECORDED} (or wrap that code in torch.fx.wrap)"
        if audit
        else f"{what}; wrap that code in torch.fx.wrap"
    )


_DATA_DEPENDENT = ("data-dependent", "DataDependent", "DynamicOutputShape", "unbacked")
"""What torch.export's error says where forward's shapes or branches depend on tensor values."""


def unexportable(msg: str, *, audit: bool = True) -> str:
    """The hint for a failed torch.export capture whose error reads ``msg`` (its type's name first):
    what forward does, and what audits it (``audit``)."""
    if any(key in msg for key in _DATA_DEPENDENT):
        what = "forward's shapes or branches depend on tensor values (nonzero, a count of boxes, an if on a value)"
    else:
        what = "torch.export cannot follow forward's code"
    return f"{what}; {RECORDED}" if audit else what
