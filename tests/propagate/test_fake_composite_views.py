"""A fake run strides the views a composite op makes inside (``einsum``'s reshape of its matmul's
result) as eager does. FakeTensor's view leaves dims of size 1 strided otherwise than ATen's
``computeStride``, and the next convolution's backward picks its kernel path by them: at H == 1 or one
channel a fake training audit charged what eager does not move, or missed what it does (fake 9,216 B
where eager adds 4,608 at 2x8x1x9; 576 of 1,152 with one channel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_backward_bytes


class EinsumBetweenConvs(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, c, 3, padding=1), nn.Conv2d(c, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(c, c) / c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.einsum("bchw,oc->bohw", self.c1(x), self.w))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize(("c", "shape"), [(8, (2, 8, 1, 9)), (1, (2, 8, 6, 6)), (8, (2, 8, 8, 8))])
def test_an_einsum_between_convolutions_trains_as_eager(c: int, shape: tuple[int, ...], mode: str) -> None:
    torch.manual_seed(0)
    model, x = EinsumBetweenConvs(c).train(), torch.randn(shape)
    expected = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == expected, [(f.node, f.bytes) for f in report.findings if f.kind.value == "backward"]
