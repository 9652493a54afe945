"""A latent break behind a torch call that works on a flat view (torchvision's Swin V2: a 4D
buffer, channels_last once converted, through Linear layers, then ``.view(-1, heads)``): the
eager capture records the Linear's ``mm`` and ``_unsafe_view``, whose inputs are not 4D, and the
walk back to the revert goes on inside the call, as a graph's one node for it does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes


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


class FourierUnit(nn.Module):
    """LaMa's FFC Fourier unit: the FFT's real and imaginary parts stacked last, moved next to the
    channels by ``.contiguous()`` (a copy the NCHW model makes too) and merged into them by a view."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.fc, self.b = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.Conv2d(2 * c, 2 * c, 1),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        n, c, h, w = x.shape
        f = torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")
        f = torch.stack((f.real, f.imag), dim=-1).permute(0, 1, 4, 2, 3).contiguous()
        f = self.fc(f.view(n, -1, f.size(-2), f.size(-1)))
        f = f.view(n, -1, 2, f.size(-2), f.size(-1)).permute(0, 1, 3, 4, 2).contiguous()
        return self.b(torch.fft.irfftn(torch.complex(f[..., 0], f[..., 1]), s=(h, w), dim=(-2, -1), norm="ortho"))


@pytest.mark.parametrize("capture", ["fx", "hooks", "export"])
def test_a_view_after_a_copy_the_nchw_model_makes_too_is_no_latent_break(capture: str) -> None:
    """Handed channels_last, that view would raise, but no change to channels_last hands it that:
    the copy before it is the NCHW model's own (charged 0), so no "use .reshape()" advice."""
    model, x = FourierUnit().eval(), torch.randn(2, 8, 8, 12)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert not [f for f in r.findings if f.kind.value == "latent_break"], [(f.kind.value, f.op) for f in r.findings]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added
