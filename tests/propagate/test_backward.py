"""The backward of a real ``train`` audit starts from the propagation's own forward, run with
autograd: the model runs forward once, and the gradient layouts are the ones a backward from
a forward of its own (as a fake audit runs it) records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.prepare.copy import prepare_audit_copy, prepare_inputs
from nhwc_audit.propagate import backward
from nhwc_audit.propagate.backward import backward_layouts
from tests import models as M


class InPlace(nn.Module):
    """In-place activations and a residual ``+=`` (fx records it out of place), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.act(self.bn(self.conv(x)))
        z = self.conv2(y)
        z += y
        return F.relu_(z), y.mean((2, 3))


class UnusedHalf(nn.Module):
    """A VAE encoder's ``mean, logvar = moments.chunk(2, 1)`` with the second half used only
    detached: the chunk's hook on it is called with no gradient (None)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return mean + logvar.detach().exp()


BUILDS: dict[str, tuple[Callable[[], nn.Module], int]] = {  # the model and its input channels
    "instance-norm": (M.InstanceNormNet, 3),
    "view-break": (M.ViewHead, 3),
    "in-place": (InPlace, 3),
    "convnext-block": (M.ConvNeXtBlock, 8),
    "train-mode-bn": (lambda: M.ConvBnRelu().train(), 3),
    "unused-half": (UnusedHalf, 3),
}


def _separate(model: nn.Module, x: torch.Tensor, breaks: frozenset[str]) -> dict[str, Any]:
    """Gradient layouts of a backward from a forward of its own, on the audit's own graph."""
    copy = prepare_audit_copy(model, share_weights=False)
    (sample,), _ = prepare_inputs((x,), {}, dtype=None, device=torch.device("cpu"))
    grads, params = backward_layouts(trace(copy.module).gm, [sample], breaks=breaks)
    return {"nodes": grads, "params": {k: v.layout for k, v in params.items()}}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_backward_starts_from_the_audits_own_forward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    build, channels = BUILDS[name]
    model, x = build(), torch.randn(2, channels, 8, 8)

    def no_second_forward(*_: Any, **__: Any) -> Any:
        raise AssertionError("a real train audit ran a forward of its own for the backward")

    with monkeypatch.context() as m:
        m.setattr(backward, "_GradProp", no_second_forward)
        report = audit(model, x, bandwidth=1e9, train=True, capture="fx")
    assert report.meta.backward
    assert any(n.grads for n in report.nodes)
    breaks = frozenset(n.name for n in report.nodes if n.error)
    separate = _separate(model, x, breaks)
    assert {n.name: n.grads for n in report.nodes if n.grads} == separate["nodes"]
    nchw_params = sorted(k for k, v in separate["params"].items() if v.value == "contiguous")
    notes = [n for n in report.meta.capture_notes if n.startswith("backward:") and "parameter gradients" in n]
    assert len(notes) == 1 and all(p in notes[0] for p in nchw_params)


def test_a_fake_train_audit_runs_its_own_forward_for_the_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake runs correct known meta-kernel errors node by node, gradients included: their
    backward keeps a forward of its own (the test above shows the real one does not)."""
    ran: list[bool] = []
    real = backward._GradProp

    def spy(*args: Any, **kwargs: Any) -> Any:
        ran.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward, "_GradProp", spy)
    report = audit(M.InstanceNormNet(), torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True, mode="fake")
    assert ran and any(n.grads for n in report.nodes)
