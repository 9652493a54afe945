"""The eager capture (module hooks and a dispatch-level recorder) goes on past a break, as the
graph captures' propagation does: what the model runs after a ``view`` that raises on
channels_last is audited too, with the findings the fx capture gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import AuditReport, PropagationError, audit


class BreakThenSoftmax(nn.Module):
    """A view that raises on channels_last, then an op that does not depend on it and returns
    NCHW on the CPU (log_softmax over the channels), then a convolution that converts back.
    ``untraceable``: a test on a value, which torch.fx cannot trace (the default capture then
    records eagerly)."""

    def __init__(self, untraceable: bool = False) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if self.untraceable and x.sum() > -1e9:
            x = x * 1.0
        n, c, h, w = x.shape
        s = x.view(n, c * h, w).sum()
        return self.b(F.log_softmax(x, dim=1)) + s


def _kinds(r: AuditReport) -> list[tuple[str, str, int]]:
    return sorted((f.kind.value, f.module_path, f.bytes) for f in r.findings)


@pytest.mark.parametrize("untraceable", [False, True])
def test_the_eager_capture_audits_what_runs_after_a_break(untraceable: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    hooks = audit(BreakThenSoftmax(untraceable).eval(), x, capture="hooks", bandwidth=1e9)
    assert hooks.meta.capture == "hooks"
    assert _kinds(hooks) == [("break", "", 0), ("conversion", "b", 8192), ("revert", "", 8192)]
    assert [f.op for f in hooks.findings if f.kind.value == "revert"] == ["log_softmax"]
    breaks = [n for n in hooks.nodes if n.error is not None]
    assert [n.op_name for n in breaks] == ["view"] and breaks[0].outputs[0].shape == (2, 64, 8)
    if untraceable:  # the default capture falls back to the eager recording
        assert audit(BreakThenSoftmax(True).eval(), x, bandwidth=1e9).meta.capture == "hooks"
    else:  # and agrees with the fx capture
        fx = audit(BreakThenSoftmax().eval(), x, bandwidth=1e9)
        assert fx.meta.capture == "fx" and _kinds(fx) == _kinds(hooks)


class OwnError(nn.Module):
    """A view that fails whatever the layout: the model's own error, not a break."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).view(7, -1)


def test_an_op_that_fails_on_nchw_too_is_the_models_error() -> None:
    with pytest.raises(PropagationError, match="model's own error"):
        audit(OwnError().eval(), torch.randn(2, 8, 8, 8), capture="hooks", bandwidth=1e9)
