"""The NCHW baseline of a real audit run on fake tensors charges what the real run charges.

A real audit whose own run costs more than a fake run would (:func:`baseline.fake_pays`) runs
its NCHW baseline on fake tensors: layouts only, no compute. Forced here (a fake run is chosen
whatever the model costs), every op case and transpose of the eager-checked tables, and a copy
made in either layout, get the findings and bytes the real baseline gives them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from nhwc_audit import AuditReport, audit
from nhwc_audit.propagate import baseline
from tests.propagate.test_op_cases_vs_eager import _TRANSPOSES, CASES, ConvOfTransposed
from tests.propagate.test_ops import TokensBack

_MODELS: dict[str, Callable[[], nn.Module]] = {
    **{f"case {name}": build for name, build in CASES.items()},
    **{
        f"conv of {name}": (lambda t=t: ConvOfTransposed(t, t(torch.zeros(2, 8, 12, 16)).shape[1]))
        for name, t in _TRANSPOSES.items()
    },
    "tokens back": TokensBack,
}
_INPUTS = {"tokens back": (1, 3, 8, 8), **{f"conv of {name}": (2, 8, 12, 16) for name in _TRANSPOSES}}

FAKE_NOTE = "NCHW baseline: run on fake tensors"


def _charged(r: AuditReport) -> tuple[int, list[tuple[str, str, int]], list[str]]:
    notes = [n for n in r.meta.capture_notes if n.startswith("NCHW baseline") and not n.startswith(FAKE_NOTE)]
    return r.summary.bytes_moved, [(f.node, f.kind.value, f.bytes) for f in r.findings], notes


@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_a_fake_baseline_charges_what_the_real_one_does(
    name: str, capture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = _MODELS[name]().eval()
    x = torch.randn(*_INPUTS.get(name, (2, 8, 16, 16)))
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", float("inf"))  # no run costs more than a fake one
    try:
        real = audit(model, x, bandwidth=1e9, capture=capture)
    except Exception as e:  # a case fx cannot trace: the hooks capture covers it
        pytest.skip(f"no {capture} audit: {e}")
    assert not any(n.startswith(FAKE_NOTE) for n in real.meta.capture_notes)
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", 0.0)  # any run costs more than a fake one
    monkeypatch.setattr(baseline, "FAKE_MIN_SECONDS", 0.0)
    fake = audit(model, x, bandwidth=1e9, capture=capture)
    assert _charged(fake) == _charged(real)
    # a fake run converts a real weight afresh at each use, so a view of one (a weight transposed in
    # forward) aliases none of its inputs there and is measured as a copy: on that view only, which
    # is never a finding (the real run sees it alias)
    views = {r.name for r in real.nodes if r.aliases_input and all(i.is_param for i in r.inputs)}
    assert [(r.name, r.nchw_bytes) for r in fake.nodes if r.name not in views] == [
        (r.name, r.nchw_bytes) for r in real.nodes if r.name not in views
    ]
    # the fake run is noted wherever the baseline changed a charge
    ran_fake = any(n.startswith(FAKE_NOTE) for n in fake.meta.capture_notes)
    assert ran_fake == any(r.nchw_bytes for r in real.nodes), fake.meta.capture_notes


def test_a_fake_baseline_that_cannot_run_gives_way_to_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value read into Python (here, a shape made from a tensor's values) cannot run on fake
    tensors: the baseline runs for real, as before."""

    class ReadsAValue(TokensBack):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            return y[:, : int(y.shape[1] * (x.abs().max() > -1).item())]

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", float("inf"))
    real = audit(ReadsAValue(), x, bandwidth=1e9, capture="hooks")
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", 0.0)
    monkeypatch.setattr(baseline, "FAKE_MIN_SECONDS", 0.0)
    fallback = audit(ReadsAValue(), x, bandwidth=1e9, capture="hooks")
    assert _charged(fallback) == _charged(real)
    assert any(n.startswith("NCHW baseline: 1 revert(s) copy in NCHW too") for n in fallback.meta.capture_notes)
    assert not any(n.startswith(FAKE_NOTE) for n in fallback.meta.capture_notes)


def test_the_fake_baseline_is_chosen_by_what_the_run_cost() -> None:
    nodes = 500
    assert not baseline.fake_pays(0.5, nodes)  # a 1 ms/node run: the real baseline is as cheap
    assert baseline.fake_pays(5.0, nodes)  # a compute-bound run (10 ms/node)
    assert not baseline.fake_pays(0.9, 20)  # a small model on a busy machine: not the model's cost


