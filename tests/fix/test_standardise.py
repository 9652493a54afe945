"""The ``standardise-weight`` rewrite (:mod:`nhwc_audit.fix.standardise`): a weight standardised
in forward through reshape, ``F.batch_norm`` and ``reshape_as`` (timm's StdConv2d and
ScaledStdConv2d: NFNets, BiT) copies the channels_last weight into NCHW order and the
convolution re-lays it on every call; standardised over dims (1, 2, 3) instead, nothing moves."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.fix.standardise import standardisation
from tests.analyze.test_computed_weights import StdConv


class RunningStats(nn.Conv2d):
    """A batch norm with running statistics over the reshaped weight: not a standardisation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mean", torch.zeros(self.out_channels))
        self.register_buffer("var", torch.ones(self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, self.mean, self.var, training=False, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _scaled() -> nn.Module:
    layers = pytest.importorskip("timm.layers")
    return layers.ScaledStdConv2d(16, 16, 3, padding=1)


@pytest.mark.parametrize("conv", [lambda: StdConv(16, 16, 3, padding=1), _scaled], ids=["std", "scaled"])
def test_a_standardised_weight_is_repaired_and_moves_nothing(conv: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), conv(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    assert report.summary.bytes_moved > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and [s.kind for s in log.steps] == ["standardise-weight"], log.refused
    assert log.bytes_after == 0 and log.deviation is not None and log.deviation.outputs < 1e-5
    assert repaired.repaired_module is not None
    with torch.no_grad():
        torch.testing.assert_close(repaired.repaired_module(x), model(x), rtol=1e-4, atol=1e-5)
    assert audit(repaired.repaired_module, x, bandwidth=1e9).summary.bytes_moved == 0


def test_a_batch_norm_with_running_statistics_is_not_taken_for_one() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), RunningStats(16, 16, 3, padding=1)).eval()
    gm = trace(model).gm
    reshapes = [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert reshapes and not any(standardisation(gm, name) for name in reshapes)
    std = trace(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), StdConv(16, 16, 3, padding=1))).gm
    assert any(standardisation(std, n.name) for n in std.graph.nodes)
