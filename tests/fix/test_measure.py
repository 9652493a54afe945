"""The repair measures a rewrite by running only what it can change (:mod:`nhwc_audit.fix.measure`):
from its first rewritten node until the live values have the measured run's layouts again. Each
candidate rewrite of these models, measured so, must give the records and summary a whole run
of the rewritten graph gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit.capture.fx import trace
from nhwc_audit.examples import UNet
from nhwc_audit.fix.islands import rewritten_nodes
from nhwc_audit.fix.measure import Measured, incremental, measure
from nhwc_audit.fix.repair import _apply
from nhwc_audit.fix.rewrites import candidates, rewritable_copy
from nhwc_audit.prepare.copy import convert


class Windows(nn.Module):
    """Attention over windows of a map, as MaxViT's blocks: permutes and reshapes whose copies
    the repair's inserted contiguous(channels_last) moves, three blocks deep."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.qkv = nn.ModuleList(nn.Linear(c, 3 * c) for _ in range(3))
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.norm = nn.InstanceNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for qkv, conv in zip(self.qkv, self.convs, strict=True):
            b, c, h, w = x.shape
            t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
            q, k, v = qkv(t).chunk(3, dim=-1)
            t = F.scaled_dot_product_attention(q, k, v)
            x = x + conv(t.reshape(b, h, w, c).permute(0, 3, 1, 2))
            x = self.norm(x.contiguous())
        return x


class PadTwice(nn.Module):
    """A circular pad (NCHW out on the CPU) read by two convolutions: the repair inserts one
    conversion back after it, a node that moves every node after it one place on."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.a(x), (1, 1, 1, 1), mode="circular")
        return self.b(y) + self.c(y)


def _records(m: Measured) -> list[tuple[Any, ...]]:
    return [(r.name, r.index, r.users, r.inputs, r.outputs, r.hidden, r.error, r.nchw_bytes) for r in m.records]


def _measured_in_part_as_whole(gm: torch.fx.GraphModule, sample: tuple[Any, ...], base: Measured, cand: Any) -> None:
    """``cand`` applied to a copy of ``gm`` (measured: ``base``) is measured in part as in whole."""
    trial = rewritable_copy(gm)
    _apply(trial, [cand], compile=False)
    part = measure(trial, sample, {}, 1e9, {}, base=base, changed=rewritten_nodes(trial, gm))
    whole = measure(trial, sample, {}, 1e9, {})
    assert _records(part) == _records(whole), cand
    assert part.analysis.summary == whole.analysis.summary, cand


@pytest.mark.parametrize(
    "build",
    [
        lambda: (UNet(), torch.randn(1, 3, 32, 32)),
        lambda: (Windows(), torch.randn(2, 3, 8, 8)),
        lambda: (PadTwice(), torch.randn(2, 3, 8, 8)),
    ],
    ids=["unet", "windows", "inserted"],
)
def test_each_rewrite_measured_in_part_is_measured_as_a_whole_run(build: Callable[[], Any]) -> None:
    model, x = build()
    gm = trace(convert(model.eval())).gm
    sample = (x.contiguous(memory_format=torch.channels_last),)
    base = measure(gm, sample, {}, 1e9, {})
    tried = 0
    for cand in candidates(gm, base.records, base.analysis):
        _measured_in_part_as_whole(gm, sample, base, cand)
        tried += 1
    assert tried >= 1


def test_a_partial_measurement_runs_only_what_a_rewrite_changes() -> None:
    """On the bundled UNet, a rewrite in its last decoder block runs a few of its nodes."""
    model, x = UNet(), torch.randn(1, 3, 32, 32)
    gm = trace(convert(model.eval())).gm
    sample = (x.contiguous(memory_format=torch.channels_last),)
    base = measure(gm, sample, {}, 1e9, {})
    last = max(
        candidates(gm, base.records, base.analysis), key=lambda c: [n.name for n in gm.graph.nodes].index(c.node)
    )
    trial = rewritable_copy(gm)
    _apply(trial, [last], compile=False)
    part = measure(trial, sample, {}, 1e9, {}, base=base, changed=rewritten_nodes(trial, gm))
    ran = [name for name in part.values if part.values[name] is not base.values.get(name)]
    assert 0 < len(ran) < len(base.records) // 4, ran


def test_a_graph_that_restrides_in_place_is_measured_whole() -> None:
    class Unsqueezes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).mean(1)
            y.unsqueeze_(1)
            return y

    assert not incremental(trace(Unsqueezes()).gm)
    assert incremental(trace(UNet()).gm)


@pytest.mark.slow
def test_maxvit_rewrites_measured_in_part_are_measured_as_whole_runs() -> None:
    """torchvision's MaxViT at 224x224: 24 candidate rewrites, one per attention block's copies
    (its repair took 15.8 s with each measured whole, 7.8 s measured in part)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    gm = trace(convert(tvm.maxvit_t().eval())).gm
    sample = (torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last),)
    base = measure(gm, sample, {}, 1e9, {})
    cands = list(candidates(gm, base.records, base.analysis))
    assert len(cands) >= 10
    for cand in cands[::3]:
        _measured_in_part_as_whole(gm, sample, base, cand)
