"""A backward finding is the gradient of one tensor: an ``nn.Identity`` (timm's DropPath in eval,
ConvNeXt V2's and PoolFormer's) returns its input, so the gradient arriving there is its
producer's, found once (a graph's Identity node, which export drops, must not count it again)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit, convert


class IdentityAfterConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.drop_path = nn.Identity()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.drop_path(self.conv(x)), 1).flatten(1))


def test_a_gradient_through_an_identity_is_found_once() -> None:
    torch.manual_seed(0)
    model, x = IdentityAfterConv().train(), torch.randn(2, 3, 8, 8)
    cl = convert(model)
    y = cl.conv(x.contiguous(memory_format=torch.channels_last))
    assert cl.drop_path(y) is y  # eager: one tensor, one gradient
    found = {}
    for capture in ("fx", "export"):
        r = audit(model, x, train=True, capture=capture, bandwidth=1e9)
        found[capture] = [(f.module_path, f.bytes) for f in r.findings if f.kind.value == "backward"]
    assert found["fx"] == found["export"] == [("conv", 2 * 2 * 16 * 2 * 2 * 4)]
