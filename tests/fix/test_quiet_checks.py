"""The repair's checks and the measurement run graphs that may raise (a break the repair leaves):
torch.fx's GraphModule prints the traceback of what it raises to stderr, which reached the CLI's
output as a raw traceback though the error was handled (a refused rewrite, an untimed variant)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit


class BreakWithPlainWeight(nn.Module):
    """A view that breaks on channels_last after a conv of a float32 plain attribute and a
    statistic taken under ``torch.no_grad()`` (no float64 copy of the model can run it, so the
    view's rewrite is judged in float32; it was refused while the repaired graph sent gradients
    through the ``no_grad`` block, and is kept since the graph keeps the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.k = torch.randn(8, 8, 3, 3) / 8
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(F.conv2d(self.n(self.a(x)), self.k, padding=1))
        with torch.no_grad():
            t = F.logsigmoid(y)
        return self.fc((y + t).view(y.shape[0], -1))


def test_a_repair_and_a_measurement_of_a_graph_that_raises_print_no_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    report = audit(BreakWithPlainWeight().train(), torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    repaired = report.repaired()
    assert repaired.repair is not None and (repaired.repair.breaks_before, repaired.repair.breaks_after) == (1, 0)
    repaired.measure(train=True, rounds=1)  # the naive conversion raises at the view: untimed, quietly
    assert "Traceback" not in capsys.readouterr().err
