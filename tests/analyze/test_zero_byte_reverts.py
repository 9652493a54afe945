"""A revert the NCHW model makes too (0 B: the same copy in either layout) is a finding only where
data flows from it to a convolution or to a finding that moves data. Attention scores copied by a
softmax in both layouts with no convolution after them (timm CaiT, ConViT) were dozens of 0 B
findings that changed nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
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
