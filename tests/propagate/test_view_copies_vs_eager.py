"""A kernel that copies a view of a channels_last map flattened to fewer dims into row-major order.

``x.flatten(2)`` (or ``x.view(B, C, H * W)``) of a channels_last map is a view N x C x HW strided
(HW * C, 1, C): dense in memory, not row-major, where the NCHW map's view is row-major. A CPU
GroupNorm, InstanceNorm1d, softmax, Conv1d or ConvTranspose1d copies it row-major inside its kernel
(``input.contiguous()``) before it computes, as does ``contiguous()`` itself: copies no layout of
the node's shows (its tensors have no channels_last format). diffusers' attention blocks run their
GroupNorm so (``group_norm(h.transpose(1, 2))`` of the map's ``view(B, C, H * W).transpose(1, 2)``).
The audit charges them as the profiler sees them and as the ground truth
(``tests/eager_bytes.py``) counts them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes
from tests.support import profiled_copies_added


class Flat(nn.Module):
    """``op`` on the flattened map of a convolution (batch 2: oneDNN keeps it channels_last)."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.op(self.conv(x).flatten(2))
        return out


class AttentionNorm(nn.Module):
    """diffusers' ``AttnProcessor``: tokens of the map, a GroupNorm of their transpose (the map's
    view again), then a projection of the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.q = nn.Conv2d(4, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, c, hh, ww = h.shape
        tokens = h.view(b, c, hh * ww).transpose(1, 2)
        tokens = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
        out: torch.Tensor = self.q(tokens)
        return out


CASES: dict[str, Callable[[], nn.Module]] = {
    "GroupNorm": lambda: Flat(nn.GroupNorm(4, 16)),
    "InstanceNorm1d": lambda: Flat(nn.InstanceNorm1d(16)),
    "softmax over H * W": lambda: Flat(lambda t: t.softmax(-1)),
    "Conv1d": lambda: Flat(nn.Conv1d(16, 8, 3, padding=1)),
    "ConvTranspose1d": lambda: Flat(nn.ConvTranspose1d(16, 8, 2, stride=2)),
    "contiguous()": lambda: Flat(lambda t: t.contiguous()),
    "diffusers-style attention GroupNorm": AttentionNorm,
}

SHAPE = (2, 4, 8, 8)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_kernel_that_copies_a_flattened_map_row_major_is_charged_the_copy(name: str, mode: str, capture: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = CASES[name]().eval(), torch.randn(SHAPE)
    r = audit(model, x, mode=mode, capture=capture)
    whole = 2 * 4 * 2 * 16 * 8 * 8  # the flattened map, read and written
    assert [(f.kind.value, f.bytes) for f in r.findings] == [("conversion", whole)]
    assert "flattened to fewer dims" in r.findings[0].hint
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == profiled_copies_added(model, x) == whole


CONTROLS: dict[str, Callable[[], nn.Module]] = {
    # an element-wise op keeps the view's strides: nothing copied
    "flatten(2) * 2": lambda: Flat(lambda t: t * 2),
    # tokens (B x HW x C) are row-major in channels_last: a LayerNorm reads them as they are
    "LayerNorm on tokens": lambda: Flat(nn.Sequential(Transpose(), nn.LayerNorm(16))),
    # kthvalue clones its input row-major whatever its order: NCHW's view too, the same bytes
    "kthvalue along H * W": lambda: Flat(lambda t: t.kthvalue(2, -1)[0]),
    # a Linear's tokens transposed: the same view in either layout, copied in NCHW too
    "softmax of a Linear's transposed tokens": lambda: Flat(nn.Sequential(Transpose(), nn.Linear(16, 8), Softmax1())),
}


class Transpose(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2)


class Softmax1(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).softmax(-1)


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_a_view_read_as_it_is_or_copied_in_nchw_too_is_charged_nothing(name: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = CONTROLS[name]().eval(), torch.randn(SHAPE)
    r = audit(model, x)
    assert not r.findings, r.findings
    assert eager_bytes(model, (x,)).added == 0 and profiled_copies_added(model, x) <= 0


@pytest.mark.slow
def test_a_diffusers_attention_block_is_charged_its_group_norms_copy() -> None:
    """diffusers' own Attention (a mid block's, as UNet2DModel and AutoencoderKL build it), which fx
    cannot trace: the eager recording charges its GroupNorm's copy of the map's view."""
    from diffusers.models.attention_processor import Attention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Attention(
        32,
        heads=1,
        dim_head=32,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()
    x = torch.randn(1, 32, 8, 8)
    r = audit(model, x)
    whole = 2 * 4 * 32 * 8 * 8
    assert r.meta.capture == "hooks"
    assert [(f.kind.value, f.op, f.bytes) for f in r.findings] == [("conversion", "GroupNorm", whole)]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == profiled_copies_added(model, x) == whole


class MapProduct(nn.Module):
    """A matmul of a channels_last map and its transpose (per channel, H x W matrices): at batch 1
    it folds the batch and channels into a view whose matrices are neither row- nor column-major
    in channels_last memory, which the CPU ``bmm`` copies matrix by matrix (in bfloat16, whole);
    NCHW's are row-major and its transpose column-major, read as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return torch.matmul(h, h.transpose(-1, -2))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_one_matmul_of_maps_is_charged_what_bmm_copies(dtype: torch.dtype, mode: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = MapProduct().eval(), torch.randn(1, 4, 8, 8)
    r = audit(model, x, mode=mode, dtype=dtype)
    both = 2 * 2 * (16 * 8 * 8) * dtype.itemsize  # each operand, read and written
    # (it reads a channels_last map and writes NCHW: a revert, as its copies of a transposed view were a conversion)
    assert [(f.kind.value, f.op, f.bytes) for f in r.findings] == [("revert", "matmul", both)]
    if dtype is torch.float32:  # (the profiler's count here is float32's)
        assert profiled_copies_added(model, x) == both
    assert eager_bytes(copy.deepcopy(model).to(dtype), (x.to(dtype),)).added == both


def test_a_linear_layers_transposed_weight_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GEMM reads a 2D transposed operand as it is (a Linear's ``weight.t()``, column-major): no
    kernel is run again for it (an SD-1.5-sized fake audit asked 46 of them, 0.47 s, before)."""
    from nhwc_audit.propagate import revert_kernels

    asked: list[str] = []
    real = revert_kernels._asked

    def spy(func: object, *rest: object) -> object:
        asked.append(str(func))
        return real(func, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(revert_kernels, "_asked", spy)
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.Flatten(2), Transpose(), nn.Linear(16, 32), nn.Linear(32, 8))
    for mode in ("real", "fake"):
        for capture in ("fx", "hooks"):  # (the eager recording sees every call: no module is blind there)
            audit(model.eval(), torch.randn(2, 4, 8, 8), mode=mode, capture=capture)
    assert asked == []
