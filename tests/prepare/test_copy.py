"""The audit's private copy: restrided (not copied) weights, the module-tree clone, and the
fallback to copied weights when a model writes to its own weights in forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nhwc_audit import audit, convert
from nhwc_audit.prepare import copy as copy_module
from nhwc_audit.prepare.clone import clone_modules
from nhwc_audit.prepare.copy import audit_param, memory_format_for_rank, prepare_audit_copy
from nhwc_audit.tensors import SharedStorages, on_shared
from tests import models as M


def _storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=4, max_size=5),
    order=st.sampled_from(["contiguous", "channels_last", "transposed"]),
)
def test_restrided_weights_have_the_strides_to_memory_format_gives(shape: list[int], order: str) -> None:
    t = torch.randn(shape)
    fmt = memory_format_for_rank(t.dim())
    assert fmt is not None
    if order == "channels_last":
        t = t.contiguous(memory_format=fmt)
    elif order == "transposed":
        t = t.transpose(-1, -2)
    got, shares = audit_param(t, None, None)
    want = t.to(memory_format=fmt)
    assert got.shape == want.shape and got.stride() == want.stride()
    if shares:  # no copy: the user's own storage, same extent
        assert got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        assert sorted(got.flatten().tolist()) == sorted(t.flatten().tolist())
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "build",
    [tvm.resnet18, tvm.mobilenet_v3_small, M.Conv3dNet, lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3))],
)
def test_audit_copy_matches_convert_without_copying_weights(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    ref = dict(convert(model).named_parameters())
    cp = prepare_audit_copy(model)
    params = dict(cp.module.named_parameters())
    assert params.keys() == ref.keys()
    for name, p in params.items():
        assert (p.shape, p.stride(), p.dtype) == (ref[name].shape, ref[name].stride(), ref[name].dtype), name
    assert _storages(cp.module) <= _storages(model)  # every parameter is read in place
    assert cp.shared == frozenset(_storages(model))
    for (n, b), (_, b0) in zip(cp.module.named_buffers(), model.named_buffers(), strict=True):
        assert b.untyped_storage().data_ptr() != b0.untyped_storage().data_ptr(), n  # buffers are copied


def test_audit_copy_converts_dtype_by_copying() -> None:
    model = nn.Conv2d(3, 4, 3)
    cp = prepare_audit_copy(model, dtype=torch.bfloat16)
    assert cp.module.weight.dtype == torch.bfloat16 and cp.module.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert cp.shared == frozenset()


class _Custom(nn.Module):
    """A module with its own __deepcopy__: cloned by deepcopy itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo):  # type: ignore[no-untyped-def]
        new = _Custom.__new__(_Custom)
        memo[id(self)] = new
        new.__dict__ = copy.deepcopy(self.__dict__, memo)
        new.copies = self.copies + 1
        return new


