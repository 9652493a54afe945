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
