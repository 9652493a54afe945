"""Per-op behaviour on small models: exact node layouts and findings on CPU (torch 2.14.1)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import AuditReport, audit
from tests import models as M
from tests.eager_bytes import eager_bytes

CL, NCHW, AMB, NS = "channels_last", "contiguous", "ambiguous", "not_spatial"


def run(model: nn.Module, shape: tuple[int, ...]) -> AuditReport:
    torch.manual_seed(0)
    return audit(model, torch.randn(shape), bandwidth=1e9)


def layouts(report: AuditReport) -> dict[str, str]:
    return {
        r.name: r.output_layout.value for r in report.nodes if r.op in ("call_module", "call_function", "call_method")
    }


def kinds(report: AuditReport) -> list[tuple[str, str]]:
    return [(f.node, f.kind.value) for f in report.findings]


def test_conv_bn_relu_chain_stays_channels_last() -> None:
    r = run(M.ConvBnRelu(), (1, 3, 8, 8))
    assert layouts(r) == {"conv": CL, "bn": CL, "relu": CL, "conv2": CL, "pool": CL}
    assert r.findings == ()
    assert r.summary.channels_last_node_share == 1.0


def test_instance_norm_reverts_and_next_conv_converts_back() -> None:
    r = run(M.InstanceNormNet(), (1, 3, 8, 8))
    assert layouts(r) == {"conv": CL, "norm": NCHW, "conv2": CL}
    assert kinds(r) == [("norm", "revert"), ("conv2", "conversion")]
    revert, conversion = r.findings
    assert revert.op == "InstanceNorm2d" and revert.module_path == "norm"
    assert revert.source is not None and revert.source.file.endswith("models.py")
    assert "GroupNorm" in revert.hint
    assert conversion.origin == "norm" and "norm" in conversion.hint
    assert [(g.entries, g.exits, g.nodes) for g in r.regions] == [(("norm",), ("conv2",), ("norm",))]


def test_softmax_over_channels_reverts() -> None:
    r = run(M.SoftmaxChannels(), (1, 3, 8, 8))
    assert kinds(r) == [("softmax", "revert")]
    assert "dim=-1" in r.findings[0].hint


def test_circular_pad_reverts() -> None:
    r = run(M.CircularPad(), (1, 3, 8, 8))
    assert layouts(r) == {"conv": CL, "pad": NCHW, "conv2": CL}
    assert kinds(r) == [("pad", "revert"), ("conv2", "conversion")]
    assert r.findings[0].detail == "circular" and "circular" in r.findings[0].hint


def test_contiguous_call_reverts() -> None:
    r = run(M.ContiguousCall(), (1, 3, 8, 8))
    assert kinds(r) == [("contiguous", "revert")]
    assert "memory_format=torch.channels_last" in r.findings[0].hint


def test_cat_of_channels_last_and_nchw_is_mixed() -> None:
    r = run(M.CatMixed(), (1, 3, 8, 8))
    assert layouts(r)["cat"] == NCHW
    assert kinds(r) == [("norm", "revert"), ("cat", "mixed")]
    cat = r.findings[1]
    # the channels_last input (1x4x8x8 float32 = 1024 B) is transposed: read + write
    assert cat.bytes == 2 * 4 * 8 * 8 * 4
    assert cat.origin == "norm"


@pytest.mark.parametrize(("nchw_first", "out"), [(True, NCHW), (False, CL)])
def test_add_operand_order_decides_layout(nchw_first: bool, out: str) -> None:
    r = run(M.AddOrder(nchw_first), (1, 3, 8, 8))
    assert layouts(r)["add"] == out
    assert kinds(r) == [("norm", "revert"), ("add", "mixed")]
    add = r.findings[1]
    assert add.layout_out.value == out
    if nchw_first:
        assert "put the channels_last operand first" in add.hint
    else:
        assert "put the channels_last operand first" not in add.hint


def test_se_gate_is_ambiguous_and_not_a_finding() -> None:
    r = run(M.SEBlock(), (1, 3, 8, 8))
    lay = layouts(r)
    assert lay["adaptive_avg_pool2d"] == AMB and lay["sigmoid"] == AMB and lay["mul"] == CL
    assert r.findings == ()


def test_view_breaks_and_the_audit_goes_on() -> None:
    r = run(M.ViewHead(), (1, 3, 8, 8))
    assert kinds(r) == [("view", "break"), ("norm", "revert")]
    brk = r.findings[0]
    assert brk.error is not None and "view" in brk.error
    assert "reshape" in brk.hint
    assert brk.source is not None and "view" in brk.source.code
    assert layouts(r)["fc"] == NS  # ran on the NCHW copy


def test_flatten_before_linear_is_not_a_finding() -> None:
    r = run(M.FlattenHead(), (1, 3, 8, 8))
    assert layouts(r) == {"conv": CL, "pool": CL, "flatten": NS, "fc": NS}
    assert r.findings == ()


def test_convnext_permute_layernorm_is_free() -> None:
    r = run(M.ConvNeXtBlock(), (1, 8, 8, 8))
    lay = layouts(r)
    assert lay["permute"] == NCHW and lay["norm"] == NCHW and lay["permute_1"] == CL
    assert r.findings == () and r.regions == ()


def test_ambiguous_pooled_tensor_upsampled_to_nchw_is_a_conversion_naming_the_upsample() -> None:
    r = run(M.PoolingBranch().eval(), (1, 3, 8, 8))
    lay = layouts(r)
    assert lay["bn"] == AMB and lay["interpolate"] == NCHW and lay["out"] == CL
    assert kinds(r) == [("out", "conversion")]
    f = r.findings[0]
    assert f.origin == "interpolate" and f.bytes == 2 * 8 * 8 * 8 * 4
    assert "interpolate" in f.hint and ".to(memory_format=torch.channels_last)" in f.hint


def test_conv3d_channels_last_3d_and_instance_norm_3d() -> None:
    r = run(M.Conv3dNet(), (2, 2, 16, 16, 16))
    assert layouts(r) == {"conv": CL, "norm": NCHW, "conv2": CL}
    assert kinds(r) == [("norm", "revert"), ("conv2", "conversion")]
    assert r.meta.inputs[0].layout.value == CL
    assert r.findings[1].bytes == 2 * 2 * 8 * 16**3 * 4


def test_cpu_conv3d_picks_ncdhw_for_a_small_volume() -> None:
    """CPU Conv3d chooses its output layout from the input's size: at batch 1, 8^3 the
    first conv returns NCDHW from a channels_last_3d input, a revert at that shape."""
    r = run(M.Conv3dNet(), (1, 2, 8, 8, 8))
    assert layouts(r) == {"conv": NCHW, "norm": NCHW, "conv2": NCHW}
    assert [(f.node, f.kind.value) for f in r.findings if not f.intrinsic] == [("conv", "revert")]
    assert "input size" in r.findings[0].hint
    # the slow backend that computes NCDHW copies each channels_last_3d weight into it, every call
    assert [(f.node, f.kind.value, f.shape) for f in r.findings if f.intrinsic] == [
        ("conv", "revert", (8, 2, 3, 3, 3)),
        ("conv2", "revert", (8, 8, 3, 3, 3)),
    ]


def test_hotspot_bytes_by_hand() -> None:
    """InstanceNormNet at 1x3x8x8, float32: the norm output (1x8x8x8 = 512 elements, 2048 B)
    is written NCHW (2 x 2048 B), then conv2 converts it back (2 x 2048 B)."""
    r = audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=2048.0)
    assert [(h.rank, h.finding.node, h.finding.bytes, h.share) for h in r.hotspots] == [
        (1, "conv2", 4096, 0.5),
        (2, "norm", 4096, 0.5),
    ]
    assert [h.finding.est_seconds for h in r.hotspots] == [2.0, 2.0]
    assert r.summary.bytes_moved == 8192 and r.summary.est_seconds == 4.0
    assert [(x.op, x.roots, x.findings, x.bytes) for x in r.fixes] == [("InstanceNorm2d", ("norm",), 2, 8192)]


class Volume(nn.Module):
    """Conv3d -> op -> Conv3d at 2x2x16^3, where CPU Conv3d keeps channels_last_3d."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv3d(2, 8, 3, padding=1)
        self.c2 = nn.Conv3d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        y = self.c1(x)
        ops = {
            "avg_pool3d": lambda t: F.avg_pool3d(t, 2),
            "adaptive_avg_pool3d": lambda t: F.adaptive_avg_pool3d(t, 4),
            "adaptive_max_pool3d": lambda t: F.adaptive_max_pool3d(t, 4),
            "interpolate": lambda t: F.interpolate(t, size=(4, 4, 4), mode="area"),
            "instance_norm": lambda t: F.instance_norm(t),
            "max_pool3d": lambda t: F.max_pool3d(t, 2),
            "trilinear": lambda t: F.interpolate(t, scale_factor=2, mode="trilinear"),
            "group_norm": lambda t: F.group_norm(t, 2),
            "reflect_pad": lambda t: F.pad(t, (1,) * 6, mode="reflect"),
        }
        out: torch.Tensor = self.c2(ops[self.kind](y))
        return out


