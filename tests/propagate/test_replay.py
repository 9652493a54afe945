"""The replay check of an fx capture: vouches for faithful graphs without a second forward,
and never for one that differs from eager."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_leaves

from nhwc_audit import audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.examples import unet
from nhwc_audit.prepare.copy import prepare_audit_copy
from nhwc_audit.propagate.chain import replay_check
from nhwc_audit.propagate.interpreter import propagate
from nhwc_audit.propagate.runner import Runner
from nhwc_audit.propagate.skeleton import Skeleton
from tests import models as M


def _replay(model: nn.Module, *args: torch.Tensor, torch_tracer: bool = False) -> str | None:
    """The replay check as the audit runs it; ``torch_tracer``: on the graph of torch's own Tracer,
    which records ``x += y`` as ``x + y`` (out of place), where the audit's records what eager does."""
    cp = prepare_audit_copy(model)
    cap = trace(cp.module)
    if torch_tracer:
        cap = dataclasses.replace(cap, graph=torch.fx.Tracer().trace(cp.module))
    sample = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args)
    skeleton = Skeleton()
    propagate(cap.root, tuple(a.clone() for a in sample), {}, graph=cap.graph, skeleton=skeleton, shared=cp.shared)
    return replay_check(cap, skeleton, sample, {}, Runner(device_type="cpu"))


class Twice(nn.Module):
    """One module called twice, a leaf returning a tuple and eager in-place ops on leaf outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y += x
        y = self.act(self.conv(y))
        seq = y.flatten(2).transpose(1, 2)
        att, _ = self.attn(seq, seq, seq)
        return y + att.transpose(1, 2).reshape(y.shape)


class Ordered(nn.Module):
    """Returns an OrderedDict (torchvision segmentation models do); fx's graph returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        return OrderedDict(out=self.conv(x), aux=[x.mean()])


class NormAct(nn.Module):
    """timm's BatchNormAct2d: batch_norm in the module's own code, then an Identity leaf and an
    in-place activation leaf that overwrites the tensor the Identity was given and returned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
        out: torch.Tensor = self.act(self.drop(y))
        return out


class Windows(nn.Module):
    """Swin-style windows: the batch is folded into dim 0 (B * windows) before a leaf Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        win = y.permute(0, 2, 3, 1).reshape(b, h // 4, 4, w // 4, 4, c).transpose(2, 3).reshape(-1, 16, c)
        out: torch.Tensor = self.proj(win)
        return out.reshape(b, -1, c).mean(1)


@pytest.mark.parametrize(
    "build,shape",
    [
        (Ordered, (1, 3, 8, 8)),
        (lambda: NormAct().eval(), (1, 3, 8, 8)),
        (lambda: NormAct().eval(), (3, 3, 8, 8)),
        (Windows, (1, 3, 8, 8)),
        (Windows, (3, 3, 8, 8)),
        (lambda: tvm.resnet18().eval(), (1, 3, 32, 32)),
        (lambda: tvm.resnet18().eval(), (3, 3, 32, 32)),
        (lambda: tvm.resnet18().train(), (2, 3, 32, 32)),  # batch statistics: leaves are not re-run
        (lambda: tvm.densenet121().eval(), (2, 3, 32, 32)),
        (lambda: tvm.mobilenet_v3_small().eval(), (2, 3, 32, 32)),
        (lambda: unet()[0], (1, 3, 32, 32)),
        (Twice, (1, 4, 8, 8)),
        (Twice, (3, 4, 8, 8)),
    ],
)
def test_replay_vouches_for_faithful_graphs(build, shape) -> None:  # type: ignore[no-untyped-def]
    assert _replay(build(), torch.randn(shape)) is None


def _count_calls(module: nn.Module, note: Any) -> None:
    """Note each run of ``module`` (a forward of its own, not a hook: the audit's copies keep
    it, and the replay refuses models with hooks)."""
    base = type(module)

    def forward(self: nn.Module, *args: Any) -> Any:
        note(args)
        return base.forward(self, *args)

    # a subclass, not a bound method in the instance: the audit's copy runs its own weights
    module.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})  # fx's leaf


