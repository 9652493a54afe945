"""The NCHW baseline of a backward asked of its convolutions' kernels one call at a time
(:mod:`nhwc_audit.propagate.nchw_kernels`) where the model reorders no dims, in place of a whole
NCHW forward and backward: the same records and findings as that run, and what eager adds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from nhwc_audit import audit, refine
from nhwc_audit.propagate.backward_kernels import Zeros, counterpart
from tests import models as M
from tests.eager_bytes import eager_backward_bytes


class _Dense(nn.Module):
    """A DenseNet-style block: each layer reads the concatenation of the ones before it, so its
    convolutions' gradients come back as channel slices of the concatenation's (dense in NCHW at
    batch 1, in neither order at batch 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.b = nn.Sequential(nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 8, 3, padding=1))
        self.head = nn.Conv2d(32, 16, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.cat([h, self.a(h)], 1)
        h = torch.cat([h, self.b(h)], 1)
        return self.head(h)


def _strided() -> nn.Module:
    # NCHW's kernel computes the strided 1 x 1 convolution's input gradient channels_last and copies it back
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1, stride=2))


class _Shared(nn.Module):
    """One convolution called twice, the second with its weight frozen elsewhere: two calls at two nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.b(self.a(x))))


class _Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.stack([self.a(x), self.b(x)]).sum(0))


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1))
    model[1].weight.requires_grad_(False)  # its backward computes the input gradient only
    return model


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any]]] = {
    "strided": (_strided, (2, 3, 16, 16), {}),
    "dense_b1": (_Dense, (1, 3, 12, 12), {}),
    "dense_b2": (_Dense, (2, 3, 12, 12), {}),
    "se_block": (M.SEBlock, (2, 3, 8, 8), {}),
    "conv3d_slow_backend": (M.Conv3dNet, (1, 2, 6, 8, 8), {}),
    "depthwise": (
        lambda: nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, groups=32)),
        (2, 3, 9, 9),
        {},
    ),
    "repeated": (lambda: nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)]), (2, 8, 8, 8), {}),
    "transposed": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)),
        (2, 3, 8, 8),
        {},
    ),
    "shared_dilated": (_Shared, (2, 3, 8, 8), {}),
    "frozen_weight": (_frozen, (2, 3, 8, 8), {}),
    "grouped_one_thread": (  # the slow backend copies each group's gradient, in either layout
        lambda: nn.Sequential(nn.Conv2d(48, 48, 1, groups=3), nn.ReLU(), nn.Conv2d(48, 48, 3, groups=3, padding=1)),
        (2, 48, 8, 8),
        {"threads": 1},
    ),
    "bfloat16": (_strided, (2, 3, 16, 16), {"dtype": torch.bfloat16}),
    # an in-place ReLU on InstanceNorm's output, a view of the NCHW map it computes (the bundled
    # UNet's up blocks): autograd's AsStridedBackward0 lays channels_last's gradient into NCHW, a
    # view in the base's own dim order, which NCHW's backward lays as it comes
    "in_place_after_instance_norm": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 8, 3, padding=1)
        ),
        (2, 3, 8, 8),
        {},
    ),
    # maps stacked then summed (smp FPN's merge): the stack is laid as a stack of channels_last maps,
    # in neither 5D order, and an NCHW run stacks NCHW maps as they come
    "stacked_maps": (_Stacked, (1, 3, 8, 8), {}),
    # a fake run corrects GroupNorm's gradient to eager's channels_last (EagerGrad): no reordering
    "group_norm": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
        ),
        (2, 3, 8, 8),
        {},
    ),
    # a classifier convolution on the pooled map (timm's dla34 ``fc``): its gradient is the loss's
    # 2D gradient unflattened, a view of a tensor no layout touches
    "pooled_conv_head": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 1), nn.Flatten()
        ),
        (2, 3, 8, 8),
        {},
    ),
}


def _key(report: object) -> tuple[object, ...]:
    nodes = [(n.name, n.backward, n.nchw_backward_bytes, n.nchw_backward_inside) for n in report.nodes]  # type: ignore[attr-defined]
    findings = [(f.kind, f.node, f.bytes, f.intrinsic, f.hint) for f in report.findings]  # type: ignore[attr-defined]
    return nodes, findings, report.meta.capture_notes  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_asked_alone_the_kernels_give_what_the_whole_nchw_run_gives(
    name: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    build, shape, options = CASES[name]
    model, x = build().train(), torch.randn(*shape)
    ran: list[str] = []
    whole = refine.nchw_backward
    monkeypatch.setattr(refine, "nchw_backward", lambda *a: ran.append("whole") or whole(*a))
    alone = audit(model, x, bandwidth=1e9, train=True, mode=mode, **options)  # type: ignore[arg-type]
    assert alone.meta.backward and not ran  # no NCHW forward and backward
    monkeypatch.setattr(refine, "by_kernel", lambda plan, runner: None)
    run = audit(model, x, bandwidth=1e9, train=True, mode=mode, **options)  # type: ignore[arg-type]
    assert ran == ["whole"]
    assert _key(alone) == _key(run)
    if not options:  # (the ground truth runs float32 on the machine's threads)
        charged = sum(f.bytes for f in alone.findings if f.kind.value == "backward")
        assert charged == eager_backward_bytes(model, (x,)).added


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_the_strided_convolutions_nchw_copy_nets_without_the_whole_run(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the whole NCHW backward ran")

    monkeypatch.setattr(refine, "nchw_backward", fail)
    torch.manual_seed(0)
    model, x = _strided().train(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
    (second,) = [n for n in report.nodes if n.name == "_2"]
    assert second.nchw_backward_inside == 2 * 2 * 64 * 16 * 16 * 4  # NCHW's copy of its input gradient
    charged = {f.node: f.bytes for f in report.findings if f.kind.value == "backward"}
    assert charged == {"_0": 2 * 64 * 3 * 9 * 4}  # the first's weight gradient copy, whole


class _Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y.view(2, 2, 4, 8, 8).transpose(1, 2).reshape(2, 8, 8, 8))


def test_a_model_that_reorders_dims_still_runs_the_whole_nchw_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[bool] = []
    whole, alone = refine.nchw_backward, refine.by_kernel
    monkeypatch.setattr(refine, "nchw_backward", lambda *a: ran.append(True) or whole(*a))
    monkeypatch.setattr(refine, "by_kernel", lambda plan, runner: ran.append(plan.reordering) or alone(plan, runner))
    torch.manual_seed(0)
    model, x = _Shuffle().train(), torch.randn(2, 3, 8, 8)
    report = audit(model, x, bandwidth=1e9, train=True)
    assert ran == [True, True]  # reordering: asked alone, nothing; then the whole run
    assert (
        sum(f.bytes for f in report.findings if f.kind.value == "backward") == eager_backward_bytes(model, (x,)).added
    )


CONV = (1, 1, 1), (0, 0), (1, 1), False, (0, 0), 1, (True, True, False)


def _call(grad: torch.Tensor, x: torch.Tensor) -> tuple[object, ...]:
    return (grad, x, torch.zeros(8, 8, 1, 1), None, *CONV)


def test_counterpart_lays_dense_tensors_nchw() -> None:
    cl = torch.zeros(2, 8, 4, 4).to(memory_format=torch.channels_last)
    got = counterpart(_call(cl, cl.clone()), {})
    assert got is not None
    assert got[0][:3] == (Zeros((2, 8, 4, 4), torch.float32, cl.device),) * 2 + (
        Zeros((8, 8, 1, 1), torch.float32, cl.device),
    )
    assert got[0][0].made().is_contiguous()


def test_counterpart_takes_a_channel_slice_of_the_nchw_map() -> None:
    whole = torch.zeros(2, 12, 4, 4).to(memory_format=torch.channels_last)
    part = whole[:, 4:]  # in neither order dense; NCHW's is the same slice of its NCHW map
    got = counterpart(_call(part, whole[:, 4:].clone()), {})
    assert got is not None
    made = got[0][0].made()
    expected = torch.zeros(2, 12, 4, 4)[:, 4:]
    assert made.shape == expected.shape and made.stride() == expected.stride()
    assert made.storage_offset() == expected.storage_offset() == 4 * 16


def test_counterpart_of_a_rows_slice_dense_in_channels_last_is_not_dense_nchw() -> None:
    """At batch 1 the first rows of a channels_last map are dense channels_last; the NCHW map's
    are not dense: the counterpart is the view, not a dense tensor."""
    whole = torch.zeros(1, 8, 8, 4).to(memory_format=torch.channels_last)
    rows = whole[:, :, :4]
    assert rows.is_contiguous(memory_format=torch.channels_last)
    got = counterpart(_call(rows, rows.clone()), {})
    assert got is not None
    made = got[0][0].made()
    assert not made.is_contiguous() and made.stride() == torch.zeros(1, 8, 8, 4)[:, :, :4].stride()


def test_counterpart_of_a_broadcast_gradient_is_unknown() -> None:
    grad = torch.zeros(2, 8, 1, 1).expand(2, 8, 4, 4)
    assert counterpart(_call(grad, torch.zeros(2, 8, 4, 4)), {}) is None


class _SlicedWeight(nn.Module):
    """A convolution's weight sliced from a parameter with one output channel: dense channels_last
    (its one output channel makes it so), not dense in the NCHW run, whose kernel copies its
    gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.w = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(1, 8, 5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.a(x), self.w[:, :, :3], padding=1)


class _StoredChannelsLast(nn.Module):
    """A plain tensor attribute stored channels_last, which the conversion leaves as built: in the
    NCHW run ``g * y`` is channels_last, and so is what the next convolution's kernel reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.g = torch.randn(1, 8, 8, 8).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.g * self.a(x))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("build", [_SlicedWeight, _StoredChannelsLast], ids=["sliced_weight", "stored_cl"])
def test_a_convolution_whose_nchw_form_is_not_dense_nchw_runs_the_whole_nchw_backward(
    build: Callable[[], nn.Module], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: asked alone, these were charged 2,880 and 10,944 B where eager (and the
    whole run) charge 2,304 and 1,728."""
    ran: list[str] = []
    whole = refine.nchw_backward
    monkeypatch.setattr(refine, "nchw_backward", lambda *a: ran.append("whole") or whole(*a))
    torch.manual_seed(0)
    model, x = build().train(), torch.randn(2, 3, 8, 8)
    report = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
    assert ran == ["whole"]
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == eager_backward_bytes(model, (x,)).added
