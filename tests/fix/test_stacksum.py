"""The ``sum-as-adds`` rewrite (:mod:`nhwc_audit.fix.stacksum`): timm's selective kernel attention
stacks its paths' channels_last maps, weights them and sums over the stacking dim; the sum writes an
NCHW map, which the convolution after it converts back (timm's skresnet18 at 64x64: 2,080,768 B a
forward, which the repair left: insert-contiguous-cl after each sum removed nothing). The maps added
one by one stay channels_last: eager PyTorch's count of the repaired model is the ground truth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes
from tests.fix.test_parts import moved_after
from tests.support import timm_model


class Selective(nn.Module):
    """Three paths stacked on dim 1, weighted by a softmax over the paths, summed over them."""

    def __init__(self) -> None:
        super().__init__()
        self.paths = nn.ModuleList(nn.Conv2d(8, 8, k, padding=k // 2) for k in (1, 3, 5))
        self.select = nn.Conv2d(8, 24, 1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.stack([p(x) for p in self.paths], dim=1)
        weights = self.select(x.sum(1).mean((2, 3), keepdim=True)).view(x.shape[0], 3, 8, 1, 1).softmax(1)
        return self.head(torch.sum(x * weights, dim=1))


def _timm_selective_kernel() -> nn.Module:
    layers = pytest.importorskip("timm.layers")
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), layers.SelectiveKernel(16, 16), nn.Conv2d(16, 8, 3))


@pytest.mark.parametrize(
    "build, shape", [(Selective, (2, 8, 16, 16)), (_timm_selective_kernel, (1, 3, 16, 16))], ids=["hand", "timm"]
)
def test_a_sum_over_a_stack_of_maps_becomes_adds_and_nothing_moves(
    build: type[nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)
    report = audit(model, x, bandwidth=1e9)
    before = eager_bytes(model, (x,)).added
    assert report.summary.bytes_moved == before > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and "sum-as-adds" in [s.kind for s in log.steps], log.refused
    assert not any("failed" in r for r in log.refused), log.refused  # (the sum's node was gone for the next rewrite)
    # what is left is timm's split of the input: each path reads a channel slice of a channels_last map
    assert log.bytes_after == moved_after(model, repaired.repaired_module, (x,)) == (0 if build is Selective else 32768)
    with torch.no_grad():
        got = repaired.repaired_module(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_skresnet_repairs_to_what_eager_moves() -> None:
    model, x = timm_model("skresnet18")
    report = audit(model, x, bandwidth=1e9)
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and log.bytes_before == eager_bytes(model, (x,)).added > 0
    assert {s.kind for s in log.steps} == {"sum-as-adds"}, log.refused
    after = moved_after(model, repaired.repaired_module, (x,))
    assert log.bytes_after == after < log.bytes_before // 3  # (the split paths read channel slices either way)
