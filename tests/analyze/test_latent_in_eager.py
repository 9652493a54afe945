"""A latent break behind a torch call that works on a flat view (torchvision's Swin V2: a 4D
buffer, channels_last once converted, through Linear layers, then ``.view(-1, heads)``): the
eager capture records the Linear's ``mm`` and ``_unsafe_view``, whose inputs are not 4D, and the
walk back to the revert goes on inside the call, as a graph's one node for it does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit


class CoordsMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("coords", torch.randn(1, 7, 7, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.mlp(self.coords).view(-1, 3)
        return self.conv(x) + bias.sum(0).view(1, 3, 1, 1)


def test_eager_capture_finds_the_latent_break_a_graph_finds() -> None:
    model = CoordsMlp().eval()
    found = {}
    for capture in ("fx", "hooks"):
        torch.manual_seed(0)
        r = audit(model, torch.randn(1, 3, 8, 8), bandwidth=1e9, capture=capture)
        assert r.meta.capture == capture
        found[capture] = [(f.kind.value, f.bytes, f.location) for f in r.findings]
    assert [k for k, _, _ in found["fx"]] == ["revert", "latent_break"]
    assert found["hooks"] == found["fx"]


def test_the_latent_break_is_real() -> None:
    """Eager: the converted buffer is channels_last and the first Linear copies it to NCHW (the
    revert); were the MLP's output kept channels_last, the view would raise."""
    converted = CoordsMlp().eval().to(memory_format=torch.channels_last)
    assert converted.coords.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert converted.mlp[0](converted.coords).is_contiguous()
        kept = converted.mlp(converted.coords).contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            kept.view(-1, 3)
