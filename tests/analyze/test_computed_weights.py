"""A convolution whose weight is computed in forward (weight standardisation, as in timm's
NFNet ScaledStdConv2d): the root cause of its layout change is the weight computation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import AuditReport, audit


class StdConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_computed_nchw_weight_is_the_root_cause(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), StdConv(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    r = audit_fixed(m, sample(1, 3, 16, 16))
    copy, f = r.findings
    weight = 2 * 16 * 16 * 3 * 3 * 4
    # the weight moves twice a forward: its reshape copies it out of NHWC, the conv re-lays it
    assert (copy.node, copy.kind.value, copy.bytes) == ("reshape", "revert", weight)
    assert copy.hint.startswith("reshape of a weight in forward copies the channels_last weight")
    assert (f.node, f.kind.value, f.origin, f.bytes) == ("conv2d", "mixed", "reshape_as", weight)
    assert f.hint.startswith("conv2d's weight is computed in forward (reshape_as")
    for hint in (copy.hint, f.hint):
        assert "without reshaping" in hint and "dims (1, 2, 3)" in hint
    assert [(x.op, x.roots) for x in r.fixes] == [("reshape", ("reshape",)), ("reshape_as", ("reshape_as",))]


def test_the_advised_standardisation_moves_nothing(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    """What the hint advises, checked: standardised over dims (1, 2, 3) with keepdim, the weight
    keeps its channels_last strides and the audit finds nothing."""

    class Advised(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
            return F.conv2d(x, (w - mean) / (var + 1e-5).sqrt(), self.bias, self.stride, self.padding)

    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Advised(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    assert audit_fixed(m, sample(1, 3, 16, 16)).findings == ()


def test_an_nchw_activation_into_a_conv_is_not_a_weight(
    audit_fixed: Callable[..., AuditReport], sample: Callable[..., torch.Tensor]
) -> None:
    class Act(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.norm = nn.InstanceNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.a(x)) + self.b(x)

    r = audit_fixed(Act(), sample(1, 3, 8, 8))
    assert all("weight is computed" not in f.hint for f in r.findings)


class DynamicFilter(nn.Module):
    """A convolution whose weight is made from the activations (a dynamic filter), not from
    parameters: no computed-weight finding, in a graph or an eager capture (which records the
    model's input with no producer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.conv2d(y, y[:, :, :3, :3].repeat(8, 1, 1, 1).contiguous())


def test_a_weight_made_from_activations_is_not_computed_from_parameters() -> None:
    import nhwc_audit

    seen = []
    for capture in ("fx", "hooks"):
        torch.manual_seed(0)
        r = nhwc_audit.audit(DynamicFilter().eval(), torch.randn(1, 3, 8, 8), capture=capture)
        assert r.meta.capture == capture
        assert [f.kind.value for f in r.findings] == ["revert", "mixed"]
        assert "computed in forward" not in r.findings[1].hint
        seen.append([(f.kind, f.bytes, f.origin) for f in r.findings])  # fx adds "via contiguous"
    assert seen[0] == seen[1]


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_reshaped_weight_has_the_weight_hint_in_every_capture(capture: str) -> None:
    """The eager capture records the weight's reshape as a revert of its own; it had the generic
    'reshape has no channels_last kernel' hint, where the graphs' captures say why it copies."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), StdConv(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)).eval()
    r = audit(m, torch.randn(1, 3, 16, 16), bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    (copy,) = [f for f in r.findings if f.kind.value == "revert"]
    assert copy.op == "reshape" and copy.bytes == 2 * 8 * 8 * 3 * 3 * 4
    assert copy.hint.startswith("reshape of a weight in forward copies the channels_last weight"), copy.hint


class CoordsTable(nn.Module):
    """Swin V2's continuous position bias: an MLP over a 1 x 7 x 7 x 2 table of coordinates kept
    as a 4D buffer, which the conversion restrides as if it held an image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
        h = torch.arange(-3, 4, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(h, h, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
        self.register_buffer("coords", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.mlp(self.coords).reshape(-1, 2).sum()


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_table_in_a_4d_buffer_is_no_weight(capture: str) -> None:
    """A Linear over a restrided 4D buffer copies it back to row-major: the hint says to store it
    3D, not to standardise a convolution's weight."""
    r = audit(CoordsTable().eval(), torch.randn(1, 3, 16, 16), bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    (copy,) = [f for f in r.findings if f.kind.value == "revert"]
    assert copy.op == "Linear" and copy.bytes == 2 * 7 * 7 * 2 * 4
    assert copy.hint.startswith("Linear reads a 4D stored tensor that model.to(memory_format=torch.channels_last)")
    assert "store it 3D" in copy.hint and "convolution" not in copy.hint


def _weight_norm(conv: nn.Conv2d) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(conv)


def _old_weight_norm(conv: nn.Conv2d) -> nn.Module:
    return nn.utils.weight_norm(conv)


def _spectral_norm(conv: nn.Conv2d) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(conv)


def _orthogonal(conv: nn.Conv2d) -> nn.Module:
    return nn.utils.parametrizations.orthogonal(conv)


def _cayley(conv: nn.Conv2d) -> nn.Module:
    return nn.utils.parametrizations.orthogonal(conv, orthogonal_map="cayley")


@pytest.mark.parametrize("wrap", [_weight_norm, _old_weight_norm, _spectral_norm, _orthogonal, _cayley])
@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_weight_computed_inside_a_conv_module_is_charged_once(
    wrap: Callable[[nn.Conv2d], nn.Module], mode: str, batch: int
) -> None:
    """A leaf convolution module whose weight its parametrization computes in forward (weight_norm,
    spectral_norm): the weight made NCHW is re-laid by the convolution once, as eager copies it (the
    rule on the op inside the module, and the kernel's own copy of the same weight, were both
    charged: 55,296 B where eager moves 36,864). An orthogonal map's ops on its parameter inside the
    module (``tril`` of the weight converted channels_last, which computes NCHW): 9,216 B of 13,824 under
    fx, which left computed ops that read parameters to the weight rules (a convolution's alone)."""
    from tests.eager_bytes import eager_bytes

    def build() -> nn.Module:  # (the old weight_norm's weight has a grad_fn: no deepcopy of it)
        torch.manual_seed(0)
        with torch.no_grad():
            m = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), wrap(nn.Conv2d(16, 16, 3, padding=1)), nn.Conv2d(16, 8, 1)
            )
        return m.eval()

    x = torch.randn(batch, 3, 16, 16)
    r = audit(build(), x, bandwidth=1e9, mode=mode)  # type: ignore[arg-type]
    truth = eager_bytes(build(), (x,)).added
    assert truth > 0 and sum(f.bytes for f in r.findings) == truth
    assert not any(f.intrinsic for f in r.findings)  # computed in forward: the model can change it


class _Transposed(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_weight_dense_in_neither_format_is_copied_in_nchw_too(batch: int, capture: str) -> None:
    """A parametrization that returns its weight transposed (in and out channels swapped): the
    convolution copies it into the format it computes in, NCHW's as channels_last's, so channels_last
    adds nothing. At batch 1 the NCHW run's copy went unseen (its order was compared with the output's
    as an activation's: 18,432 B charged); at batch 2 a 0 B conversion was left, and check() raised."""
    from nhwc_audit import check
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)).eval()
    nn.utils.parametrize.register_parametrization(m[1], "weight", _Transposed())
    x = torch.randn(batch, 3, 16, 16)
    assert eager_bytes(m, (x,)).added == 0
    for mode in ("real", "fake"):
        assert audit(m, x, bandwidth=1e9, mode=mode, capture=capture).findings == ()  # type: ignore[arg-type]
    check(m, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
