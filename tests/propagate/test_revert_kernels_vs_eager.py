"""A kernel that reverts by copying its input whole into NCHW first, then computing from the copy.

A CPU ``avg_pool3d`` has no channels_last_3d kernel (torch 2.14.1): it copies a channels_last_3d
input whole (``input.contiguous()``) and pools the copy, so a 2 x 2 x 2 pool moves eight times the
bytes of its output, where the rule for a revert (the smaller of input and output) charged one.
The audit asks such a kernel once per signature what it copied, as the profiler sees it and as the
ground truth (``tests/eager_bytes.py``) counts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.propagate import dispatch
from tests.eager_bytes import eager_bytes
from tests.support import profiled_copies_added


class After(nn.Module):
    """An op on a channels_last convolution's output (batch 2: oneDNN keeps channels_last)."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module, rank: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 16, 3, padding=1) if rank == 5 else nn.Conv2d(4, 16, 3, padding=1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.op(self.conv(x))
        return out


class Pick(nn.Module):
    """Some of the channels, by ``index_select`` (its index a buffer)."""

    def __init__(self, idx: tuple[int, ...] = (0, 3, 5, 9)) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor(idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.idx)


class Pool(nn.Module):
    """``avg_pool3d`` of the sample itself (a convolution at batch 1 would hand it NCDHW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool3d(x, 2)


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "AvgPool3d(2)": (lambda: After(nn.AvgPool3d(2)), (2, 4, 8, 8, 8)),
    "AvgPool3d((3,2,1))": (lambda: After(nn.AvgPool3d((3, 2, 1))), (2, 4, 6, 8, 8)),
    "avg_pool3d at batch 1": (Pool, (1, 16, 8, 8, 8)),
    "index_select over the channels": (lambda: After(Pick(), rank=4), (2, 4, 12, 12)),
    # an output dense in both orders (N x C x 1 x 1 x 1, one channel): the kernel copied its input all the same
    "global avg_pool3d": (lambda: After(nn.AvgPool3d(8)), (2, 4, 8, 8, 8)),
    "index_select of one channel": (lambda: After(Pick((3,)), rank=4), (2, 4, 12, 12)),
}


@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_kernel_that_copies_its_input_whole_is_charged_the_copy(name: str, mode: str, capture: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    build, shape = CASES[name]
    model, x = build().eval(), torch.randn(shape)
    r = audit(model, x, mode=mode, capture=capture)
    reverts = [f for f in r.findings if f.kind.value == "revert" and not f.intrinsic]
    assert len(reverts) == 1 and reverts[0].bytes == 2 * 4 * math.prod((shape[0], 16, *shape[2:]))  # its whole input
    assert (
        r.summary.bytes_moved
        == eager_bytes(model, (x,)).added
        == profiled_copies_added(model, x) + r.summary.intrinsic_bytes
    )


def test_the_recorder_sees_an_avg_pool3d_copy_its_channels_last_input() -> None:
    """Why AvgPool3d is not recorder-blind: its kernel's copy is one the recorder keeps."""
    x = torch.randn(2, 4, 6, 6, 6).to(memory_format=torch.channels_last_3d)
    rec = dispatch.CopyRecorder(relays=True)
    with rec, torch.no_grad():
        nn.AvgPool3d(2)(x)
    assert [(c.shape, c.bytes) for c in rec.copies] == [((2, 4, 6, 6, 6), 2 * x.numel() * 4)]


def test_a_pool_with_a_channels_last_kernel_is_charged_nothing() -> None:
    """MaxPool3d keeps channels_last_3d: nothing reverts, nothing is asked."""
    torch.manual_seed(0)
    model, x = After(nn.MaxPool3d(2)).eval(), torch.randn(2, 4, 8, 8, 8)
    assert not audit(model, x).findings and eager_bytes(model, (x,)).added == 0


class Median(nn.Module):
    """The median along W of a channels_last convolution's output (``keepdim``: a map)."""

    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        self.conv, self.keepdim = nn.Conv2d(4, 16, 3, padding=1), keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x).median(3, keepdim=self.keepdim)[0]
        return out


LEAVING: dict[str, Callable[[], nn.Module]] = {
    # im2col copies its channels_last input whole into NCHW, then unfolds (an N x C*k*k x L output)
    "F.unfold": lambda: After(nn.Unfold(3, padding=1), rank=4),
    "F.fold(F.unfold(...))": lambda: After(
        lambda t: nn.functional.fold(nn.functional.unfold(t, 2, stride=2), (12, 12), 2, stride=2), rank=4
    ),
    # median.dim is median.dim_values' caller: the out= variant's kernel makes the copy
    "median along W": lambda: Median(keepdim=False),
    "median along W, keepdim": lambda: Median(keepdim=True),
}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(LEAVING))
def test_a_kernel_that_copies_a_map_whole_and_writes_no_map_is_charged_the_copy(name: str, mode: str) -> None:
    """F.unfold, median along a dim: a kernel with no channels_last path that copies its input whole,
    whatever the rank of what it writes."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = LEAVING[name]().eval(), torch.randn(2, 4, 12, 12)
    r = audit(model, x, mode=mode)
    whole = 2 * 4 * 2 * 16 * 12 * 12  # the convolution's output, read and written
    assert [(f.kind.value, f.bytes) for f in r.findings] == [("revert", whole)]
    said = "has no channels_last kernel" if "keepdim" in name else "copies its whole channels_last input"
    assert said in r.findings[0].hint  # (a map written: the op's own hint)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == profiled_copies_added(model, x) == whole


def test_a_kernel_that_copies_its_input_in_nchw_too_is_charged_only_the_rule() -> None:
    """kthvalue clones its input into row-major order in either layout (the same bytes: the profiler's
    difference is 0): not the kernel's whole copy, only the rule's output-sized revert, as before."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = After(lambda t: t.kthvalue(2, 3, keepdim=True)[0], rank=4).eval(), torch.randn(2, 4, 12, 12)
    r = audit(model, x)
    assert [(f.kind.value, f.bytes) for f in r.findings] == [("revert", 2 * 4 * 2 * 16 * 12)]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added and profiled_copies_added(model, x) == 0
