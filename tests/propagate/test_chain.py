"""The capture chain: each capture works on state no earlier attempt left behind, a failure of
the audit's own machinery fails that capture (with a note), and only the model's own error is
reported as the model's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit import AuditReport, PropagationError, TraceError
from nhwc_audit.prepare.copy import plain_tensors
from nhwc_audit.propagate.compare import first_difference


class Head(nn.Module):
    """Like Ultralytics' Detect: anchors computed from the feature shape and cached on the
    module when the shape changes (fx cannot trace the shape test; export runs it on fake
    tensors), and a plain tensor attribute read as a number. As there, the cache starts as
    class attributes, so the first forward adds instance attributes."""

    shape: torch.Size | None = None
    anchors = torch.empty(0)

    def __init__(self) -> None:
        super().__init__()
        self.stride = torch.tensor([8.0, 16.0])  # a plain attribute, not a buffer

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.shape != y.shape:
            self.anchors = torch.arange(y.shape[-1] * y.shape[-2], dtype=y.dtype).view(1, 1, -1) * self.stride[1].item()
            self.shape = y.shape
        return y.flatten(2) + self.anchors


class CachesAnchors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4)
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)))


def test_what_export_caches_on_modules_never_reaches_the_eager_check(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    model = CachesAnchors()
    report = audit_fixed(model, sample(1, 3, 8, 8), capture="export")
    assert report.meta.capture == "export"
    assert any(
        "sets attributes on its modules in forward (head.anchors, head.shape)" in n for n in report.meta.capture_notes
    )
    eager = audit_fixed(CachesAnchors(), sample(1, 3, 8, 8), capture="hooks")
    assert {(f.kind, f.module_path) for f in report.findings} == {(f.kind, f.module_path) for f in eager.findings}
    assert "shape" not in vars(model.head) and "anchors" not in vars(model.head)  # the user's model ran nothing


@pytest.mark.parametrize("train", [False, True])
def test_fake_mode_runs_a_model_that_reads_plain_tensor_attributes(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor], train: bool
) -> None:
    real = audit_fixed(CachesAnchors(), sample(1, 3, 8, 8), train=train)
    fake = audit_fixed(CachesAnchors(), sample(1, 3, 8, 8), mode="fake", train=train)
    # after fx fails: the eager recording, or torch.export when a backward pass needs a graph
    assert fake.meta.capture == real.meta.capture == ("export" if train else "hooks")
    assert [(f.node, f.kind) for f in fake.findings] == [(f.node, f.kind) for f in real.findings]


def test_plain_tensor_attributes_are_found() -> None:
    assert [name for name, _ in plain_tensors(CachesAnchors())] == ["head.stride"]


def test_a_comparison_that_cannot_be_made_is_a_difference_not_a_crash() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 3)
    assert first_difference(torch.zeros(2, 3), fake) == (
        "output 0 cannot be compared: the expected value is a fake or meta tensor"
    )


class NeedsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[:, : int(y.abs().sum().item() > 0) + 1]


def test_fake_tensors_own_limit_is_not_blamed_on_the_inputs(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    with pytest.raises(PropagationError) as e:
        audit_fixed(NeedsValues(), sample(1, 3, 8, 8), mode="fake")
    assert "fake" in str(e.value) and "--mode real" in str(e.value)
    assert "check the input shapes" not in str(e.value)
    assert audit_fixed(NeedsValues(), sample(1, 3, 8, 8)).summary.findings == 0


class TracedOtherwise(nn.Module):
    """Forward takes another branch while torch.fx traces it (``is_fx_tracing()``, as
    ``torch.jit.isinstance`` or a Python value can): the graph raises where eager runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if torch.fx._symbolic_trace.is_fx_tracing():
            return y.reshape(1, -1, 3)
        return y


def test_a_forced_graph_that_raises_where_eager_runs_is_the_graphs_error() -> None:
    """Not 'the model's own error at the audited shapes' (eager runs them): the capture's, with the
    captures that record what eager runs named."""
    from nhwc_audit import TraceError, audit

    model, x = TracedOtherwise().eval(), torch.randn(1, 3, 5, 5)
    model(x)  # eager runs
    with pytest.raises(TraceError, match="captured graph is wrong.*where the eager model runs.*'hooks'"):
        audit(model, x, capture="fx", bandwidth=1e9)
    assert audit(model, x, bandwidth=1e9).meta.capture == "hooks"  # auto: the chain goes on


