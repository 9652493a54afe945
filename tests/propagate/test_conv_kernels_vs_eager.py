"""A convolution's kernel copies inside of its weight, forward: the CPU's slow backends.

On the CPU (torch 2.14.1) a float32 Conv3d or ConvTranspose3d at batch 1 runs on the slow backend,
which computes NCDHW and copies a channels_last_3d weight into it on every call
(``weight.contiguous()`` inside ``slow_conv3d_forward``); the op's layouts show only its input's
re-lay. The audit charges the weight's copy as an intrinsic finding, as the profiler sees it and as
the ground truth (``tests/eager_bytes.py``) counts it, in every capture and mode.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils._python_dispatch import TorchDispatchMode

from nhwc_audit import audit
from nhwc_audit.propagate import conv_kernels
from tests.eager_bytes import eager_bytes
from tests.support import conv_forward_copies

CASES = {
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(8, 16, 3, padding=1)), (1, 8, 12, 12, 12)),
    "conv3d_stem_stride2": (lambda: nn.Sequential(nn.Conv3d(3, 16, 3, stride=2, padding=1)), (1, 3, 16, 16, 16)),
    "conv3d_1x3x3": (lambda: nn.Sequential(nn.Conv3d(8, 16, (1, 3, 3), padding=(0, 1, 1))), (1, 8, 8, 12, 12)),
    "conv_transpose3d": (lambda: nn.Sequential(nn.ConvTranspose3d(16, 8, 2, stride=2)), (1, 16, 8, 8, 8)),
    "conv_transpose3d_k3": (
        lambda: nn.Sequential(nn.ConvTranspose3d(16, 8, 3, stride=2, padding=1, output_padding=1)),
        (1, 16, 8, 8, 8),
    ),
    # the second and third run one kernel path (an NCDHW input, a channels_last_3d weight) at other
    # sizes: the first one's answer, at each one's sizes
    "three_sizes": (
        lambda: nn.Sequential(
            nn.Conv3d(8, 16, 3, padding=1), nn.Conv3d(16, 32, 3, padding=1), nn.Conv3d(32, 8, 3, padding=1)
        ),
        (1, 8, 8, 8, 8),
    ),
    "two_alike": (
        lambda: nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1)),
        (1, 8, 10, 10, 10),
    ),
}


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = CASES[name]
    return build().eval(), torch.randn(shape)


def _profiled(model: nn.Module, x: torch.Tensor) -> int:
    """The weight copies channels_last_3d adds, as the profiler sees them."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    return conv_forward_copies(cl, x.to(memory_format=torch.channels_last_3d)) - conv_forward_copies(model, x)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_slow_backends_weight_copy_is_charged_as_the_profiler_sees_it(name: str, mode: str, capture: str) -> None:
    torch.set_num_threads(1)
    model, x = _case(name)
    r = audit(model, x, mode=mode, capture=capture)
    inside = [f for f in r.findings if f.intrinsic]
    assert sum(f.bytes for f in inside) == _profiled(model, x) > 0
    assert all(f.kind.value == "revert" and "slow backend" in f.hint for f in inside)
    eb = eager_bytes(model, (x,))
    assert sum(f.bytes for f in r.findings) == eb.added
    assert sum(f.bytes for f in r.findings if not f.intrinsic) == eb.relayed


def test_the_export_capture_charges_it_too() -> None:
    torch.set_num_threads(1)
    model, x = _case("two_alike")
    r = audit(model, x, capture="export")
    assert sum(f.bytes for f in r.findings if f.intrinsic) == _profiled(model, x) > 0


def test_every_call_of_a_signature_is_charged_once_asked() -> None:
    """The second convolution runs with the recorder off (its signature was asked at the first):
    both are charged their weight's copy."""
    torch.set_num_threads(1)
    model, x = _case("two_alike")
    r = audit(model, x)
    charged = {f.node: f.bytes for f in r.findings if f.intrinsic}
    assert len(charged) == 2 and len(set(charged.values())) == 1
    # only the first re-lays its input: the second reads the first's NCDHW output, intrinsic alone
    first = min(charged, key=lambda name: next(n.index for n in r.nodes if n.name == name))
    assert [n.name for n in r.incompatible_nodes] == [first]


