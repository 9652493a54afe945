"""The one comparison of computed values: graph against eager (the capture check), the replay
against the record, and a repaired model against the original (float64 or calibrated).

Every comparison answers ``None`` (same) or one line saying what differs. A pair that cannot be
compared at all (a FakeTensor against a real tensor, mismatched devices) is a difference too,
never an exception: the caller decides what a difference means.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ..errors import first_line

__all__ = ["IndexedJudge", "Judge", "first_difference", "tensor_difference", "tensors_of"]

Judge = Callable[[torch.Tensor, torch.Tensor], "str | None"]
"""A custom closeness test for one pair (actual, expected) of same-shape floating tensors."""

IndexedJudge = Callable[[int, torch.Tensor, torch.Tensor], "str | None"]
"""A :data:`Judge` that is also told the pair's position among the outputs."""


def tensors_of(value: Any) -> list[torch.Tensor]:
    """The tensors among the pytree leaves of ``value``, in order."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def tensor_difference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    judge: Judge | None = None,
) -> str | None:
    """None when ``actual`` matches ``expected`` (``torch.testing.assert_close`` at its default
    tolerances for the dtype, or ``rtol``/``atol``, or ``judge`` for floating tensors; strides
    ignored, NaN equal to NaN), else what differs."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} where {tuple(expected.shape)} is expected"
    if _fake(actual) != _fake(expected):
        which = "actual" if _fake(actual) else "expected"
        return f"cannot be compared: the {which} value is a fake or meta tensor"
    if _fake(actual):
        return None  # nothing to compare but the shape
    try:
        if judge is not None and actual.is_floating_point() and expected.is_floating_point():
            return judge(actual, expected)
        if actual.dtype == expected.dtype and torch.equal(actual, expected):
            return None
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)
    except AssertionError as e:
        if actual.is_floating_point() and expected.is_floating_point():
            diff = (actual.double() - expected.double()).abs().max().item()
            return f"values differ (max abs diff {diff:.3g})"
        return f"values differ ({first_line(e)})"
    except Exception as e:
        return f"cannot be compared: {first_line(e)}"
    return None


def first_difference(
    actual: Any,
    expected: Any,
    *,
    what: str = "output",
    rtol: float | None = None,
    atol: float | None = None,
    judge: IndexedJudge | None = None,
) -> str | None:
    """None when the tensors among the leaves of ``actual`` and ``expected`` match pairwise
    (:func:`tensor_difference`), else the first difference as one line naming ``what`` differs.

    >>> first_difference((torch.ones(2),), [torch.ones(2)]) is None
    True
    >>> first_difference(torch.ones(2), torch.zeros(2))
    'output 0 values differ (max abs diff 1)'
    """
    ta, tb = tensors_of(actual), tensors_of(expected)
    if len(ta) != len(tb):
        return f"{len(ta)} {what} tensors where {len(tb)} are expected"
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        pair_judge = None if judge is None else functools.partial(judge, i)
        diff = tensor_difference(x, y, rtol=rtol, atol=atol, judge=pair_judge)
        if diff is not None:
            return f"{what} {i} {diff}"
    return None
