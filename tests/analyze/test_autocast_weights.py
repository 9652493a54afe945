"""Under CPU autocast the eager capture records the cast of each weight (``_to_copy``) as an op
of its own: a convolution then reads a computed weight, channels_last as the conversion lays
weights out. That is the conversion's weight, not an activation whose layout disagrees with the
NCHW input: the convolution converts that input, as fx (where the cast happens inside the
kernel's call) and the float32 run report it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit, convert


class NormThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.n = nn.InstanceNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.n(self.c(x)))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "autocast"])
@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_cast_weight_is_a_weight(capture: str, autocast: torch.dtype | None) -> None:
    torch.manual_seed(0)
    model, x = NormThenConv().eval(), torch.randn(1, 3, 16, 16)
    cl = convert(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        normed = cl.n(cl.c(x.contiguous(memory_format=torch.channels_last)))
        out = cl.c2(normed)
    # eager: the norm's output is NCHW, the conv's channels_last (it converts its input)
    assert normed.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    r = audit(model, x, capture=capture, autocast=autocast, bandwidth=1e9)
    kinds = sorted(f.kind.value for f in r.findings)
    assert kinds == ["conversion", "revert"], [(f.kind.value, f.node) for f in r.findings]


class HyperConst(nn.Module):
    """A convolution of a learned constant map (StyleGAN's constant input: computed from
    parameters only, channels_last once converted) by a filter computed from the model's input
    (a hypernetwork: NCHW). The computed-from-parameters input is the data here, not the weight:
    the operands disagree (mixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.const = nn.Parameter(torch.randn(1, 16, 8, 8))
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.hyper = nn.Linear(16, 16 * 16 * 9)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        feat = self.stem(img)
        w = self.hyper(feat.mean((2, 3))).view(16, 16, 3, 3)
        return torch.nn.functional.conv2d(torch.tanh(self.const), w, padding=1) + feat


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_constant_map_convolved_by_a_computed_filter_is_mixed(capture: str) -> None:
    torch.manual_seed(0)
    model, img = HyperConst().eval(), torch.randn(1, 3, 8, 8)
    cl = convert(model)
    with torch.no_grad():
        data = torch.tanh(cl.const)
        w = cl.hyper(cl.stem(img.contiguous(memory_format=torch.channels_last)).mean((2, 3))).view(16, 16, 3, 3)
    assert data.is_contiguous(memory_format=torch.channels_last) and not data.is_contiguous()
    assert w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
    r = audit(model, img, capture=capture, bandwidth=1e9)
    assert [f.op for f in r.findings if f.kind.value == "mixed"] == ["conv2d"], [
        (f.kind.value, f.op) for f in r.findings
    ]
