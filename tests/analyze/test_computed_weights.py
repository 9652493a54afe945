"""A convolution whose weight is computed in forward (weight standardisation, as in timm's
NFNet ScaledStdConv2d): the root cause of its layout change is the weight computation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import AuditReport


class StdConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_computed_nchw_weight_is_the_root_cause(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), StdConv(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    r = audit_fixed(m, sample(1, 3, 16, 16))
    (f,) = r.findings
    assert (f.node, f.kind.value, f.origin) == ("conv2d", "mixed", "reshape_as")
    assert f.hint.startswith("conv2d's weight is computed in forward (reshape_as")
    assert "weight.contiguous(memory_format=torch.channels_last)" in f.hint
    assert [(x.op, x.roots) for x in r.fixes] == [("reshape_as", ("reshape_as",))]


def test_an_nchw_activation_into_a_conv_is_not_a_weight(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    class Act(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.norm = nn.InstanceNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.a(x)) + self.b(x)

    r = audit_fixed(Act(), sample(1, 3, 8, 8))
    assert all("weight is computed" not in f.hint for f in r.findings)
