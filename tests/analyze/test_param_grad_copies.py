"""A training step's ``loss.backward()`` writes each parameter's gradient into its ``.grad``, which
keeps the parameter's strides: autograd copies a gradient computed in another layout into them
(``AccumulateGrad``). A converted (1, C, H, W) table added to a map is channels_last; its gradient,
summed over the batch, comes out NCHW: a copy as large as the table, every step, that the NCHW
model does not make. The audit takes gradients with ``torch.autograd.grad`` (no ``.grad``) and
missed it, and so did the ground truth; the CPU profiler's ``aten::copy_`` under ``AccumulateGrad``
is the reference here, measured independently of both."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_backward_bytes, eager_bytes


class Table(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.c1(x) + self.pos)


def _accumulate_copies(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes (read and write) of the ``aten::copy_`` calls under ``AccumulateGrad`` in one backward."""
    out = model(x)
    with torch.profiler.profile(record_shapes=True) as prof:
        out.backward(torch.randn_like(out))
    return sum(
        2 * x.element_size() * math.prod(e.input_shapes[0])
        for e in prof.events()
        if e.name == "aten::copy_" and e.cpu_parent is not None and "AccumulateGrad" in e.cpu_parent.name
    )


def _profiled_added(model: nn.Module, x: torch.Tensor) -> int:
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    cl = copy.deepcopy(model).to(memory_format=fmt)
    return _accumulate_copies(cl, x.contiguous(memory_format=fmt)) - _accumulate_copies(copy.deepcopy(model), x)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize(("shape", "batch"), [((1, 8, 1, 16), 1), ((1, 8, 1, 16), 2), ((1, 8, 16, 16), 2)])
def test_a_parameter_gradient_copied_into_its_channels_last_grad_is_charged(
    shape: tuple[int, ...], batch: int, capture: str, mode: str
) -> None:
    torch.manual_seed(0)
    model, x = Table(shape).train(), torch.randn(batch, 3, 16, 16)
    expected = _profiled_added(model, x)
    assert expected == 2 * 4 * math.prod(shape)
    r = audit(model, x, train=True, capture=capture, mode=mode)
    copies = [f for f in r.findings if f.kind.value == "backward" and not f.intrinsic]
    assert [(f.op, f.bytes) for f in copies] == [("add", expected)]
    assert "AccumulateGrad of pos" in copies[0].hint and ".grad keeps its parameter's layout" in copies[0].hint
    assert eager_backward_bytes(model, (x,)).relayed == expected
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added + eager_backward_bytes(model, (x,)).added


def test_a_gradient_in_the_parameters_own_layout_is_not_copied() -> None:
    """A (1, C, 1, 1) table is dense in both orders: its gradient keeps its strides, nothing copied."""
    torch.manual_seed(0)
    model, x = Table((1, 8, 1, 1)).train(), torch.randn(2, 3, 16, 16)
    assert _profiled_added(model, x) == 0
    r = audit(model, x, train=True)
    assert not [f for f in r.findings if f.kind.value == "backward" and not f.intrinsic]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("rank", [4, 5])
def test_a_gradient_another_tensor_holds_is_copied_in_nchw_too(rank: int, mode: str) -> None:
    """At batch 1 a table of the map's own shape gets the very gradient the add's output got (add's
    backward hands one tensor to both operands): ``.grad`` cannot take it as it is, and the NCHW model
    copies it as well (the profiler: 16,384 B under AccumulateGrad in both runs at 1x8x16x16; 32,768 in
    a Conv3d model's). It was charged whole."""
    torch.manual_seed(0)
    if rank == 4:
        model, x = Table((1, 8, 16, 16)).train(), torch.randn(1, 3, 16, 16)
    else:
        model = nn.Sequential(_Table3d()).train()
        x = torch.randn(1, 1, 8, 8, 8)
    assert _profiled_added(model, x) == 0
    r = audit(model, x, train=True, mode=mode)
    assert not [f for f in r.findings if "AccumulateGrad" in f.hint]
    assert eager_backward_bytes(model, (x,)).relayed == 0


class _Table3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 4, 1)
        self.p = nn.Parameter(torch.rand(1, 8, 8, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(x) + self.p)


class TransposedWeight(nn.Module):
    """A weight transposed in forward (diffusers' FIR upsampler flips and transposes its conv's for
    ``conv_transpose2d``): its gradient comes back transposed in either layout, and ``AccumulateGrad``
    copies it into the parameter's strides in the NCHW model as much as in channels_last."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 16, 3, 3))
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.transpose(0, 1) if self.view == "transpose" else self.w.permute(1, 0, 3, 2)
        return self.post(nn.functional.conv2d(self.pre(x), w, padding=1))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("view", ["transpose", "permute"])
def test_a_weight_transposed_in_forward_is_copied_by_accumulate_grad_in_nchw_too(view: str, mode: str) -> None:
    # the NCHW baseline's run holds views of the parameters: its walk missed their copies and left the
    # channels_last one charged whole (55,296 B where eager moves 36,864)
    torch.manual_seed(0)
    model, x = TransposedWeight(view).train(), torch.randn(2, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
    assert report.meta.backward
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth
    assert _profiled_added(model, x) == 0  # the profiler: AccumulateGrad copies as much in NCHW
