"""A latent break is one that fixing its revert would expose: the view re-tried on the strides the
reverting op's input has (a 5D view of a map is not channels_last_3d)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.analyze.exposed import view_strides
from tests.eager_bytes import eager_bytes


def test_view_strides_say_what_tensor_view_says() -> None:
    rng = random.Random(0)
    checked = 0
    for shape in [(2, 8, 4, 4), (2, 4, 2, 4, 4), (1, 3, 1, 5), (2, 1, 6)]:
        for order in itertools.permutations(range(len(shape))):
            base = torch.empty([shape[d] for d in order]).permute(*sorted(range(len(shape)), key=order.index))
            n = base.numel()
            for _ in range(6):
                new: list[int] = []
                left = n
                while left > 1:
                    f = rng.choice([d for d in range(1, left + 1) if left % d == 0])
                    new.append(f)
                    left //= f
                new = new or [1]
                try:
                    want: list[int] | None = list(base.view(*new).stride())
                except RuntimeError:
                    want = None
                got = view_strides(base.shape, base.stride(), new)
                assert got == want or (want is not None and got is not None and _same_for_size_one(new, got, want)), (
                    tuple(base.shape),
                    base.stride(),
                    new,
                )
                checked += 1
    assert checked > 200


def _same_for_size_one(shape: list[int], a: list[int], b: list[int]) -> bool:
    return all(x == y or n == 1 for n, x, y in zip(shape, a, b, strict=True))


class GroupSoftmax(nn.Module):
    """A softmax over a channel group of ``x.view(N, G, C // G, H, W)``, then ``view`` back (or
    ``view(N, -1)``, which no layout of the channels_last map allows without a copy)."""

    def __init__(self, back: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.back = back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        g = y.view(n, 4, c // 4, h, w).softmax(2)
        if self.back:
            return self.b(g.view(n, c, h, w))
        return self.b(g.view(n, -1).view(n, c, h, w))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_view_back_from_a_channel_group_softmax_is_no_latent_break(capture: str, mode: str) -> None:
    # kept in its input's order, the softmax's output views back to N x C x H x W
    torch.manual_seed(0)
    model, x = GroupSoftmax(back=True).eval(), torch.randn(2, 8, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert [f.kind.value for f in r.findings] == ["revert", "conversion"]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_view_that_no_order_of_the_map_allows_stays_a_latent_break(capture: str) -> None:
    torch.manual_seed(0)
    model, x = GroupSoftmax(back=False).eval(), torch.randn(2, 8, 16, 16)
    kinds = [f.kind.value for f in audit(model, x, bandwidth=1e9, capture=capture).findings]
    assert "latent_break" in kinds
    y = nn.Conv2d(8, 8, 1)(x.to(memory_format=torch.channels_last)).view(2, 4, 2, 16, 16)
    with pytest.raises(RuntimeError):  # eager: the softmax's input, viewed as the model views it
        y.view(2, -1)
