"""A fake audit leaves no fake tensor in the caches of the model's code, and reads back no real
one (transformers' MaskFormer keeps its sine position embedding in an ``lru_cache`` keyed on
shape, device and dtype, shared by every instance)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.prepare.caches import code_caches


def _cached(fn):  # type: ignore[no-untyped-def]
    """A wrapper that holds its cache in a closure, as transformers' does."""
    cached = functools.lru_cache(maxsize=1)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        return cached(*args, **kwargs)

    return wrapper


@functools.lru_cache(maxsize=4)
def _ramp(h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(h * w, dtype=dtype).view(1, 1, h, w) / (h * w)


class PositionEmbedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    @staticmethod
    @_cached
    def embedding(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n, c, h, w = shape
        return torch.linspace(0, 1, c * h * w, dtype=dtype).view(1, c, h, w).expand(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.embedding(y.shape, y.dtype) + _ramp(y.shape[2], y.shape[3], y.dtype)


def test_the_caches_of_the_models_code_are_found() -> None:
    assert len(code_caches(PositionEmbedded())) == 2


@pytest.mark.parametrize("capture", ["hooks", "export"])  # an fx graph holds the cached code traced through
def test_the_users_model_runs_after_a_fake_audit_and_a_fake_audit_after_a_real_one(capture: str) -> None:
    model = PositionEmbedded().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)  # the caches hold real tensors
    for mode in ("fake", "real", "fake"):
        r = audit(model, x, bandwidth=1e9, mode=mode, capture=capture)
        assert r.meta.capture == capture
    with torch.no_grad():
        after = model(x)  # would raise on a FakeTensor left in a cache
    assert type(after) is torch.Tensor and torch.equal(after, expected)
