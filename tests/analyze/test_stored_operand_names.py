"""The hint of a mixed op that reads a stored tensor names it, or says where it is read.

The eager capture (a model torch.fx cannot trace) records no node for a parameter or a buffer an op
reads, so the hint of timm nest's position embedding, a 4D parameter the conversion re-lays, read
"add reads a stored tensor (?: a parameter, a buffer, ...)". fx names it by its get_attr node."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit


class TokenTable(nn.Module):
    """A (1, H, W, C) table added to tokens laid out as a map (timm nest's ``x + self.pos_embed``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pos = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(1, 4, 4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 2, 3, 1).contiguous() + self.pos


class Level(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TokenTable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # a branch on a value: torch.fx cannot trace it
            return x
        return self.block(x)


@pytest.mark.parametrize(("build", "named"), [(TokenTable, "pos (get_attr"), (Level, "read in block (TokenTable)")])
def test_the_stored_tensor_is_named_or_placed(build: type[nn.Module], named: str) -> None:
    torch.manual_seed(0)
    report = audit(build().eval(), torch.randn(1, 3, 4, 4), bandwidth=1e9)
    (f,) = report.findings
    assert f.kind.value == "mixed" and "reads a stored tensor" in f.hint
    assert named in f.hint and "(?" not in f.hint
