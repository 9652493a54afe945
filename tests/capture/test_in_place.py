"""``x += y`` and its kin in the fx capture: in place on tensors, as eager runs them (see
``tests/propagate/test_backward_vs_eager.py::AddIntoAView`` for the backward that needs it); on
values Python rebinds (ints, tuples), out of place; ``@=`` out of place (a tensor has no
``__imatmul__``); and a model that writes to its own weights with them is checked against eager
from the same state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.fix.repair import repair_model
from tests.eager_bytes import eager_bytes


class Pyramid(nn.Module):
    """Pooled sizes halved with ``//=`` on an int from ``x.size(-1)``, a size tuple grown with
    ``+=``: torch.fx generates ``a //= 2;  ifloordiv = a`` for an in-place node, which rebinds
    ``a`` for the nodes after it that read the size before."""

    def __init__(self, contiguous: bool = False) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.contiguous = contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        if self.contiguous:
            y = y.contiguous()
        size, sizes = y.size(-1), []
        for _ in range(3):
            sizes.append(size)
            size //= 2
        s = y.size()
        first = s
        s += (1,)
        outs = [F.adaptive_avg_pool2d(y, k) for k in sizes]
        up = F.interpolate(outs[1], size=sizes[0]) + F.interpolate(outs[2], size=first[-1])
        return self.post(outs[0] + up + s[-1])  # s[-1]: the 1 appended


@pytest.mark.parametrize("contiguous", [False, True])
def test_in_place_operators_on_ints_and_tuples_rebind_as_python_does(contiguous: bool) -> None:
    torch.manual_seed(0)
    model, x = Pyramid(contiguous).eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        report = audit(model, x, bandwidth=1e9)
        assert report.meta.capture == "fx"
        repaired = report.repaired()
        assert repaired.repaired_module is not None and repaired.repair is not None
        torch.testing.assert_close(repaired.repaired_module(x), want, rtol=1e-4, atol=1e-5)
        assert [s.kind for s in repaired.repair.steps] == (["contiguous-cl"] if contiguous else [])
        gm, log = repair_model(model, (x,))  # a trace of the repair's own
        torch.testing.assert_close(gm(x), want, rtol=1e-4, atol=1e-5)


class MatmulInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("w", torch.ones(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        y @= self.w  # a tensor has no __imatmul__: y = y @ w
        return self.post(y)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_matmul_assignment_is_out_of_place(capture: str) -> None:
    model, x = MatmulInPlace().eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added == 49152


class BufferWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("pos", torch.zeros(1, 8, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.pos
        b += 1.0  # the model's own state, one more every call
        return self.post(self.pre(x) + b)


class ParamWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.scale
        p += 1.0
        return self.post(self.pre(x) * p)


@pytest.mark.parametrize("build", [BufferWrite, ParamWrite])
def test_a_model_that_writes_its_own_state_is_checked_from_one_state(build: type[nn.Module]) -> None:
    """The graph and eager ran one after the other, each adding to the weight: their outputs
    could never agree, and the fx capture was dropped (and the repair refused)."""
    model, x = build().eval(), torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "fx", report.meta.capture_notes
    assert report.repaired().repaired_module is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_graph_that_raises_in_the_check_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """Training, the parameter's in-place add raises in eager and in the graph (a leaf that
    requires grad): a GraphModule prints the traceback of what it raises to stderr."""
    audit(ParamWrite().train(), torch.randn(2, 3, 16, 16), bandwidth=1e9, train=True)
    assert capfd.readouterr().err == ""


def test_the_generated_code_of_an_in_place_add_on_a_tensor_writes_it() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            kept = y
            y += 1
            return kept * 2  # eager: y's write shows through kept

    model, x = Aliased().eval(), torch.randn(1, 3, 8, 8)
    gm = trace(model).gm
    assert "+= 1" in gm.code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_an_in_place_add_on_an_attribute_writes_what_it_views() -> None:
    """``v = y.mT; v += 1`` writes ``y``: torch's Attribute proxy (``y.mT``, ``x.shape``) had no
    in-place operators, so the graph added out of place and the check dropped fx."""

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.pre(x)
            v = y.mT
            v += 1
            s = x.shape
            s += (1,)
            return self.post(y) + s[-1]

    model, x = Transposed().eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "fx", report.meta.capture_notes
    with torch.no_grad():
        torch.testing.assert_close(report.repaired().repaired_module(x), model(x), rtol=1e-4, atol=1e-5)


class SumsIntoAFreshTensor(nn.Module):
    """Adds into a tensor forward makes from no input (``t = torch.zeros(())``; ``t += ...``):
    eager makes it afresh each call, torch.fx stows it as one constant for every run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        t = torch.zeros(())
        t += y.mean()
        t += y.amax()
        return self.norm(y) * t