class _ScriptedMiddle(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.mid = torch.jit.script(torch.nn.Sequential(torch.nn.InstanceNorm2d(8), torch.nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mid(self.a(x)))


@pytest.mark.parametrize("how", [{}, {"capture": "hooks"}, {"capture": "export"}, {"mode": "fake"}])
def test_a_torchscript_submodule_is_audited(how: dict[str, str]) -> None:
    """A ScriptModule's tables are no dicts (a TypeError restoring attributes) and it takes no
    hooks (the eager capture blamed the model): every capture audits it now, as eager moves."""
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    model, x = _ScriptedMiddle().eval(), torch.randn(2, 3, 8, 8)
    r = nhwc_audit.audit(model, x, bandwidth=1e9, **how)  # type: ignore[arg-type]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == 16384


class _KeywordKey(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.heads = torch.nn.ModuleDict({"in": torch.nn.InstanceNorm2d(8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.heads["in"](self.a(x)))


def test_a_graph_whose_code_does_not_compile_falls_to_export_for_a_backward() -> None:
    """torch.fx writes ``self.heads.in(...)`` for a ModuleDict key that is a Python keyword: the
    train audit's GraphModule raised SyntaxError; the chain now moves on to torch.export."""
    torch.manual_seed(0)
    r = nhwc_audit.audit(_KeywordKey().train(), torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    assert r.meta.capture == "export" and r.meta.backward
    assert any("does not compile" in n for n in r.meta.capture_notes)


class _RefusesTheShape(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 32 == 0  # timm halonet's own check of the input size
        return self.conv(x)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["auto", "fx", "export", "hooks"])
def test_the_models_own_error_is_named_so_whatever_the_capture(capture: str, mode: str) -> None:
    """A forced export said only 'torch.export could not capture ByobNet: AssertionError: ' (a
    bare assert), where the other captures say it is the model's own error at the audited shapes."""
    from nhwc_audit.errors import PropagationError

    with pytest.raises(PropagationError, match="raised AssertionError.*the model's own error at the audited shapes"):
        nhwc_audit.audit(_RefusesTheShape(), torch.randn(1, 3, 20, 20), capture=capture, mode=mode)  # type: ignore[arg-type]


class _BranchesOnLayout(torch.nn.Module):
    """A branch on a test fx cannot make a bool of (``is False`` on a proxy): fx takes the view,
    which raises on channels_last, where eager takes the flatten (a LightningModule in the wild)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y.flatten(1) if y.is_contiguous() is False else y.view(y.size(0), -1)
        return self.fc(y)  # type: ignore[no-any-return]


def test_a_graph_that_breaks_where_eager_runs_is_not_the_models() -> None:
    """auto kept fx's graph and reported a break eager never hits ('not checked against eager
    (the model breaks on channels_last)'): one eager forward now says whether the model breaks."""
    x = torch.randn(1, 3, 16, 16)
    r = nhwc_audit.audit(_BranchesOnLayout().eval(), x, bandwidth=1e9)
    assert r.meta.capture == "hooks" and not r.findings
    assert any(
        "the graph breaks at node 'view' where the eager model runs channels_last" in n for n in r.meta.capture_notes
    )
    forced = nhwc_audit.audit(_BranchesOnLayout().eval(), x, bandwidth=1e9, capture="fx")
    assert [f.kind.value for f in forced.findings] == ["break"]  # what fx's graph does, as asked


class _ViewsTheMap(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))  # type: ignore[no-any-return]


def test_a_forced_export_of_a_model_that_breaks_on_channels_last_says_so() -> None:
    """A forced export failed on the view, and eager channels_last raised too: the audit called it
    'the model's own error at the audited shapes, not a channels_last problem'. The eager recording,
    which runs a failing op again on NCHW copies, tells a break from the model's own error."""
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TraceError, match="the model breaks on channels_last input .*'auto' .* report where"):
        nhwc_audit.audit(_ViewsTheMap().eval(), x, capture="export")
    assert [f.kind.value for f in nhwc_audit.audit(_ViewsTheMap().eval(), x, bandwidth=1e9).findings] == ["break"]


class _ViewHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_a_wrong_input_shape_quotes_the_error_the_nchw_model_meets(mode: str) -> None:
    """At a shape the head does not take, the graph runs past the view (a break, run again NCHW) and the
    linear layer raises in either layout; the message added "eager forward fails too: view size is not
    compatible ... Use .reshape(...)", what eager channels_last meets first, sending the user to the
    break instead of the input shape (a new user's trial). Eager as the model was built meets the
    linear layer's error: the same."""
    from nhwc_audit.errors import PropagationError

    with pytest.raises(PropagationError) as info:
        nhwc_audit.audit(_ViewHead(), torch.randn(1, 3, 32, 32), mode=mode)  # type: ignore[arg-type]
    message = str(info.value)
    assert "node 'fc'" in message and "the model's own error at the audited shapes" in message
    run = "eager forward on fake tensors" if mode == "fake" else "eager forward"
    assert message.endswith(f"({run} fails the same way)") and "view size" not in message


class PicksByAValue(nn.Module):
    """``y[torch.where(level == 0)[0]]`` (torchvision's MultiScaleRoIAlign per level): its output's shape
    needs the buffer's values, which fake tensors do not have; the model's own run works."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("level", torch.tensor([0, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        return self.post(y[torch.where(self.level == 0)[0]])


def test_a_fake_run_s_error_says_the_eager_run_it_compared_was_on_fake_tensors() -> None:
    # it said "(eager forward fails the same way)", read as the model's own error where the model runs
    with pytest.raises(PropagationError) as e:
        nhwc_audit.audit(
            PicksByAValue().eval(), torch.randn(2, 8, 16, 16), capture="export", mode="fake", bandwidth=1e9
        )
    assert str(e.value).endswith("(eager forward on fake tensors fails the same way)"), str(e.value)
    assert "--mode real" in str(e.value)
