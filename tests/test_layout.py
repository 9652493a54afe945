"""The layout rule on hand-made tensors, and agreement with torch's own is_contiguous."""

from __future__ import annotations

import itertools

import pytest
import torch

from nhwc_audit import Layout, classify, classify_strides
from nhwc_audit.layout import tensor_meta

CL = torch.channels_last
CL3 = torch.channels_last_3d


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (torch.zeros(2, 3, 4, 5), Layout.CONTIGUOUS),
        (torch.zeros(2, 3, 4, 5).to(memory_format=CL), Layout.CHANNELS_LAST),
        (torch.zeros(2, 1, 4, 5), Layout.AMBIGUOUS),  # C == 1
        (torch.zeros(2, 1, 4, 5).to(memory_format=CL), Layout.AMBIGUOUS),
        (torch.zeros(2, 8, 1, 1), Layout.AMBIGUOUS),  # H == W == 1 (SE gate, pooled)
        (torch.zeros(2, 8, 1, 1).to(memory_format=CL), Layout.AMBIGUOUS),
        (torch.zeros(2, 3, 4, 5).permute(0, 2, 3, 1), Layout.STRIDED),  # NCHW memory viewed as NHWC
        (torch.zeros(2, 3, 4, 5).to(memory_format=CL).permute(0, 2, 3, 1), Layout.CONTIGUOUS),  # ConvNeXt
        (torch.zeros(2, 3, 4, 5).permute(0, 1, 3, 2), Layout.STRIDED),
        (torch.zeros(2, 6, 4, 5).to(memory_format=CL)[:, :3], Layout.STRIDED),  # channel slice
        (torch.zeros(2, 6, 4, 5)[:, :, :2], Layout.STRIDED),
        (torch.zeros(2, 3, 4, 5).expand(2, 3, 4, 5), Layout.CONTIGUOUS),
        (torch.zeros(1, 3, 1, 5).expand(2, 3, 4, 5), Layout.STRIDED),  # stride-0 broadcast
        (torch.zeros(2, 3, 4, 5, 6), Layout.CONTIGUOUS),
        (torch.zeros(2, 3, 4, 5, 6).to(memory_format=CL3), Layout.CHANNELS_LAST),
        (torch.zeros(2, 1, 4, 5, 6), Layout.AMBIGUOUS),
        (torch.zeros(2, 3, 4), Layout.NOT_SPATIAL),
        (torch.zeros(2, 3), Layout.NOT_SPATIAL),
        (torch.zeros(()), Layout.NOT_SPATIAL),
        (torch.zeros(0, 3, 4, 5), Layout.AMBIGUOUS),  # empty: dense in every order
    ],
)
def test_classify(tensor: torch.Tensor, expected: Layout) -> None:
    assert classify(tensor) is expected


def test_pointwise_and_depthwise_weights_are_ambiguous_but_restrided() -> None:
    """1x1 and depthwise weights read ambiguous before and after .to(channels_last), yet their
    strides change; the records keep raw strides so the difference is visible."""
    w1 = torch.zeros(16, 8, 1, 1)
    dw = torch.zeros(8, 1, 3, 3)
    for w in (w1, dw):
        converted = w.to(memory_format=CL)
        assert classify(w) is Layout.AMBIGUOUS
        assert classify(converted) is Layout.AMBIGUOUS
        assert converted.stride() != w.stride()
        assert tensor_meta(converted).strides == tuple(converted.stride())
    assert tensor_meta(w1.to(memory_format=CL)).strides == (8, 1, 8, 8)
    assert tensor_meta(dw.to(memory_format=CL)).strides == (9, 1, 3, 1)


def _expected_from_torch(t: torch.Tensor) -> Layout:
    if t.dim() not in (4, 5):
        return Layout.NOT_SPATIAL
    fmt = CL if t.dim() == 4 else CL3
    nchw, nhwc = t.is_contiguous(), t.is_contiguous(memory_format=fmt)
    return {
        (True, True): Layout.AMBIGUOUS,
        (True, False): Layout.CONTIGUOUS,
        (False, True): Layout.CHANNELS_LAST,
        (False, False): Layout.STRIDED,
    }[(nchw, nhwc)]


def test_agrees_with_torch_is_contiguous_on_many_shapes_and_permutations() -> None:
    sizes = (1, 2, 3)
    checked = 0
    for shape in itertools.product(sizes, repeat=4):
        base = torch.zeros(shape)
        for perm in itertools.permutations(range(4)):
            t = base.permute(perm)
            assert classify_strides(tuple(t.shape), t.stride()) is _expected_from_torch(t), (shape, perm)
            checked += 1
    for shape in itertools.product((1, 2), repeat=5):
        for fmt in (torch.contiguous_format, CL3):
            t = torch.zeros(shape).contiguous(memory_format=fmt)
            assert classify(t) is _expected_from_torch(t)
            checked += 1
    assert checked == 81 * 24 + 64


def test_tensor_meta_bytes() -> None:
    m = tensor_meta(torch.zeros(2, 3, 4, 5, dtype=torch.float16).to(memory_format=CL))
    assert (m.shape, m.strides, m.dtype, m.itemsize, m.nbytes) == ((2, 3, 4, 5), (60, 1, 15, 3), "float16", 2, 240)
    assert m.layout is Layout.CHANNELS_LAST


def test_stride_lean_matches_pytorchs_suggest_memory_format() -> None:
    """Which way an ambiguous tensor leans decides kernels' output layouts; our pure function
    must agree with PyTorch's own test on every case."""
    import torch._prims_common as pc

    from nhwc_audit.layout import strides_like_channels_last

    checked = 0
    for shape in itertools.product((1, 2, 3), repeat=4):
        base = torch.zeros(shape)
        for perm in itertools.permutations(range(4)):
            t = base.permute(perm)
            for u in (t, t.contiguous(), t.contiguous(memory_format=CL), t.to(memory_format=CL)):
                expected = pc.suggest_memory_format(u) == CL
                assert strides_like_channels_last(tuple(u.shape), u.stride()) is expected, (shape, perm, u.stride())
                checked += 1
    for shape in itertools.product((1, 2, 3), repeat=5):
        t = torch.zeros(shape)
        for u in (t, t.to(memory_format=CL3), t.permute(0, 2, 1, 3, 4), t.permute(0, 4, 3, 2, 1)):
            assert strides_like_channels_last(tuple(u.shape), u.stride()) is (pc.suggest_memory_format(u) == CL3)
            checked += 1
    assert checked == 81 * 24 * 4 + 243 * 4


def test_the_nchw_side_of_a_transpose() -> None:
    from nhwc_audit.layout import along_w, nchw_side

    x = torch.zeros(2, 8, 16, 16)
    w_innermost = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # a 1D FFT along W's N, H, C, W
    assert along_w(tensor_meta(w_innermost)) and along_w(tensor_meta(x))
    assert not along_w(tensor_meta(x.to(memory_format=torch.channels_last)))
    assert not along_w(tensor_meta(x.permute(0, 1, 3, 2)))  # H innermost: not W
    assert not along_w(tensor_meta(x[:, :, 1:-1])) and nchw_side(tensor_meta(x[:, :, 1:-1]))  # a slice
    assert not nchw_side(tensor_meta(torch.zeros(2, 1, 16, 16).expand(2, 8, 16, 16)))  # broadcast