@pytest.mark.parametrize(
    ("kind", "reverts"),
    [
        ("avg_pool3d", True),
        ("adaptive_avg_pool3d", True),
        ("adaptive_max_pool3d", True),
        ("interpolate", True),  # area
        ("instance_norm", True),
        ("max_pool3d", False),
        ("trilinear", False),
        ("group_norm", False),  # GroupNorm keeps channels_last_3d on CPU
        ("reflect_pad", False),
    ],
)
def test_3d_ops_on_cpu(kind: str, reverts: bool) -> None:
    r = run(Volume(kind), (2, 2, 16, 16, 16))
    if reverts:
        assert [(f.op, f.kind.value) for f in r.findings] == [(kind, "revert"), ("Conv3d", "conversion")]
    else:
        assert r.findings == ()


class InPlaceSkip(nn.Module):
    """``out += skip`` with ``out`` NCHW (InstanceNorm) and ``skip`` channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.a(x))
        out += self.b(x)
        return out


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_in_place_mixed_add_is_found_under_every_capture(capture: str) -> None:
    r = audit(InPlaceSkip(), torch.randn(1, 3, 8, 8), bandwidth=1e9, capture=capture)
    (mixed,) = [f for f in r.findings if f.kind.value == "mixed"]
    assert mixed.op in ("add", "add_") and mixed.bytes == 2 * 4 * 8 * 8 * 4
    assert [f.kind.value for f in r.findings] == ["revert", "mixed"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_single_channel_volume_leaves_channels_last_without_a_copy(batch: int, threads: int) -> None:
    """A C == 1 volume is dense in both orders; at batch 1 CPU Conv3d computes straight into
    NCDHW: the region starts there, but no activation is transposed (0 bytes); the second conv's
    slow backend copies its channels_last_3d weight into NCDHW (its own copy, intrinsic)."""
    m = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1))
    r = audit(m, torch.randn(batch, 1, 16, 16, 16), bandwidth=1e9, threads=threads)
    expected = [("_0", "revert", 0)] if batch == 1 else []
    assert [(f.node, f.kind.value, f.bytes) for f in r.findings if not f.intrinsic] == expected
    weight = [("_1", 2 * 8 * 8 * 27 * 4)] if batch == 1 else []
    assert [(f.node, f.bytes) for f in r.findings if f.intrinsic] == weight
    assert r.summary.bytes_moved == r.summary.intrinsic_bytes == sum(b for _, b in weight)
    for f in (f for f in r.findings if not f.intrinsic):  # the conv kernel's own choice, not a channel-shuffle copy
        assert f.hint.startswith("the convolution kernel chose NCHW/NCDHW output"), f.hint


class SlicedSkip(nn.Module):
    """A skip path through a circular pad and a slice (NCHW-ordered, not dense) concatenated
    with a channels_last branch: the inputs disagree; cat itself has a channels_last kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.pad(self.a(x), (1, 1, 1, 1), mode="circular")[:, :, 1:-1, 1:-1]
        return self.c(torch.cat([skip, self.b(x)], 1))


