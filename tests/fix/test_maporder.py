"""The ``contiguous-map-order`` rewrite (:mod:`nhwc_audit.fix.maporder`): a space-to-depth written as
view, permute, ``.contiguous()``, view (timm's ``SpaceToDepth``, TResNet's stem) copies the map into
row-major order, so the map it makes is NCHW and the convolution after it converts it back (timm's
tresnet_m at 64x64: 98,304 B a forward, which the repair left: contiguous-cl failed on the 6D copy).
Copied in the order that makes that map channels_last, nothing moves: eager PyTorch's count of the
repaired model is the ground truth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.fix.maporder import map_order
from tests.eager_bytes import eager_bytes
from tests.fix.test_parts import moved_after
from tests.support import timm_model


def test_the_copy_order_puts_batch_then_spatial_then_channel_dims() -> None:
    # a channel shuffle's transposed view (n, c // g, g, h, w) viewed as (n, c, h, w)
    assert map_order((2, 24, 2, 8, 8), (2, 48, 8, 8)) == (0, 3, 4, 1, 2)
    # a space-to-depth's (n, 2, 2, c, h // 2, w // 2) viewed as (n, 4c, h // 2, w // 2)
    assert map_order((1, 2, 2, 8, 4, 4), (1, 32, 4, 4)) == (0, 4, 5, 1, 2, 3)
    # a depth-to-space's (n, c, h, 2, w, 2) viewed as (n, c, 2h, 2w); size-1 dims go with a group
    assert map_order((1, 8, 4, 2, 4, 2), (1, 8, 8, 8)) == (0, 2, 3, 4, 5, 1)
    assert map_order((1, 8, 4, 4, 1), (1, 8, 4, 4)) == (0, 2, 3, 4, 1)
    # a volume: (n, c, d, h, w) order is channels_last_3d's
    assert map_order((1, 4, 2, 3, 3, 3), (1, 8, 3, 3, 3)) == (0, 3, 4, 5, 1, 2)
    assert map_order((1, 6, 4, 4), (1, 4, 6, 4)) is None  # no merge of the dims
    assert map_order((1, 6, 4, 4), (1, 6, 16)) is None  # no map
    assert map_order((1, 1, 1, 1, 4), (1, 4, 1, 1)) is None  # no merge in order


class SpaceToDepth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, c, h, w = x.shape
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous()
        return self.head(x.view(n, c * 4, h // 2, w // 2))


def _timm_space_to_depth() -> nn.Module:
    layers = pytest.importorskip("timm.layers")
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layers.SpaceToDepth(4), nn.Conv2d(128, 8, 1))


@pytest.mark.parametrize("build", [SpaceToDepth, _timm_space_to_depth], ids=["hand", "timm"])
def test_a_space_to_depth_copies_in_map_order_and_nothing_moves(build: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    before = eager_bytes(model, (x,)).added
    assert report.summary.bytes_moved == before > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and [s.kind for s in log.steps] == ["contiguous-map-order"], log.refused
    assert not log.refused, log.refused  # (contiguous-cl failed on the 6D copy: a map's format for a 6D tensor)
    assert log.bytes_after == moved_after(model, repaired.repaired_module, (x,)) == 0
    with torch.no_grad():
        got = repaired.repaired_module(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_tresnet_stem_repairs_to_nothing_moved() -> None:
    model, x = timm_model("tresnet_m")
    report = audit(model, x, bandwidth=1e9)
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and log.bytes_before == eager_bytes(model, (x,)).added > 0
    assert [s.kind for s in log.steps] == ["contiguous-map-order"], log.refused
    assert log.bytes_after == moved_after(model, repaired.repaired_module, (x,)) == 0


def test_a_train_repair_says_its_steps_count_a_forward() -> None:
    """A train audit's repair gives its totals per training step (forward and backward) and each
    step's bytes as that rewrite was measured, over a forward: the console printed "118.5 kB ->
    52.9 kB per training step" above a step "(-32.8 kB)" with no word that the two count otherwise
    (found by a helper's sweep: five train repairs whose steps added up to half their drop)."""
    from rich.console import Console

    from nhwc_audit.report.console import render_outcome

    torch.manual_seed(0)
    model, x = SpaceToDepth().train(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9, train=True).repaired()
    log = report.repair
    assert log is not None and log.per.startswith("per training step") and log.steps_per == "per forward"
    (step,) = log.steps
    assert step.bytes_saved < log.bytes_before - log.bytes_after
    console = Console(record=True, width=400)
    console.print(render_outcome(report))
    assert "per forward)" in console.export_text()
    assert "per forward" in report.to_html() and report.to_dict()["repair"]["steps_per"] == "per forward"


class _Excite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.pool, self.f = nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return y * torch.sigmoid(self.f(self.pool(y))) + y


class _ShapeBranch(nn.Module):
    """A squeeze-excite block behind a branch on a shape, which torch.fx cannot trace (torch.export
    captures it for a train audit): its repair goes part by part and changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.se, self.c2 = nn.Conv2d(3, 16, 3, padding=1), _Excite(), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        if y.shape[-1] > 8:
            y = self.se(y)
        return self.c2(y)


def test_a_train_repair_that_changed_nothing_counts_a_training_step() -> None:
    """Its totals are the audit's, per training step; the log said "per forward" (a helper's sweep)."""
    torch.manual_seed(0)
    report = audit(_ShapeBranch().train(), torch.randn(2, 3, 16, 20), bandwidth=1e9, train=True)
    log = report.repaired().repair
    assert log is not None and not log.changed and log.bytes_before == report.summary.bytes_moved
    assert log.per == report.summary.per and log.per.startswith("per training step")


def _shuffle_chain(blocks: int) -> nn.Module:
    from torchvision.models.shufflenetv2 import InvertedResidual

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *(InvertedResidual(16, 16, 1) for _ in range(blocks)))


def test_a_chain_of_channel_shuffles_is_repaired_whole() -> None:
    """Each shuffle's ``.contiguous()`` reverts only once the one before it keeps channels_last, so each
    pass of the repair exposed one more: torchvision's shufflenet_v2_x0_5 (eight blocks in its second
    stage) kept 86,016 of 337,920 B at 2x3x64x64 after the repair's four passes, while "What to change"
    listed all 337,920 under its ``.contiguous()`` fix. A rewrite that exposes another is followed in the
    same pass: the fix's bytes are what the repair removes."""
    torch.manual_seed(0)
    model, x = _shuffle_chain(6).eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    (fix,) = report.fixes
    assert fix.bytes == report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None
    assert [s.kind for s in log.steps].count("contiguous-map-order") == 5, log.refused  # (the last feeds no cat)
    assert log.bytes_after == moved_after(model, repaired.repaired_module, (x,)) == 0
    assert log.bytes_before - log.bytes_after == fix.bytes
    with torch.no_grad():
        got = repaired.repaired_module(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)
