"""The dispatch-level recorder: every call's hidden layout copies, and the guard that refuses
writes to the user's weights, whatever the model's own code does between two calls."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import nhwc_audit
from nhwc_audit.capture.fx import trace
from nhwc_audit.channels import laid_out, permuted
from nhwc_audit.errors import SharedWeightWrite
from nhwc_audit.prepare.copy import prepare_audit_copy
from nhwc_audit.propagate import blind, dispatch, interpreter
from nhwc_audit.propagate.dispatch import RecordingMode
from nhwc_audit.propagate.interpreter import propagate


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
    """Reshapes whose sizes are 0-dim tensors: 8 rows view the NHWC map, 32 rows copy it (the same
    layouts in, a copy decided by a tensor's value)."""

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


class _ConvFlat(nn.Module):
    """A conv and a flatten from dim 2 (a view of its NHWC map): the models below change the
    flatten's setting, by various means, between two calls of it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.flat = nn.Flatten(2)


class Retuned(_ConvFlat):
    """Code of the model's changes a leaf's setting between its two calls: the second flatten
    (from dim 1 of an NHWC map) copies, the first (from dim 2) does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = self.flat(y).sum(-1)
        b = self.flat(_set_start(self.flat, 1, y)).sum(-1)
        return a + b.sum(-1, keepdim=True)


def _set_by_relu(m: nn.Module, name: str, value: Any, y: torch.Tensor) -> torch.Tensor:
    """``y`` again, with a ``relu`` method of the model's own on it that sets ``m.<name>``."""
    z = y * 1

    def relu() -> torch.Tensor:
        setattr(m, name, value)
        return torch.relu(z)

    z.relu = relu  # type: ignore[method-assign]
    return z


torch.fx.wrap("_set_by_relu")


class Shadowed(_ConvFlat):
    """A tensor method of the model's own (set on the tensor) changes a leaf's setting between
    its calls: the second flatten copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = _set_by_relu(self.flat, "start_dim", 1, y)
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


_UNDO: list[Any] = []
"""Modes entered and global hooks registered by the models' code, undone later in their forward."""


def _enter(flat: nn.Module, dispatch: bool, y: torch.Tensor) -> torch.Tensor:
    mode = _ToNCHW() if dispatch else _Retune(flat)
    mode.__enter__()
    _UNDO.append(mode)
    return y


def _leave(y: torch.Tensor) -> torch.Tensor:
    _UNDO.pop().__exit__(None, None, None)
    return y


def _hooked(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    m.register_forward_hook(lambda m, a, out: out.contiguous())
    return y


def _global_hook(y: torch.Tensor) -> torch.Tensor:
    hook = torch.nn.modules.module.register_module_forward_hook
    _UNDO.append(hook(lambda m, a, out: out.contiguous() if isinstance(m, nn.ReLU) else out))
    return y


def _unhook(y: torch.Tensor) -> torch.Tensor:
    _UNDO.pop().remove()
    return y


for _f in ("_enter", "_leave", "_hooked", "_global_hook", "_unhook"):
    torch.fx.wrap(_f)


class Moded(_ConvFlat):
    """The model's code enters a mode between two calls like each other: a torch function mode
    that changes a leaf's setting when ``torch.relu`` runs, or a dispatch mode that makes
    ``relu`` NCHW."""

    def __init__(self, dispatch: bool) -> None:
        super().__init__()
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


_OPS = torch.library.Library("nhwc_audit_test_dispatch", "DEF")
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
        op = torch.ops.nhwc_audit_test_dispatch.maybe_nchw
        return op(-y.abs()) + op(y.abs())


@pytest.mark.parametrize(
    "build,shape",
    [
        (Repeats, (1, 3, 8, 8)),
        (Functional, (1, 3, 8, 8)),
        (ValueShaped, (1, 3, 4, 4)),
        (Retuned, (1, 3, 4, 4)),
        (CustomOp, (1, 3, 4, 4)),
        (Shadowed, (1, 3, 4, 4)),
        (lambda: Moded(dispatch=False), (1, 3, 4, 4)),
        (lambda: Moded(dispatch=True), (1, 3, 4, 4)),
        (lambda: Hooked(every=False), (1, 3, 4, 4)),
        (lambda: Hooked(every=True), (1, 3, 4, 4)),
    ],
)
def test_every_call_keeps_its_hidden_copies(build: Any, shape: tuple[int, ...]) -> None:
    """A call like an earlier one that made no copy may copy (its module's setting, a mode or a
    hook of the model's own changed in between, or a value torch reads as a number): each call
    is recorded on its own."""
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    cp = prepare_audit_copy(model.eval())
    cap = trace(cp.module)
    records, _ = propagate(cap.root, (x.contiguous(memory_format=torch.channels_last),), {}, graph=cap.graph)
    copies = [r.name for r in records if r.hidden]
    if build is Repeats:
        assert copies[:3] == ["norms_0", "norms_1", "norms_2"]  # the same configuration, each call
    elif build is Functional:
        assert [c for c in copies if c.startswith("flatten")] == ["flatten", "flatten_1", "flatten_2"], copies
        assert len([c for c in copies if c.startswith("pad")]) == 3, copies
    elif type(model) in (ValueShaped, Retuned, CustomOp):  # the second call copies, the first does not
        assert copies and all(i >= len(records) // 2 for i, r in enumerate(records) if r.hidden), copies
    else:  # the call after the model's change copies
        assert copies, [r.name for r in records]


class WritesWeight(nn.Module):
    """An in-place ReLU on an activation, then the same call on a weight of the same layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        w = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
        self.w = nn.Parameter(w, requires_grad=False)  # frozen: the in-place ReLU may run on it
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + self.act(self.w)


def test_an_in_place_call_on_a_shared_weight_is_refused() -> None:
    """An in-place ReLU on an activation, then on one of the user's weights (read in place): the
    guard refuses the second write, and ``audit()`` runs on copies of the weights."""
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
        z = _set_by_relu(self.emb, "max_norm", 1.0, y)
        a = self.emb(self.idx)
        w = z.relu()
        b = self.emb(self.idx)
        return y.sum() + w.sum() + a.sum() + b.sum()


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


def _variants(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """One input shape in every layout a model hands a module: row-major, channels_last (4D,
    5D), a non-dense slice and a permuted view."""
    rank = len(shape)
    x = torch.randn(shape)
    out = [x, torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2], torch.randn(shape[::-1]).permute(*range(rank)[::-1])]
    if rank in (4, 5):
        out.append(x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d))
    return out


_BLIND_CASES: list[tuple[Any, tuple[int, ...]]] = [
    (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 9, 9)),
    (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (2, 4, 9, 9)),
    (lambda: nn.Conv2d(1, 6, 1), (2, 1, 5, 5)),
    (lambda: nn.Conv3d(4, 6, 3, padding=1), (1, 4, 5, 6, 7)),
    (lambda: nn.ConvTranspose1d(4, 6, 2, stride=2), (2, 4, 9)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2), (1, 4, 3, 4, 5)),
    (lambda: nn.BatchNorm1d(4), (2, 4, 9)),
    (lambda: nn.BatchNorm2d(4), (2, 4, 5, 5)),
    (lambda: nn.BatchNorm3d(4), (1, 4, 3, 4, 5)),
    (lambda: nn.GroupNorm(2, 4), (2, 4, 5, 5)),
    (lambda: nn.GroupNorm(2, 4), (1, 4, 3, 4, 5)),
    (lambda: nn.LayerNorm(5), (2, 4, 5, 5)),
    (lambda: nn.LayerNorm([4, 5, 5]), (2, 4, 5, 5)),
    (lambda: nn.LayerNorm(6), (2, 9, 6)),
    (lambda: nn.Linear(6, 3), (2, 9, 6)),
    (nn.Identity, (2, 4, 5, 5)),
    (nn.ReLU, (2, 4, 5, 5)),
    (nn.ReLU6, (2, 4, 5, 5)),
    (nn.SiLU, (2, 4, 5, 5)),
    (lambda: nn.GELU(approximate="tanh"), (2, 4, 5, 5)),
    (nn.GELU, (2, 4, 5, 5)),
    (nn.Hardswish, (2, 4, 5, 5)),
    (nn.Hardsigmoid, (2, 4, 5, 5)),
    (nn.Sigmoid, (2, 4, 5, 5)),
    (nn.Tanh, (2, 4, 5, 5)),
    (lambda: nn.LeakyReLU(0.1), (2, 4, 5, 5)),
    (lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 4, 9, 9)),
    (lambda: nn.MaxPool3d(2), (1, 4, 4, 6, 6)),
    (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), (2, 4, 9, 9)),
    (lambda: nn.AdaptiveAvgPool2d(1), (2, 4, 9, 9)),
    (lambda: nn.AdaptiveAvgPool2d((3, 4)), (2, 4, 9, 9)),
    (lambda: nn.Dropout(0.3), (2, 4, 5, 5)),
    # in place, on an activation (never a shared weight: see the test after the next)
    (lambda: nn.ReLU(inplace=True), (2, 4, 5, 5)),
    (lambda: nn.ReLU6(inplace=True), (2, 4, 5, 5)),
    (lambda: nn.SiLU(inplace=True), (2, 4, 5, 5)),
    (lambda: nn.Hardswish(inplace=True), (2, 4, 5, 5)),
    (lambda: nn.Hardsigmoid(inplace=True), (2, 4, 5, 5)),
    (lambda: nn.LeakyReLU(0.1, inplace=True), (2, 4, 5, 5)),
    (lambda: nn.Dropout(0.3, inplace=True), (2, 4, 5, 5)),
]


def test_every_recorder_blind_type_is_checked_here() -> None:
    assert {type(build()) for build, _ in _BLIND_CASES} == blind.RECORDER_BLIND


@pytest.mark.parametrize("build,shape", _BLIND_CASES)
def test_the_recorder_sees_nothing_in_a_recorder_blind_module(build: Any, shape: tuple[int, ...]) -> None:
    """Why the interpreter may take the recorder off the stack for these modules on the CPU:
    in any input layout dense in memory, in either mode, float32 or bfloat16, with the weights as
    built or converted, no copy reaches the recorder, no layout change but the node's own, and no
    parameter is written. On an input not dense in NCHW or channels_last order (a slice, a
    permuted view, a 2D/3D view in another order than row-major) they are not blind: a kernel may
    copy it whole first."""
    for dtype in (torch.float32, torch.bfloat16):
        for training in (False, True):
            for convert in (False, True):
                m = build().to(dtype).train(training)
                if convert:
                    m = nhwc_audit.convert(m)
                assert blind.recorder_blind(m, (torch.empty(shape),), frozenset())
                params = [(p, p._version) for p in m.parameters()]
                for x in _variants(shape):
                    x = x.to(dtype)  # (a cast of a slice is dense)
                    if not laid_out(x) or permuted(x):  # (a 1D conv's permuted view: copied row-major)
                        assert not blind.recorder_blind(m, (x,), frozenset()), (m, x.stride())
                        continue
                    rec = dispatch.CopyRecorder(relays=True)
                    try:
                        with rec, torch.no_grad():
                            y = m(x)
                    except NotImplementedError:  # no such CPU kernel (avg_pool3d in bfloat16)
                        continue
                    assert rec.copies == [], (m, x.stride(), rec.copies)
                    if getattr(m, "inplace", False):
                        y = x  # the node's output is its input, written in place
                    # a layout change it computes is its own op's, from its input to its output
                    assert all((r.source, r.result) == (id(x), id(y)) for r in rec.relayed), (
                        m,
                        x.stride(),
                        rec.relayed,
                    )
                    assert all(p._version == v for p, v in params)


def test_the_recorder_sees_nothing_in_a_linear_on_a_row_major_map() -> None:
    """ConvNeXt's Linear on the NHWC map a permute of a channels_last one gives (row-major): its
    matmul folds the map with a view; a channels_last map it would copy, which is not blind."""
    for dtype in (torch.float32, torch.bfloat16):
        for training in (False, True):
            m = nn.Linear(8, 16).to(dtype).train(training)
            x = torch.randn(2, 8, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            assert blind.recorder_blind(m, (x,))
            rec = dispatch.CopyRecorder(relays=True)
            with rec, torch.no_grad():
                m(x)
            assert rec.copies == [] and rec.relayed == []
    map_cl = torch.randn(2, 6, 5, 8).contiguous(memory_format=torch.channels_last)
    assert not blind.recorder_blind(nn.Linear(8, 16), (map_cl,))
    rec = dispatch.CopyRecorder(relays=True)
    with rec, torch.no_grad():
        nn.Linear(8, 16)(map_cl)
    assert rec.copies  # why: the reshape copies it


def test_a_module_with_a_hook_or_its_own_settings_is_not_blind() -> None:
    assert not blind.recorder_blind(nn.ReLU(inplace=True))  # no shared weights said: never in place
    copy = prepare_audit_copy(nn.Conv2d(2, 2, 3))
    on_user = copy.module.weight  # the user's storage, read in place
    assert copy.shared and not blind.recorder_blind(nn.ReLU(inplace=True), (on_user,), copy.shared)
    assert blind.recorder_blind(nn.ReLU(inplace=True), (on_user.clone(),), copy.shared)
    assert not blind.recorder_blind(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
    four_d = torch.randn(1, 2, 2, 2).contiguous(memory_format=torch.channels_last)
    assert not blind.recorder_blind(nn.Linear(2, 2), (four_d,))  # matmul folds a 4D input: a copy
    assert blind.recorder_blind(nn.Linear(2, 2), (torch.randn(3, 2),))
    assert blind.recorder_blind(nn.Linear(2, 2), (four_d.permute(0, 2, 3, 1),))  # ConvNeXt's NHWC tokens
    hooked = nn.Conv2d(2, 2, 1)
    hooked.register_forward_hook(lambda *a: None)
    assert not blind.recorder_blind(hooked)
    own = nn.Conv2d(2, 2, 1)
    own.forward = lambda x: x.contiguous()  # type: ignore[method-assign]
    assert not blind.recorder_blind(own)

    class Sub(nn.Conv2d):
        pass

    assert not blind.recorder_blind(Sub(2, 2, 1))
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not blind.recorder_blind(nn.ReLU())
    finally:
        handle.remove()


def _operands(target: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return ((([x, y], 1) if target is torch.cat else (x, y)) if target not in (torch.sigmoid, torch.relu) else (x,)), {}


@pytest.mark.parametrize("target", sorted(blind.RECORDER_BLIND_FUNCTIONS | blind.IN_PLACE_FUNCTIONS, key=repr))
def test_the_recorder_sees_nothing_in_a_blind_function_on_one_layout_and_dtype(target: Any) -> None:
    """Why the interpreter may take the recorder off the stack for these functions: on tensors
    of one dtype, all row-major or all channels_last (4D and 5D, a broadcast operand too), no
    copy reaches the recorder and no layout change but the node's own."""
    for dtype in (torch.float32, torch.bfloat16):
        for shape, other in (
            ((2, 4, 5, 5), (2, 4, 5, 5)),
            ((1, 4, 3, 4, 5), (1, 4, 3, 4, 5)),
            ((2, 4, 5, 5), (2, 4, 1, 1)),
        ):
            for fmt in ("nchw", "cl"):
                x, y = torch.randn(shape, dtype=dtype), torch.randn(other, dtype=dtype)
                if fmt == "cl":
                    x, y = (
                        t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
                        for t in (x, y)
                    )
                if target is torch.cat and shape != other:
                    continue
                args, kwargs = _operands(target, x, y)
                assert blind.function_blind(target, args, kwargs, frozenset()), (target, fmt, shape, other)
                rec = dispatch.CopyRecorder(relays=True)
                with rec, torch.no_grad():
                    out = target(*args, **kwargs)
                assert rec.copies == [], (target, x.stride(), rec.copies)
                assert all(r.result == id(out) for r in rec.relayed), (target, x.stride(), rec.relayed)


def test_an_in_place_operator_on_a_shared_weight_is_not_blind() -> None:
    """``out += identity`` runs without the recorder, but not where an operand holds a user's weight
    the audit reads in place: the recorder refuses that write before it happens."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    shared = frozenset({w.untyped_storage().data_ptr()})
    assert blind.function_blind(operator.iadd, (x, x), {}, shared)
    assert not blind.function_blind(operator.iadd, (x, x), {})  # (no guard known: never)
    assert not blind.function_blind(operator.iadd, (w, x), {}, shared)
    assert not blind.function_blind(operator.imul, (x, w), {}, shared)


def test_a_blind_function_on_mixed_layouts_or_dtypes_is_not_blind() -> None:
    x = torch.randn(2, 4, 5, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not blind.function_blind(torch.cat, ([x, cl], 1), {})
    assert not blind.function_blind(torch.add, (x, x.double()), {})
    assert not blind.function_blind(torch.add, (cl, torch.randn(5)), {})  # a vector beside a map: not judged
    assert not blind.function_blind(torch.add, (x, x), {"out": torch.empty_like(x)})
    assert not blind.function_blind(torch.add, (x[:, :, ::2], x[:, :, ::2]), {})  # slices: another path
    assert not blind.function_blind(torch.flatten, (x,), {})  # a reshape copies a channels_last map
    assert not blind.maybe_blind([])  # an unhashable target


def _any_layout_call(fn: Any, x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    c = x.shape[1]
    stats = (torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype))
    affine = (torch.randn(c, dtype=x.dtype), torch.randn(c, dtype=x.dtype))
    if fn is F.batch_norm:
        return (x, *stats, *affine, False), {}
    if fn is F.layer_norm:
        return (x, x.shape[-1:], torch.randn(x.shape[-1], dtype=x.dtype), torch.randn(x.shape[-1], dtype=x.dtype)), {}
    return (x,), {}


@pytest.mark.parametrize("fn", sorted(blind.ANY_LAYOUT_FUNCTIONS, key=repr))
def test_the_recorder_sees_nothing_in_a_functional_norm_or_activation_in_any_layout(fn: Any) -> None:
    """The functional forms of recorder-blind modules, as timm calls them: in any input layout
    dense in memory, float32 or bfloat16, no copy reaches the recorder and no layout change but the
    node's own (on one not dense, a slice, they are not blind: a kernel may copy it first)."""
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((2, 4, 5, 5), (1, 4, 3, 4, 5)):
            for x in _variants(shape):
                args, kwargs = _any_layout_call(fn, x.to(dtype))
                if not laid_out(args[0]) or permuted(args[0]):  # (a cast of a slice is dense)
                    assert not blind.function_blind(fn, args, kwargs), (fn, x.stride())
                    continue
                assert blind.function_blind(fn, args, kwargs), (fn, x.stride())
                rec = dispatch.CopyRecorder(relays=True)
                with rec, torch.no_grad():
                    y = fn(*args, **kwargs)
                assert rec.copies == [], (fn, x.stride(), rec.copies)
                assert all((r.source, r.result) == (id(args[0]), id(y)) for r in rec.relayed), (
                    fn,
                    x.stride(),
                    rec.relayed,
                )


def test_plain_calls_and_metadata_are_blind_and_writes_are_not() -> None:
    x = torch.randn(2, 4, 5, 5)
    for target, args in ((operator.eq, (4, 4)), (torch._assert, (True, "4D")), (operator.getitem, ((2, 3), 1))):
        assert blind.function_blind(target, args, {})
        rec = dispatch.CopyRecorder(relays=True)
        with rec:
            target(*args)
        assert rec.copies == [] and rec.relayed == []
    assert blind.function_blind(getattr, (x, "shape"), {}) and blind.maybe_blind(getattr)
    assert not blind.function_blind(getattr, (x, "mT"), {})  # a view: a call the recorder sees
    assert not blind.function_blind(operator.eq, (x, x), {})  # a comparison of values
    stats = (torch.zeros(4), torch.ones(4))
    assert not blind.function_blind(F.batch_norm, (x, *stats, None, None, True), {})  # writes its statistics
    assert blind.function_blind(F.batch_norm, (x, None, None, None, None, True), {})  # batch statistics only
    assert not blind.function_blind(F.relu, (x,), {"inplace": True})
    assert not blind.function_blind(F.silu, (x, True), {})  # in place, as a positional argument
    assert blind.function_blind(F.gelu, (x, "tanh"), {})
    assert not blind.function_blind(F.batch_norm, (x, *stats), {"training": True})


class _Functional(nn.Module):
    """timm's norm-and-activation layers: functional calls after checks of the input's rank."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.InstanceNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))  # copies inside: the recorder must see them still
        torch._assert(y.ndim == 4, "a map")
        bn = self.bn
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        y = F.silu(F.layer_norm(y, y.shape[-1:]))
        return F.gelu(y.contiguous()) + y


class _Cats(nn.Module):
    """Cats and adds on one layout (blind) and on mixed ones (the recorder must see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = torch.cat([y, torch.relu(y)], 1)  # one layout
        w = torch.cat([y, self.norm(y)], 1)  # channels_last beside NCHW
        return self.head(z + w) * torch.sigmoid(y.sum(1, keepdim=True)) + y.contiguous() - y


class _Block(nn.Module):
    """Blind leaves around calls the recorder must see: a hidden copy between them."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=inplace)
        self.norm = nn.InstanceNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = self.norm(y).contiguous()
        return self.act(self.head(y)) + y


@pytest.mark.parametrize(
    "build", [_Block, lambda: _Block(inplace=True), Repeats, lambda: Hooked(every=True), _Cats, _Functional]
)
def test_records_are_the_same_with_the_recorder_off_for_blind_modules(build: Any, monkeypatch: Any) -> None:
    """Taking the recorder off the stack changes no record; and it is taken off (the
    recorder is asked for fewer ops)."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    calls: list[int] = []
    seen = dispatch.CopyRecorder.__torch_dispatch__

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return seen(self, *args, **kwargs)

    monkeypatch.setattr(dispatch.CopyRecorder, "__torch_dispatch__", counted)

    def run() -> tuple[list[Any], int]:
        calls.clear()
        copy = prepare_audit_copy(model)
        cap = trace(copy.module)
        records, _ = propagate(cap.root, (x.clone(),), graph=cap.graph, shared=copy.shared)
        return records, len(calls)

    fast, fast_calls = run()
    monkeypatch.setattr(blind, "RECORDER_BLIND", frozenset())
    monkeypatch.setattr(interpreter, "maybe_blind", lambda target: False)
    slow, slow_calls = run()
    assert fast == slow
    assert any(r.hidden for r in fast)
    assert fast_calls < slow_calls


class _Gain(torch.Tensor):
    """A gain map whose products run in NCHW, then come back channels_last: its
    ``__torch_function__`` copies where no recorder-blind rule can tell."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.Tensor.__mul__, torch.mul, torch.Tensor.mul):
            a, b = (t.as_subclass(torch.Tensor).contiguous() for t in args)
            return torch.Tensor.mul(a, b).contiguous(memory_format=torch.channels_last)
        return super().__torch_function__(func, types, args, kwargs or {})


class _Gained(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.register_buffer("g", torch.ones(1, 8, 8, 8).as_subclass(_Gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) * self.g)


def test_a_tensor_subclass_with_its_own_torch_function_is_never_blind() -> None:
    x = torch.randn(1, 8, 8, 8)
    gain = torch.ones(1, 8, 8, 8).as_subclass(_Gain)
    assert not blind.function_blind(operator.mul, (x, gain), {})
    assert not blind.function_blind(getattr, (gain, "shape"), {})
    assert not blind.recorder_blind(nn.ReLU(), (gain,))
    weighted = nn.Conv2d(8, 8, 1)
    weighted.weight = nn.Parameter(weighted.weight.detach().as_subclass(_Gain))
    assert not blind.recorder_blind(weighted, (x,))
    assert blind.function_blind(operator.mul, (x, nn.Parameter(x.clone())), {})  # a Parameter is plain
    torch.manual_seed(0)
    for train in (False, True):
        r = nhwc_audit.audit(_Gained(), (torch.randn(1, 3, 8, 8),), bandwidth=1e10, train=train)
        assert ("mul", "conversion", 4096) in [(f.node, f.kind.value, f.bytes) for f in r.findings]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_sparse_operand_is_not_blind_and_the_graph_is_kept() -> None:
    class Sparse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).flatten(1).relu().to_sparse_csr()
            return torch.add(y, y).to_dense()

    csr = torch.eye(3).to_sparse_csr()
    assert not blind.function_blind(torch.add, (csr, csr), {})
    r = nhwc_audit.audit(Sparse(), (torch.randn(1, 3, 8, 8),), bandwidth=1e10)
    assert r.meta.capture == "fx" and not r.meta.capture_notes


def test_a_leaf_module_called_with_keywords_is_judged_on_them() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(input=self.conv(x)))  # a Linear on a channels_last map: a copy

    r = nhwc_audit.audit(Keyword(), (torch.randn(1, 3, 8, 8),), bandwidth=1e10)
    assert ("fc", "revert", 4096) in [(f.node, f.kind.value, f.bytes) for f in r.findings]
