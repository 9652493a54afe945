"""The one comparison of values: the byte-level fast path answers 'same' only when the values
are the same, and everything it cannot vouch for falls back to comparing values."""

from __future__ import annotations

import pytest
import torch

from nhwc_audit.propagate.compare import tensor_difference


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 8, 5, 5),
        lambda: torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(1, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d),
        lambda: torch.randn(7, 3).to(torch.bfloat16),
        lambda: torch.arange(12),
        lambda: torch.randn(4, 6)[:, ::2],  # not dense: compared by value
        lambda: torch.randn(0, 3),
    ],
)
def test_equal_tensors_are_the_same_and_a_changed_element_is_not(make: object) -> None:
    a = make()  # type: ignore[operator]
    b = a.clone(memory_format=torch.preserve_format)
    assert tensor_difference(b, a) is None
    if a.numel():
        c = b.clone(memory_format=torch.preserve_format)
        last = tuple(n - 1 for n in c.shape)
        c[last] += 1 if not c.is_floating_point() else 0.5
        assert tensor_difference(c, a) is not None


def test_bytes_that_differ_can_still_be_equal_values() -> None:
    zeros = torch.zeros(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    assert tensor_difference(-zeros, zeros) is None  # -0.0 == 0.0: decided by value
    nan = torch.full((1, 2, 3, 3), float("nan"))
    assert tensor_difference(nan.clone(), nan) is None  # NaN where NaN is expected


def test_other_strides_or_dtypes_are_compared_by_value() -> None:
    a = torch.randn(1, 8, 4, 4)
    assert tensor_difference(a.contiguous(memory_format=torch.channels_last), a) is None
    assert tensor_difference(a.double(), a) is not None  # another dtype differs (assert_close's rule)
    assert tensor_difference(a.contiguous(memory_format=torch.channels_last) + 1, a) is not None


def test_dense_tensors_of_one_layout_are_compared_by_their_bytes() -> None:
    from nhwc_audit.propagate import compare

    a = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert compare._same_bytes(a.clone(memory_format=torch.preserve_format), a)
    assert not compare._same_bytes(a.contiguous(), a)  # other strides: by value
    assert not compare._same_bytes(a[:, ::2], a[:, ::2].clone(memory_format=torch.preserve_format))  # not dense


def test_tensors_without_plain_storage_are_compared_by_value() -> None:
    # a zero tensor has no storage (data_ptr 0) and a wrapper subclass keeps its data in its
    # inner tensors: reading their bytes would read address 0
    from torch.testing._internal.two_tensor import TwoTensor

    z = torch._efficientzerotensor(4)  # type: ignore[attr-defined]
    assert tensor_difference(z, torch._efficientzerotensor(4)) is None  # type: ignore[attr-defined]
    x = torch.randn(4)
    assert tensor_difference(torch.nn.Parameter(TwoTensor(x, x)), torch.nn.Parameter(TwoTensor(x, x + 1))) is None
