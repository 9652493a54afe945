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

import nhwc_audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.errors import SharedWeightWrite
from nhwc_audit.examples import unet
from nhwc_audit.prepare.copy import prepare_audit_copy
from nhwc_audit.propagate import seen as seen_module
from nhwc_audit.propagate.dispatch import CopyRecorder
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
    if build in (ValueShaped, Retuned, CustomOp):
        assert any(r.hidden for r in every[len(every) // 2 :]), [r.name for r in every if r.hidden]
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


def test_a_module_is_read_again_only_after_a_call_that_may_run_the_models_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checks: list[int] = []
    same = seen_module._same_objects
    monkeypatch.setattr(seen_module, "_same_objects", lambda m, before: checks.append(1) or same(m, before))
    seen = SeenCalls()
    x = torch.randn(1, 8, 4, 4)
    flat = nn.Flatten(2)
    first = seen.key(flat, (x,), {})
    seen.call_key("call_function", torch.relu, (x,), {})  # torch's own: cannot set anything on flat
    assert seen.key(flat, (x,), {}) == first and not checks
    seen.call_key("call_function", _mine, (x,), {})  # the model's own code ran (or may have)
    flat.start_dim = 1
    assert seen.key(flat, (x,), {}) != first and checks


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
