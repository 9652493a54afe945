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

from ..errors import first_line
from ..tensors import in_a_dense_format, iter_tensors

__all__ = ["IndexedJudge", "Judge", "first_difference", "tensor_difference"]

Judge = Callable[[torch.Tensor, torch.Tensor], "str | None"]
"""A custom closeness test for one pair (actual, expected) of same-shape floating tensors."""

IndexedJudge = Callable[[int, torch.Tensor, torch.Tensor], "str | None"]
"""A :data:`Judge` that is also told the pair's position among the outputs."""


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


@functools.cache
def _memcmp() -> Any:
    """The C library's ``memcmp`` (None where ctypes cannot find it)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.memcmp
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are dense CPU tensors of one dtype and one set of strides holding the
    same bytes: equal values (NaN included), read at memory speed; ``torch.equal`` reads them
    ~20x slower on this project's CPU (2 ms for a 3 MB activation). False proves nothing (0.0
    and -0.0 differ in bytes): the caller compares values then."""
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != b.dtype or a.stride() != b.stride():
        return False
    for t in (a, b):
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return False  # subclasses (a Parameter of one too) keep their data elsewhere
        if t.layout != torch.strided or t.is_quantized or t.is_conj() or t.is_neg() or t._is_zerotensor():
            return False
        if not in_a_dense_format(t) or (t.data_ptr() == 0 and t.numel() > 0):
            return False  # no storage to read
    memcmp = _memcmp()
    if memcmp is None:
        return False
    return bool(memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0)


_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex32: (1e-3, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}
"""(rtol, atol) by dtype: ``torch.testing.assert_close``'s documented defaults; exact elsewhere."""


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None, atol: float | None) -> str | None:
    """``assert_close``'s test (``|actual - expected| <= atol + rtol * |expected|``, NaN equal to
    NaN, strides ignored) on plain strided tensors of one dtype and device. Not
    ``assert_close`` itself: its every call imports ``torch.distributed.tensor`` (~0.5 s the
    first time, in a process that audits)."""
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} where {expected.dtype} is expected"
    if actual.device != expected.device:
        return f"on {actual.device} where {expected.device} is expected"
    if rtol is None or atol is None:
        rtol, atol = _TOLERANCES.get(expected.dtype, (0.0, 0.0))
    close = torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return None
    if actual.is_floating_point() or actual.is_complex():
        diff = (actual.to(torch.complex128 if actual.is_complex() else torch.float64) - expected).abs().max().item()
        return f"values differ (max abs diff {diff:.3g})"
    return f"values differ ({int((~close).sum())} of {close.numel()} elements)"


def tensor_difference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    judge: Judge | None = None,
) -> str | None:
    """None when ``actual`` matches ``expected`` (``torch.testing.assert_close``'s test at its
    default tolerances for the dtype, or ``rtol``/``atol``, or ``judge`` for floating tensors;
    strides ignored, NaN equal to NaN), else what differs."""
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
        if _same_bytes(actual, expected):
            return None
        if actual.dtype == expected.dtype and torch.equal(actual, expected):
            return None
        if all(t.layout == torch.strided and not t.is_quantized for t in (actual, expected)):
            return _close(actual, expected, rtol, atol)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)
    except AssertionError as e:
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
    ta, tb = iter_tensors(actual), iter_tensors(expected)
    if len(ta) != len(tb):
        return f"{len(ta)} {what} tensors where {len(tb)} are expected"
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        pair_judge = None if judge is None else functools.partial(judge, i)
        diff = tensor_difference(x, y, rtol=rtol, atol=atol, judge=pair_judge)
        if diff is not None:
            return f"{what} {i} {diff}"
    return None