def test_cat_of_a_sliced_nchw_input_is_mixed_not_a_revert() -> None:
    r = audit(SlicedSkip(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert [(f.node, f.kind.value, f.origin) for f in r.findings] == [
        ("pad", "revert", None),
        ("cat", "mixed", "pad"),
        ("c", "conversion", "pad"),
    ]
    cat = r.findings[1]
    assert "has no channels_last kernel" not in cat.hint and cat.bytes == 2 * 4 * 8 * 8 * 4
    assert [(x.op, x.findings) for x in r.fixes] == [("pad(circular)", 3)]


class StackedSum(nn.Module):
    """smp FPN's decoder merge: torch.stack(maps).sum(dim=0). The stack keeps each map NHWC
    (its channels are dim 2), the sum writes NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.stack([self.a(x), self.b(x)]).sum(dim=0))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_sum_over_a_stack_of_channels_last_maps_reverts(capture: str) -> None:
    x = torch.randn(1, 3, 8, 8)
    r = audit(StackedSum(), x, bandwidth=1e9, capture=capture)
    assert [(f.op, f.kind.value) for f in r.findings] == [("sum", "revert"), (r.findings[1].op, "conversion")]
    revert = r.findings[0]
    assert revert.bytes == 2 * 8 * 8 * 8 * 4 and "stack" in revert.hint and "has no channels_last" not in revert.hint
    assert r.findings[1].origin == revert.node
    assert r.summary.bytes_moved == eager_bytes(StackedSum(), (x,)).added


class TokensBack(nn.Module):
    """diffusers' Transformer2DModel output: tokens (B, HW, C) reshaped to (B, H, W, C),
    permuted to NCHW and made contiguous: a copy in either layout (channels_last adds nothing
    there), then a 1x1 conv that converts back (channels_last's real cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.proj(self.a(x).flatten(2).transpose(1, 2))
        return self.out(t.reshape(b, h, w, 8).permute(0, 3, 1, 2).contiguous())


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_copy_made_in_either_layout_costs_nothing_extra(capture: str) -> None:
    x = torch.randn(1, 3, 8, 8)
    r = audit(TokensBack(), x, bandwidth=1e9, capture=capture)
    kinds = [(f.kind.value, f.bytes) for f in r.findings]
    act = 8 * 8 * 8 * 4
    assert kinds == [("revert", 0), ("conversion", 2 * act)]  # still where channels_last is lost
    assert any(n.startswith("NCHW baseline: 1 revert(s) copy in NCHW too") for n in r.meta.capture_notes)
    assert r.summary.bytes_moved == eager_bytes(TokensBack(), (x,)).added


def test_the_nchw_baseline_runs_the_graph_without_generating_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fx audit interprets the graph on the audit copy, the NCHW baseline too: no GraphModule
    (whose code generation costs ~50 ms on a 1,600-node graph) is built unless a later step
    (a repair, a backward pass) asks for one."""
    built: list[str] = []
    real_init = torch.fx.GraphModule.__init__

    def counting(self: torch.fx.GraphModule, *a: Any, **k: Any) -> None:
        built.append(type(self).__name__)
        real_init(self, *a, **k)

    monkeypatch.setattr(torch.fx.GraphModule, "__init__", counting)
    r = audit(TokensBack(), torch.randn(1, 3, 8, 8), bandwidth=1e9, capture="fx")
    assert any(n.startswith("NCHW baseline: 1 revert(s) copy in NCHW too") for n in r.meta.capture_notes)
    assert built == []
