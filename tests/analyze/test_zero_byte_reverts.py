"""A revert the NCHW model makes too (0 B: the same copy in either layout) is a finding only where
data flows from it to a convolution or to a finding that moves data. Attention scores copied by a
softmax in both layouts with no convolution after them (timm CaiT, ConViT) were dozens of 0 B
findings that changed nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit, check
from nhwc_audit.errors import ChannelsLastError
from tests.eager_bytes import eager_bytes


class TransposedCopy(nn.Module):
    """``conv(x).transpose(2, 3).contiguous()``: a copy in either layout, then a conv or not."""

    def __init__(self, into_conv: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.into_conv = into_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x).transpose(2, 3).contiguous()
        return self.b(z) if self.into_conv else z.softmax(-1) @ z


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_copy_made_in_either_layout_that_leads_nowhere_is_no_finding(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TransposedCopy(into_conv=False).eval(), torch.randn(2, 8, 8, 8)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert not r.findings
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == 0


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_copy_made_in_either_layout_stays_the_origin_of_the_conversion_after_it(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TransposedCopy(into_conv=True).eval(), torch.randn(2, 8, 8, 8)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert [(f.kind.value, f.bytes) for f in r.findings] == [("revert", 0), ("conversion", 8192)]
    assert r.findings[1].origin == r.findings[0].node
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added


class MatrixOnTheLeft(nn.Module):
    """``w @ x`` with ``w`` a parameter matrix: matmul copies the map's transposed matrices and the
    result's back (32,768 B at 1x8x16x16, in NCHW as in channels_last: the CPU profiler's
    ``aten::copy_``) and writes NCHW. It was a 0 B *conversion* (its copies read a transposed view,
    no layout), so ``check(fail_on='revert')`` passed a model whose next convolution converts back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.w @ self.a(x))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_an_op_that_reads_channels_last_and_writes_nchw_through_copies_of_a_view_is_a_revert(
    capture: str, mode: str
) -> None:
    torch.manual_seed(0)
    model, x = MatrixOnTheLeft().eval(), torch.randn(1, 3, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert [(f.kind.value, f.op, f.bytes) for f in r.findings] == [
        ("revert", "matmul", 0),
        ("conversion", "Conv2d", 16384),
    ]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added
    with pytest.raises(ChannelsLastError, match="1 offending node"):
        check(model, x, fail_on="revert", bandwidth=1e9, capture=capture, mode=mode)


class PermutedResidual(nn.Module):
    """A residual add on a permuted view of a map (timm MobileViTv2's unfolded patches, ``x = x +
    attn(norm(x))``): the add follows its first operand's order, in either layout, and the
    convolution after it re-lays that in either layout too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in, self.conv_a, self.conv_out = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.conv_in(x).permute(0, 1, 3, 2)
        p = p + self.conv_a(p)
        return self.conv_out(p)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_an_add_that_follows_its_permuted_first_operand_is_no_revert(capture: str) -> None:
    """It was a 0 B revert, "add has no channels_last kernel on cpu and returns NCHW", kept because
    data flows from it to a convolution; its output is in its first operand's order, not NCHW, and
    no finding's bytes come from it. A 0 B revert is kept where its output flows on as NCHW."""
    torch.manual_seed(0)
    model, x = PermutedResidual().eval(), torch.randn(2, 8, 6, 4)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == 0
    assert not r.findings and not r.incompatible_nodes
    check(model, x, fail_on="revert")


def test_mobilevitv2_s_patch_adds_are_no_reverts() -> None:
    """timm mobilevitv2_050's last stage at a 2x3x80x48 input (a 3 x 2 map): its three residual adds
    of the patches were 0 B reverts; what moves is the GroupNorms' and the sums' (eager's count)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    block, x = timm.create_model("mobilevitv2_050", pretrained=False).stages[4][1].eval(), torch.randn(2, 256, 3, 2)
    r = audit(block, x, bandwidth=1e9)
    assert r.summary.bytes_moved == eager_bytes(block, (x,)).added > 0
    assert "add" not in {f.op for f in r.findings}
    assert {f.op for f in r.findings if f.kind.value == "revert"} == {"group_norm", "sum"}
