"""Stored tensors the conversion restrides, read as data: a position table kept as (1, H, W, C)
and permuted, a frequency table multiplied into tokens, a bias table expanded over the batch.
``model.to(memory_format=torch.channels_last)`` re-lays every 4D parameter and buffer, so ops
on views of them read an order the NCHW model never had: each case is charged what eager
PyTorch measures (:mod:`tests.eager_bytes`). Found by a sweep of timm: ConViT's gated
positional attention (a (1, N, N, 3) buffer expanded over the batch into a Linear, charged per
batch item), NaFlexViT's learned position embedding (interpolated from its permuted table: not
charged) and RoPE-mixed ViTs' frequency table (not charged)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.records import FindingKind
from tests.eager_bytes import eager_bytes


class ExpandedTable(nn.Module):
    """ConViT's GPSA: a (1, N, N, 3) buffer expanded over the batch into an ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Linear(3, 4)
        self.register_buffer("rel", torch.randn(1, 16, 16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        t = y.flatten(2).transpose(1, 2)
        p = self.pos(self.rel.expand(y.shape[0], -1, -1, -1))
        return p.permute(0, 3, 1, 2).softmax(-1).sum(1) @ t


_TABLE_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bicubic_antialias": lambda p: F.interpolate(p, size=(4, 4), mode="bicubic", antialias=True),
    "bilinear": lambda p: F.interpolate(p, size=(4, 4), mode="bilinear"),
    "nearest": lambda p: F.interpolate(p, size=(4, 4), mode="nearest"),
    "avg_pool2d": lambda p: F.avg_pool2d(p, 2),
    "max_pool2d": lambda p: F.max_pool2d(p, 2),
    "contiguous": lambda p: p.contiguous()[:, :, ::2, ::2],
    "mul": lambda p: (p * 2)[:, :, ::2, ::2],
}


class PermutedTable(nn.Module):
    """NaFlexViT's learned position embedding: a (1, H, W, C) parameter read through
    ``permute(0, 3, 1, 2)`` by an op that writes NCHW."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.patch(x).flatten(2).transpose(1, 2)
        return y + _TABLE_OPS[self.op](self.pos.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)


class FrequencyTable(nn.Module):
    """timm's RotaryEmbeddingMixed: a (2, depth, heads, L) parameter times token coordinates,
    then ``repeat_interleave``, which copies the product into row-major order."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.freqs = nn.Parameter(torch.randn(2, 3, 4, 8))
        self.register_buffer("t", torch.arange(16.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.patch(x).flatten(2).transpose(1, 2)
        f = self.t.unsqueeze(-1) * self.freqs[0].unsqueeze(-2)
        return y + f.sin().repeat_interleave(2, -1).sum((0, 1))


def _charged(r: object) -> list[tuple[str, str, int]]:
    return [(f.kind.value, f.op, f.bytes) for f in r.findings]  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_table_expanded_over_the_batch_is_charged_what_it_stores(batch: int, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = ExpandedTable().eval(), torch.randn(batch, 3, 4, 4)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected == 2 * 16 * 16 * 3 * 4 and r.summary.bytes_moved == expected, _charged(r)
    # read out of NHWC into the Linear's rows whatever the batch: a revert, as at batch 1
    assert [f.kind for f in r.findings] == [FindingKind.REVERT], _charged(r)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("op", sorted(_TABLE_OPS))
def test_a_permuted_table_read_into_another_order_is_charged_what_eager_moves(op: str, capture: str) -> None:
    torch.manual_seed(0)
    model, x = PermutedTable(op).eval(), torch.randn(2, 3, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == expected, (expected, _charged(r))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_restrided_frequency_table_copied_row_major_is_charged_what_eager_moves(capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = FrequencyTable().eval(), torch.randn(1, 3, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, _charged(r)


class NormAfterConvs(nn.Module):
    """pix2pix's conv, InstanceNorm, ReLU twice: each InstanceNorm a plain revert of an activation,
    whatever the conv's weight (a stored 4D tensor the conversion restrided) looks like."""

    def __init__(self, table_first: bool) -> None:
        super().__init__()
        self.table_first = table_first
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.instance_norm(self.a(x)))
        y = self.b(y)
        return F.relu(F.instance_norm(self.pos + y if self.table_first else y + self.pos))


@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("table_first", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_revert_of_an_activation_is_not_a_tables(batch: int, table_first: bool, capture: str) -> None:
    torch.manual_seed(0)
    model, x = NormAfterConvs(table_first).eval(), torch.randn(batch, 3, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    reverts = [f for f in r.findings if f.kind is FindingKind.REVERT]
    assert len(reverts) == 2 and r.summary.bytes_moved == eager_bytes(model, (x,)).added, _charged(r)
    assert not [f.hint for f in reverts if "stored tensor" in f.hint], [f.hint for f in reverts]


class ExpandedOffsets(nn.Module):
    """A deformable conv's offsets, a stored table expanded over the batch: torchvision's kernel
    calls ``offset.contiguous()``, which copies what the table stores into another order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(1, 18, 16, 16) * 0.1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import deform_conv2d

        y = self.conv(x)
        return deform_conv2d(y, self.offset.expand(y.shape[0], -1, -1, -1), self.w, padding=1)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["auto", "export", "hooks"])  # (deform_conv2d branches on a shape: no fx)
def test_a_library_kernels_copy_of_an_expanded_table_is_charged_what_it_stores(capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = ExpandedOffsets().eval(), torch.randn(4, 3, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, (expected, _charged(r))


class TableAddedContiguous(nn.Module):
    """A permuted (1, H, W, C) table interpolated, then added with ``.contiguous()``: NCHW copies
    the table at the contiguous, channels_last reads it across at the add, in one line."""

    def __init__(self, table_first: bool) -> None:
        super().__init__()
        self.table_first = table_first
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, 4, 6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.patch(x)
        t = F.interpolate(self.pos.permute(0, 3, 1, 2), size=(4, 6), mode="bilinear")
        return t.contiguous() + y if self.table_first else y + t.contiguous()


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("table_first", [False, True])
def test_a_copy_nchw_makes_at_either_operand_is_netted(table_first: bool, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = TableAddedContiguous(table_first).eval(), torch.randn(2, 3, 8, 12)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, (expected, _charged(r))
