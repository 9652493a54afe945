"""A slice of a channels_last map read with an NCHW activation is a mixed op, caused by that
activation's producer.

timm's CSP stages (``CrossStage``, cspdarknet53 and its kin) split a map in two along its channels,
run one half through blocks that end in ``.contiguous()`` (NCHW), and concatenate the other half
with it. The cat's inputs disagree (a channel slice of an NHWC map, an NCHW map) and it writes
NCHW. It was reported as a revert with the channel-shuffle hint ("do it in (N, H, W, C) order
instead"), a fix of its own in "What to change"; changing the ``.contiguous()`` removes it (the
repair's ``contiguous-cl`` does: cspdarknet53 at 64 x 64, 3,850,240 -> 770,048 B, where "What to
change" had listed the cats' 770,048 B apart). The bytes are unchanged: eager PyTorch's count is the
ground truth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.records import FindingKind
from tests.eager_bytes import eager_bytes
from tests.support import timm_model


class CrossStage(nn.Module):
    """A CSP stage as timm writes it (``timm.models.cspnet.CrossStage.forward``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 2 * c, 1)
        self.blocks = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.transition_b = nn.Conv2d(c, c, 1)
        self.transition = nn.Conv2d(2 * c, 2 * c, 1)
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.expand(x).split(self.c, dim=1)
        xb = self.blocks(xb)
        xb = self.transition_b(xb).contiguous()
        return self.transition(torch.cat([xs, xb], dim=1))


class Untraceable(CrossStage):
    """The same, with a check torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 4:
            raise ValueError("too small")
        return super().forward(x)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cls", [CrossStage, Untraceable], ids=["fx", "hooks"])
def test_a_cat_of_a_slice_and_an_nchw_map_is_mixed_and_fixed_at_the_contiguous(
    cls: type[nn.Module], batch: int
) -> None:
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(batch, 3, 8, 8)
    report = audit(model, x, bandwidth=1e9)
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    cat = next(f for f in report.findings if f.op == "cat")
    contiguous = next(f for f in report.findings if f.op == "contiguous")
    assert cat.kind is FindingKind.MIXED and cat.producer == contiguous.node, cat
    assert cat.bytes == 2 * 4 * 8 * 8 * 8 * batch  # the slice, read and written once
    assert "(N, H, W, C) order" not in cat.hint and contiguous.node in cat.hint
    # one change removes the three: the .contiguous() (at batch 1 the first block's convolution also
    # copies the other half whole, a fix of its own)
    after = next(f for f in report.findings if f.producer == cat.node)
    fix = report.fixes[0]
    assert (fix.op, fix.findings, fix.bytes) == ("contiguous", 3, contiguous.bytes + cat.bytes + after.bytes)


def test_the_repair_of_the_contiguous_removes_what_its_fix_lists() -> None:
    torch.manual_seed(0)
    model, x = CrossStage().eval(), torch.randn(1, 3, 8, 8)
    report = audit(model, x, bandwidth=1e9)
    log = report.repaired().repair
    assert log is not None and [s.kind for s in log.steps] == ["contiguous-cl"]
    # what "What to change" promised for it (the first block's copy of its half stays)
    assert log.bytes_before - log.bytes_after == report.fixes[0].bytes == 16_384


@pytest.mark.slow
def test_timm_cspdarknet53_lists_its_cats_under_the_contiguous() -> None:
    model, x = timm_model("cspdarknet53")
    report = audit(model, x, bandwidth=1e9)
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added == 3_850_240
    cats = [f for f in report.findings if f.op == "cat"]
    assert len(cats) == 5 and all(f.kind is FindingKind.MIXED and f.producer.startswith("contiguous") for f in cats)
    # what is left after it is the convolutions' copies of split halves (770,048 B): the repair's figure too
    assert report.fixes[0].op == "contiguous" and report.fixes[0].bytes == 3_850_240 - 770_048
