"""Ops a library registers (torchvision's ``roi_align``, ``roi_pool``, ``ps_roi_align``,
``deform_conv2d``) are one call at the dispatch level; their CPU kernels call ``contiguous()`` on
their inputs, which copies a channels_last feature map whole into NCHW on every call. Each is
charged what eager moves (:mod:`tests.eager_bytes` runs such a kernel with a mode that sees the
ATen ops it calls), not the crops' size its own layouts show, in every capture that runs it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision.ops as tvo
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes

_BOXES = torch.tensor([[0, 1.0, 1.0, 9.0, 12.0], [1, 3.0, 0.0, 15.0, 8.0], [0, 0.0, 0.0, 15.0, 15.0]])


class Library(nn.Module):
    """``post(op(pre(x)))`` with a library op between two convolutions."""

    def __init__(
        self, op: Callable[[Library, torch.Tensor], torch.Tensor], post: int = 8, **buffers: torch.Tensor
    ) -> None:
        super().__init__()
        self.pre, self.op, self.post = nn.Conv2d(8, 8, 3, padding=1), op, nn.Conv2d(post, 8, 3, padding=1)
        for name, b in buffers.items():
            self.register_buffer(name, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.op(self, self.pre(x)))


CASES: dict[str, Callable[[], nn.Module]] = {
    "roi_align": lambda: Library(lambda s, y: tvo.roi_align(y, s.boxes, (4, 4), 1.0, 2, aligned=True), boxes=_BOXES),
    "roi_pool": lambda: Library(lambda s, y: tvo.roi_pool(y, s.boxes, (4, 4), 1.0), boxes=_BOXES),
    "ps_roi_align": lambda: Library(lambda s, y: tvo.ps_roi_align(y, s.boxes, 2, 1.0, 2), post=2, boxes=_BOXES),
    # the offsets (a buffer the conversion re-lays) and the weight are copied too
    "deform_conv2d": lambda: Library(
        lambda s, y: tvo.deform_conv2d(y, s.offset, s.weight, padding=1),
        offset=torch.randn(2, 18, 16, 16) * 0.5,
        weight=torch.randn(8, 8, 3, 3) / 24,
    ),
}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["auto", "export", "hooks"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_library_op_is_charged_what_its_kernel_copies(case: str, capture: str, mode: str) -> None:
    """A fake run asks the op's CPU kernel what it copies, on zeros laid out as its arguments."""
    torch.manual_seed(0)
    model, x = CASES[case]().eval(), torch.randn(2, 8, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]
    op = next(f for f in r.findings if f.kind.value == "revert")
    assert op.bytes >= 2 * 2 * 8 * 16 * 16 * 4, op  # its input map copied whole, read and written


def test_the_ground_truth_sees_the_copy_inside_a_library_kernel() -> None:
    # the profiler's count of roi_align's copies (aten::copy_, 2 x 4 bytes x elements): 32,768 B
    # of the 2 x 8 x 16 x 16 map, beyond the crops' 3,072 the op's own layouts show
    torch.manual_seed(0)
    model = Library(lambda s, y: tvo.roi_align(y, s.boxes, (4, 4), 1.0, 2, aligned=True), boxes=_BOXES).eval()
    by_site = eager_bytes(model, (torch.randn(2, 8, 16, 16),)).by_site()
    assert sorted(cl - nchw for nchw, cl in by_site.values()) == [3072, 32768]


class MultiScale(nn.Module):
    """torchvision's MultiScaleRoIAlign over two levels (one fx leaf running roi_align per level)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.pool, self.post = tvo.MultiScaleRoIAlign(["a", "b"], 7, 2), nn.Conv2d(16, 8, 1)
        self.register_buffer("boxes", torch.tensor([[1.0, 1.0, 20.0, 30.0], [5.0, 3.0, 60.0, 50.0], [0, 0, 8, 8]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.post(self.pool({"a": a, "b": self.b(a)}, [self.boxes], [(64, 64)]))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_kernel_that_computed_from_its_own_copies_relays_nothing_more(capture: str) -> None:
    """Each level's map is copied whole into NCHW, and roi_align computes its crops from that copy:
    the crops are not a second re-lay of the map (fx charged them too: 18,816 B more than eager)."""
    torch.manual_seed(0)
    model, x = MultiScale().eval(), torch.rand(1, 3, 64, 64)
    expected = eager_bytes(model, (x,)).added
    assert audit(model, x, bandwidth=1e9, capture=capture).summary.bytes_moved == expected > 0


class AutocastRoi(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("boxes", _BOXES[:2].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (the op itself: fx traces it)
        return self.post(torch.ops.torchvision.roi_align(self.pre(x), self.boxes, 1.0, 4, 4, 2, False))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_library_op_under_autocast_is_charged_its_kernels_copy(capture: str) -> None:
    """Under CPU autocast roi_align runs in float32 on a cast of the map: the kernel's copy of that
    cast is what moves, not the crops its float32 call writes."""
    torch.manual_seed(0)
    model, x = AutocastRoi().eval(), torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, autocast=True)
    assert r.summary.bytes_moved == expected > 2 * 2 * 8 * 16 * 16 * 4, [
        (f.kind.value, f.node, f.bytes) for f in r.findings
    ]


@torch.library.custom_op("nhwc_audit_tests::roundtrip", mutates_args=())
def _roundtrip(x: torch.Tensor) -> torch.Tensor:  # no device_types: one CompositeExplicitAutograd kernel
    return (x.contiguous() * 2).contiguous(memory_format=torch.channels_last)


@_roundtrip.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_custom_op_for_every_device_is_seen_inside(capture: str) -> None:
    torch.manual_seed(0)
    model, x = Library(lambda s, y: torch.ops.nhwc_audit_tests.roundtrip(y)).eval(), torch.randn(2, 8, 16, 16)
    expected = eager_bytes(model, (x,)).added
    assert audit(model, x, bandwidth=1e9, capture=capture).summary.bytes_moved == expected > 0


def test_a_refusal_of_the_probe_s_guard_inside_a_library_kernel_is_raised_on() -> None:
    """A kernel run by its key that raises is not probed (the caller runs the op as the model does:
    a Scalar overload refuses the scalar a mode hands back to it). A refusal of the probe's guard at
    an op the kernel calls (a write to the user's weights; here at ``roi_align``'s ``contiguous()``) is
    no such case: a library kernel hands it back as a RuntimeError (torch's stable ABI), and running
    the op again unguarded would make the write the guard refused."""
    from nhwc_audit.errors import SharedWeightWrite
    from nhwc_audit.propagate.kernel_copies import probed

    def guard(func: object, args: object, kwargs: object) -> None:
        raise SharedWeightWrite("refused by the guard")

    y = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    with pytest.raises(SharedWeightWrite, match="refused by the guard"):
        probed(torch.ops.torchvision.roi_align.default, (y, _BOXES, 1.0, 4, 4, 2, True), {}, guard)
    # a Scalar overload's refusal: not probed (the caller runs it)
    assert probed(torch.ops.aten.fmod.Scalar, (y[:, :4], 0.5), {}, lambda *a: None) is None
