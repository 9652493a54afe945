"""The ``restride-ambiguous`` rewrite (:mod:`nhwc_audit.fix.restride`): DeepLabV3's ASPP pooling
branch upsamples a pooled 1 x 1 map whose strides are in NCHW order, so the upsample, the cat of the
branches and the projection after it leave channels_last (torchvision's deeplabv3_mobilenet_v3_large
at 96 x 96: 663,552 B a forward, which the repair left: no rewrite applied). Restrided with
``.to(memory_format=torch.channels_last)`` first, nothing moves: eager PyTorch's count of the
repaired model is the ground truth."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes
from tests.fix.test_parts import moved_after


class AsppHead(nn.Module):
    """A stem and torchvision's own ASPP (three atrous branches, the pooling branch, the projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.aspp = nn.Conv2d(3, 16, 3, padding=1), ASPP(16, [2, 4], 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(torch.relu(self.stem(x)))


class Untraceable(AsppHead):
    """The same, with a shape check torch.fx cannot trace: repaired part by part."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            raise ValueError("the size must be a multiple of 4")
        return super().forward(x)


@pytest.mark.parametrize("cls", [AsppHead, Untraceable], ids=["fx", "parts"])
def test_the_aspp_pooling_branch_is_restrided_and_nothing_moves(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(1, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    before = eager_bytes(model, (x,)).added
    assert report.summary.bytes_moved == before > 0
    # the cat's finding, which leads the fix, named no change of the upsample's input ("keep that op
    # channels_last"); the conversion after it did
    cat = next(f for f in report.findings if f.kind.value == "mixed")
    assert ".to(memory_format=torch.channels_last)" in cat.hint and "whose input is ambiguous" in cat.hint
    assert ".to(memory_format=torch.channels_last)" in report.fixes[0].hint
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and [s.kind for s in log.steps] == ["restride-ambiguous"], log.refused
    assert log.bytes_before == before and log.bytes_after == moved_after(model, repaired.repaired_module, (x,)) == 0
    assert log.deviation is not None and log.deviation.outputs < 1e-5
    with torch.no_grad():
        got = repaired.repaired_module(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision.deeplabv3_mobilenet_v3_large", "smp.DeepLabV3Plus"])
def test_public_deeplabv3_models_repair_to_nothing_moved(name: str) -> None:
    """The two public models the rewrite was found on (torchvision's traces; smp's is repaired part by
    part), against eager's count of the repaired model."""
    from nhwc_audit.zoo.models import build

    pytest.importorskip(name.split(".")[0].replace("smp", "segmentation_models_pytorch"))
    model, args, _ = build(name)
    report = audit(model, *args, bandwidth=1e9)
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and log.bytes_before == eager_bytes(model, tuple(args)).added > 0
    assert [s.kind for s in log.steps] == ["restride-ambiguous"], log.refused
    assert log.bytes_after == moved_after(model, repaired.repaired_module, tuple(args)) == 0


def test_cbam_spatial_attention_is_restrided_and_nothing_moves() -> None:
    """timm's CBAM concatenates the channel mean and max of a map, two one-channel maps (ambiguous),
    into a two-channel NCHW map the 7 x 7 convolution converts back (4,096 B here): its inputs are
    restrided instead."""
    cbam = pytest.importorskip("timm.layers.cbam")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), cbam.CbamModule(16, rd_ratio=0.25), nn.Conv2d(16, 8, 3))
    model, x = model.eval(), torch.randn(1, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and [(s.kind, s.node) for s in log.steps] == [("restride-ambiguous", "cat")], log.refused
    assert log.bytes_after == moved_after(model, repaired.repaired_module, (x,)) == 0
