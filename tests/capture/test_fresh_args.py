"""A function the graph calls whole that updates its list argument in place: torchvision's swin3d
clips its window list to a small input in ``_get_window_and_shift_size`` (``torch.fx.wrap``-ed).
``fx.Interpreter`` hands a node its lists as fx keeps them, immutable, where the GraphModule's code and
the model's build them anew: every audit of swin3d_t at a clip under its 8x7x7 window said the fx
graph was wrong ("'immutable_list' object does not support mutation") and fell back to module
hooks, a train audit audited no backward, and the repair blamed the model ("the model's own error
at the audited shapes")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit.propagate.fresh_args import fresh
from tests.eager_bytes import eager_backward_bytes, eager_bytes


@torch.fx.wrap
def clip_window(window: list[int], size: list[int]) -> list[int]:
    for i in range(2):
        if size[i] <= window[i]:
            window[i] = size[i]  # updates its argument, as torchvision's swin3d helper does
    return window


class Clipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.window = [7, 7]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = clip_window(self.window.copy(), [x.shape[2], x.shape[3]])
        y = self.conv(x)
        return self.out(y.softmax(1).contiguous() * (w[0] * w[1]))


@pytest.mark.parametrize("train", [False, True])
def test_a_graph_whose_function_updates_its_list_argument_is_audited_by_fx(train: bool) -> None:
    torch.manual_seed(0)
    model, x = Clipped().train(train), torch.randn(2, 3, 6, 6)  # 6 <= 7: the helper writes its list
    report = nhwc_audit.audit(model, x, bandwidth=1e9, train=train)
    assert report.meta.capture == "fx", report.meta.capture_notes
    assert not any("immutable" in n for n in report.meta.capture_notes)
    forward = sum(f.bytes for f in report.findings if f.kind.value != "backward")
    assert forward == eager_bytes(model, (x,)).added > 0
    if train:
        assert report.meta.backward
        backward = sum(f.bytes for f in report.findings if f.kind.value == "backward")
        assert backward == eager_backward_bytes(model, (x,)).added


def test_its_repair_runs_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    model, x = Clipped().eval(), torch.randn(2, 3, 6, 6)
    report = nhwc_audit.audit(model, x, bandwidth=1e9).repaired()
    assert report.repair is not None and report.repair.steps
    with torch.no_grad():
        torch.testing.assert_close(report.repaired_module(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_fresh_copies_lists_and_dicts_and_keeps_the_rest() -> None:
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    t = torch.zeros(1)
    got = fresh((immutable_list([1, immutable_list([t])]), immutable_dict({"a": immutable_list([2])}), 3))
    assert got == ([1, [t]], {"a": [2]}, 3)
    assert type(got[0]) is list and type(got[0][1]) is list and type(got[1]) is dict and got[0][1][0] is t


@pytest.mark.slow
def test_swin3d_is_audited_by_fx_at_a_clip_under_its_window() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.video.swin3d_t(weights=None).eval(), torch.randn(1, 3, 4, 32, 32)
    report = nhwc_audit.audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "fx", report.meta.capture_notes
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added
