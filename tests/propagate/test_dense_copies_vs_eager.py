"""A kernel given a 4D/5D input that is not dense in memory copies it whole first (``contiguous()``).
A channel slice of a channels_last map (``torch.split``, ``chunk``, ``x[:, a:b]``: Res2Net, CSPNet,
ShuffleNetV2, YOLO's C2f) is dense in no order, while NCHW memory holds one sample's slice densely:
at batch 1, channels_last adds that copy at every convolution, pool, norm, upsample or softmax that
reads such a slice; at batch 2 and more NCHW copies it too. The copy is made inside the kernel,
where a dispatch mode sees nothing; the audit runs such an op by its kernel with a mode pushed
(:mod:`nhwc_audit.propagate.kernel_copies`), as the ground truth (``tests/eager_bytes.py``) does."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from nhwc_audit.channels import laid_out
from nhwc_audit.propagate import blind
from nhwc_audit.records import FindingKind
from nhwc_audit.testing import assert_channels_last
from tests.eager_bytes import eager_bytes


class SplitThen(nn.Module):
    """A 1x1 conv to 16 channels, split in halves; ``op`` reads the second half."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.c(x), 8, 1)
        return self.op(b)


class C2f(nn.Module):
    """Ultralytics' C2f: ``cv1`` split in two, a bottleneck conv on the second half, all concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1 = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([y0, y1, self.m(y1)], 1))


_CASES: dict[str, Callable[[], nn.Module]] = {
    "conv": lambda: SplitThen(nn.Conv2d(8, 4, 3, padding=1)),
    "depthwise_conv": lambda: SplitThen(nn.Conv2d(8, 8, 3, padding=1, groups=8)),
    "max_pool": lambda: SplitThen(nn.MaxPool2d(2)),
    "group_norm": lambda: SplitThen(nn.GroupNorm(2, 8)),
    "bilinear_upsample": lambda: SplitThen(nn.Upsample(scale_factor=2, mode="bilinear")),
    "softmax_over_channels": lambda: SplitThen(nn.Softmax(1)),
    "batch_norm": lambda: SplitThen(nn.BatchNorm2d(8)),  # reads a slice in place: no copy
    "relu": lambda: SplitThen(nn.ReLU()),  # element-wise: no copy
    "c2f": C2f,
}
_COPIES = {"conv", "depthwise_conv", "max_pool", "group_norm", "bilinear_upsample", "softmax_over_channels", "c2f"}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", sorted(_CASES))
def test_a_kernels_copy_of_a_channel_slice_is_charged_what_eager_moves(
    case: str, batch: int, capture: str, mode: str
) -> None:
    torch.manual_seed(0)
    model, x = _CASES[case]().eval(), torch.randn(batch, 3, 8, 8)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert r.summary.bytes_moved == expected, [(f.kind.value, f.node, f.bytes) for f in r.findings]
    if batch == 1 and case in _COPIES and case != "softmax_over_channels":  # (softmax reverts: NCHW out)
        assert expected == 2 * 8 * 8 * 8 * 4
        (f,) = r.findings
        assert f.kind is FindingKind.CONVERSION and "torch.split" in f.hint and "(batch 1)" in f.hint
    if batch == 2 and case != "bilinear_upsample":  # NCHW copies the slice too (softmax: into its NCHW output)
        assert expected == 0
        # and no finding of 0 B says otherwise (assert_channels_last would fail on one)
        assert not [f for f in r.findings if f.kind is FindingKind.CONVERSION], r.findings
        assert_channels_last(model, x, capture=capture, mode=mode)
    # (at batch 2 the NCHW kernel of a bilinear upsample of the slice computes channels_last, re-laying
    # its input and its result inside: copies neither side counts, so channels_last's copy is charged)


def test_an_op_on_a_slice_is_never_run_without_the_recorder() -> None:
    """A module or function the interpreter would run with the recorder off its stack (it sees
    nothing in them on dense inputs) keeps it on for a slice, whose copy it must see."""
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    half = x[:, 8:]
    assert laid_out(x) and not laid_out(half)
    for m in (nn.Conv2d(8, 4, 1), nn.MaxPool2d(2), nn.GroupNorm(2, 8)):
        assert blind.recorder_blind(m, (x[:, :8].contiguous(),), frozenset())
        assert not blind.recorder_blind(m, (half,), frozenset())
    assert not blind.function_blind(nn.functional.batch_norm, (half, None, None, None, None, True), {})


class QuantizedSlice(nn.Module):
    """A quantized map's channel slice, upsampled: its kernel is QuantizedCPU's, never run as a CPU one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.quantize_per_tensor(self.conv(x), 0.1, 0, torch.quint8)
        return nn.functional.interpolate(q[:, :4], scale_factor=2.0).dequantize()


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_a_quantized_slice_is_no_break(capture: str) -> None:
    """Run by the CPU kernel, the quantized upsample raised, and the audit called it a break."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's deprecation of quantize_per_tensor's memory format)
        r = audit(QuantizedSlice().eval(), torch.randn(1, 3, 8, 8), capture=capture, bandwidth=1e9)
    assert r.summary.breaks == 0 and [f.kind for f in r.findings] == [FindingKind.REVERT], r.findings
