"""A map made from an attention's result in channel-major order, ``bmm(v, attn^T).view(b, c, h, w)``:
NCHW, and converted at the next convolution. The audit charged the conversion but counted no NCHW node
(100% of the spatial nodes "stayed channels_last" beside it: a new user's find), and its hint said to fix
the view "so it stays channels_last", which a view cannot do. The map now starts an NCHW region, and the
hint names the change that makes it channels_last: tokens (b, hw, c), transposed and viewed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes


class Attention2d(nn.Module):
    def __init__(self, tokens_last: bool, c: int = 16) -> None:
        super().__init__()
        self.tokens_last = tokens_last
        self.stem, self.q, self.k, self.v = (nn.Conv2d(3 if i == 0 else c, c, 1) for i in range(4))
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        b, c, h, w = y.shape
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)
        k, v = self.k(y).reshape(b, c, h * w), self.v(y).reshape(b, c, h * w)
        attn = torch.bmm(q, k).softmax(-1)
        if self.tokens_last:  # the hint's change: (b, hw, c), transposed and viewed
            out = torch.bmm(attn, v.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        else:
            out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return y + self.proj(out)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_map_made_nchw_from_tokens_is_an_nchw_region_with_a_hint_that_works(capture: str) -> None:
    torch.manual_seed(0)
    model, x = Attention2d(False).eval(), torch.randn(2, 3, 8, 8)
    report = audit(model, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    (conversion,) = [f for f in report.findings if f.kind.value == "conversion"]
    assert "(N, H*W, C)" in conversion.hint and "bmm(attn, v.transpose(1, 2))" in conversion.hint
    assert report.summary.nchw_nodes >= 1 and report.summary.nchw_bytes > 0
    (region,) = report.regions
    assert conversion.node in region.exits and region.entries == (conversion.origin,)
    torch.manual_seed(0)
    changed = Attention2d(True).eval()
    fixed = audit(changed, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    assert fixed.summary.bytes_moved == eager_bytes(changed, (x,)).added == 0
    assert fixed.summary.nchw_nodes == 0 and not fixed.regions
