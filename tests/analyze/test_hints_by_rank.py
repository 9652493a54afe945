"""A hint names the memory format and the dim order of the tensor it is about: a volume's
(``torch.channels_last_3d``, ``(N, D, H, W, C)``), where ``torch.channels_last`` raises ("required
rank 4 tensor to use channels_last format"), and a 2D map's as before. Each memory format a hint
names is one its tensor takes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from nhwc_audit import audit


class Contiguous(nn.Module):
    def __init__(self, conv: type[nn.Module], op: str) -> None:
        super().__init__()
        self.a, self.b, self.op = conv(4, 8, 3, padding=1), conv(8, 8, 3, padding=1), op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y.contiguous() if self.op == "contiguous" else y.softmax(1))


@pytest.mark.parametrize("op", ["contiguous", "softmax"])
@pytest.mark.parametrize("rank", [4, 5])
def test_a_hint_names_the_memory_format_of_its_tensors_rank(rank: int, op: str) -> None:
    conv = nn.Conv3d if rank == 5 else nn.Conv2d
    x = torch.randn(2, 4, *([6] * (rank - 2)))
    (finding,) = [f for f in audit(Contiguous(conv, op).eval(), x, bandwidth=1e9).findings if f.kind.value == "revert"]
    formats = re.findall(r"torch\.channels_last\w*", finding.hint)
    order = "(N, D, H, W, C)" if rank == 5 else "(N, H, W, C)"
    assert (formats or [order in finding.hint]) and "?" not in finding.hint, finding.hint
    for name in formats:  # every format named is one a tensor of this rank takes
        torch.empty(x.shape).contiguous(memory_format=getattr(torch, name.removeprefix("torch.")))
    if op == "softmax":
        assert order in finding.hint, finding.hint


def test_the_cuda_norm_hint_of_a_volume_names_channels_last_3d() -> None:
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv3d(8, 8, 3, padding=1)).eval()
    r = audit(model, torch.randn(2, 4, 6, 6, 6), mode="fake", device="cuda", bandwidth=1e9)
    (finding,) = [f for f in r.findings if f.kind.value == "revert"]
    assert "torch.channels_last_3d" in finding.hint and not re.search(r"torch\.channels_last\b", finding.hint)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle of a 2D map: its copy is of a 5D view."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y.view(2, 2, 4, 6, 6).transpose(1, 2).contiguous().view(2, 8, 6, 6))


def test_the_hint_for_a_view_of_a_2d_map_names_the_maps_dim_order() -> None:
    r = audit(Shuffle().eval(), torch.randn(2, 4, 6, 6), bandwidth=1e9)
    (finding,) = [f for f in r.findings if f.kind.value == "revert"]
    assert len(finding.shape) == 5 and "(N, H, W, C)" in finding.hint and "(N, D, H, W, C)" not in finding.hint


class OneChannelHead(nn.Module):
    """A head to one channel of a map an op left NCHW (a cumsum over H)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x).cumsum(2))


def test_a_one_channel_convs_conversion_says_its_weight_decides_and_the_advice_holds() -> None:
    from nhwc_audit import convert
    from tests.eager_bytes import transposes

    torch.manual_seed(0)
    model, x = OneChannelHead().eval(), torch.randn(2, 4, 6, 6)
    (finding,) = [f for f in audit(model, x, bandwidth=1e9).findings if f.kind.value == "conversion"]
    assert finding.node == "head" and "weight NCHW after converting" in finding.hint, finding.hint
    converted = convert(model)
    cl = x.contiguous(memory_format=torch.channels_last)
    relaid = [t for t in transposes(converted, (cl,)) if t.op == "convolution" and t.shape[1] == 1]
    assert relaid  # the head re-lays its input ...
    converted.head.weight.data = converted.head.weight.data.to(memory_format=torch.contiguous_format)
    assert not [t for t in transposes(converted, (cl,)) if t.op == "convolution" and t.shape[1] == 1]  # ... not after


class _WindowDepartition(nn.Module):
    """torchvision maxvit_t's window departition (maxvit.py:279): a 6D permute of windows reshaped
    back to (B, C, H, W), copied row-major; or the same copy in (B, H, W, C) order, then a free
    permute (what the hint advises)."""

    def __init__(self, nhwc_order: bool) -> None:
        super().__init__()
        self.a, self.b, self.nhwc_order = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nhwc_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, p = self.a(x), 4
        b, c, h, w = y.shape
        t = y.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p, c)  # partition
        t = t.reshape(b, h // p, w // p, p, p, c)
        if self.nhwc_order:
            return self.b(t.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c).permute(0, 3, 1, 2))
        return self.b(t.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w))


def test_a_window_reshaped_back_into_a_map_gets_the_nhwc_order_hint_not_the_stack_one() -> None:
    """maxvit_t's first 'What to change' line told the user to add a stack of maps instead of summing
    it: the hint for a revert from a higher rank assumed a reduction. A reshape keeps every element;
    doing it in (N, H, W, C) order (the hint's advice) gives the same values and moves nothing."""
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    model, advised = _WindowDepartition(False).eval(), _WindowDepartition(True).eval()
    advised.load_state_dict(model.state_dict())
    report = audit(model, x, bandwidth=1e9)
    (revert,) = [f for f in report.findings if f.kind.value == "revert"]
    assert "(N, H, W, C) order" in revert.hint and "stack" not in revert.hint, revert.hint
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    with torch.no_grad():
        torch.testing.assert_close(advised(x), model(x))
    assert audit(advised, x, bandwidth=1e9).summary.bytes_moved == eager_bytes(advised, (x,)).added == 0


class _SumOverH(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).sum(2, keepdim=True) + 1


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_map_reduced_over_h_gets_the_op_s_own_hint_not_the_stack_one(capture: str) -> None:
    """A reduction judged by the order of the dims it keeps is hinted as any revert out of a map: a
    review found every such revert told to "add the maps instead" (the hint of a stack reduced)."""
    report = audit(_SumOverH().eval(), torch.randn(2, 3, 6, 5), bandwidth=1e9, capture=capture)
    (f,) = [f for f in report.findings if f.op == "sum"]
    assert f.kind.value == "revert" and f.bytes == 640
    assert f.hint.startswith("sum has no channels_last kernel on cpu") and "stack" not in f.hint, f.hint