@pytest.mark.parametrize("batch,calls", [(1, [1]), (4, [4])])
def test_fx_check_runs_no_second_forward(batch: int, calls: list[int]) -> None:
    model = M.ConvBnRelu().eval()
    seen: list[int] = []
    _count_calls(model.conv, lambda a: seen.append(a[0].shape[0]))
    report = audit(model, torch.randn(batch, 3, 8, 8), bandwidth=1e9)
    assert report.meta.capture == "fx" and report.meta.capture_notes == ()
    assert seen == calls  # the propagation's call only: the check replayed it


class ChangesInput(nn.Module):
    """fx sees a Proxy, not a Tensor: the graph skips the ``+ 1`` that eager applies before conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x) * 2
        if isinstance(y, torch.Tensor):
            y = y + 1
        out: torch.Tensor = self.conv2(y)
        return out


class ChangesLeafOutput(ChangesInput):
    """As ChangesInput, but the graph passes conv1's output straight into conv2: the replay
    kept it as a stand-in, and eager computing with it ends the replay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if isinstance(y, torch.Tensor):
            y = y + 1
        out: torch.Tensor = self.conv2(y)
        return out


class SkipsCall(nn.Module):
    """The graph never calls conv2; eager does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv1(x)
        if isinstance(y, torch.Tensor):
            y = self.conv2(y)
        return y


class CallsMore(nn.Module):
    """The graph calls conv twice; eager once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        if not isinstance(y, torch.Tensor):
            y = self.conv(y)
        return y


class OutputOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.conv(x)
        if isinstance(y, torch.Tensor):
            return {"y": y, "z": y.mean()}
        return {"y": y}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "model,channels,why",
    [
        (ChangesInput(), 3, "eager calls add where the graph calls conv2 (conv2)"),
        (ChangesLeafOutput(), 3, "eager calls add where the graph calls conv2 (conv2)"),
        (SkipsCall(), 3, "eager calls conv2d after the graph's last call"),
        (CallsMore(), 4, "the graph calls conv_1 (conv), eager does not"),
        (OutputOnly(), 3, "eager calls mean after the graph's last call"),
    ],
)
def test_replay_never_vouches_for_a_graph_that_differs(model: nn.Module, channels: int, why: str, batch: int) -> None:
    x = torch.randn(batch, channels, 8, 8)
    assert (_replay(model, x) or "").startswith(why)
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "hooks"  # the full check confirmed it and the chain moved on


