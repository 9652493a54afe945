"""A 2D/3D tensor a pointwise op broadcasts onto a channels_last map (``h + p``, ``p`` a (C, H, W)
table): ``model.to(memory_format=torch.channels_last)`` re-lays 4D/5D tensors only, so the table stays
row-major and TensorIterator reads it across layouts on every call, exactly as it reads its
(1, C, H, W) view. Both the audit and the ground truth (:mod:`tests.eager_bytes`) considered only
4D/5D operands and charged 0 for it, against 16,384 B for the same table stored 4D and made in
forward (a case the summer's sweep of ambiguous shapes found and left)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.analyze import hint_keys as H
from nhwc_audit.analyze.reads import pointwise
from tests.eager_bytes import eager_backward_bytes, eager_bytes

_C, _H, _W = 8, 16, 16
_TABLE = _C * _H * _W * 4  # float32 bytes of a (C, H, W) table

_OPS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tuple[int, ...], int]] = {
    # name: (op of map and table, table shape, what channels_last adds: read and written)
    "add_chw": (lambda h, p: h + p, (_C, _H, _W), 2 * _TABLE),
    # the table first: TensorIterator writes NCHW, reads the map across, and the next conv converts back
    "mul_chw_first": (lambda h, p: p * h, (_C, _H, _W), 2 * (2 * _TABLE) * 2),
    "where_chw": (lambda h, p: torch.where(h > 0, h, p), (_C, _H, _W), 2 * _TABLE),
    "add_in_place_chw": (lambda h, p: h.add_(p), (_C, _H, _W), 2 * _TABLE),
    "lerp_chw": (lambda h, p: torch.lerp(h, p, 0.5), (_C, _H, _W), 2 * _TABLE),
    # Python's operators, as fx names them (truediv, mod): ATen's div and remainder
    "div_chw": (lambda h, p: h / p, (_C, _H, _W), 2 * _TABLE),
    "mod_chw": (lambda h, p: h % p, (_C, _H, _W), 2 * _TABLE),
    "add_c11": (lambda h, p: h + p, (_C, 1, 1), 0),  # one dim held: no order to change
    "add_hw": (lambda h, p: h + p, (_H, _W), 0),  # H and W run alike in both layouts
    "add_hw_transposed": (lambda h, p: h + p.t(), (_W, _H), 0),  # across in NCHW as much
    "add_chw_channels_innermost": (lambda h, p: h + p.permute(1, 2, 0).contiguous().permute(2, 0, 1), (_C, _H, _W), 0),
    "layer_norm_chw": (lambda h, p: F.layer_norm(h, (_C, _H, _W), p), (_C, _H, _W), None),  # not pointwise
}


class Table(nn.Module):
    def __init__(self, op: str, made_in_forward: bool = False) -> None:
        super().__init__()
        self.op, shape, _ = _OPS[op]
        self.conv1, self.conv2 = nn.Conv2d(_C, _C, 3, padding=1), nn.Conv2d(_C, _C, 3, padding=1)
        self.made_in_forward = made_in_forward
        self.p = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.ones(self.p.shape) if self.made_in_forward else self.p
        return self.conv2(self.op(self.conv1(x), p))


@pytest.mark.parametrize("op", sorted(_OPS))
def test_a_broadcast_table_is_charged_what_eager_moves(op: str) -> None:
    torch.manual_seed(0)
    model, x = Table(op).eval(), torch.randn(2, _C, _H, _W)
    truth, expected = eager_bytes(model, (x,)).added, _OPS[op][2]
    assert truth == (expected if expected is not None else truth)
    for how in ({}, {"capture": "export"}, {"capture": "hooks"}, {"mode": "fake"}):
        report = audit(model, x, bandwidth=1e9, **how)  # type: ignore[arg-type]
        assert report.summary.bytes_moved == truth, how


def test_the_finding_names_the_table_and_says_to_store_it_4d() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, _C, _H, _W)
    for made in (False, True):
        report = audit(Table("add_chw", made_in_forward=made).eval(), x, bandwidth=1e9)
        (f,) = report.findings
        assert (f.kind.value, f.op, f.bytes) == ("mixed", "add", 2 * _TABLE)
        stored = "(1, C, H, W)" in f.hint and "re-lays 4D and 5D tensors only" in f.hint
        assert stored is not made, f.hint  # a tensor computed in forward: the op that makes it (no table to store)
    assert H.LOW_RANK_TABLE.startswith("@")


def test_a_5d_map_with_a_4d_table() -> None:
    class Volume(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1)
            self.p = nn.Parameter(torch.randn(4, 6, 8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.conv1(x) * self.p)

    torch.manual_seed(0)
    model, x = Volume().eval(), torch.randn(2, 4, 6, 8, 8)
    truth = eager_bytes(model, (x,)).added
    assert truth == 2 * 4 * 6 * 8 * 8 * 4  # (the ground truth aligns a 4D operand with a 5D map as a new dim)
    assert audit(model, x, bandwidth=1e9).summary.bytes_moved == truth


def test_training_with_a_broadcast_table_matches_eager() -> None:
    torch.manual_seed(0)
    model, x = Table("add_chw").train(), torch.randn(2, _C, _H, _W)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True)
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth
    assert sum(f.bytes for f in report.findings if f.kind.value == "mixed") == 2 * _TABLE


def test_pointwise_names() -> None:
    assert all(map(pointwise, ("add", "add_", "mul", "where", "masked_fill", "sub")))
    assert all(map(pointwise, ("truediv", "mod", "iadd", "itruediv", "and_")))  # Python's operators, as fx names them
    assert not any(map(pointwise, ("layer_norm", "copy_", "Conv2d", "conv2d", "getitem", "matmul", "a.b")))
