"""The finding rules are skipped for a node that is channels_last throughout
(:attr:`~nhwc_audit.records.NodeRecord.all_channels_last`): the rules themselves find nothing
there, on models that mix every kind of node."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from nhwc_audit import audit
from nhwc_audit.analyze.findings import find_findings
from nhwc_audit.examples import unet
from nhwc_audit.records import NodeRecord


class _Mixed(nn.Module):
    """Bias adds, a broadcast gate, a stack into 5D, a cat beside an NCHW norm, a 3D branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8)
        self.bias = nn.Parameter(torch.randn(8, 1, 1))
        self.conv3d = nn.Conv3d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.conv(x) + self.bias
        g = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        s = torch.stack([g, y], 2)
        return torch.cat([g, self.norm(y)], 1), self.conv3d(s), s.sum(2)


@pytest.mark.parametrize(
    "build",
    [
        unet,
        lambda: (_Mixed(), (torch.randn(2, 3, 8, 8),)),
        lambda: (torchvision.models.densenet121(num_classes=10), (torch.randn(1, 3, 32, 32),)),
        lambda: (torchvision.models.convnext_tiny(num_classes=10), (torch.randn(1, 3, 32, 32),)),
    ],
)
def test_nodes_channels_last_throughout_have_no_finding_by_the_rules(build: Any, monkeypatch: Any) -> None:
    torch.manual_seed(0)
    model, args = build()
    for train in (False, True):
        r = audit(model.eval(), args, bandwidth=1e10, train=train)
        records = list(r.nodes)
        assert any(n.all_channels_last for n in records)
        fast = find_findings(records, bandwidth=1e10)
        with monkeypatch.context() as m:
            m.setattr(NodeRecord, "all_channels_last", property(lambda self: False))
            full = find_findings(records, bandwidth=1e10)
        assert fast == full
        assert {f.node for f in full}.isdisjoint(n.name for n in records if n.all_channels_last and not n.backward)
