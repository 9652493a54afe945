"""Bytes charged against eager ground truth (:mod:`tests.eager_bytes`) on op patterns from
public models, in every capture: what channels_last adds, and nothing more.

Each case is a minimal form of what an audit of a real model (outside this repo's zoo)
charged differently from eager: timm's focalnet and the UPerNet pyramid pooling (a mixed op
that is mixed in the NCHW model too), timm's CSPNet (a cat of a channels_last half and an
NCHW half), torchvision's r2plus1d_18 stem (a Conv3d that re-lays its input), and the
vgg/alexnet classifier head (a flatten exit: not a finding, in any capture; not counted by the
eager checker either).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from tests import models as M
from tests.eager_bytes import eager_bytes

CAPTURES = ["fx", "export", "hooks"]


class MixedInBoth(nn.Module):
    """LayerNorm2d (permute, layer_norm, permute back) leaves NHWC strides in the NCHW model
    too, so the add of it and an NCHW product is mixed in either layout (focalnet.py:102)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],)).permute(0, 3, 1, 2)
        g = y.mean((2, 3), keepdim=True) * y[:, :1]  # [1,C,1,1] * [1,1,H,W]: NCHW in either layout
        return y + g


class HalfAndHalfCat(nn.Module):
    """timm's CrossStage (cspnet.py:390): one half of a channels_last split made NCHW by
    ``.contiguous()``, then cat with the other half: only the channels_last half moves."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.c = c
        self.exp = nn.Conv2d(c, 2 * c, 1)
        self.b = nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.exp(x).split(self.c, dim=1)
        xb = self.b(xb).contiguous()
        return self.out(torch.cat([xs, xb], dim=1))


def r2plus1d_stem() -> nn.Module:
    """torchvision's r2plus1d_18 stem: on CPU the (3, 1, 1) Conv3d from 45 to 64 channels takes
    channels_last_3d and returns NCDHW; the kernel re-lays its 45-channel input."""
    return nn.Sequential(
        nn.Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
        nn.BatchNorm3d(45),
        nn.ReLU(),
        nn.Conv3d(45, 64, (3, 1, 1), padding=(1, 0, 0), bias=False),
    ).eval()


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_mixed_op_mixed_in_nchw_too_is_no_finding_while_it_stays_nhwc(capture: str) -> None:
    # the add stays channels_last and reads the NCHW operand across orders as the NCHW model does
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    r = audit(MixedInBoth().eval(), x, bandwidth=1e9, capture=capture)
    assert not [f for f in r.findings if f.kind.value == "mixed"]
    assert any(n.startswith("NCHW baseline:") and "mixed" in n for n in r.meta.capture_notes)
    assert r.summary.bytes_moved == eager_bytes(MixedInBoth().eval(), (x,)).added == 0


class MixedInBothLeavingNhwc(MixedInBoth):
    """The same add with the NCHW operand first: its output is NCHW and the next conv converts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],)).permute(0, 3, 1, 2)
        g = y.mean((2, 3), keepdim=True) * y[:, :1]
        return self.conv(g + y)


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_mixed_op_mixed_in_nchw_too_stays_a_finding_where_nhwc_is_left(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    r = audit(MixedInBothLeavingNhwc().eval(), x, bandwidth=1e9, capture=capture)
    got = [(f.kind.value, f.bytes) for f in r.findings]
    assert got == [("mixed", 0), ("conversion", 32768)]  # the mixed add is where the conversion comes from
    assert r.summary.bytes_moved == eager_bytes(MixedInBothLeavingNhwc().eval(), (x,)).added


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_cat_is_charged_the_half_it_moves(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 32, 16, 16)
    model = HalfAndHalfCat().eval()
    r = audit(model, x, bandwidth=1e9, capture=capture)
    half = 32 * 16 * 16 * 4
    cat = [f for f in r.findings if f.op == "cat"]
    assert [f.bytes for f in cat] == [2 * half]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_convolution_that_reverts_is_charged_its_input(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 32, 32)
    model = r2plus1d_stem()
    r = audit(model, x, bandwidth=1e9, capture=capture)
    reverts = [f for f in r.findings if f.kind.value == "revert" and not f.intrinsic]
    assert len(reverts) == 1
    assert reverts[0].bytes == 2 * 45 * 4 * 16 * 16 * 4  # the 45-channel input, not the 64-channel output
    # (at batch 1 the CPU's slow backend copies each channels_last_3d weight too: the kernel's own)
    assert {f.node for f in r.findings if f.intrinsic} == {f.node for f in r.findings if f.op == "Conv3d"}
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_flatten_exit_is_not_a_finding_in_any_capture(capture: str) -> None:
    """The vgg/alexnet head: a pool to H, W > 1, then ``torch.flatten(x, 1)`` (a copy of the NHWC
    map, a view in NCHW) into the classifier."""
    x = torch.randn(1, 3, 32, 32)
    r = audit(M.FlattenHead().eval(), x, bandwidth=1e9, capture=capture)
    assert r.findings == ()
    assert r.summary.bytes_moved == eager_bytes(M.FlattenHead().eval(), (x,)).added == 0


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_padding_revert_is_charged_its_input(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    r = audit(M.CircularPad().eval(), x, bandwidth=1e9, capture=capture)  # ATen pads via new_empty + copy_
    act, padded = 8 * 8 * 8 * 4, 8 * 10 * 10 * 4
    assert [(f.kind.value, f.bytes) for f in r.findings] == [("revert", 2 * act), ("conversion", 2 * padded)]
    assert r.summary.bytes_moved == eager_bytes(M.CircularPad().eval(), (x,)).added


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_contiguous_call_before_a_flatten_stays_a_revert(capture: str) -> None:
    r = audit(M.ContiguousThenFlatten().eval(), torch.randn(1, 3, 8, 8), bandwidth=1e9, capture=capture)
    assert [(f.kind.value, f.op, f.bytes) for f in r.findings] == [("revert", "contiguous", 2 * 8 * 8 * 8 * 4)]


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_weight_reshaped_in_forward_is_no_exit(capture: str) -> None:
    """BiT's and NFNet's weight standardisation moves the weight twice a forward in channels_last:
    its reshape to (1, O, -1) copies it out of NHWC (a view in NCHW; the eager capture sees a copy
    and a view to 3D, like a flatten exit, but only activations exit), and the convolution re-lays
    the computed NCHW weight to its NHWC input (the profiler shows the copy inside the kernel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), M.StandardisedConv(8, 8, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    weight = 8 * 8 * 3 * 3 * 4
    assert sorted((f.kind.value, f.bytes) for f in r.findings) == [("mixed", 2 * weight), ("revert", 2 * weight)]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added


class WithIndices(nn.Module):
    """Ops that revert and also return int64 indices (a max pool with ``return_indices``, ``topk``
    over the channels): the indices are computed, not moved; eager moves the values only."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool3d = nn.AdaptiveMaxPool3d((2, 4, 4), return_indices=True)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "pool3d":  # on the (channels_last_3d) sample itself
            return self.pool3d(x)[0] * 2
        y = self.conv(x)
        if self.op == "topk":
            return torch.topk(y, 4, dim=1).values * 2
        if self.op == "fractional":
            return F.fractional_max_pool2d(y, 2, output_size=(5, 5), _random_samples=torch.full((1, 16, 2), 0.5)) * 2
        raise ValueError(self.op)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("op", ["topk", "fractional", "pool3d"])
def test_a_revert_that_returns_indices_is_charged_its_values(capture: str, op: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 16, 16) if op == "pool3d" else torch.randn(1, 3, 12, 12)
    r = audit(WithIndices(op).eval(), x, bandwidth=1e9, capture=capture)
    expected = eager_bytes(WithIndices(op).eval(), (x,)).added
    assert expected > 0
    assert r.summary.bytes_moved == expected


class StoredOperands(nn.Module):
    """A 4D parameter and a 4D buffer that hold tokens (timm NesT's position embedding,
    nest.py:278: ``x + self.pos_embed`` on a (1, T, N, C) token map): ``model.to(channels_last)``
    restrides them, so the add re-lays them on every call; and a tensor made in forward (a graph
    keeps it as a constant) that meets a channels_last activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.pos = nn.Parameter(torch.randn(1, 4, 8, 16))
        self.register_buffer("mask", torch.randn(1, 4, 8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # 1x16x8x8, channels_last
        tokens = y.permute(0, 2, 3, 1).reshape(1, 4, 16, 16)[:, :, :8].contiguous()  # row-major tokens
        return (tokens + self.pos + self.mask).sum() + (y + torch.ones(1, 16, 8, 8)).sum()


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", CAPTURES)
def test_a_stored_operand_in_the_other_layout_is_mixed(capture: str, mode: str) -> None:
    """In fake mode too: fx keeps the tensor made in forward as a real constant, made fake for
    the run (it raised 'Please convert all Tensors to FakeTensors')."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    r = audit(StoredOperands().eval(), x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert r.meta.capture == capture
    expected = eager_bytes(StoredOperands().eval(), (x,)).added
    # each stored operand read across layouts once: the parameter, the buffer, the constant
    assert expected == 2 * 4 * (4 * 8 * 16 + 4 * 8 * 16 + 16 * 8 * 8)
    mixed = [f for f in r.findings if f.kind.value == "mixed"]
    assert len(mixed) == 3, r.findings
    assert r.summary.bytes_moved == expected
    stored = [f for f in mixed if "restrides every 4D parameter" in f.hint]
    assert len(stored) >= 2  # the parameter and the buffer (the constant is one in graphs only)


class Sampled(nn.Module):
    """``grid_sample`` of a channels_last map returns NCHW on the CPU: a revert of the map. Its
    grid (N x H x W x 2, row-major) holds coordinates, not a map, so the op is not mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("theta", torch.tensor([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0]]]).repeat(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(self.theta, [2, 8, 16, 16], align_corners=False)
        return F.grid_sample(self.pre(x), grid, align_corners=False)


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_sampling_grid_is_not_an_operand_in_another_layout(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16)
    r = audit(Sampled().eval(), x, bandwidth=1e9, capture=capture)
    assert [f.kind.value for f in r.findings] == ["revert"]
    assert "no channels_last kernel" in r.findings[0].hint
    assert r.summary.bytes_moved == eager_bytes(Sampled().eval(), (x,)).added > 0


class PosConv(nn.Module):
    """timm twins' PosConv (twins.py:556) at batch 1: tokens viewed back as a map
    (``transpose(1, 2).view(B, C, H, W)``) get a size-1 batch stride from eager's view that the
    CPU conv reads as not channels_last; FakeTensor's view strode it otherwise, so a fake audit's
    NCHW baseline wrote the final ``.contiguous()`` off as copying in NCHW too (fake 131,072 B,
    real and eager 262,144 B; timm twins_svt_small 2.81 against 5.62 MB)."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.norm = nn.LayerNorm(c)
        self.peg = nn.Conv2d(c, c, 3, 1, 1, groups=c)
        self.down = nn.Conv2d(c, c, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))
        f = t.transpose(1, 2).view(b, c, h, w)
        t = (self.peg(f) + f).flatten(2).transpose(1, 2)
        return self.down(t.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous())


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", CAPTURES)
def test_a_view_back_to_a_map_is_strided_as_eager_strides_it(capture: str, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    r = audit(PosConv().eval(), x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert r.summary.bytes_moved == eager_bytes(PosConv().eval(), (x,)).added == 262144


class InnerMoves(nn.Module):
    """Nodes whose own inputs and outputs do not show what their ATen ops move: a 1D pool over
    tokens flattened from an NHWC map (timm nextvit, nextvit.py:297: the 2D pool inside reads
    the unsqueezed NHWC tokens and writes NCHW) and a circular-padding convolution (the kernel
    re-lays the padded NCHW input back into NHWC)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 1)
        self.pool = nn.AvgPool1d(2)
        self.circular = nn.Conv2d(64, 64, 3, padding=1, padding_mode="circular")
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.op == "pool1d":
            return self.pool(y.flatten(2)).sum(-1)
        return self.circular(y)


def test_a_fake_audit_charges_a_circular_convolution_as_eager() -> None:
    """In fake mode too (fx charged nothing inside nodes there): meta kernels agree with the
    CPU's here; they are trusted inside a node except where known wrong (GroupNorm)."""
    x = torch.randn(1, 3, 8, 8)
    r = audit(InnerMoves("circular").eval(), x, bandwidth=1e9, mode="fake")
    assert r.meta.capture == "fx"
    assert r.summary.bytes_moved == eager_bytes(InnerMoves("circular").eval(), (x,)).added


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("op", ["pool1d", "circular"])
def test_what_the_ops_inside_a_node_move_is_charged(capture: str, op: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    r = audit(InnerMoves(op).eval(), x, bandwidth=1e9, capture=capture)
    expected = eager_bytes(InnerMoves(op).eval(), (x,)).added
    assert expected > 0
    assert r.summary.bytes_moved == expected


class PermutedPlusEmbedding(nn.Module):
    """timm volo (volo.py:974): a patch map permuted to (B, H, W, C) plus a (1, H, W, C) position
    embedding. The add re-lays one operand in either layout: the embedding in the channels_last
    model (restrided by the conversion), the permuted map in the NCHW one; channels_last adds
    nothing (fx charged the embedding whole: its NCHW baseline read activations only)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.embed(x).permute(0, 2, 3, 1) + self.pos).sum()


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", CAPTURES)
def test_a_stored_operand_re_laid_in_either_layout_costs_nothing_extra(capture: str, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    r = audit(PermutedPlusEmbedding().eval(), x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert [f.kind.value for f in r.findings] == ["mixed"]
    assert r.summary.bytes_moved == eager_bytes(PermutedPlusEmbedding().eval(), (x,)).added == 0


class _Join(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _OtherJoin(nn.Module):  # the same code on another line
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class TwoJoins(nn.Module):
    """Two instances of one module (one source line): the NCHW model copies at the first (a mixed add of a
    LayerNorm2d-like output), the channels_last one at the second (after a log_softmax over channels).
    The NCHW copy at the first was netted against the second's, the same line but another call of it (a
    composition fuzz's find): 4,096 B where the same model with a second class on another line is
    charged 6,144, as eager charges it."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.stem, self.ln, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.LayerNorm(4), nn.Conv2d(4, 4, 3, padding=1)
        self.j1, self.j2 = _Join(), (_Join() if shared else _OtherJoin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.j1(x, self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.head(self.j2(F.log_softmax(x, 1), x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_another_instance_on_the_same_line_is_another_call(capture: str) -> None:
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(0)
    apart = TwoJoins(False).eval()
    expected = eager_bytes(apart, (x,)).added  # (per line, eager nets the shared model's two calls alike)
    assert audit(apart, x, bandwidth=1e9, capture=capture).summary.bytes_moved == expected == 6144  # type: ignore[arg-type]
    torch.manual_seed(0)
    shared = TwoJoins(True).eval()
    assert audit(shared, x, bandwidth=1e9, capture=capture).summary.bytes_moved == expected  # type: ignore[arg-type]


class CatOfAMapAndATransposedView(nn.Module):
    """A cat of a transposed view of a map (re-laid by the cat in either layout) and the map itself
    (re-laid only in channels_last): the NCHW baseline's move of the view was taken off the map's, so
    the cat was charged 0 where eager moves 2,048 B more in channels_last (4,096 B in all against
    eager's 6,144; found by a helper's composition fuzz)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = x.view(-1, 2, 2, 8, 8).transpose(1, 2).contiguous().view(-1, 4, 8, 8).transpose(2, 3)
        return self.head(torch.cat([y, x], 1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_cat_of_a_view_re_laid_in_both_layouts_is_charged_the_map_it_moves(capture: str) -> None:
    torch.manual_seed(0)
    model, x = CatOfAMapAndATransposedView().eval(), torch.randn(1, 3, 8, 8)
    report = audit(model, x, capture=capture, bandwidth=1e9)
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added == 6144
    assert {f.op: f.bytes for f in report.findings if f.bytes} == {"cat": 2048, "Conv2d": 4096}
