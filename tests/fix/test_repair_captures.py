"""The repair of a model that torch.fx traces, audited with another capture (``capture='hooks'`` or
``'export'``): it re-traced the model and charged each node whole, so a copy the model makes in
either layout (a channel shuffle's) counted in the log and not in the audit: 131,072 B a forward
reported 262,144 -> 262,144 (shufflenet_v2_x0_5 at 64x64: 258,048 reported 301,056; maxvit_t
11.5 MB reported 41.6 MB). The repair now audits the model with torch.fx and rewrites that graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes
from tests.fix.test_parts import moved_after


class Shuffle(nn.Module):
    """A channel shuffle (view, transpose, contiguous, view) between two convolutions: the
    ``.contiguous()`` copies in NCHW too; in channels_last its first ``view`` breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.b(x)


@pytest.mark.parametrize("capture", ["hooks", "export"])
def test_a_traceable_model_audited_otherwise_is_repaired_on_its_fx_audit(capture: str) -> None:
    torch.manual_seed(0)
    model, x = Shuffle().eval(), torch.randn(1, 3, 32, 32)
    report = audit(model, x, bandwidth=1e9, capture=capture)
    assert report.meta.capture == capture
    truth = eager_bytes(model, (x,)).added
    assert report.summary.bytes_moved == truth > 0
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and log.bytes_before == truth, (log.bytes_before, truth)
    assert log.bytes_after == moved_after(model, repaired.repaired_module, (x,)), log.bytes_after
    assert any(f"captured with {capture}; the model traces" in n for n in log.notes), log.notes
    with torch.no_grad():
        got = repaired.repaired_module(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)
