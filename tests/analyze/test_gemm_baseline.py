"""A GEMM reads a transposed operand as it is: the NCHW baseline charges it no copy for that. It did
in the graph captures (``moves.reorder_bytes`` counted the operand as reordered into the output's
order), and the phantom was taken off the channels_last matmul's real copy: EfficientFormerV2's
talking-heads attention at batch 2 was charged 32,768 B less under fx and export than under the
eager capture, whose baseline pairs no such copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.analyze.moves import moved_bytes
from tests.eager_bytes import eager_bytes


class TalkingHeads(nn.Module):  # EfficientFormerV2's Attention2d, cut down
    def __init__(self, c: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.th1, self.th2 = nn.Conv2d(heads, heads, 1), nn.Conv2d(heads, heads, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x).reshape(b, self.h, -1, h * w).permute(0, 1, 3, 2)
        k = self.k(x).reshape(b, self.h, -1, h * w)
        v = self.v(x).reshape(b, self.h, -1, h * w).permute(0, 1, 3, 2)
        attn = self.th2(self.th1(q @ k).softmax(-1))
        return self.proj((attn @ v).transpose(2, 3).reshape(b, c, h, w))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_captures_charge_attention_on_head_views_alike(batch: int) -> None:
    torch.manual_seed(0)
    model, x = TalkingHeads().eval(), torch.randn(batch, 32, 8, 8)
    charged: dict[str, dict[str, int]] = {}
    for capture in ("fx", "hooks", "export"):
        by_op = charged.setdefault(capture, {})
        for f in audit(model, x, capture=capture, bandwidth=1e9).findings:
            by_op[f.op] = by_op.get(f.op, 0) + f.bytes  # the eager capture records each of a matmul's copies
    assert charged["fx"] == charged["hooks"] == charged["export"], charged
    assert sum(charged["fx"].values()) == eager_bytes(model, (x,)).added


def test_a_matmul_moves_nothing_reading_a_transposed_operand() -> None:
    torch.manual_seed(0)
    r = audit(nn.Sequential(TalkingHeads()).eval(), torch.randn(2, 32, 8, 8), bandwidth=1e9)
    matmuls = [n for n in r.nodes if n.op_name.lower() in ("matmul", "bmm")]
    assert matmuls and all(moved_bytes(n) == sum(h.bytes for h in n.hidden) for n in matmuls)
