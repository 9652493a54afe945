"""oneDNN's channels_last weight gradient of a 1 x 1 strided convolution with fewer input channels than
a block writes past its buffer (uxlfoundation/oneDNN#6035; torch 2.14.1 on an AVX-512 CPU: a segfault
at 1x8x64x64, glibc's abort on a corrupted heap at 1x12x128x128). A train audit of such a model took
the process down; the audit now runs that backward without oneDNN and says why in its notes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit.propagate import onednn


def _needs_the_bug() -> None:
    if onednn.ic_block() is None or not torch._C._has_mkldnn:
        pytest.skip("no oneDNN x86 kernel on this machine")
    if not onednn.present():
        pytest.skip("this PyTorch's oneDNN does not crash on the probe")


@pytest.mark.parametrize(
    ("conv", "risky"),
    [
        (nn.Conv2d(8, 8, 1, stride=2), True),
        (nn.Conv2d(3, 32, 1, stride=(2, 1)), True),
        (nn.Conv2d(8, 16, 1, stride=2, padding="valid"), True),
        (nn.Conv2d(8, 8, 1, stride=1), False),  # no stride to reduce
        (nn.Conv2d(8, 8, 1, stride=2, padding=1), False),
        (nn.Conv2d(64, 8, 1, stride=2), False),  # whole blocks of input channels
        (nn.Conv2d(16, 16, 1, stride=2, groups=2), False),  # a grouped kernel
        (nn.Conv2d(8, 8, 3, stride=2), False),
        (nn.Conv2d(8, 8, 1, stride=2).to(torch.bfloat16), False),
    ],
)
def test_which_convolutions_are_the_kernels_case(conv: nn.Conv2d, risky: bool) -> None:
    if onednn.ic_block() != 16:
        pytest.skip("the cases are an AVX-512 CPU's (a block of 16 input channels)")
    assert onednn.at_risk(conv.weight, conv.stride, conv.padding, conv.groups, channels_last=True) is risky
    assert not onednn.at_risk(conv.weight, conv.stride, conv.padding, conv.groups, channels_last=False)


class Downsample(nn.Module):
    """A residual downsample with a 1 x 1 stride-2 projection of 8 channels (``skip``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.skip = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2)
        self.body = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.skip(y) + self.body(y)


def _onednn_notes(model: nn.Module, x: torch.Tensor, **how: object) -> list[str]:
    return [n for n in nhwc_audit.audit(model, x, **how).meta.capture_notes if n.startswith("oneDNN")]  # type: ignore[arg-type]


def test_the_report_names_the_convolution_and_what_to_change() -> None:
    _needs_the_bug()
    (note,) = _onednn_notes(Downsample().eval(), torch.randn(1, 3, 16, 16))
    assert "skip (8 -> 8, stride (2, 2))" in note and "oneDNN#6035" in note and "ran its backward" not in note
    assert "16 input channels" in note and "x[:, :, ::s, ::s]" in note and "  " not in note and " ." not in note
    assert not _onednn_notes(nn.Conv2d(16, 8, 1, stride=2), torch.randn(1, 16, 8, 8))
    # the convolutions compute in bfloat16 (the audit's dtype or autocast): not the kernel's case, no note
    assert not _onednn_notes(Downsample().eval(), torch.randn(1, 3, 16, 16), autocast=torch.bfloat16)
    assert not _onednn_notes(Downsample().eval(), torch.randn(1, 3, 16, 16), dtype=torch.bfloat16)
    with torch.device("meta"):  # built on meta, audited for the CPU in fake mode
        on_meta = Downsample().eval()
    assert _onednn_notes(on_meta, torch.randn(1, 3, 16, 16), mode="fake", device="cpu")


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_a_parametrized_convolution_is_judged_without_running_its_parametrization(orthogonal_map: str) -> None:
    """The note reads a parametrized weight's shape, not the weight: computing it ran the parametrization
    on the audit's copy out of a fake run's mode (a Cayley map's real identity beside fake weights raised:
    every capture's fake audit failed), and an orthogonal 1 x 1 stride-2 projection of 8 channels is
    still the kernel's case."""
    from torch.nn.utils.parametrizations import orthogonal

    def build() -> nn.Module:
        torch.manual_seed(0)
        m = Downsample().eval()
        m.skip = orthogonal(m.skip, orthogonal_map=orthogonal_map)
        return m

    x = torch.randn(1, 3, 16, 16)
    for capture in ("fx", "export", "hooks"):
        nhwc_audit.audit(build(), x, mode="fake", capture=capture)  # type: ignore[arg-type]
    if onednn.ic_block() is not None and torch._C._has_mkldnn and onednn.present():
        (note,) = _onednn_notes(build(), x, mode="fake")
        assert "skip (8 -> 8, stride (2, 2))" in note