class Random(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.drop(self.conv(x))
        return y + torch.rand_like(y)


def test_random_calls_in_the_same_place_are_the_same_graph() -> None:
    """The graph draws where eager draws (same call, same inputs): vouched, no second forward."""
    model = Random().train()
    assert _replay(model, torch.randn(1, 3, 8, 8)) is None
    seen: list[int] = []
    _count_calls(model.conv, lambda a: seen.append(1))
    report = audit(model, torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert report.meta.capture == "fx" and report.meta.capture_notes == ()
    assert len(seen) == 1  # the propagation's call only


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)


class BakedRandom(_Conv):
    """fx draws ``torch.randn(4, 1, 1)`` once, while tracing, and keeps it as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv(x) + torch.randn(4, 1, 1))


class AliasedAdd(_Conv):
    """``out += 1`` writes to ``y`` too in eager; fx records ``out + 1`` and keeps ``y``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = y
        out += 1
        return self.conv2(out + y)


class ViewThenAdd(_Conv):
    """A view taken before ``y += 1`` sees the write in eager, not in the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        v = y[:, :2]
        y += 1
        return self.conv2(torch.cat([v, y[:, 2:]], 1))


class InPlace(_Conv):
    """An in-place method: the graph writes where eager writes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        v = y[:, :2]
        y.mul_(2)
        return self.conv2(torch.cat([v, y[:, 2:]], 1))


class FoldedConstants(_Conv):
    """Constants fx computes while tracing: a view of a buffer, a made tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor([[3, 2], [1, 0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y[:, self.index.view(-1)] * torch.arange(4.0).view(1, 4, 1, 1)
        return self.conv2(y)


class KeptWhole(_Conv):
    """torchvision's stochastic_depth is a function fx keeps whole (``torch.fx.wrap``)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.conv2(y + self.drop(y))


@pytest.mark.parametrize("model", [InPlace(), FoldedConstants(), KeptWhole().eval(), KeptWhole().train()])
def test_replay_follows_writes_constants_and_functions_kept_whole(model: nn.Module) -> None:
    import sys

    where = sys.modules["torchvision.ops.stochastic_depth"]  # the function's own module
    kept = where.stochastic_depth
    assert _replay(model, torch.randn(2, 3, 8, 8)) is None
    assert where.stochastic_depth is kept  # answered during the replay only


def test_the_propagation_keeps_no_activation_for_the_replay() -> None:
    cp = prepare_audit_copy(tvm.resnet18().eval())
    cap = trace(cp.module)
    skeleton = Skeleton()
    sample = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    propagate(cap.root, (sample.clone(),), {}, graph=cap.graph, skeleton=skeleton, shared=cp.shared)
    held = [skeleton.values, skeleton.plain, skeleton.written]
    assert not [v for v in tree_leaves(held) if isinstance(v, torch.Tensor)]
    assert replay_check(cap, skeleton, (sample,), {}, Runner(device_type="cpu")) is None


@pytest.mark.parametrize(
    "model,why",
    [
        (BakedRandom(), "eager draws random numbers (randn) where the graph keeps a constant"),
        (
            AliasedAdd(),
            "other inputs than the graph's add_1: argument[1]: eager passes add where the graph passes conv",
        ),
        (ViewThenAdd(), "other inputs than the graph's cat: argument[0][0]: eager passes a tensor on memory eager"),
    ],
)
def test_replay_never_vouches_where_eager_values_differ(model: nn.Module, why: str) -> None:
    """The in-place cases on torch's own Tracer's graph (``+=`` out of place there)."""
    x = torch.randn(1, 3, 8, 8)
    torch_tracer = not isinstance(model, BakedRandom)
    got = _replay(model, x, torch_tracer=torch_tracer) or ""
    assert why in got, got
    with torch.no_grad():
        gm = torch.fx.GraphModule(model, torch.fx.Tracer().trace(model)) if torch_tracer else trace(model).gm
        eager, graph = model(x), gm(x)
    assert not torch.equal(eager, graph)  # the graph really differs


@pytest.mark.parametrize("model", [AliasedAdd(), ViewThenAdd()], ids=["aliased", "view"])
def test_the_audits_graph_writes_in_place_where_eager_does(model: nn.Module) -> None:
    """``out += 1`` is ``operator.iadd`` in the audit's graph: the tensors eager writes through
    other names (``y`` of ``out = y``, a view taken before) are written in the graph too, so the
    graph computes eager's values and the replay vouches for it."""
    x = torch.randn(1, 3, 8, 8)
    assert _replay(model, x) is None
    with torch.no_grad():
        assert torch.equal(model(x), trace(model).gm(x))
    assert audit(model, x, bandwidth=1e9).meta.capture == "fx"


class _Y(nn.Module):
    """conv, then ``body`` (the case), then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))

    def body(self, y: torch.Tensor) -> Any:
        return y

    def forward(self, x: torch.Tensor) -> Any:
        return self.body(self.conv(x))


def _case(body: Any) -> nn.Module:
    return type("Case", (_Y,), {"body": lambda self, y: body(self, y)})()


def _proxy(y: Any) -> bool:
    return not isinstance(y, torch.Tensor)  # True while fx traces: the graph takes the other branch


def _half_add(self: Any, y: torch.Tensor) -> Any:
    h = y.half()
    h += y  # eager keeps float16; fx records h + y: float32
    return h


def _broadcast_add(self: Any, y: torch.Tensor) -> Any:
    m = y.mean((2, 3), keepdim=True)
    if _proxy(y):
        m += y  # fx: m + y broadcasts to y's shape
        return m
    return m * 0 + y  # eager: an in-place add could not broadcast m


def _int_or_float(self: Any, y: torch.Tensor) -> Any:
    return y.long() * (2.0 if _proxy(y) else 2)


def _reads_device(self: Any, y: torch.Tensor) -> Any:
    try:
        if y.is_meta:  # a stand-in is on the meta device; the graph's tensor was not
            return y * 2
    except Exception:
        return y * 3  # fx cannot branch on a proxy
    return y


def _sets_data(self: Any, y: torch.Tensor) -> Any:
    if not _proxy(y):
        y.data = y
    return self.conv2(y)


def _writes_parameter(self: Any, y: torch.Tensor) -> Any:
    s = self.scale[0]
    s += 1  # a view of the parameter: eager changes self.scale, fx records s + 1
    return y * self.scale


def _same_object(self: Any, y: torch.Tensor) -> Any:
    z = y.contiguous(memory_format=torch.channels_last)
    return y * 2 if z is not y else y  # eager: y is already channels_last, so z is y


def _view_of_written(self: Any, y: torch.Tensor) -> Any:
    y += 1
    w = y[:, :2]
    w += 1  # eager changes y too; fx records w + 1
    return self.conv2(y)


def _draws(self: Any, y: torch.Tensor) -> Any:
    if not _proxy(y):
        torch.rand(3)  # eager draws; fx keeps nothing of it
    return torch.nn.functional.dropout(y, 0.5, training=True)


def _list_or_tuple(self: Any, y: torch.Tensor) -> Any:
    return (y,) if _proxy(y) else [y]


def _hooked() -> nn.Module:
    model, seen = _Y(), []
    model.conv.register_forward_hook(lambda m, a, o: seen.append(o))  # runs in eager only
    return model


_OUT_OF_PLACE = [lambda f=f: _case(f) for f in (_half_add, _broadcast_add, _writes_parameter, _view_of_written)]


@pytest.mark.parametrize(
    "build,why",
    [
        (_OUT_OF_PLACE[0], "where the graph makes another tensor"),
        (_OUT_OF_PLACE[1], ""),
        (lambda: _case(_int_or_float), "(int), the graph 2.0"),
        (lambda: _case(_reads_device), ""),
        (lambda: _case(_sets_data), "data (a property)"),
        (_OUT_OF_PLACE[2], "a tensor on memory eager changed in place"),
        (lambda: _case(_same_object), ""),
        (_OUT_OF_PLACE[3], "a tensor on memory eager changed in place"),
        (lambda: _case(_draws).train(), "eager draws random numbers"),
        (lambda: _case(_list_or_tuple), "output: eager passes [FakeTensor"),
        (_hooked, "hooks on conv"),
    ],
)
def test_replay_refuses_what_it_cannot_answer(build: Any, why: str) -> None:
    """Cases a review built against the replay: each graph differs from eager (or eager runs
    code the replay cannot), and the replay must not vouch for it. The cases of ``+=`` on
    torch's own Tracer's graph, which records it out of place."""
    got = _replay(build(), torch.randn(1, 3, 8, 8), torch_tracer=build in _OUT_OF_PLACE)
    assert got is not None and why.replace("[FakeTensor", "[") in got, got


@pytest.mark.parametrize(
    "body",
    [
        lambda self, y: torch.max(y, 1, keepdim=True)[0] * y,  # torch.return_types
        lambda self, y: torch.split(y, 1, 1)[-1],  # a negative index into a tuple
        lambda self, y: y + y.new_ones(1),  # a Tensor method torch does not list as overridable
    ],
)
def test_replay_vouches_for_these_faithful_graphs(body: Any) -> None:
    assert _replay(_case(body), torch.randn(1, 3, 8, 8)) is None


class MadeConstant(nn.Module):
    """A tensor made in forward: fx keeps it as a constant (``_tensor_constant0``) on the model."""

    def __init__(self, random: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.random = random

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.randn(4) if self.random else torch.tensor([1.0, 2.0, 3.0, 4.0])
        return self.conv(x) * scale.view(1, 4, 1, 1)


def test_constants_made_in_forward_keep_the_fx_capture() -> None:
    report = audit(MadeConstant(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert report.meta.capture == "fx" and report.meta.capture_notes == ()
    drawn = audit(MadeConstant(random=True), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert drawn.meta.capture == "hooks"  # fx kept one draw; eager draws anew: the full check refused it


def _fewer_parts(self: Any, y: torch.Tensor) -> Any:
    parts = torch.split(y, 1, 1)
    return torch.cat(parts if _proxy(y) else parts[:3], 1)  # the graph passes all four


def _sliced_parts(self: Any, y: torch.Tensor) -> Any:
    parts = torch.split(y, 1, 1)
    return torch.cat(parts[1:], 1) + parts[1:][0]


def test_replay_compares_whole_tuples_and_follows_their_slices() -> None:
    x = torch.randn(1, 3, 8, 8)
    assert "where the graph passes split" in (_replay(_case(_fewer_parts), x) or "")
    assert _replay(_case(_sliced_parts), x) is None
