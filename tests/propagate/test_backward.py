"""The backward of a real ``train`` audit starts from the propagation's own forward, run with
autograd: the model runs forward once, and the gradient layouts are the ones a backward from
a forward of its own (as a fake audit runs it) records."""

from __future__ import annotations

import dataclasses
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
from nhwc_audit.tensors import iter_tensors
from tests import models as M
from tests.support import relayed


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
    ran = backward_layouts(trace(copy.module).gm, [sample], breaks=breaks)
    grads, params = ran.layouts, ran.params
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


class Encoder(nn.Module):
    """An eval-mode TransformerEncoder given a padding mask: without autograd it takes the fused
    nested-tensor path, whose outputs differ from the path training runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.enc(self.conv(x).flatten(2).transpose(1, 2), src_key_padding_mask=mask))
        return out


def test_a_train_audits_checks_run_with_autograd_as_its_propagation_does() -> None:
    """A hook keeps the replay from vouching: the graph is compared with an eager run, which
    must run as training does too, or the fast path makes the fx graph look wrong."""
    torch.manual_seed(0)
    model = Encoder().eval()
    model.head.register_forward_hook(lambda *_: None)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, 10:] = True
    report = audit(model, (torch.randn(1, 3, 4, 4),), example_kwargs={"mask": mask}, bandwidth=1e9, train=True)
    assert report.meta.capture == "fx" and report.meta.backward, report.meta.capture_notes


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(2).transpose(1, 2)
        y = self.attn(y, y, y, need_weights=False)[0]
        out: torch.Tensor = self.conv2(y.transpose(1, 2).reshape(x.shape[0], 16, 4, 4))
        return out


def test_mode_both_runs_its_fake_half_as_the_real_one_ran() -> None:
    """MultiheadAttention's output strides differ with and without autograd: a train audit's
    fake half runs with autograd too, so no divergence is made up."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    for train in (False, True):
        report = audit(Attention().eval(), x, bandwidth=1e9, train=train, mode="both")
        assert report.summary.divergences == 0, train
        assert report.meta.backward is train


class ClipsItsWeight(nn.Module):
    """A WGAN critic that clips its own weight under ``torch.no_grad()`` in forward (a block fx
    does not trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.conv.weight.clamp_(-0.1, 0.1)
        out: torch.Tensor = self.head(F.relu(self.conv(x)))
        return out


def test_a_node_autograd_alone_refuses_is_not_a_break() -> None:
    model = ClipsItsWeight()
    before = model.conv.weight.detach().clone()
    report = audit(model, torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    assert [n.name for n in report.nodes if n.error] == []
    assert report.meta.capture == "fx" and report.meta.backward
    assert torch.equal(model.conv.weight, before)  # the clip ran on the audit's own copy


def test_a_rejected_captures_autograd_run_does_not_outlive_the_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fx graph of the encoder above is rejected when its eager check runs without
    autograd (forced here): the rejected run's activations go before the next capture runs."""
    import gc
    import weakref

    from nhwc_audit.propagate import chain

    outs: list[weakref.ref[torch.Tensor]] = []
    alive_at_export: list[bool] = []
    real_run = chain.GradRun

    class Spy(real_run):  # type: ignore[misc,valid-type]
        def __init__(self, out: Any, grads: Any) -> None:
            super().__init__(out, grads)
            outs.append(weakref.ref(iter_tensors(out)[0]))

    real_export = chain.exported

    def export(*args: Any, **kwargs: Any) -> Any:
        alive_at_export.extend(ref() is not None for ref in outs)
        return real_export(*args, **kwargs)

    real_forward = chain.Runner.forward

    def forward_without_autograd(self: Any, *args: Any) -> Any:  # the check as it ran before
        with torch.no_grad():
            return real_forward(dataclasses.replace(self, grad=False), *args)

    monkeypatch.setattr(chain, "GradRun", Spy)
    monkeypatch.setattr(chain, "exported", export)
    monkeypatch.setattr(chain.Runner, "forward", forward_without_autograd)
    torch.manual_seed(0)
    model = Encoder().eval()
    model.head.register_forward_hook(lambda *_: None)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, 10:] = True
    gc.disable()  # as inside an audit: only what refcounts free goes
    try:
        audit(model, (torch.randn(1, 3, 4, 4),), example_kwargs={"mask": mask}, bandwidth=1e9, train=True)
    finally:
        gc.enable()
    assert alive_at_export == [False]