@pytest.mark.parametrize(
    "wrap",
    [
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.weight_norm,
        torch.nn.utils.spectral_norm,
        lambda m: prune.l1_unstructured(m, "weight", amount=0.3),
    ],
    ids=["parametrizations.weight_norm", "weight_norm", "spectral_norm", "prune"],
)
def test_a_conv_whose_weight_is_computed_by_a_hook_or_a_parametrization(wrap: Any) -> None:
    """weight_norm, spectral_norm and prune take ``weight`` out of the module's parameters (a hook
    or a parametrization computes it): its kernel is asked at each call, and the graph capture runs
    (it raised a KeyError once). The eager capture charges what eager adds (the ground truth's two
    runs deep-copy the model, which the hook-based ones' non-leaf weights refuse)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Conv3d(8, 16, 3, padding=1)), nn.Conv3d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 8, 8, 8)
    r = audit(model, x)
    assert r.meta.capture == "fx" and r.summary.intrinsic_bytes > 0
    if wrap is torch.nn.utils.parametrizations.weight_norm:
        hooks = audit(model, x, capture="hooks")
        assert sum(f.bytes for f in hooks.findings) == eager_bytes(model, (x,)).added > 0


def test_batch_two_runs_onednn_and_copies_no_weight() -> None:
    torch.set_num_threads(1)
    model, _ = _case("conv3d")
    x = torch.randn(2, 8, 12, 12, 12)
    assert _profiled(model, x) == 0
    r = audit(model, x)
    assert not r.findings and r.summary.intrinsic_bytes == 0


def test_a_fake_run_too_large_to_ask_whole_asks_a_cut_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the probe limit the fake run asks the kernel on a copy cut along its spatial dims that
    keeps the backend: the weight's copy is the whole problem's."""
    torch.set_num_threads(1)
    model, x = _case("conv3d")
    real = sum(f.bytes for f in audit(model, x).findings if f.intrinsic)
    monkeypatch.setattr(conv_kernels, "PROBE_NUMEL", 2000)
    fake = audit(model, x, mode="fake")
    assert sum(f.bytes for f in fake.findings if f.intrinsic) == real > 0


def test_the_summary_counts_the_kernels_copies_apart_and_names_them() -> None:
    """A forward audit's summary: the reverts count the model's own layout changes; the kernels'
    copies are counted and marked apart, and the verdict names them as forward weight copies too."""
    torch.set_num_threads(1)
    model, x = _case("three_sizes")
    r = audit(model, x)
    s = r.summary
    assert (s.reverts, s.intrinsic) == (1, 3) and s.intrinsic_bytes == _profiled(model, x)
    text = str(r)
    assert "1 revert," in text and "3 kernel copies" in text and "revert (kernel)" in text
    assert r.verdict is not None
    (share,) = [reason for reason in r.verdict.reasons if "kernels' own copies" in reason]
    assert "backward" not in share and "weights" in share
    assert r.to_dict()["summary"]["intrinsic"] == 3


class _Passing(TorchDispatchMode):
    """A caller's own dispatch mode that only passes each op on."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_an_audit_inside_a_callers_dispatch_mode_says_its_kernels_were_not_asked() -> None:
    """Real mode: a kernel run under the audit's mode would skip the caller's, so none is run, and the
    report says so (it charged the weight's copy silently to no one); a fake audit asks on zeros."""
    torch.set_num_threads(1)
    model, x = _case("conv3d")
    with _Passing():
        real, fake = audit(model, x), audit(model, x, mode="fake")
    (note,) = [n for n in real.meta.capture_notes if "_Passing" in n]
    assert "not run to see what they copy" in note and real.summary.intrinsic_bytes == 0
    assert not [n for n in fake.meta.capture_notes if "_Passing" in n]
    assert fake.summary.intrinsic_bytes == _profiled(model, x) > 0
    assert not [n for n in audit(model, x).meta.capture_notes if "dispatch mode" in n]


class _NormedProjection(nn.Module):
    """MONAI's decoder block (SwinUNETR's ``decoder1``): a 1 x 1 convolution of an InstanceNorm's NCHW
    output, whose weight, converted channels_last, is dense in both orders."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if rank == 4 else (nn.Conv3d, nn.InstanceNorm3d)
        self.a, self.n, self.c = conv(24, 24, 1), norm(24, affine=True), conv(24, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.n(self.a(x)))


@pytest.mark.parametrize("shape", [(1, 24, 128, 128), (1, 24, 32, 64, 64)])
def test_a_cut_copy_keeps_a_one_by_one_weights_strides(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake training run above the probe limit asks a convolution's kernels on a cut copy, rebuilt
    in each tensor's format: a 1 x 1 weight converted channels_last is dense in NCHW order too, and was
    rebuilt NCHW, a kernel path that copies nothing: the backward of SwinUNETR's 1 x 1 projection of an
    NCHW map at 1x1x64x64x64 lost 75,499,776 B (the input and gradient re-laid) of eager's 509,675,712."""
    from nhwc_audit.propagate import backward_kernels
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = _NormedProjection(len(shape)).train(), torch.randn(shape)
    truth = eager_backward_bytes(model, (x,)).added
    for module in (conv_kernels, backward_kernels):
        monkeypatch.setattr(module, "PROBE_NUMEL", 100_000)  # (4M elements: these are asked whole)
    for mode in ("real", "fake"):
        r = audit(model, x, bandwidth=1e9, train=True, mode=mode)
        assert sum(f.bytes for f in r.findings if f.kind.value == "backward") == truth > 0, mode
