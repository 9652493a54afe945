"""A train audit's backward findings go with the change that removes them.

An InstanceNorm reverts to NCHW on the CPU: in backward the convolution before it gets its gradient
in NCHW, and the ReLU after it (NCHW in forward) meets the next convolution's channels_last gradient;
both re-lay it. "What to change" listed those backward findings as fixes of their own ("Conv2d:
backward x7 (23.1 MB)", "ReLU: backward x6 (7.3 MB)" on the bundled UNet, beside "InstanceNorm2d:
revert x6 (25.7 MB)"), where the one change, the InstanceNorm, removes all of them: the repair takes
that UNet's training step from 59.9 MB to 3.3 MB, the kernels' own copies of weight gradients, which
no change removes and which stay a group of their own."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.records import FindingKind


def block() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
    )


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 4:
            raise ValueError("too small")
        return self.body(x)


@pytest.mark.parametrize("build", [block, Untraceable], ids=["fx", "hooks"])
def test_backward_findings_are_listed_under_the_instancenorm_that_causes_them(build: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, x = build(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, train=True, bandwidth=1e9)
    backward = [f for f in report.findings if f.kind is FindingKind.BACKWARD and not f.intrinsic]
    # the convolution before the norm, the ReLU after it, the convolution after that
    assert len(backward) == 3, report.findings
    norm, *rest = report.fixes
    assert norm.op == "InstanceNorm2d" and norm.findings == 2 + len(backward)
    assert [f.op for f in rest] == ["Conv2d"] and rest[0].kind is FindingKind.BACKWARD  # the weight gradients' copies
    assert norm.bytes + rest[0].bytes == report.summary.bytes_moved
    # what the fix lists is what the change removes
    log = report.repaired().repair
    assert log is not None and [s.kind for s in log.steps] == ["instancenorm->groupnorm"]
    assert log.bytes_before - log.bytes_after == norm.bytes


def test_a_convolution_s_backward_goes_with_the_copy_its_gradient_comes_through() -> None:
    """A convolution's backward re-lays the gradient that arrives NCHW through a ``.contiguous()``
    the model writes after it: the copy's change removes both."""
    torch.manual_seed(0)

    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).contiguous() * 2

    report = audit(Tail(), torch.randn(2, 3, 8, 8), train=True, bandwidth=1e9)
    fixes = {f.op: f for f in report.fixes}
    moved = [f for f in report.findings if not f.intrinsic]
    assert fixes["contiguous"].findings == len(moved) and fixes["contiguous"].bytes == sum(f.bytes for f in moved)


class NormTwoOpsOn(nn.Module):
    """A convolution whose gradient comes back NCHW from an InstanceNorm through an op that keeps
    channels_last (monai SegResNet: its first convolution, then an identity; an upsampling
    convolution, then an upsample and an add)."""

    def __init__(self, via: str) -> None:
        super().__init__()
        self.via = via
        self.c1, self.mid = nn.Conv2d(3, 16, 3, padding=1), nn.Identity()
        self.norm, self.c2 = nn.InstanceNorm2d(16), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        y = (
            self.mid(y)
            if self.via == "identity"
            else F.interpolate(y, scale_factor=2.0)
            if self.via == "upsample"
            else y * 2
        )
        return self.c2(F.relu(self.norm(y)))


class GatedAfterCopy(nn.Module):
    """A sigmoid gate in the NCHW region a ``.contiguous()`` starts: the mul reading it has only a
    backward finding, the sigmoid's own backward re-lays its gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x).contiguous()
        y = torch.sigmoid(y) * y
        return self.c3(self.c2(y) + y)


class TableBeforeNorm(nn.Module):
    """A (1, C, H, W) table added to a map before an InstanceNorm: the convolution before the add gets
    its gradient NCHW through the add (the norm's doing); the table's own gradient, summed over the
    batch, comes out NCHW and is copied into the converted table's strides whatever the norm (the
    add's own doing, left by the norm's repair)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.table = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(1, 8, 16, 20))
        self.norm, self.c2 = nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.norm(self.c1(x) + self.table)))


@pytest.mark.parametrize(
    "build",
    [
        lambda: NormTwoOpsOn("identity"),
        lambda: NormTwoOpsOn("upsample"),
        lambda: NormTwoOpsOn("mul"),
        GatedAfterCopy,
        TableBeforeNorm,
    ],
    ids=["identity", "upsample", "mul", "gate", "table"],
)
def test_what_the_fix_lists_is_what_its_repair_removes(build: Callable[[], nn.Module]) -> None:
    """Found by a helper's train sweep: monai SegResNet's InstanceNorm fix listed 27,525,120 B where
    its repair removes 28,311,552; the rest sat in a "Conv2d (backward)" group of its own."""
    torch.manual_seed(0)
    model, x = build(), torch.randn(2, 3, 16, 20)
    report = audit(model, x, train=True, bandwidth=1e9)
    fix, *rest = report.fixes
    # what is left: the kernels' own copies, a parameter gradient's copy (the table's)
    assert all(f.kind is FindingKind.BACKWARD and f.findings == len(f.roots) for f in rest), rest
    log = report.repaired().repair
    assert log is not None and len({s.kind for s in log.steps}) == 1
    assert log.bytes_before - log.bytes_after == fix.bytes


