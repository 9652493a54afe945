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
    def __init__(self, contiguous: bool, from_4d: bool, heads: int = 2, win: int = 4, dim: int = 16) -> None:
        super().__init__()
        n = win * win
        self.heads, self.n, self.contiguous, self.from_4d = heads, n, contiguous, from_4d
        self.table = nn.Parameter(torch.randn((2 * win - 1) ** 2, heads))
        self.table_4d = nn.Parameter(torch.randn(1, heads, n, n))
        self.register_buffer("idx", torch.randint(0, (2 * win - 1) ** 2, (n * n,)), persistent=False)
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
@pytest.mark.parametrize("contiguous", [True, False])
def test_a_bias_made_from_a_table_is_no_finding(capture: str, contiguous: bool) -> None:
    torch.manual_seed(0)
    model = RelPosBias(contiguous, from_4d=False).eval()
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
