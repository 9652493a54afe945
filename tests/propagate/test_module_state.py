"""Module state put back around a capture (:func:`attributes_restored`): every kind of change a
forward can make to its modules is undone and the public attributes it set are named; a run
that changes nothing leaves every table the very object it was."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit import pipeline
from nhwc_audit.prepare.copy import AuditCopy
from nhwc_audit.propagate.module_state import attributes_restored


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))


def _state(m: nn.Module) -> list[tuple[str, list[tuple[str, int]]]]:
    """Each module's four tables: keys, in order, and the identity of each value."""
    return [
        (path, [(k, id(v)) for t in (s.__dict__, s._parameters, s._buffers, s._modules) for k, v in t.items()])
        for path, s in m.named_modules()
    ]


def test_every_change_a_forward_can_make_is_undone_and_named() -> None:
    m = _model()
    before = _state(m)
    tables = [(s.__dict__, s._parameters, s._buffers, s._modules) for s in m.modules()]
    with attributes_restored(m) as changed:
        m[0].anchors = torch.zeros(2)  # a new public attribute
        m[0].stride = (5, 5)  # a plain value replaced
        m[0]._private = 1  # a private one: undone, not named
        m[0].weight = nn.Parameter(torch.zeros(1))  # a parameter replaced
        m[1].register_buffer("running_mean", torch.ones(4))  # a buffer replaced
        m[2].add_module("extra", nn.ReLU())  # a submodule added
        del m[2][1]  # one removed
        m[1].__dict__.pop("momentum")  # an attribute deleted behind Module's back
    assert sorted(changed) == ["0.anchors", "0.stride"]
    assert _state(m) == before
    assert [(s.__dict__, s._parameters, s._buffers, s._modules) for s in m.modules()] == tables


def test_a_run_that_changes_nothing_names_nothing() -> None:
    m = _model()
    before = _state(m)
    with attributes_restored(m) as changed:
        m[0].stride = m[0].stride  # the same object written back
        m(torch.randn(1, 3, 6, 6).flatten(2).mean(-1)[..., None, None].expand(1, 3, 6, 6))
    assert changed == []
    assert _state(m) == before


def test_a_dict_replaced_whole_is_put_back() -> None:
    m = _model()
    before = _state(m)
    own = m[0].__dict__
    with attributes_restored(m) as changed:
        object.__setattr__(m[0], "__dict__", {**own, "anchors": torch.zeros(1)})
    assert m[0].__dict__ is own and _state(m) == before
    assert changed == ["0.anchors"]


def test_the_entries_of_a_modules_own_dict_and_list_are_put_back() -> None:
    """A cache a model keeps in a dict or list of its own, filled in place by forward (timm's
    ``attention_bias_cache``): its entries go back as they were, the containers stay the very objects."""
    m = _model()
    cache: dict[str, Any] = {"kept": torch.ones(1)}
    seen: list[Any] = [1]
    m[0].cache, m[1].seen, m[1]._memo = cache, seen, {}
    kept = cache["kept"]
    with attributes_restored(m) as changed:
        cache["cpu"] = torch.zeros(1)  # an entry added
        cache["kept"] = torch.zeros(1)  # one replaced
        seen.append(2)
        m[1]._memo["x"] = 1  # a private one: put back, not named
    assert m[0].cache is cache and cache == {"kept": kept} and cache["kept"] is kept
    assert m[1].seen is seen and seen == [1] and m[1]._memo == {}
    assert sorted(changed) == ["0.cache", "1.seen"]


class ScalesByAnchors(nn.Module):
    """A lookup keyed by a tensor (hashed by identity): comparing its keys by value raised "Boolean
    value of Tensor with more than one element is ambiguous" in every audit (a review's find)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.anchors = nn.Conv2d(3, 8, 3, padding=1), torch.tensor([8.0, 16.0, 32.0])
        self.scales = {self.anchors: 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scales[self.anchors]


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_dict_keyed_by_tensors_is_compared_by_identity(capture: str) -> None:
    model = ScalesByAnchors().eval()
    assert nhwc_audit.audit(model, torch.randn(1, 3, 8, 8), capture=capture).summary.bytes_moved == 0  # type: ignore[arg-type]
    assert list(model.scales) == [model.anchors]


class AttentionBiasCache(nn.Module):
    """timm's EfficientFormer and LeViT attention: in eval, the biases gathered by their indices are
    kept in a dict on the module, by device, the first time forward runs."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.biases = nn.Parameter(torch.randn(4, size * size))
        self.register_buffer("idxs", torch.arange(size * size), persistent=False)
        self.size, self.attention_bias_cache = size, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if self.training or key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.biases[:, self.idxs].view(1, 4, self.size, self.size)
        return self.conv(x) + self.attention_bias_cache[key]


