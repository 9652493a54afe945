"""Latent breaks: a view that runs only because a revert upstream hands it an NCHW tensor, and
raises as soon as the user follows the advice to fix that revert."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nhwc_audit import AuditReport, repair
from nhwc_audit.records import FindingKind


class NormThenView(nn.Module):
    def __init__(self, view_as: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.view_as = view_as
        self.register_buffer("flat_shape", torch.empty(1, 4 * 8 * 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        flat = y.view_as(self.flat_shape) if self.view_as else y.view(y.shape[0], -1)
        return self.fc(flat)


def test_the_view_behind_a_revert_is_a_latent_break(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    report = audit_fixed(NormThenView(), sample(1, 3, 8, 8))
    assert [(f.node, f.kind) for f in report.findings] == [("norm", FindingKind.REVERT), ("view", FindingKind.LATENT)]
    latent = report.findings[1]
    assert latent.origin == "norm" and latent.bytes == 0 and "raises once that input is channels_last" in latent.hint
    assert report.nodes[[r.name for r in report.nodes].index("view")].latent_error.startswith("RuntimeError: view")
    assert report.summary.latent_breaks == 1 and "1 latent break" in report.headline
    # one fix: change the InstanceNorm and the view together
    (fix,) = report.fixes
    assert fix.op == "InstanceNorm2d" and fix.roots == ("norm",) and fix.findings == 2
    assert "fix together with 1 op(s) that raise once this stays channels_last (view at" in fix.hint


def test_views_of_channels_last_tensors_that_work_are_not_flagged(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    class Fine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.InstanceNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x)
            return y.permute(0, 2, 3, 1) + y.flatten(2).mean()  # permute is a view that works in NHWC

    report = audit_fixed(Fine(), sample(1, 4, 8, 8))
    assert report.summary.latent_breaks == 0


def test_the_repair_fixes_the_revert_and_its_latent_break_together(sample: Callable[..., torch.Tensor]) -> None:
    gm, log = repair(NormThenView(), sample(1, 3, 8, 8))
    assert [s.kind for s in log.steps] == ["view->reshape", "instancenorm->groupnorm"]
    assert log.bytes_after == 0 and log.breaks_after == 0 and log.refused == ()
    x = sample(2, 3, 8, 8, seed=1).to(memory_format=torch.channels_last)
    gm(x)  # the repaired graph runs on channels_last input


def test_every_skipped_repair_candidate_is_named_with_its_reason(sample: Callable[..., torch.Tensor]) -> None:
    """view_as is a latent break the view rewrite does not handle: swapping the InstanceNorm
    would expose it, and the log says so instead of staying silent."""
    _, log = repair(NormThenView(view_as=True), sample(1, 3, 8, 8))
    assert log.steps == ()
    assert log.refused == ("instancenorm->groupnorm at norm: it makes 1 op(s) raise on channels_last input",)


def test_every_capture_finds_the_latent_break(sample: Callable[..., torch.Tensor]) -> None:
    """The eager recording re-runs the model's ``view`` of an NCHW activation on a channels_last
    copy too (torchvision's shufflenet: fx found its channel-shuffle latent breaks, hooks not);
    a ``flatten`` that views NCHW copies channels_last and never raises."""
    from nhwc_audit import audit

    x = sample(1, 3, 8, 8)
    found = {
        capture: [
            (f.kind.value, f.op) for f in audit(NormThenView().eval(), x, bandwidth=1e9, capture=capture).findings
        ]
        for capture in ("fx", "export", "hooks")
    }
    assert all(("latent_break", "view") in kinds for kinds in found.values()), found

    class FlattenAfterNorm(NormThenView):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.norm(self.conv(x)), 1))

    for capture in ("fx", "hooks"):
        r = audit(FlattenAfterNorm().eval(), x, bandwidth=1e9, capture=capture)
        assert r.summary.latent_breaks == 0


def test_a_train_audits_fix_leads_with_the_forward_findings_hint() -> None:
    """A node with a revert and a backward finding grouped its fix under the backward one: the
    InstanceNorm's 'use nn.GroupNorm(...)' gave way to the generic backward text under --train."""
    from nhwc_audit import audit
    from tests import models as M

    torch.manual_seed(0)
    report = audit(M.InstanceNormNet().train(), torch.randn(2, 3, 16, 16), bandwidth=1e9, train=True)
    norm = next(f for f in report.fixes if f.op == "InstanceNorm2d")
    assert norm.kind is FindingKind.REVERT and "nn.GroupNorm" in norm.hint
    assert any(f.kind is FindingKind.BACKWARD and f.node in norm.roots for f in report.findings)
