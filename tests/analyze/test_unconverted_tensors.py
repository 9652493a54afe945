"""Tensors the conversion leaves as they are: computed from parameters and buffers of rank
other than 4 and 5 (a relative-position bias table, as in timm's MaxViT and GCViT, indexed,
viewed (N, N, heads) and permuted to (1, heads, N, N)), they have channels_last strides in the NCHW
model too, so what an op does with them is no finding; one made from a 4D parameter, which the
conversion re-lays, still is. Each case is checked against the model run NCHW in eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nhwc_audit


class RelPosBias(nn.Module):
    def __init__(
        self, contiguous: bool, from_4d: bool, heads: int = 2, win: int = 4, dim: int = 16, buffer: bool = True
    ) -> None:
        super().__init__()
        n = win * win
        self.heads, self.n, self.contiguous, self.from_4d = heads, n, contiguous, from_4d
        self.table = nn.Parameter(torch.randn((2 * win - 1) ** 2, heads))
        self.table_4d = nn.Parameter(torch.randn(1, heads, n, n))
        idx = torch.randint(0, (2 * win - 1) ** 2, (n * n,))
        if buffer:
            self.register_buffer("idx", idx, persistent=False)
        else:  # a plain tensor attribute: a graph reads it with get_attr, as a buffer
            self.idx = idx
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def bias(self) -> torch.Tensor:
        if self.from_4d:  # the conversion makes this parameter channels_last
            return self.table_4d.contiguous() if self.contiguous else self.table_4d
        b = self.table[self.idx].view(self.n, self.n, self.heads).permute(2, 0, 1).unsqueeze(0)
        return b.contiguous() if self.contiguous else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, c, h, w = x.shape
        q = x.flatten(2).transpose(1, 2).reshape(b, self.n, self.heads, c // self.heads).transpose(1, 2)
        attn = (q @ q.transpose(-1, -2)) + self.bias()
        o = (attn.softmax(-1) @ q).transpose(1, 2).reshape(b, self.n, c)
        return o.transpose(1, 2).reshape(b, c, h, w)


def _strides_in_both(model: RelPosBias) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The bias's strides in the model as built and in its channels_last conversion (eager)."""
    with torch.no_grad():
        return model.bias().stride(), nhwc_audit.convert(model).bias().stride()


@pytest.mark.parametrize("capture", ["fx", "hooks", "export"])
@pytest.mark.parametrize(("contiguous", "buffer"), [(True, True), (False, True), (True, False)])
def test_a_bias_made_from_a_table_is_no_finding(capture: str, contiguous: bool, buffer: bool) -> None:
    torch.manual_seed(0)
    model = RelPosBias(contiguous, from_4d=False, buffer=buffer).eval()
    nchw, converted = _strides_in_both(model)
    assert nchw == converted  # eager: the same tensor whatever the model's memory format
    if not contiguous:
        assert model.bias().is_contiguous(memory_format=torch.channels_last)
    report = nhwc_audit.audit(model, torch.randn(1, 16, 4, 4), bandwidth=1e10, capture=capture)
    assert report.meta.capture == capture
    assert report.findings == ()
    nhwc_audit.check(model, torch.randn(1, 16, 4, 4), bandwidth=1e10, capture=capture, fail_on="revert")


@pytest.mark.parametrize("capture", ["fx", "hooks", "export"])
@pytest.mark.parametrize(("contiguous", "kind", "op"), [(True, "revert", "contiguous"), (False, "mixed", "add")])
def test_a_bias_made_from_a_4d_parameter_still_is(capture: str, contiguous: bool, kind: str, op: str) -> None:
    torch.manual_seed(0)
    model = RelPosBias(contiguous, from_4d=True).eval()
    converted = nhwc_audit.convert(model).table_4d
    assert converted.is_contiguous(memory_format=torch.channels_last) and not converted.is_contiguous()
    report = nhwc_audit.audit(model, torch.randn(1, 16, 4, 4), bandwidth=1e10, capture=capture)
    assert [(f.kind.value, f.op) for f in report.findings] == [(kind, op)]
    assert report.findings[0].bytes == 2 * 2 * 16 * 16 * 4


class ScaleUpsampled(nn.Module):
    """A (1, C, 1, 1) parameter, dense in both orders: ``.to(memory_format=channels_last)``
    restrides it all the same, and the upsample that follows its strides makes a channels_last
    map in the converted model only, mixed with an NCHW one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).contiguous()
        return y * torch.nn.functional.interpolate(self.scale, size=y.shape[-2:], mode="nearest")


class ProjectedPositions(nn.Module):
    """A position map made from a 2D parameter and projected by a 1x1 conv, whose weight the
    conversion restrides: the conv's output is channels_last in the converted model only."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 64))
        self.proj = nn.Conv2d(8, 8, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).contiguous()
        return y + self.proj(self.pos.view(1, 8, 8, 8))


@pytest.mark.parametrize("capture", ["fx", "hooks", "export"])
@pytest.mark.parametrize("build", [ScaleUpsampled, ProjectedPositions])
def test_tensors_made_from_restrided_parameters_are_the_conversions(capture: str, build: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(1, 3, 8, 8)
    mixed = "mul" if build is ScaleUpsampled else "add"
    with torch.no_grad():  # eager: the op mixes layouts in the converted model only
        for m, in_cl in ((model, False), (nhwc_audit.convert(model), True)):
            side = m.scale if build is ScaleUpsampled else m.pos.view(1, 8, 8, 8)
            made = (
                torch.nn.functional.interpolate(side, size=(8, 8), mode="nearest")
                if build is ScaleUpsampled
                else m.proj(side)
            )
            assert made.is_contiguous(memory_format=torch.channels_last) is in_cl and made.is_contiguous() is not in_cl
    report = nhwc_audit.audit(model, x, bandwidth=1e9, capture=capture)
    assert ("mixed", mixed) in [(f.kind.value, f.op) for f in report.findings]