class _Streaming(nn.Module):
    """Keeps a tensor from its last call on itself and reads a value into Python: a fake
    baseline stores a FakeTensor there and fails at ``.item()``; the real one after it must not
    read that FakeTensor back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.cache is not None and self.cache.shape == y.shape:
            y = y + 0.5 * self.cache
        self.cache = y.detach()
        t = y.transpose(-1, -2).contiguous()  # copies in either layout
        return self.head(t) * int((t.abs().max() > -1).item())


def test_a_fake_baseline_that_fails_leaves_nothing_for_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(0)
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", float("inf"))
    real = audit(_Streaming().eval(), x, bandwidth=1e9, capture="hooks")
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", 0.0)
    monkeypatch.setattr(baseline, "FAKE_MIN_SECONDS", 0.0)
    torch.manual_seed(0)
    model = _Streaming().eval()
    fallback = audit(model, x, bandwidth=1e9, capture="hooks")
    assert _charged(fallback) == _charged(real)
    assert any(n.startswith("NCHW baseline: 1 revert(s) copy in NCHW too") for n in fallback.meta.capture_notes)
    assert model.cache is None  # the user's model is never run


class _BreakThenMask(nn.Module):
    """A break (``view`` on channels_last) stops the audit's eager run before a boolean mask: the
    audit keeps its restrided weights, and the NCHW baseline, which reads them through NCHW
    strides (the model's own values), runs on to the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.head(self.conv(x).transpose(-1, -2).contiguous())  # a revert that copies in NCHW too
        f = self.fc(t.view(t.shape[0], -1))  # a break on channels_last
        return f[f > 0]


def test_the_baseline_reads_the_models_values_past_a_break() -> None:
    torch.manual_seed(0)
    r = audit(_BreakThenMask().eval(), torch.randn(1, 3, 8, 8), bandwidth=1e9, capture="hooks")
    assert r.summary.breaks == 1
    assert any(n.startswith("NCHW baseline: 1 revert(s) copy in NCHW too") for n in r.meta.capture_notes)
    assert not any("not run" in n for n in r.meta.capture_notes)


class TwoProjections(nn.Module):
    """One source line called twice (monai's UNETR ``proj_feat``): tokens viewed as a map and
    made ``.contiguous()``. The first call's tokens are row-major in the channels_last model only,
    so it copies there and not in the NCHW model (where no ATen op runs); the second copies in
    both. The eager capture's baseline must pair each call with its own NCHW run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 8, 1)

    def proj(self, t: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        return t.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, _, h, w = y.shape
        tokens = y.flatten(2).transpose(1, 2)
        return self.out(self.proj(tokens, b, h, w)) + self.out(self.proj(self.lin(tokens), b, h, w))


def _copies(model: nn.Module, x: torch.Tensor) -> list[bool]:
    """Eager: does each call's ``.contiguous()`` copy?"""
    seen: list[bool] = []
    proj = model.proj

    def watched(t: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        seen.append(not t.view(b, h, w, -1).permute(0, 3, 1, 2).is_contiguous())
        return proj(t, b, h, w)

    model.proj = watched  # type: ignore[method-assign]
    with torch.no_grad():
        model(x)
    return seen


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_each_call_of_a_line_is_charged_against_its_own_nchw_run(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TwoProjections().eval(), torch.randn(1, 3, 8, 8)
    assert _copies(TwoProjections().eval(), x) == [False, True]  # NCHW
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _copies(TwoProjections().eval().to(memory_format=torch.channels_last), cl) == [True, True]
    r = audit(model, x, capture=capture, bandwidth=1e10)
    assert r.meta.capture == capture
    copy = 8 * 8 * 8 * 4 * 2  # read and written
    reverts = [(f.kind.value, f.bytes) for f in r.findings if f.kind.value == "revert"]
    assert reverts == [("revert", copy), ("revert", 0)]


def _made_contiguous(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        t = t.contiguous()
    return t


class ContiguousWhereNeeded(nn.Module):
    """One line makes its argument contiguous only where it is not: the channels_last model calls
    ``.contiguous()`` there once more than the NCHW one (on a map NCHW in the NCHW model), then both
    copy a transposed map of another shape. That second copy is paired with its NCHW twin."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([_made_contiguous(self.stem(x)), _made_contiguous(self.side(x).transpose(2, 3))], 1))


def test_a_call_made_in_one_layout_only_shifts_no_pairing() -> None:
    torch.manual_seed(0)
    model, x = ContiguousWhereNeeded().eval(), torch.randn(1, 3, 8, 8)
    charged = {}
    for capture in ("hooks", "export"):
        r = audit(model, x, capture=capture, bandwidth=1e10)
        assert r.meta.capture == capture
        charged[capture] = [(f.kind.value, f.bytes) for f in r.findings]
    assert charged["hooks"][:2] == [("revert", 8 * 64 * 4 * 2), ("revert", 0)]  # the second copies in NCHW too
    assert charged["hooks"] == charged["export"]


def _real_and_forced_fake(
    model: nn.Module, x: torch.Tensor, train: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[AuditReport, AuditReport]:
    """The audit with its baseline run real (forced: on a loaded machine the model's cost could
    decide otherwise), then forced fake."""
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", float("inf"))
    real = audit(model, x, bandwidth=1e9, train=train)
    assert not any(n.startswith(FAKE_NOTE) for n in real.meta.capture_notes)
    monkeypatch.setattr(baseline, "FAKE_SECONDS_PER_NODE", 0.0)
    monkeypatch.setattr(baseline, "FAKE_MIN_SECONDS", 0.0)
    fake = audit(model, x, bandwidth=1e9, train=train)
    assert any(n.startswith(FAKE_NOTE) for n in fake.meta.capture_notes)
    return real, fake


@pytest.mark.parametrize("train", [False, True])
def test_a_fake_baseline_of_a_train_audit_strides_views_as_eager(train: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """No backward follows the fake baseline, so a view that needs a gradient gets eager's size-1
    strides there too (fake_strides.view_strides left it, as where a backward follows), else a
    batch-1 map viewed back from tokens
    looked channels_last to the GroupNorm after it, which eager runs in NCHW; the FIR pad after
    that was credited as a copy NCHW makes too."""
    from tests.propagate.test_fake_follows_real import ScaledThenNormThenFirPad

    torch.manual_seed(0)
    real, fake = _real_and_forced_fake(ScaledThenNormThenFirPad().eval(), torch.randn(1, 4, 8, 8), train, monkeypatch)
    assert [(f.node, f.kind.value, f.bytes) for f in real.findings if f.kind.value == "revert"] == [
        ("pad", "revert", 8192)
    ]
    assert _charged(fake) == _charged(real)


class BiasedAttention(nn.Module):
    """SAM/Swin-style attention: q, k, v unbound from a permuted qkv projection (batch-1 views) and a
    relative-position bias gathered from a Parameter as the mask. CPU SDPA picks its kernel by
    whether the mask needs a gradient: the NCHW baseline must run in the audit's autograd mode."""

    def __init__(self, c: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, c, 8, stride=8)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.neck = nn.Conv2d(c, 16, 1)
        self.table = nn.Parameter(torch.randn(225, heads) * 0.02)
        self.register_buffer("index", torch.randint(0, 225, (64 * 64,), generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).permute(0, 2, 3, 1)
        b, hh, ww, c = h.shape
        qkv = self.qkv(h).reshape(b, hh * ww, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = (t.view(b, self.heads, hh * ww, -1) for t in qkv.reshape(3, b * self.heads, hh * ww, -1).unbind(0))
        bias = self.table[self.index].view(64, 64, -1).permute(2, 0, 1).unsqueeze(0)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        o = o.view(b, self.heads, hh, ww, -1).permute(0, 2, 3, 1, 4).reshape(b, hh, ww, c)
        return self.neck(self.proj(o).permute(0, 3, 1, 2))


def test_a_fake_baseline_runs_in_the_audits_autograd_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    real, fake = _real_and_forced_fake(BiasedAttention().eval(), torch.randn(1, 3, 64, 64), True, monkeypatch)
    assert sum(f.bytes for f in real.findings if f.kind.value != "backward") == 0

    def charged(r: AuditReport) -> tuple[int, list[tuple[str, str, int]], list[str]]:
        # what is charged: a 0 B revert at the attention (kept where data flows to a conv) came and
        # went between runs of the whole suite, its presence not this test's question
        total, findings, notes = _charged(r)
        return total, [f for f in findings if f[2]], notes

    assert charged(fake) == charged(real)