_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint
    import nhwc_audit
    torch.set_num_threads(1)

    class Down(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how = how
            self.stem, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8)
            self.skip, self.body = nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        def block(self, y):
            return self.skip(y) + self.body(y)
        def forward(self, x):
            y = self.norm(self.stem(x))
            if self.how == "none":
                return self.block(y)
            return checkpoint(self.block, y, use_reentrant=self.how == "reentrant")

    x = torch.randn(1, 3, 128, 128)
    for how in ("none", "reentrant", "non-reentrant"):
        for mode in ("real", "fake"):
            r = nhwc_audit.audit(Down(how).train(), x, train=True, mode=mode)
            assert any(n.startswith("oneDNN") and "ran its backward without oneDNN" in n for n in r.meta.capture_notes)
            print(how, mode, r.summary.bytes_moved, flush=True)
    r = nhwc_audit.audit(Down("none").train(), x, train=True)
    print("measured", r.measure(train=True).measurement is not None, flush=True)
    r = r.repaired()
    print("repaired", r.repair.bytes_before, r.repair.bytes_after, flush=True)
    frozen = Down("none").train()
    frozen.skip.weight.requires_grad_(False)  # its bias trained alone: the same kernel
    r = nhwc_audit.audit(frozen, x, train=True)
    print("frozen", r.summary.bytes_moved, flush=True)
    """
)


def test_a_train_audit_and_its_repair_run_where_training_channels_last_crashes() -> None:
    """In a fresh process (a crash would take pytest down): real and fake, a checkpointed block
    (the counting run's backward), a training step timed (``--measure``), the repair's checks with
    gradients, and a frozen weight whose bias is trained."""
    _needs_the_bug()
    ran = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, check=False)
    assert ran.returncode == 0, (ran.returncode, ran.stdout, ran.stderr[-2000:])
    lines = ran.stdout.splitlines()
    assert len(lines) == 9 and [line.split()[0] for line in lines[-3:]] == ["measured", "repaired", "frozen"]
    assert lines[-3] == "measured True"
    for how in ("none", "reentrant", "non-reentrant"):  # fake = real
        assert len({line.split()[2] for line in lines if line.split()[0] == how}) == 1


@pytest.mark.parametrize(
    ("second", "risky"),
    [
        (nn.Conv2d(4, 8, 1, stride=2), True),
        (nn.Conv2d(4, 8, 1), False),  # a squeeze-excitation block's: no stride to reduce
        (nn.Conv2d(4, 8, 1, stride=2, padding=1), False),
    ],
)
def test_a_backward_asks_the_probe_only_when_one_of_its_convolutions_is_the_kernels_case(
    second: nn.Conv2d, risky: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repair's checks guarded every backward of a model with a 1 x 1 convolution of few input
    channels, whatever its stride: the probe (a fresh interpreter, ~2.7 s) ran for every
    squeeze-excitation block (timm regnety_002's repair: 27 s against a 3 s audit). The backward's own
    convolutions, as autograd saved them, now say whether one is the kernel's case."""
    if onednn.ic_block() is None or not torch._C._has_mkldnn:
        pytest.skip("no oneDNN x86 kernel on this machine")
    asked: list[int] = []
    monkeypatch.setattr(onednn, "present", lambda: asked.append(1) or True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), second).to(memory_format=torch.channels_last)
    loss = model(torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)).sum()
    with onednn.guarded(list(model.parameters()), loss) as mode:
        assert isinstance(mode, onednn.Guard) is risky and bool(asked) is risky


def test_a_backward_through_a_reentrant_checkpoint_asks_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reentrant checkpoint's backward recomputes its block inside an autograd.Function: the graph
    shows no convolution of it, so one of the kernel's case in it would go unguarded."""
    from torch.utils.checkpoint import checkpoint

    if onednn.ic_block() is None or not torch._C._has_mkldnn:
        pytest.skip("no oneDNN x86 kernel on this machine")
    monkeypatch.setattr(onednn, "present", lambda: True)
    stem, risky = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1, stride=2)
    model = nn.Sequential(stem, risky).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    loss = checkpoint(risky, stem(x), use_reentrant=True).sum()
    with onednn.guarded(list(model.parameters()), loss) as mode:
        assert isinstance(mode, onednn.Guard)