class _Between(nn.Module):
    def __init__(self, op: nn.Module, post: int = 8) -> None:
        super().__init__()
        self.a, self.op, self.b = nn.Conv2d(8, 8, 3, padding=1), op, nn.Conv2d(post, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.op(self.a(x)))


def _eager_grad_layout(model: nn.Module, x: torch.Tensor) -> str:
    """The layout of the gradient eager autograd hands conv ``a``'s channels_last output."""
    from nhwc_audit import convert

    m, seen = convert(model), {}

    def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.update(g=g.stride()))

    m.a.register_forward_hook(hook)
    y = m(x.contiguous(memory_format=torch.channels_last).requires_grad_())
    (y * torch.randn_like(y)).sum().backward()
    return (
        "channels_last" if seen["g"] == torch.empty(x.shape).to(memory_format=torch.channels_last).stride() else "nchw"
    )


@pytest.mark.parametrize(
    "op,post",
    [(nn.GLU(dim=1), 4), (nn.LogSoftmax(dim=1), 8), (nn.ReflectionPad2d(2), 8), (nn.ReplicationPad2d((1, 0, 0, 2)), 8)]
    + [(nn.Conv2d(8, 8, 3, padding=(1, 2), padding_mode=m), 8) for m in ("replicate", "reflect")],
)
def test_a_fake_train_audit_strides_gradients_as_the_cpu_kernels_do(op: nn.Module, post: int) -> None:
    """The meta kernels of GLU's and of the reflect/replicate pads' backward stride their gradient
    otherwise than the CPU kernels (torch 2.14.1): a fake audit asks the CPU kernel, as real mode
    runs it, and finds what eager does at conv ``a``."""
    torch.manual_seed(0)
    model = _Between(op, post).train()
    x = torch.randn(2, 8, 8, 12)
    nchw_grad_at_a = _eager_grad_layout(model, x) == "nchw"
    for mode in ("real", "fake"):
        r = audit(model, x, bandwidth=1e9, train=True, mode=mode)
        found = [f.module_path for f in relayed(r.findings)]
        assert ("a" in found) == nchw_grad_at_a, (mode, found, r.meta.capture_notes)


class _WithItsConv(nn.Module):
    """``fn(y, conv(y))``: an op of two channels_last maps whose gradient formula masks in place."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.c, self.fn = nn.Conv2d(8, 8, 1), fn

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y, self.c(y))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize(
    "fn",
    [torch.maximum, torch.minimum, torch.fmax, torch.fmin]
    + [lambda y, t: torch.clamp(y, min=t), lambda y, t: torch.clamp(y, min=t, max=t + 1), torch.clamp_max],
    ids=["maximum", "minimum", "fmax", "fmin", "clamp_min_tensor", "clamp_both_tensors", "clamp_max"],
)
def test_a_fake_train_audit_masks_gradients_in_place_as_training_does(fn: Any, capture: str) -> None:
    """Their formulas fill a mask in place in training, out of place (to a contiguous copy) under
    any dispatch mode, a fake run's too: no backward finding where eager hands ``a`` channels_last."""
    torch.manual_seed(0)
    model = _Between(_WithItsConv(fn)).train()
    x = torch.randn(2, 8, 8, 12)
    assert _eager_grad_layout(model, x) == "channels_last"
    for mode in ("real", "fake"):
        r = audit(model, x, bandwidth=1e9, train=True, mode=mode, capture=capture)
        assert not relayed(r.findings), (mode, r.meta.capture_notes)


