"""The NCHW baseline's forward plan (``analyze.nchw_order.forward_keeps_nchw``): an fx capture
whose NCHW forward keeps every map in NCHW order moves nothing there, and the baseline skips its
run. Each model here is audited twice, with the plan and with the baseline run whatever the plan
says: the records, findings, fixes and notes must be the same. The plan must fire where it can (a
UNet's reverts), and must not where an NCHW run moves what the channels_last one does not (a
tensor the conversion leaves channels_last, code of the model's that branches on the layout, a
permute)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from nhwc_audit import audit, examples, refine
from nhwc_audit.api import AuditReport
from tests.fuzz_models import NETS, FuzzNet, fuzz_settings
from tests.propagate.test_op_cases_vs_eager import CASES


def _audits(model: nn.Module, x: torch.Tensor, **kw: Any) -> tuple[AuditReport, AuditReport, bool]:
    """(audit with the plan, audit with the baseline always run, whether the plan skipped a run)."""
    asked: list[bool] = []
    plan = refine.forward_keeps_nchw

    def spied(*a: Any, **kw: Any) -> bool:
        asked.append(plan(*a, **kw))
        return asked[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refine, "forward_keeps_nchw", spied)
        planned = audit(model, x, bandwidth=1e9, **kw)
        mp.setattr(refine, "forward_keeps_nchw", lambda *a, **kw: False)
        whole = audit(model, x, bandwidth=1e9, **kw)
    return planned, whole, any(asked)


def _assert_same(planned: AuditReport, whole: AuditReport) -> None:
    assert planned.nodes == whole.nodes
    assert planned.findings == whole.findings
    assert planned.fixes == whole.fixes
    assert _notes(planned) == _notes(whole)


def _notes(report: AuditReport) -> tuple[str, ...]:
    """The capture notes but the one saying the baseline ran on fake tensors, which a real audit
    chooses by how long its own run took (``baseline.fake_pays``: a first audit in a process can)."""
    return tuple(n for n in report.meta.capture_notes if "run on fake tensors" not in n)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("mode", ["real", "fake"])
def test_a_unets_reverts_skip_the_nchw_run_with_the_same_result(mode: str, train: bool) -> None:
    model, (x,) = examples.unet()
    planned, whole, skipped = _audits(model.train(train), x[:, :, :32, :32], mode=mode, train=train)
    assert skipped and any(f.kind.value == "revert" for f in planned.findings)
    _assert_same(planned, whole)


class _Volume(nn.Module):
    """A 3D UNet's step at batch 1: the CPU's slow Conv3d copies its channels_last_3d weight into NCDHW
    every call (its kernel's own copies, asked of the NCHW call's kernel: none there), and an
    InstanceNorm3d reverts."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)
        self.norm = nn.InstanceNorm3d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.interpolate(self.norm(self.a(x)), scale_factor=2.0))


class _Depthwise1x1(nn.Module):
    """A 1x1 depthwise convolution at one thread: its CPU kernel copies each channel's slice in either
    layout (``nchw_inside``: asked of the NCHW call's kernel, the same bytes)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem, self.dw, self.pw = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 1, groups=c), nn.Conv2d(c, c, 1)
        self.norm = nn.InstanceNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.norm(torch.relu(self.dw(self.stem(x)))))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("build", [_Volume, _Depthwise1x1])
def test_a_kernel_s_own_copies_are_asked_of_its_nchw_call(build: type[nn.Module], mode: str) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 1, 8, 8, 8) if build is _Volume else torch.randn(2, 3, 16, 16)
    planned, whole, skipped = _audits(model, x, mode=mode, threads=1)
    assert skipped and any(n.inside for n in planned.nodes)
    assert any(n.nchw_inside for n in planned.nodes) == (build is _Depthwise1x1)
    _assert_same(planned, whole)


class _LeftChannelsLast(nn.Module):
    """A plain tensor attribute made channels_last, which the conversion leaves as built: the NCHW
    run adds it to an NCHW map (a mixed op there, none in channels_last's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)
        self.table = torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x) + self.table)


@torch.fx.wrap
def _as_nchw(x: torch.Tensor) -> torch.Tensor:
    """The model's own code, run eagerly under fx: a channels_last map is copied to NCHW (a clone),
    an NCHW one goes through a permuted copy (NCHW's run moves it too)."""
    if x.is_contiguous():
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).contiguous()
    return x.contiguous()


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.post = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(_as_nchw(self.conv(x)))


class _Permutes(nn.Module):
    """ConvNeXt's LayerNorm over channels, permuted, before a revert: NCHW's run re-lays it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.norm = nn.InstanceNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(y) + y


class _TransposedTable(nn.Module):
    """A rank-2 table read transposed, added to a map: across NCHW's order as much as NHWC's (the
    same mixed op in both runs), and an InstanceNorm's revert to make the baseline run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.table = nn.Parameter(torch.randn(16, 16))
        self.norm = nn.InstanceNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x) + self.table.t())


