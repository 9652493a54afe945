"""torch.export writes ``x.float()`` into its graph with an assert that ``x`` is float32: true of
the export's own run, false under autocast, where the convolution before it gives bfloat16. The
audit runs the graph as the model runs (under autocast), so the asserts are dropped: a forced
export failed, blaming the model, and a train audit fell back to the eager capture (no
backward)."""

from __future__ import annotations

import torch
from torch import nn

from nhwc_audit import audit, convert


class CastBack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c(x)
        if x.shape[1] == 3:  # a branch on a shape: torch.fx cannot trace it, torch.export can
            a = a * 2
        return self.c2(a.float())


def test_an_export_runs_under_autocast() -> None:
    torch.manual_seed(0)
    model, x = CastBack().eval(), torch.randn(1, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = convert(model)(x.contiguous(memory_format=torch.channels_last))
    assert eager.dtype == torch.bfloat16  # the model runs under autocast
    exported = audit(model, x, capture="export", autocast=torch.bfloat16, bandwidth=1e9)
    hooks = audit(model, x, capture="hooks", autocast=torch.bfloat16, bandwidth=1e9)
    assert exported.meta.capture == "export"
    assert [f.kind for f in exported.findings] == [f.kind for f in hooks.findings]
    assert exported.nodes[-1].inputs[0].meta.dtype == "bfloat16"


def test_a_train_audit_under_autocast_gets_its_backward() -> None:
    torch.manual_seed(0)
    r = audit(CastBack().train(), torch.randn(2, 3, 16, 16), train=True, autocast=torch.bfloat16, bandwidth=1e9)
    assert r.meta.capture == "export" and r.meta.backward, r.meta.capture_notes