class _TokensConv1d(nn.Module):
    """A Conv1d over a map's tokens at batch 1, viewed back: its gradient reaches conv ``a`` NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        return self.b(self.c(y.flatten(2)).view(n, c, h, w))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_fake_train_audit_keeps_the_gradient_of_a_restrided_token_view(capture: str) -> None:
    torch.manual_seed(0)
    model, x = _TokensConv1d().train(), torch.randn(1, 8, 8, 12)
    assert _eager_grad_layout(model, x) == "nchw"
    found = {
        mode: sorted(
            (f.kind.value, f.module_path, f.bytes)
            for f in audit(model, x, bandwidth=1e9, train=True, mode=mode, capture=capture).findings
        )
        for mode in ("real", "fake")
    }
    assert found["fake"] == found["real"] and ("backward", "a", 6144) in found["real"], found


class _Attractor(nn.Module):
    """ZoeDepth's attractor: an activation of the map, broadcast in 5D against an NCHW map."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        d = self.act(y).unsqueeze(2) - torch.ones(y.shape[0], 1, 4, y.shape[2], y.shape[3])
        return (d / (1 + d * d)).sum(2)


@pytest.mark.parametrize(
    "op",
    [_Attractor(act) for act in (nn.Softplus(), nn.ReLU6(), nn.Hardswish(), nn.Hardsigmoid())],
    ids=["softplus", "relu6", "hardswish", "hardsigmoid"],
)
def test_a_fake_train_audit_strides_activation_gradients_as_the_cpu_kernels_do(op: nn.Module) -> None:
    """The meta kernels of these activations' backward stride their gradient otherwise than the
    CPU kernels (torch 2.14.1): the fake audit's backward findings are the real audit's, and
    conv ``a``'s is eager's."""
    torch.manual_seed(0)
    model = _Between(op).train()
    x = torch.randn(1, 8, 8, 12)
    found = {}
    for mode in ("real", "fake"):
        r = audit(model, x, bandwidth=1e9, train=True, mode=mode)
        found[mode] = [(f.module_path, f.bytes) for f in relayed(r.findings)]
    assert found["fake"] == found["real"]
    assert ("a" in [p for p, _ in found["real"]]) == (_eager_grad_layout(model, x) == "nchw")


class _PatchEmbedStage(nn.Module):
    """A Segformer-like stage: patch-embedding conv, LayerNorm'd tokens, back to an NCHW map that
    a decode head reads as tokens."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.proj, self.n1, self.fc = nn.Conv2d(3, c, 7, stride=4, padding=3), nn.LayerNorm(c), nn.Linear(c, c)
        self.n2, self.head = nn.LayerNorm(c), nn.Linear(c, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        b, c, h, w = y.shape
        t = self.n1(y.flatten(2).transpose(1, 2))
        t = self.n2(t + self.fc(t))
        y = t.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return self.head(y.flatten(2).transpose(1, 2))


def _area_attention() -> nn.Module:
    block = pytest.importorskip("ultralytics.nn.modules.block")  # YOLO12's: a BatchNorm'd qkv read as tokens
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), block.AAttn(64, num_heads=2, area=1), nn.Conv2d(64, 8, 1))


def _attention() -> nn.Module:
    block = pytest.importorskip("ultralytics.nn.modules.block")  # YOLO26's: views of a BatchNorm'd qkv
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), block.Attention(64, 2, 0.5), nn.Conv2d(64, 8, 1))


@pytest.mark.parametrize(
    "build", [_PatchEmbedStage, _area_attention, _attention], ids=["layer_norm", "batch_norm", "views_of_batch_norm"]
)
def test_a_fake_train_audit_strides_norm_gradients_as_the_cpu_kernels_do(build: Callable[[], nn.Module]) -> None:
    """LayerNorm's and BatchNorm's backward meta kernels follow the incoming gradient where the CPU
    kernels follow the input (torch 2.14.1), and a view restrided to eager's size-1 strides by
    ``as_strided`` would get the source's strides for its gradient: the fake audit's backward
    findings are the real one's."""
    torch.manual_seed(0)
    model = build().train()
    x = torch.randn(1, 3, 32 if build is _PatchEmbedStage else 4, 32 if build is _PatchEmbedStage else 4)
    found = [
        [
            (f.module_path, f.bytes)
            for f in audit(model, x, bandwidth=1e9, train=True, mode=m).findings
            if f.kind.value == "backward"
        ]
        for m in ("real", "fake")
    ]
    assert found[1] == found[0]