def test_a_model_that_cannot_run_at_the_size_names_its_own_error_with_export_in_fake_mode() -> None:
    """Export's trace filled the cache with a tensor of its own fake mode before the model's error (a
    7 x 7 bias added to a 16 x 16 map): the eager run that names the model's error then mixed fake
    modes ("fake mode cannot run the model: AssertionError: Mixing fake modes NYI")."""
    x = torch.randn(1, 3, 16, 16)
    for mode in ("real", "fake"):
        with pytest.raises(nhwc_audit.PropagationError, match="the model's own error") as e:
            nhwc_audit.audit(AttentionBiasCache(7).eval(), x, capture="export", mode=mode)  # type: ignore[arg-type]
        assert "fake modes" not in str(e.value)
    r = nhwc_audit.audit(AttentionBiasCache(16).eval(), x, capture="export", mode="fake")
    assert r.meta.capture == "export"


class Functional(nn.Module):
    """A weight read by a get_attr node (``F.conv2d(x, self.weight)``) and a tensor the tracer
    keeps as a constant (``torch.tensor`` in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight) * torch.tensor([2.0])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])  # train builds a GraphModule on the graph
@pytest.mark.parametrize("build", [lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), Functional])
def test_a_report_does_not_keep_the_audits_copy_of_the_model(
    build: Any, train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report keeps the fx graph for a repair; the private copy the audit ran goes."""
    model = build()
    copies: list[weakref.ref[nn.Module]] = []
    real_copy = pipeline.prepare_audit_copy

    def spy(*args: Any, **kwargs: Any) -> AuditCopy:
        got = real_copy(*args, **kwargs)
        copies.extend(weakref.ref(m) for m in got.module.modules())  # a GraphModule holds submodules
        return got

    monkeypatch.setattr(pipeline, "prepare_audit_copy", spy)
    report = nhwc_audit.audit(model, torch.randn(1, 3, 8, 8), bandwidth=1e9, train=train)
    gc.collect()
    assert report.capture is not None and copies
    assert all(ref() is None for ref in copies)
    assert all(not isinstance(v, nn.Parameter) for _, v in report.capture.attributes)
    assert report.repaired().repair is not None  # the kept graph is enough for a repair


class HooksItself(nn.Module):
    """Installs forward hooks on its blocks the first time forward runs and sets a flag saying so
    (transformers' ``capture_outputs``), then branches on a tensor (fx cannot trace it). Its head
    reads what the hooks collected: hooks installed twice feed it twice as many features."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "hooked", False):
            self.seen: list[torch.Tensor] = []
            for b in self.blocks:
                b.register_forward_hook(lambda m, i, o: self.seen.append(o))
            self.hooked = True
        self.seen.clear()
        for b in self.blocks:
            x = b(x)
        if x.sum() > 1e9:  # (a branch on a tensor: torch.fx fails here, after the hooks went in)
            x = x * 0
        return self.head(torch.cat([s.mean((2, 3)) for s in self.seen], 1))


def test_hooks_a_failed_trace_installed_go_with_the_flag_it_set() -> None:
    """The trace set the flag and installed the hooks; putting the flag back alone left the hooks in
    place, and the eager recording installed them again: 'the model's own error' at the head."""
    model, x = HooksItself().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        HooksItself()(x)  # it runs
    r = nhwc_audit.audit(model, x, bandwidth=1e9)
    assert r.meta.capture == "hooks" and r.meta.capture_notes[0].startswith("fx: torch.fx could not trace")
    assert not model.blocks[0]._forward_hooks and not hasattr(model, "hooked")  # the user's model untouched


class CachesOnItself(nn.Module):
    """Fills a dict cache of its own in forward, keyed by device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bias, self.cache = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(1, 8, 1, 1)), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (key := str(x.device)) not in self.cache:
            self.cache[key] = self.bias * 2
        return self.conv(x) + self.cache[key]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_cache_filled_in_forward_is_named_once(capture: str) -> None:
    """The export note named it twice, "(cache, cache)": as an attribute set and as a container refilled."""
    model = CachesOnItself().eval()
    r = nhwc_audit.audit(model, torch.randn(1, 3, 8, 8), capture=capture)  # type: ignore[arg-type]
    (note,) = [n for n in r.meta.capture_notes if "sets attributes" in n]
    assert "(cache)" in note and model.cache == {}
