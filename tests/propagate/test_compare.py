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


@pytest.mark.parametrize(
    ("dtype", "close", "far"),
    [
        (torch.float32, 1e-6, 1e-4),
        (torch.float64, 1e-8, 1e-6),
        (torch.float16, 5e-4, 1e-2),
        (torch.bfloat16, 0.0, 5e-2),  # 1.6e-2: bfloat16 has no step between
    ],
)
def test_values_within_the_dtypes_default_tolerance_match(dtype: torch.dtype, close: float, far: float) -> None:
    a = torch.linspace(1, 2, 16, dtype=torch.float64)
    assert tensor_difference((a * (1 + close)).to(dtype), a.to(dtype)) is None
    assert tensor_difference((a * (1 + far)).to(dtype), a.to(dtype)) is not None
    if dtype == torch.float32:  # the same as torch.testing.assert_close decides
        torch.testing.assert_close((a * (1 + close)).to(dtype), a.to(dtype))


def test_given_tolerances_are_used_and_integers_are_exact() -> None:
    a = torch.ones(4, dtype=torch.float64)
    assert tensor_difference(a + 1e-8, a) is None
    assert tensor_difference(a + 1e-8, a, rtol=1e-12, atol=1e-12) == "values differ (max abs diff 1e-08)"
    assert tensor_difference(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == "values differ (1 of 3 elements)"
    assert tensor_difference(torch.tensor([True]), torch.tensor([True])) is None
    assert tensor_difference(a.float(), a) == "dtype torch.float32 where torch.float64 is expected"


def test_comparing_values_imports_nothing_heavy() -> None:
    # torch.testing.assert_close imports torch.distributed.tensor on its every call: ~0.5 s of a
    # CLI run that reaches a comparison of values that are close but not equal
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from nhwc_audit.propagate.compare import tensor_difference\n"
        "a = torch.randn(64)\n"
        "assert tensor_difference(a * (1 + 1e-7), a) is None\n"
        "assert tensor_difference(a + 1, a) is not None\n"
        "print('torch.distributed.tensor' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
