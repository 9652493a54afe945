"""A gradient summed from two consumers of a 3D token view of a map (``F.normalize(y.flatten(2))``
reads its input twice): where ``y`` is channels_last, ``y.flatten(2)`` is channel-minor, one part of
its gradient comes back in that order and the other row-major, and autograd sums them into the
row-major one, moving the part across. The backward followed the parts of 4D/5D gradients only and
charged none of it (74,752 B of eager's 107,520 at 2x8x16x16; a helper's op sweep); Restormer-like
attention makes such sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_backward_bytes


class _Normalized(nn.Module):
    def __init__(self, hw: int = 256) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.p = nn.Parameter(torch.randn(hw, hw) / hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        t = F.normalize(y.flatten(2), dim=-1)
        return self.c2((t @ self.p).view_as(y))


@pytest.mark.parametrize("how", [{}, {"mode": "fake"}, {"capture": "export"}], ids=["real", "fake", "export"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_token_gradient_summed_across_orders_is_charged(batch: int, how: dict[str, str]) -> None:
    torch.manual_seed(0)
    model, x = _Normalized().train(), torch.randn(batch, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth
    if batch == 2:
        assert truth == 107_520
    if batch == 2 and "capture" not in how:  # (export names its ATen ops)
        assert [f.bytes for f in report.findings if f.kind.value == "backward" and f.node == "normalize"] == [32_768]
