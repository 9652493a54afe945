"""Leaf calls like one already recorded without a copy or a write run without the dispatch
recorder: the records must be exactly those of recording every call."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.fx.immutable_collections import immutable_list
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import nhwc_audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.errors import SharedWeightWrite
from nhwc_audit.examples import unet
from nhwc_audit.prepare.copy import prepare_audit_copy
from nhwc_audit.propagate.dispatch import CopyRecorder, RecordingMode
from nhwc_audit.propagate.interpreter import propagate
from nhwc_audit.propagate.seen import SeenCalls


class Repeats(nn.Module):
    """The same configurations called again: InstanceNorm and a circular conv copy inside
    (every call must keep its hidden copy), an in-place ReLU writes to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.norms = nn.ModuleList(nn.InstanceNorm2d(8) for _ in range(3))
        self.circular = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular") for _ in range(2))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            y = self.act(norm(conv(y)))
        for conv in self.circular:
            y = conv(y)
        return y


class Functional(nn.Module):
    """torch's functions and tensor methods called again on the same layouts: a circular
    ``pad`` and the ``flatten`` of an NHWC tensor copy inside (each call keeps its copies), an
    in-place ``add_`` writes to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for _ in range(3):
            z = torch.cat([y, y * 2], dim=1)[:, :8]
            z = F.layer_norm(z.permute(0, 2, 3, 1).contiguous(), (8,)).permute(0, 3, 1, 2)
            z = F.interpolate(F.pad(z, (1, 1, 1, 1), mode="circular"), size=y.shape[-2:], mode="bilinear")
            z = z + torch.flatten(y, 1).mean(-1)[:, None, None, None]
            y = torch.relu(y + z).add_(1)
        return y


class ValueShaped(nn.Module):
    """Reshapes whose sizes are 0-dim tensors: 8 rows view the NHWC map, 32 rows copy it (a
    tensor torch reads as a number is never keyed by its layout alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("rows_a", torch.tensor(8))
        self.register_buffer("rows_b", torch.tensor(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.reshape(self.rows_a, -1).sum() + y.reshape(self.rows_b, -1).sum()


def _set_start(m: nn.Module, v: int, x: torch.Tensor) -> torch.Tensor:
    m.start_dim = v  # type: ignore[assignment]
    return x


torch.fx.wrap("_set_start")


class Retuned(nn.Module):
    """Code of the model's changes a leaf's setting between its two calls: the second flatten
    (from dim 1 of an NHWC map) copies, the first (from dim 2) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.flat = nn.Flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = self.flat(y).sum(-1)
        b = self.flat(_set_start(self.flat, 1, y)).sum(-1)
        return a + b.sum(-1, keepdim=True)


def _shadow(flat: nn.Module, y: torch.Tensor) -> torch.Tensor:
    z = y * 1

    def relu() -> torch.Tensor:  # a method of the model's on this one tensor
        flat.start_dim = 1  # type: ignore[assignment]
        return torch.relu(z)

    z.relu = relu  # type: ignore[method-assign]
    return z


torch.fx.wrap("_shadow")


class Shadowed(nn.Module):
    """A tensor method of the model's own (set on the tensor) changes a leaf's setting between
    its calls: the second flatten copies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.flat = nn.Flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = _shadow(self.flat, y)
        a = self.flat(y)
        b = self.flat(z.relu())
        return a.sum() + b.sum()


class _Retune(TorchFunctionMode):
    def __init__(self, flat: nn.Module) -> None:
        super().__init__()
        self.flat = flat

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.relu:
            self.flat.start_dim = 1
        return func(*args, **(kwargs or {}))


class _ToNCHW(RecordingMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        return out.contiguous() if func is torch.ops.aten.relu.default else out


_MODES: list[Any] = []


def _enter(flat: nn.Module, dispatch: bool, y: torch.Tensor) -> torch.Tensor:
    mode = _ToNCHW() if dispatch else _Retune(flat)
    mode.__enter__()
    _MODES.append(mode)
    return y


def _leave(y: torch.Tensor) -> torch.Tensor:
    _MODES.pop().__exit__(None, None, None)
    return y


def _hooked(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    m.register_forward_hook(lambda m, a, out: out.contiguous())
    return y


def _global_hook(y: torch.Tensor) -> torch.Tensor:
    hook = torch.nn.modules.module.register_module_forward_hook
    _MODES.append(hook(lambda m, a, out: out.contiguous() if isinstance(m, nn.ReLU) else out))
    return y


def _unhook(y: torch.Tensor) -> torch.Tensor:
    _MODES.pop().remove()
    return y


for _f in ("_enter", "_leave", "_hooked", "_global_hook", "_unhook"):
    torch.fx.wrap(_f)


class Moded(nn.Module):
    """The model's code enters a mode between two calls like each other: a torch function mode
    that changes a leaf's setting when ``torch.relu`` runs, or a dispatch mode that makes
    ``relu`` NCHW."""

    def __init__(self, dispatch: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.flat = nn.Flatten(2)
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _enter(self.flat, self.dispatch, self.conv(x))
        a = self.flat(y)
        b = torch.relu(y)  # the function mode sets flat.start_dim = 1; the dispatch mode copies
        c = self.flat(b)
        d = torch.relu(y)
        return _leave(a.sum() + c.sum() + d.sum())


class Hooked(nn.Module):
    """The model's code adds a forward hook that copies (to the module itself, into the hook
    table it had, or for every module) between two calls like each other."""

    def __init__(self, every: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.act = nn.ReLU()
        self.every = every

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = self.act(y)
        y = _global_hook(y) if self.every else _hooked(self.act, y)
        b = self.act(y)
        return _unhook(a + b) if self.every else a + b


_OPS = torch.library.Library("nhwc_audit_test_seen", "DEF")
_OPS.define("maybe_nchw(Tensor x) -> Tensor")
_OPS.impl("maybe_nchw", lambda x: x.contiguous() if bool(x.sum() > 0) else x * 1.0, "CompositeImplicitAutograd")


class CustomOp(nn.Module):
    """A custom op of the user's (``torch.ops.<lib>``, whose ``__module__`` reads as torch's)
    copies on the values it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        op = torch.ops.nhwc_audit_test_seen.maybe_nchw
        return op(-y.abs()) + op(y.abs())


def _records(model: nn.Module, x: torch.Tensor, *, skip: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    cp = prepare_audit_copy(model.eval())
    cap = trace(cp.module)
    with monkeypatch.context() as m:
        if not skip:
            m.setattr(SeenCalls, "key", lambda self, *a: None)
            m.setattr(SeenCalls, "call_key", lambda self, *a: None)
        records, _ = propagate(cap.root, (x.contiguous(memory_format=torch.channels_last),), {}, graph=cap.graph)
    return records


@pytest.mark.parametrize(
    "build,shape",
    [
        (Repeats, (1, 3, 8, 8)),
        (Functional, (1, 3, 8, 8)),
        (tvm.resnet18, (2, 3, 32, 32)),
        (tvm.swin_t, (1, 3, 64, 64)),
        (ValueShaped, (1, 3, 4, 4)),
        (Retuned, (1, 3, 4, 4)),
        (CustomOp, (1, 3, 4, 4)),
        (Shadowed, (1, 3, 4, 4)),
        (lambda: Moded(dispatch=False), (1, 3, 4, 4)),
        (lambda: Moded(dispatch=True), (1, 3, 4, 4)),
        (lambda: Hooked(every=False), (1, 3, 4, 4)),
        (lambda: Hooked(every=True), (1, 3, 4, 4)),
        (lambda: unet()[0], (1, 3, 32, 32)),
    ],
)
def test_skipping_seen_calls_changes_no_record(
    build: Any, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    every = _records(model, x, skip=False, monkeypatch=monkeypatch)
    seen = _records(model, x, skip=True, monkeypatch=monkeypatch)
    assert seen == every
    if build is Repeats:
        hidden = [r.name for r in every if r.hidden]
        assert hidden[:3] == ["norms_0", "norms_1", "norms_2"]  # the same configuration, each call
    if type(model) in (ValueShaped, Retuned, CustomOp):  # a copy in the second call
        assert any(r.hidden for r in every[len(every) // 2 :]), [r.name for r in every if r.hidden]
    if type(model) in (Shadowed, Moded, Hooked):  # a copy in a call like a quiet one
        assert any(r.hidden for r in every), [r.name for r in every]
    if build is Functional:
        copies = [r.name for r in every if r.hidden]
        assert [c for c in copies if c.startswith("flatten")] == ["flatten", "flatten_1", "flatten_2"], copies
        assert len([c for c in copies if c.startswith("pad")]) == 3, copies


def test_only_plain_torch_nn_calls_qualify() -> None:
    seen = SeenCalls()
    x = torch.randn(1, 8, 4, 4)
    conv = nn.Conv2d(8, 8, 1)
    assert seen.key(conv, (x,), {}) is not None
    assert seen.key(conv, (x,), {}) == seen.key(nn.Conv2d(8, 8, 1), (torch.randn(1, 8, 4, 4),), {})
    assert seen.key(conv, (x,), {}) != seen.key(conv, (x.contiguous(memory_format=torch.channels_last),), {})
    hooked = nn.Conv2d(8, 8, 1)
    hooked.register_forward_hook(lambda m, a, o: None)
    assert seen.key(hooked, (x,), {}) is None

    class Mine(nn.Conv2d):
        pass

    assert seen.key(Mine(8, 8, 1), (x,), {}) is None  # not torch.nn's own code
    assert seen.key(nn.Sequential(nn.ReLU()), (x,), {}) is None  # children
    odd = nn.ReLU()
    odd.extra = [x]  # type: ignore[assignment]
    assert seen.key(odd, (x,), {}) is None
    assert seen.key(nn.ReLU(), (nn.ReLU(),), {}) is None  # a module as an argument


def _mine(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def test_only_torch_functions_and_plain_tensor_methods_qualify() -> None:
    seen = SeenCalls()
    x = torch.randn(1, 8, 4, 4)
    cat = seen.call_key("call_function", torch.cat, ([x, x],), {"dim": 1})
    assert cat is not None
    assert cat == seen.call_key("call_function", torch.cat, ([torch.randn(1, 8, 4, 4)] * 2,), {"dim": 1})
    assert cat != seen.call_key("call_function", torch.cat, ((x, x),), {"dim": 1})  # list and tuple
    assert cat != seen.call_key("call_function", torch.cat, ([x, x],), {"dim": True})  # 1 and True
    assert seen.call_key("call_function", torch.nn.functional.interpolate, (x,), {"scale_factor": 2.0}) is not None
    assert seen.call_key("call_function", operator.getitem, (x, (slice(None), slice(0, 2))), {}) is not None
    index = seen.call_key("call_function", operator.getitem, (x, [0, 1]), {})
    assert index is not None and index != seen.call_key("call_function", operator.getitem, (x, (0, 1)), {})
    assert seen.call_key("call_method", "permute", (x, 0, 2, 3, 1), {}) is not None
    assert seen.call_key("call_function", _mine, (x,), {}) is None  # the model's own function
    assert seen.call_key("call_function", torch.cat, ([x, _mine],), {}) is None  # a callable argument

    class Sub(torch.Tensor):
        pass

    assert seen.call_key("call_method", "permute", (x.as_subclass(Sub), 0, 2, 3, 1), {}) is None
    # fx passes a list argument as its own list type: keyed like a list of the same items
    fx_list = seen.call_key("call_function", torch.cat, (immutable_list([x, x]),), {"dim": 1})
    assert fx_list is not None and fx_list != cat
    assert fx_list == seen.call_key("call_function", torch.cat, (immutable_list([x, x]),), {"dim": 1})


def test_a_function_of_the_models_set_on_the_tensor_class_is_not_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.Tensor, "nhwc_audit_mine", _mine, raising=False)
    seen = SeenCalls()
    x = torch.randn(1, 8, 4, 4)
    assert seen.call_key("call_method", "nhwc_audit_mine", (x,), {}) is None
    assert seen.call_key("call_method", "split", (x, 2), {}) is not None  # torch's own, written in Python
    shadowed = torch.randn(1, 8, 4, 4)
    shadowed.relu = lambda: _mine(shadowed)  # type: ignore[method-assign]  # on the tensor itself
    assert seen.call_key("call_method", "relu", (shadowed,), {}) is None
    assert seen.call_key("call_method", "relu", (x,), {}) is not None


def test_a_module_is_read_again_when_its_objects_or_hooks_change() -> None:
    seen = SeenCalls()
    x = torch.randn(1, 8, 4, 4)
    flat = nn.Flatten(2)
    first = seen.key(flat, (x,), {})
    assert first is not None and seen.key(flat, (x,), {}) == first
    flat.start_dim = 1  # set by anything: torch's own calls can run the model's code (modes, hooks)
    assert seen.key(flat, (x,), {}) != first
    handle = flat.register_forward_hook(lambda m, a, out: out)  # into the same hook table
    assert seen.key(flat, (x,), {}) is None
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        assert seen.key(flat, (x,), {}) is None
    finally:
        handle.remove()
    assert seen.key(flat, (x,), {}) is not None


def test_no_call_is_keyed_under_a_mode_of_the_models_own() -> None:
    seen = SeenCalls()
    x = torch.randn(1, 8, 4, 4)
    with TorchFunctionMode():  # torch's functions run its code
        assert seen.call_key("call_function", torch.relu, (x,), {}) is None
        assert seen.key(nn.ReLU(), (x,), {}) is None
    with RecordingMode():  # a skipped call runs with dispatch modes off: it would skip this one
        assert seen.call_key("call_function", torch.relu, (x,), {}) is None
    assert SeenCalls(own_modes=1).call_key("call_function", torch.relu, (x,), {}) is not None
    with RecordingMode():
        assert SeenCalls(own_modes=1).call_key("call_function", torch.relu, (x,), {}) is not None


class Concatenates(nn.Module):
    """``torch.cat`` of the same layouts, three times."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y], 1) + torch.cat([y, y], 1) + torch.cat([y, y], 1)


class WritesWeight(nn.Module):
    """An in-place ReLU on an activation, then the same call on a weight of the same layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        w = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
        self.w = nn.Parameter(w, requires_grad=False)  # frozen: its layout key is an activation's
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + self.act(self.w)


def test_a_call_like_a_quiet_one_that_writes_to_a_shared_weight_is_still_refused() -> None:
    """Calls that write only to their own inputs are skipped when seen again, unless they read
    one of the user's weights: the guard must see that write."""
    model = WritesWeight().eval()
    cp = prepare_audit_copy(model)
    assert cp.shared
    cap = trace(cp.module)
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(SharedWeightWrite):
        propagate(cap.root, (x,), {}, graph=cap.graph, shared=cp.shared)
    before = model.w.detach().clone()
    report = nhwc_audit.audit(model, torch.randn(1, 3, 4, 4))
    assert torch.equal(model.w.detach(), before)
    assert any("copies of the weights" in note for note in report.meta.capture_notes)


def test_calls_on_the_users_shared_weights_are_still_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaf module's own weights are the user's, read in place (shared): that alone must not
    keep its repeated calls under the recorder (only a shared tensor passed to a call does)."""
    model = Repeats().eval()
    cp = prepare_audit_copy(model)
    assert cp.shared
    cap = trace(cp.module)
    seen: list[str] = []
    record = CopyRecorder.__torch_dispatch__

    def counted(self: CopyRecorder, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        seen.append(str(func))
        return record(self, func, types, args, kwargs)

    monkeypatch.setattr(CopyRecorder, "__torch_dispatch__", counted)
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    propagate(cap.root, (x,), {}, graph=cap.graph, shared=cp.shared)
    # recorded: conv, convs.0 (channels_last input), convs.1 (NCHW input, after the
    # InstanceNorm), circular.0 and circular.1 (each input layout once, and they copy inside);
    # convs.2 is a call like convs.1 on the same layouts: skipped
    assert seen.count("aten.convolution.default") == 5, seen


def test_repeated_concatenations_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """fx hands ``torch.cat`` its list as an ``immutable_list``: a call like one already recorded
    is skipped all the same."""
    model = Concatenates().eval()
    cp = prepare_audit_copy(model)
    cap = trace(cp.module)
    seen: list[str] = []
    record = CopyRecorder.__torch_dispatch__

    def counted(self: CopyRecorder, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        seen.append(str(func))
        return record(self, func, types, args, kwargs)

    monkeypatch.setattr(CopyRecorder, "__torch_dispatch__", counted)
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    propagate(cap.root, (x,), {}, graph=cap.graph, shared=cp.shared)
    assert seen.count("aten.cat.default") == 1, seen


class Emb(nn.Module):
    """A method of the model's on a tensor sets ``max_norm`` on an Embedding between two calls
    like each other: the second renormalises the (user's) weight in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.emb = nn.Embedding(10, 16)
        self.register_buffer("idx", torch.arange(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = _arm(self.emb, y)
        a = self.emb(self.idx)
        w = z.relu()
        b = self.emb(self.idx)  # (right after: a sum of 0-dim tensors would be a call never skipped)
        return y.sum() + w.sum() + a.sum() + b.sum()


def _arm(emb: nn.Module, y: torch.Tensor) -> torch.Tensor:
    z = y * 1

    def relu() -> torch.Tensor:
        emb.max_norm = 1.0  # type: ignore[assignment]
        return torch.relu(z)

    z.relu = relu  # type: ignore[method-assign]
    return z


torch.fx.wrap("_arm")


class HookWrites(nn.Module):
    """A hook the model's code adds between two calls like each other writes to a weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = self.act(y)
        return a + self.act(_zeroing_hook(self.act, self.conv, y))


def _zeroing_hook(act: nn.Module, conv: nn.Module, y: torch.Tensor) -> torch.Tensor:
    act.register_forward_hook(lambda m, a, out: (conv.weight.mul_(0), out)[1])
    return y


torch.fx.wrap("_zeroing_hook")


@pytest.mark.parametrize("build", [Emb, HookWrites])
def test_audit_never_writes_the_users_weights_through_a_call_changed_by_the_models_code(build: Any) -> None:
    torch.manual_seed(0)
    model = build().eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = nhwc_audit.audit(model, torch.randn(1, 3, 8, 8), capture="fx")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any("copies of the weights" in n for n in report.meta.capture_notes), report.meta.capture_notes
