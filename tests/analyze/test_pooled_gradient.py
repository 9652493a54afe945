"""A global average pool's gradient in a train audit: its backward (``mean``, ``AdaptiveAvgPool2d(1)``)
divides the broadcast gradient by H x W into a new tensor, NCHW, which meets the channels_last map at the
pool's input (eager's channels_last backward copies there, the NCHW one does not). The hint said a pooled
head's gradient "has no layout fix"; a sum divided after it keeps the gradient a broadcast view, and
eager then copies nothing there. The hint names that change, and the audit of the changed model agrees
with eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_backward_bytes


def _pool(y: torch.Tensor, how: str) -> torch.Tensor:
    if how == "adaptive":
        return F.adaptive_avg_pool2d(y, 1)
    if how == "mean":
        return y.mean((2, 3), keepdim=True)
    return y.sum((2, 3), keepdim=True) / (y.shape[2] * y.shape[3])  # the hint's change


class PooledHead(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.conv, self.fc = how, nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool(torch.relu(self.conv(x)), self.how).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.gate, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.out(y * torch.sigmoid(self.gate(_pool(y, self.how))))


def _backward(model: nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    """The train audit's backward bytes, and the hints of its findings a model change can remove."""
    report = audit(model, x, bandwidth=1e9, train=True)
    found = [f for f in report.findings if f.kind.value == "backward"]
    return sum(f.bytes for f in found), [f.hint for f in found if not f.intrinsic]


@pytest.mark.parametrize("block", [PooledHead, SqueezeExcite])
@pytest.mark.parametrize("how", ["adaptive", "mean"])
def test_a_global_average_pools_gradient_is_advised_a_sum_divided_after_it(block: type[nn.Module], how: str) -> None:
    torch.manual_seed(0)
    model, x = block(how).train(), torch.randn(2, 3, 16, 16)
    moved, hints = _backward(model, x)
    assert moved == eager_backward_bytes(model, (x,)).added
    assert hints and all("x.sum((2, 3), keepdim=True) / (H * W)" in h for h in hints), hints
    torch.manual_seed(0)
    changed = block("sum").train()
    moved, hints = _backward(changed, x)
    assert not hints  # only a convolution kernel's own copies are left
    assert moved == eager_backward_bytes(changed, (x,)).added