def test_a_tensor_made_in_forward_and_written_in_place_is_fresh_in_each_run_of_the_graph() -> None:
    """Each run of the fx graph wrote into the one constant the trace stowed: the real audit's
    check found the graph off eager (output 7.86 off) and fell back (hooks, export in training),
    and a fake train audit, which cannot check, ran its backward into the last run's graph
    (98,304 B where eager moves 65,536)."""
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = SumsIntoAFreshTensor().train(), torch.randn(2, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    forward = eager_bytes(model, (x,)).added
    for mode in ("real", "fake"):
        report = audit(model, x, mode=mode, train=True, bandwidth=1e10)  # type: ignore[arg-type]
        assert report.meta.capture == "fx", report.meta.capture_notes
        assert report.summary.bytes_moved == forward + truth  # a train audit sums both ways
        assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth, mode
    gm = trace(model).gm
    torch.manual_seed(1)
    assert torch.equal(gm(x), gm(x)) and torch.equal(gm(x), model(x))


class FillsAFreshBuffer(nn.Module):
    """Writes a conv's first channels into a buffer forward makes (``torch.zeros`` of a fixed
    size: a constant to the trace), by assignment, by ``+=`` into a slice of it (the trace
    indexes it itself and stows the slice apart), or by ``add_`` on that slice."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.post = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "copy_into_channels_last":  # a buffer made channels_last: no clone of its own kept it
            z = torch.empty(2, 8, 16, 16, memory_format=torch.channels_last)
            z.copy_(y)
            return self.post(z)
        z = torch.zeros(2, 8, 16, 16)
        if self.how == "assign":
            z[:, :4] = y[:, :4]
        elif self.how == "add_into_slice":
            z[:, :4] += y[:, :4]
        else:
            z[:, :4].add_(y[:, :4])
        return self.post(z)


@pytest.mark.parametrize("how", ["assign", "add_into_slice", "add__on_slice", "copy_into_channels_last"])
def test_a_buffer_made_in_forward_and_filled_through_views_is_fresh_and_shared_by_its_views(how: str) -> None:
    """``z[:, :4] = y`` (traced as ``__setitem__`` on the constant) was not seen as a write; a
    slice of the constant written in place was cloned apart from the constant, so the write no
    longer reached it (the graph's first run computed ``post(zeros)``). Fake train charged
    131,072 B (assignment) or 32,768 (``add_``) where eager's backward moves 81,920, and forced
    fx charged the forward 0 where the slice's add reads a channels_last slice into an NCHW one
    (16,384 B in eager, in every capture)."""
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = FillsAFreshBuffer(how).train(), torch.randn(2, 8, 16, 16)
    gm = trace(model).gm
    with torch.no_grad():
        assert torch.equal(gm(x), model(x)) and torch.equal(gm(x), model(x))
    truth, forward = eager_backward_bytes(model, (x,)).added, eager_bytes(model, (x,)).added
    for mode in ("real", "fake"):
        report = audit(model, x, mode=mode, train=True, capture="fx", bandwidth=1e10)  # type: ignore[arg-type]
        assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth, mode
        assert report.summary.bytes_moved == forward + truth, mode
    for capture in ("auto", "hooks"):
        assert audit(model.eval(), x, capture=capture, bandwidth=1e10).summary.bytes_moved == forward, capture