class _Tree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.again = self.shared  # one module under two names
        self.norm = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 1))
        self.custom = _Custom()
        self.history: list[int] = [1]
        self.config = {"k": [1, 2]}
        self.tied = nn.Linear(2, 2)
        self.tied2 = nn.Linear(2, 2)
        self.tied2.weight = self.tied.weight
        self.register_buffer("grid", torch.arange(4.0).reshape(1, 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.again(self.shared(x))) + self.grid.mean()


def test_clone_modules_is_a_deepcopy() -> None:
    model = _Tree()
    model.shared.register_forward_hook(lambda m, i, o: None)
    memo = {id(t): t.detach().clone() for t in [*model.parameters(), *model.buffers()]}
    c = clone_modules(model, memo)
    assert type(c) is _Tree and c is not model
    assert c.shared is c.again and c.shared is not model.shared
    assert c.tied2.weight is c.tied.weight and c.tied.weight is memo[id(model.tied.weight)]
    assert c.custom.copies == 1  # its own __deepcopy__ ran
    assert len(c.shared._forward_hooks) == 1 and c.shared._forward_hooks is not model.shared._forward_hooks
    c.history.append(2)
    c.config["k"].append(3)
    assert model.history == [1] and model.config == {"k": [1, 2]}
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(c(x), model(x))  # the weight_norm parametrization came along
    assert sorted(c.state_dict()) == sorted(model.state_dict())
    c.again.padding_mode = "circular"
    assert model.shared.padding_mode == "zeros"


def test_one_walk_names_the_tensors_as_named_parameters_and_named_buffers_do() -> None:
    # prepare_audit_copy walks the module tree once; the names, the order and the dedup of
    # tied weights and shared modules are named_parameters()'s and named_buffers()'s
    model = _Tree()
    got = [(name, t, is_param) for name, t, is_param in copy_module.model_tensors(model)]
    want = [(n, p, True) for n, p in model.named_parameters()] + [(n, b, False) for n, b in model.named_buffers()]
    assert [(n, id(t), p) for n, t, p in got] == [(n, id(t), p) for n, t, p in want]
    modules = list(model.named_modules())
    assert [(n, id(t), p) for n, t, p in copy_module.model_tensors(model, modules)] == [
        (n, id(t), p) for n, t, p in want
    ]


class _WritesWeights(nn.Module):
    """Clamps its conv weight in forward (as some quantization-aware layers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.conv.weight.clamp_(-0.05, 0.05)
        return self.norm(self.conv(x))


class _Renorm(nn.Module):
    """nn.Embedding(max_norm=...) renormalises its weight in place on every lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4, max_norm=0.1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.conv(x + self.emb(idx)[:, :, None, None])


class _ActivatesItsWeight(nn.Module):
    """An in-place activation module called on the model's own 4D weight: the interpreter may
    take its recorder off for in-place activations of activations, never of a shared weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.act(self.conv.weight)
        return self.act(self.conv(x))


@pytest.mark.parametrize("capture", ["auto", "export", "hooks"])
@pytest.mark.parametrize("kind", ["clamp", "renorm", "inplace_activation"])
def test_model_writing_to_its_weights_is_audited_on_copies(capture: str, kind: str) -> None:
    if kind in ("clamp", "inplace_activation"):
        model: nn.Module = _WritesWeights() if kind == "clamp" else _ActivatesItsWeight()
        args: tuple[torch.Tensor, ...] = (torch.randn(1, 3, 8, 8),)
    else:
        model = _Renorm()
        args = (torch.randn(2, 4, 8, 8), torch.tensor([1, 3]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = audit(model, args, bandwidth=1e9, capture=capture)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the write happened on the audit's copy only
    assert any("writes to its own weights in forward" in note for note in report.meta.capture_notes)
    ref = audit(copy.deepcopy(model), args, bandwidth=1e9, capture=capture)
    assert [(f.node, f.kind) for f in report.findings] == [(f.node, f.kind) for f in ref.findings]


def _alias(w: torch.Tensor) -> torch.Tensor:
    """A tensor over the weight's memory with a storage of its own (another data_ptr)."""
    return torch.utils.dlpack.from_dlpack(w.detach()[:, 1:])


torch.fx.wrap("_alias")


class _WritesThroughAlias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(1, 8, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + _alias(self.w).add_(1).sum()


@pytest.mark.parametrize("capture", ["auto", "hooks"])
def test_a_write_through_memory_of_the_users_weight_is_refused(capture: str) -> None:
    """The guard compares memory, not storage pointers: a write through a tensor made over a
    weight's bytes (dlpack of a slice) is refused, and the audit runs on copies."""
    model = _WritesThroughAlias()
    assert copy_module.prepare_audit_copy(model).shared.spans  # type: ignore[attr-defined]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = audit(model, torch.randn(1, 3, 4, 4), bandwidth=1e9, capture=capture)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert any("writes to its own weights in forward" in note for note in report.meta.capture_notes)


def test_on_shared_sees_memory_inside_a_shared_storage() -> None:
    base, other = torch.zeros(64), torch.zeros(64)
    storage = base.untyped_storage()
    shared = SharedStorages([(storage.data_ptr(), storage.data_ptr() + storage.nbytes())])
    assert on_shared(base, shared) and on_shared(base[10:], shared)
    assert on_shared(torch.utils.dlpack.from_dlpack(base[10:]), shared)  # its own storage, inside
    assert not on_shared(other, shared)
    assert not on_shared(torch.zeros(0), shared)
    assert on_shared(base, frozenset({storage.data_ptr()}))  # a plain set: the storage itself only
    assert not on_shared(torch.utils.dlpack.from_dlpack(base[10:]), frozenset({storage.data_ptr()}))
    for again in (copy.copy(shared), copy.deepcopy(shared)):  # copies keep the spans
        assert again == shared and on_shared(torch.utils.dlpack.from_dlpack(base[10:]), again)
