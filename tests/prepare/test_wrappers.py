"""Models as users hand them over: wrapped by ``torch.compile`` or ``DataParallel``, or holding
TorchScript modules. The audit runs what a wrapper wraps, and gives a TorchScript module's weights
(real or fake) the channels_last strides every other weight gets. Measured by a sweep of user model forms against eager (``tests.eager_bytes``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit, repair
from tests.eager_bytes import eager_bytes

CAPTURES = ["fx", "export", "hooks"]


class Body(nn.Module):
    """A circular pad between two convs: one revert in eager (the second conv copies the crop, not
    dense, in either layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.c1(x), (1, 1, 1, 1), mode="circular")[:, :, 1:-1, 1:-1]
        return self.c2(y)


def _scripted(kind: str, module: nn.Module, x: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation warnings
        return torch.jit.trace(module, x) if kind == "trace" else torch.jit.script(module)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("kind", ["trace", "script"])
def test_a_torchscript_submodule_gets_channels_last_weights(kind: str, capture: str) -> None:
    """The copy took a TorchScript module whole (its own deepcopy ignores the memo of restrided
    weights), and a traced module's parameter table is no attribute of its ``__dict__``: its conv
    re-laid its NCHW weight, 1,728 B charged ('conversion' in fx, 'mixed' in hooks) where eager has 0."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = nn.Sequential(_scripted(kind, nn.Conv2d(3, 8, 3).eval(), x), nn.ReLU())
    if capture == "export" and kind == "trace":
        pytest.skip("torch.export refuses a traced module's parameters (not nn.Parameter)")
    assert eager_bytes(model, (x,)).added == 0
    report = audit(model, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == 0 and not report.findings


def test_a_traced_model_is_charged_what_eager_moves() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = _scripted("trace", Body().eval(), x)
    weights = [p.clone() for p in model.parameters()]
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "hooks"
    # the pad's revert, as eager: the conv re-lays the crop, which the NCHW model's conv copies too (not dense)
    assert report.summary.bytes_moved == 65_536
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(model.parameters(), weights, strict=True))


@pytest.mark.parametrize("where", ["model", "submodule"])
@pytest.mark.parametrize("kind", ["trace", "script"])
def test_a_fake_audit_of_torchscript_runs_as_the_real_one(kind: str, where: str) -> None:
    """A fake audit blamed the model ('the model's own error at the audited shapes ... eager
    forward fails the same way') where eager runs: its TorchScript module kept real weights, which
    a fake input cannot meet. It holds the fake copy's weights now."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    scripted = _scripted(kind, Body().eval(), x)
    model = scripted if where == "model" else nn.Sequential(nn.Conv2d(3, 3, 1), scripted)
    real, fake = audit(model, x, bandwidth=1e9), audit(model, x, mode="fake", bandwidth=1e9)
    assert fake.summary.bytes_moved == real.summary.bytes_moved > 0
    assert [(f.kind, f.node, f.bytes) for f in fake.findings] == [(f.kind, f.node, f.bytes) for f in real.findings]


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return Body().eval()


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "compiled_child", "compile_of_data_parallel"])
def test_a_wrapped_model_is_audited_as_the_module_it_wraps(wrap: str) -> None:
    """torch.fx cannot trace torch.compile's module ('missing the required forward function'):
    the audit fell back to hooks and dynamo compiled the audit's own code (46 frames, 2.4 s for
    three layers), module paths read '_orig_mod.1'. DataParallel failed fx the same way."""
    plain = _plain()
    wrapped: nn.Module = {
        "compile": lambda: torch.compile(plain, backend="eager"),
        "data_parallel": lambda: nn.DataParallel(plain),
        "compiled_child": lambda: nn.Sequential(torch.compile(plain, backend="eager")),
        "compile_of_data_parallel": lambda: torch.compile(nn.DataParallel(plain), backend="eager"),
    }[wrap]()
    x = torch.randn(1, 3, 32, 32)
    state = copy.deepcopy(plain.state_dict())
    report, reference = audit(wrapped, x, bandwidth=1e9), audit(plain, x, bandwidth=1e9)
    assert report.meta.capture == "fx"
    assert report.summary.bytes_moved == reference.summary.bytes_moved == 65_536
    inside = (lambda p: ".".join(["0", *filter(None, [p])])) if wrap == "compiled_child" else (lambda p: p)
    assert [(f.kind, f.module_path) for f in report.findings] == [
        (f.kind, inside(f.module_path)) for f in reference.findings
    ]
    assert not any("_orig_mod" in path or path.startswith("module") for path, _ in report.meta.modules)
    wrapper_notes = [n for n in report.meta.capture_notes if n.startswith("audited Body, which")]
    assert len(wrapper_notes) == (0 if wrap == "compiled_child" else 1)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())


def test_a_repair_of_a_compiled_model_repairs_the_module_it_wraps() -> None:
    plain = _plain()
    gm, log = repair(torch.compile(plain, backend="eager"), torch.randn(1, 3, 32, 32))
    assert type(gm).__name__ == "Body" and log.breaks_after == 0


def test_a_forced_trace_of_a_torchscript_model_says_so() -> None:
    """torch.fx said 'AssertionError: traced_func_name=forward doesn't exist in RecursiveScriptModule
    (data-dependent control flow or non-torch calls in forward ...)'."""
    from nhwc_audit.errors import TraceError

    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(
        TraceError, match=r"cannot trace a TorchScript module \(RecursiveScriptModule\): capture 'hooks'"
    ):
        audit(_scripted("script", Body().eval(), x), x, capture="fx", bandwidth=1e9)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("kind", ["trace", "script"])
def test_a_torchscript_submodule_is_audited_whole_and_trained_through(kind: str, mode: str) -> None:
    """fx traced into a TorchScript module as a call on its C++ object: the graph held neither the
    module nor its parameters (a train audit: 0 B of backward where eager moves 65,536), and the
    conv inside it of the pad's crop, a strided NCHW slice, was not charged (half of eager's bytes).
    It is one node now, the copies inside it seen at the dispatch level."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _scripted(kind, Body().eval(), x[:1]))
    expected = eager_bytes(model, (x,)).added
    # the pad's revert per sample: the conv's re-lay of the crop, not dense, is a copy the NCHW model makes too
    assert audit(model, x, bandwidth=1e9, capture="fx", mode=mode).summary.bytes_moved == expected == 131_072  # type: ignore[arg-type]
    if mode == "real":
        from tests.eager_bytes import eager_backward_bytes

        trained = audit(model.train(), x, bandwidth=1e9, capture="fx", train=True)
        backward = sum(f.bytes for f in trained.findings if f.kind.value == "backward")
        assert backward == eager_backward_bytes(model.train(), (x,)).added > 0
