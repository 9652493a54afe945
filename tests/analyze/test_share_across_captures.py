"""The channels_last share does not depend on the capture: the eager capture records every ATen
op a call dispatches (InstanceNorm's copy, view, batch norm and view back) where a graph has one
node for the call, and only the call's last op counts."""

from __future__ import annotations

import pytest
import torch

from nhwc_audit import audit
from nhwc_audit.examples import unet
from tests import models as M


@pytest.mark.parametrize("model", [M.InstanceNormNet, lambda: M.AddOrder(True), lambda: unet()[0], M.FlattenHead])
def test_the_share_is_the_same_in_every_capture(model: object) -> None:
    torch.manual_seed(0)
    m = model()  # type: ignore[operator]
    x = torch.randn(1, 3, 32, 32)
    shares = {}
    for capture in ("fx", "export", "hooks"):
        s = audit(m, x, bandwidth=1e9, capture=capture).summary
        shares[capture] = (s.spatial_nodes, s.nchw_nodes, round(s.channels_last_node_share, 6))
    assert shares["hooks"] == shares["fx"] == shares["export"], shares


class _LeafSites(torch.nn.Module):
    """Findings inside torch.nn modules: InstanceNorm's revert (an ATen clone under the eager
    capture, instance_norm under export) and the next conv's conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv3d(2, 8, 3, padding=1)
        self.norm = torch.nn.InstanceNorm3d(8)
        self.b = torch.nn.Conv3d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


@pytest.mark.parametrize("model", [_LeafSites, M.InstanceNormNet])
def test_a_finding_inside_a_torch_nn_module_has_one_key_in_every_capture(model: type[torch.nn.Module]) -> None:
    """A --baseline or an allow list written by one capture matches the others: an op a torch.nn
    module runs is named by that module, as fx names it; its ATen op stays in ``target``."""
    m = model().eval()
    x = torch.randn(2, 2, 16, 16, 16) if model is _LeafSites else torch.randn(1, 3, 16, 16)
    reports = {c: audit(m, x, bandwidth=1e9, capture=c) for c in ("fx", "export", "hooks")}
    keys = {c: sorted((f.key, f.bytes) for f in r.findings) for c, r in reports.items()}
    assert keys["fx"] and keys["hooks"] == keys["fx"] == keys["export"], keys
    assert any(f.kind.value == "revert" and f.op.startswith("InstanceNorm") for f in reports["hooks"].findings)
    assert any("aten." in f.target for f in reports["hooks"].findings)


class _FunctionalSites(torch.nn.Module):
    """Findings at torch.nn.functional calls that torch.export records as other ATen ops
    (``F.interpolate`` as ``upsample_bilinear2d``, ``F.grid_sample`` as ``grid_sampler``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("grid", torch.rand(1, 16, 16, 2) * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).sum(-1, keepdim=True).expand(-1, -1, -1, 8)  # NCHW from here
        y = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear")
        return self.b(torch.nn.functional.grid_sample(y, self.grid, align_corners=False))


def test_a_finding_at_a_functional_call_has_one_key_in_every_capture() -> None:
    m = _FunctionalSites().eval()
    x = torch.randn(1, 3, 8, 8)
    reports = {c: audit(m, x, bandwidth=1e9, capture=c) for c in ("fx", "export", "hooks")}
    keys = {c: sorted((f.key, f.bytes) for f in r.findings) for c, r in reports.items()}
    assert keys["hooks"] == keys["fx"] == keys["export"], keys
    ops = {n.op_name for n in reports["export"].nodes}
    assert {"interpolate", "grid_sample"} <= ops and not ops & {"upsample_bilinear2d", "grid_sampler"}


class _PaddedAndSampled(torch.nn.Module):
    """A replicate pad and a grid_sample without its mode: the eager capture and torch.export see
    ATen kernels (replication_pad2d, grid_sampler_2d) whose names or arguments hold the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("grid", torch.rand(2, 8, 8, 2) * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.pad(self.a(x).transpose(2, 3), (1, 1, 1, 1), mode="replicate")
        return self.b(torch.nn.functional.grid_sample(y, self.grid, align_corners=False))


def test_an_ops_mode_is_the_same_in_every_capture() -> None:
    m = _PaddedAndSampled().eval()
    x = torch.randn(2, 3, 8, 8)
    details = {
        c: sorted({(n.op_name, n.detail) for n in audit(m, x, bandwidth=1e9, capture=c).nodes if n.detail})
        for c in ("fx", "export", "hooks")
    }
    assert ("pad", "replicate") in details["fx"] and ("grid_sample", "bilinear") in details["fx"], details
    assert details["hooks"] == details["fx"] == details["export"], details


class _InPlaceResidual(torch.nn.Module):
    """torchvision's residual ``out += identity`` with the sum mixed: torch.fx records ``add``,
    the ATen-level captures ``add_``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        out += x.contiguous()
        return self.b(out)


def test_an_in_place_op_has_the_key_of_its_out_of_place_op_in_every_capture() -> None:
    m = _InPlaceResidual().eval()
    x = torch.randn(1, 4, 8, 8)
    reports = {c: audit(m, x, bandwidth=1e9, capture=c) for c in ("fx", "export", "hooks")}
    keys = {c: sorted((f.key, f.bytes) for f in r.findings) for c, r in reports.items()}
    assert any(k.startswith("mixed::add:") for k, _ in keys["fx"]), keys
    assert keys["hooks"] == keys["fx"] == keys["export"], keys
    assert {f.op for f in reports["hooks"].findings if f.kind.value == "mixed"} == {"add_"}  # shown as it ran


class _Divisions(torch.nn.Module):
    """``y /= t`` and ``y / t`` with ``t`` NCHW: torch.fx names both ``truediv``, the ATen-level
    captures ``div_`` and ``div``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y /= x.contiguous() + 2
        return self.b(y / (x.contiguous() + 2))


def test_a_python_operator_has_the_key_of_its_aten_op_in_every_capture() -> None:
    m = _Divisions().eval()
    x = torch.randn(1, 4, 8, 8)
    reports = {c: audit(m, x, bandwidth=1e9, capture=c) for c in ("fx", "export", "hooks")}
    keys = {c: sorted((f.key, f.bytes) for f in r.findings) for c, r in reports.items()}
    assert [k for k, _ in keys["fx"]].count("mixed::div:test_share_across_captures.py") == 2, keys
    assert keys["hooks"] == keys["fx"] == keys["export"], keys