def test_a_gradient_a_channel_shuffle_lays_out_stays_with_its_own_op() -> None:
    """A channel shuffle's ``view`` to 5D hands its gradient back through a reshape, row-major whatever
    the layout of the map it views, so the ReLU before the shuffle's ``cat`` re-lays its gradient after
    the ``.contiguous()`` is repaired too. It was listed under that ``.contiguous()``, whose fix then
    listed more than its repair removes (torchvision's shufflenet_v2_x0_5 at 2x3x64x64 in training:
    675,840 B listed, 497,664 B removed); now the fix lists what the repair removes."""
    from tests.fix.test_maporder import _shuffle_chain

    torch.manual_seed(0)
    model, x = _shuffle_chain(6).train(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, train=True, bandwidth=1e9)
    (fix,) = [f for f in report.fixes if f.op == "contiguous"]
    log = report.repaired().repair
    assert log is not None and {s.kind for s in log.steps} == {"contiguous-map-order", "view->reshape"}
    assert log.bytes_before - log.bytes_after == fix.bytes > 0
    relu = [f for f in report.fixes if f.op == "ReLU"]
    assert relu and relu[0].kind is FindingKind.BACKWARD


class _NormThenSoftmax(nn.Module):
    """The bundled UNet's head in small: an InstanceNorm before the last convolution, a softmax over
    the channels after it. In backward that convolution re-lays its input (NCHW: the norm reverted)
    and the gradient the softmax hands back NCHW."""

    def __init__(self, out: int = 4) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.outc = nn.Conv2d(8, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.outc(torch.relu(self.norm(self.conv(x)))), dim=1)


@pytest.mark.parametrize("out", [4, 8], ids=["other-shape", "same-shape"])
def test_a_convolution_s_backward_is_shared_by_the_changes_upstream_and_downstream(
    out: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The convolution's backward finding went whole with its own forward finding's root, the
    InstanceNorm; the re-lay of the gradient the softmax hands back goes with the softmax (the bundled
    UNet in training: the InstanceNorm fix listed 56,623,104 B and its rewrite alone removes 55,574,528;
    the softmax fix 524,288 and its rewrite alone 1,572,864; a helper's repair sweep). Each fix now
    lists what its own rewrite removes, and together they list the whole; where the convolution's input
    and output have one shape, one of its copies of that shape is its input's."""
    import nhwc_audit.fix.repair as repair

    torch.manual_seed(0)
    model, x = _NormThenSoftmax(out).train(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, train=True, bandwidth=1e9)
    fixes = {f.op: f for f in report.fixes}
    assert {"InstanceNorm2d", "softmax"} <= set(fixes)
    everything = report.repaired().repair
    assert everything is not None
    removed_by_both = everything.bytes_before - everything.bytes_after
    assert fixes["InstanceNorm2d"].bytes + fixes["softmax"].bytes == removed_by_both
    listed = repair.candidates
    for op, kind in (("InstanceNorm2d", "instancenorm->groupnorm"), ("softmax", "softmax-nhwc")):
        roots = set(fixes[op].roots)
        monkeypatch.setattr(
            repair, "candidates", lambda g, rs, a, roots=roots: (c for c in listed(g, rs, a) if c.node in roots)
        )
        log = report.repaired().repair
        assert log is not None and [s.kind for s in log.steps] == [kind]
        assert log.bytes_before - log.bytes_after == fixes[op].bytes, op


def test_a_kernel_s_own_copies_name_no_gradient_source() -> None:
    """A channels_last CPU convolution's backward copies its weight gradient, computed NCHW, into
    channels_last whatever feeds it the gradient; "What to change" grouped those of nine convolutions
    under "its gradient comes from InstanceNorm2d" where several got theirs from a BatchNorm2d (a new
    user's trial). The clause stays where it tells what to change: a gradient re-laid."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.InstanceNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1),
    ).train()
    r = audit(model, torch.randn(2, 3, 16, 16), bandwidth=1e9, train=True)
    own = [f for f in r.findings if f.kind.value == "backward" and f.intrinsic]
    assert len(own) >= 2 and not [f for f in own if "its gradient comes from" in f.hint]
    relaid = [f for f in r.findings if f.kind.value == "backward" and not f.intrinsic]
    assert all("its gradient comes from" in f.hint for f in relaid)