@torch.library.custom_op("nhwc_audit_tests::relu", mutates_args=())
def _relu_to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A custom op named like ATen's ``relu``, whose kernel (opaque to a dispatch mode) lays its
    output channels_last."""
    return torch.relu(x).contiguous(memory_format=torch.channels_last)


@_relu_to_channels_last.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


class _Stem(nn.Module):
    """A convolution, an InstanceNorm's revert, a 1x1 convolution: the stem's output made
    channels_last by code of the model's that the graph calls as a torch.nn leaf (a hook, a
    parametrization, a forward of the instance's own) is a no-op in the channels_last run and a
    copy in the NCHW one, which then reverts at the norm too."""

    def __init__(self, custom: bool = False) -> None:
        super().__init__()
        self.conv, self.norm, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 1)
        self.custom = custom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.post(self.norm(torch.ops.nhwc_audit_tests.relu(y) if self.custom else y))


class _ToChannelsLast(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.contiguous(memory_format=torch.channels_last)


def _hooked() -> nn.Module:
    m = _Stem()
    m.conv.register_forward_hook(lambda mod, i, o: o.contiguous(memory_format=torch.channels_last))
    return m


def _pre_hooked() -> nn.Module:
    m = _Stem()
    m.norm.register_forward_pre_hook(lambda mod, i: (i[0].contiguous(memory_format=torch.channels_last),))
    return m


def _parametrized() -> nn.Module:
    m = _Stem()
    torch.nn.utils.parametrize.register_parametrization(m.conv, "weight", _ToChannelsLast())
    return m


def _own_forward() -> nn.Module:
    m = _Stem()
    conv = m.conv
    conv.forward = lambda x: nn.Conv2d.forward(conv, x).contiguous(memory_format=torch.channels_last)  # type: ignore[method-assign]
    return m


@pytest.mark.parametrize(
    "build",
    [
        _LeftChannelsLast,
        _Branches,
        _Permutes,
        _TransposedTable,
        _hooked,
        _pre_hooked,
        _parametrized,
        lambda: _Stem(custom=True),
    ],
    ids=["left", "branches", "permutes", "table", "hook", "pre_hook", "parametrized", "custom_op"],
)
@pytest.mark.parametrize("mode", ["real", "fake"])
def test_a_model_whose_nchw_run_moves_data_runs_it(build: Callable[[], nn.Module], mode: str) -> None:
    torch.manual_seed(0)
    planned, whole, skipped = _audits(build().eval(), torch.randn(2, 3, 16, 16), mode=mode)
    assert not skipped
    assert any(n.nchw_bytes for n in whole.nodes)  # the NCHW run moved data: skipping it would be wrong
    _assert_same(planned, whole)


def test_a_leaf_with_a_forward_of_its_own_runs_the_nchw_run() -> None:
    """(Real mode: the instance's forward, a closure over the user's module, runs its weights.)"""
    torch.manual_seed(0)
    planned, whole, skipped = _audits(_own_forward().eval(), torch.randn(2, 3, 16, 16))
    assert not skipped
    assert any(n.nchw_bytes for n in whole.nodes)  # the NCHW run moved data: skipping it would be wrong
    _assert_same(planned, whole)


def test_a_global_module_hook_runs_the_nchw_run() -> None:
    torch.manual_seed(0)
    model = _Stem().eval()
    hook = nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: o.contiguous(memory_format=torch.channels_last) if getattr(mod, "in_channels", 0) == 3 else o
    )
    try:
        planned, whole, skipped = _audits(model, torch.randn(2, 3, 16, 16))
    finally:
        hook.remove()
    assert not skipped and any(n.nchw_bytes for n in whole.nodes)
    _assert_same(planned, whole)


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_op_case_gets_the_same_records_with_the_plan(case: str) -> None:
    torch.manual_seed(0)
    planned, whole, _ = _audits(CASES[case]().eval(), torch.randn(2, 8, 16, 16))
    _assert_same(planned, whole)


@fuzz_settings(30)
@given(**NETS, size=st.sampled_from([2, 4, 7]), mode=st.sampled_from(["real", "fake"]))
def test_random_cnns_get_the_same_records_with_the_plan(
    ops: list[str], head: str, batch: int, size: int, train: bool, mode: str
) -> None:
    torch.manual_seed(0)
    model = FuzzNet(ops, head).train(train)
    planned, whole, _ = _audits(model, torch.randn(batch, 3, size, size), mode=mode, train=train)
    _assert_same(planned, whole)
