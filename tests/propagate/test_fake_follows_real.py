"""A fake-mode audit gives what a real one gives where the fake run differs from eager in ways
the meta kernels do not show: a fake tensor's C++ ``device()`` queries reach the eager capture's
recorder as ``prim.device`` calls (not ops of the model), and GroupNorm's CPU kernel follows its
input's ``suggest_memory_format()``, so a channels_last input whose size-1 batch dim has another
stride (a view after a transpose) gets NCHW there."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import nhwc_audit
from tests.support import relayed


class NormThenSelect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).permute(0, 2, 3, 1)[:, 0]


class NormAfterTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.proj = nn.Linear(64, 64)
        self.norm = nn.GroupNorm(8, 64)
        self.out = nn.Conv2d(64, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        n, c, hh, ww = h.shape
        t = self.proj(h.flatten(2).transpose(1, 2)).transpose(1, 2).view(n, c, hh, ww)
        return self.out(self.norm(t))


def _same(real: nhwc_audit.AuditReport, fake: nhwc_audit.AuditReport) -> None:
    # (a size-1 dim's stride may differ: FakeTensor keeps the input's where some CPU kernels do not)
    def layouts(r: nhwc_audit.AuditReport) -> list[tuple[str, list[tuple[tuple[int, ...], str]]]]:
        return [(n.name, [(o.shape, o.layout.value) for o in n.outputs]) for n in r.nodes]

    assert layouts(fake) == layouts(real)
    assert [(f.kind, f.node, f.bytes) for f in fake.findings] == [(f.kind, f.node, f.bytes) for f in real.findings]
    assert fake.summary.nodes == real.summary.nodes and fake.summary.spatial_nodes == real.summary.spatial_nodes


@pytest.mark.parametrize("capture", ["hooks", "fx"])
def test_a_fake_eager_capture_records_the_models_ops_only(capture: str) -> None:
    torch.manual_seed(0)
    model, x = NormThenSelect().eval(), torch.randn(1, 3, 16, 16)
    real = nhwc_audit.audit(model, x, mode="real", capture=capture, bandwidth=1e10)
    fake = nhwc_audit.audit(model, x, mode="fake", capture=capture, bandwidth=1e10)
    assert not any("prim." in n.target for n in fake.nodes)
    _same(real, fake)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_the_group_norm_correction_follows_the_suggested_format(capture: str) -> None:
    torch.manual_seed(0)
    model, x = NormAfterTokens().eval(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():  # eager: a channels_last view the CPU kernel reads as NCHW
        cl = nhwc_audit.convert(model)
        h = cl.conv(x.contiguous(memory_format=torch.channels_last))
        t = cl.proj(h.flatten(2).transpose(1, 2)).transpose(1, 2).view(1, 64, 16, 16)
        assert t.is_contiguous(memory_format=torch.channels_last) and cl.norm(t).is_contiguous()
    real = nhwc_audit.audit(model, x, mode="real", capture=capture, bandwidth=1e10)
    fake = nhwc_audit.audit(model, x, mode="fake", capture=capture, bandwidth=1e10)
    (norm,) = [n for n in real.nodes if n.op_name.lower() in ("groupnorm", "group_norm") and n.outputs[0].rank == 4]
    assert norm.outputs[0].layout.value == "contiguous"
    _same(real, fake)


class ScaledThenNormThenFirPad(nn.Module):
    """diffusers' attention block hands back a batch-1 map viewed from tokens (strides (C, 1, W*C,
    C)); ``x / rescale_output_factor`` keeps that stride on the CPU (its operands differ in shape,
    so TensorIterator strides the output by the input's), so the GroupNorm after it writes NCHW;
    then ResnetBlock2D(kernel="fir") pads a 6D view of it (upfirdn2d_native), a revert."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, c, 3, padding=1)
        self.proj = nn.Linear(c, c)
        self.norm = nn.GroupNorm(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        t = self.proj(y.view(b, c, h * w).transpose(1, 2))
        z = (t.transpose(-1, -2).reshape(b, c, h, w) + y) / 1.0
        z = nn.functional.silu(self.norm(z))
        u = z.reshape(-1, h, w, 1).view(-1, h, 1, w, 1, 1)
        return nn.functional.pad(u, [0, 0, 0, 1, 0, 0, 0, 1])


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_an_op_on_a_batch_1_view_from_tokens_keeps_the_strides_eager_keeps(capture: str) -> None:
    torch.manual_seed(0)
    model, x = ScaledThenNormThenFirPad().eval(), torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # eager: the division keeps the view's batch stride, GroupNorm then writes NCHW
        cl = nhwc_audit.convert(model)
        y = cl.conv(x.contiguous(memory_format=torch.channels_last))
        t = cl.proj(y.view(1, 16, 64).transpose(1, 2)).transpose(-1, -2).reshape(1, 16, 8, 8)
        assert (t / 1.0).stride() == (16, 1, 128, 16) and cl.norm(t / 1.0).is_contiguous()
    real = nhwc_audit.audit(model, x, mode="real", capture=capture, bandwidth=1e10)
    fake = nhwc_audit.audit(model, x, mode="fake", capture=capture, bandwidth=1e10)
    assert [f.kind.value for f in real.findings] == ["revert"] and real.findings[0].bytes == 8192
    _same(real, fake)


class TokensResizedThenConv(nn.Module):
    """smp's SegFormer decoder: tokens through a Linear, reshaped back to a batch-1 map (eager
    strides the size-1 batch dim 64, FakeTensor 16,384), resized bilinearly (the CPU kernel picks
    NCHW from eager's strides) and fused by a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.linear, self.fuse = nn.Conv2d(3, 32, 3, 2, 1), nn.Linear(32, 64), nn.Conv2d(64, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, _, h, w = x.shape
        y = self.linear(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        return self.fuse(nn.functional.interpolate(y, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_fake_train_audit_strides_a_batch_1_view_as_eager(capture: str) -> None:
    """A backward follows a train audit's run: the view is restrided in place, keeping its own
    backward (an ``as_strided`` of it would hand the gradient the source's strides), and so is it
    in the forward the backward runs from: the conv's backward re-lays the NCHW resize too."""
    torch.manual_seed(0)
    model, x = TokensResizedThenConv().train(), torch.randn(1, 3, 32, 32)
    real = nhwc_audit.audit(model, x, mode="real", capture=capture, bandwidth=1e10, train=True)
    fake = nhwc_audit.audit(model, x, mode="fake", capture=capture, bandwidth=1e10, train=True)
    found = [(f.kind.value, f.node, f.bytes) for f in real.findings]
    relays = [f for f in real.findings if f.kind.value != "backward"] + relayed(real.findings)
    assert [(f.kind.value, f.bytes) for f in relays] == [("revert", 0), ("conversion", 524288), ("backward", 524288)]
    assert [(f.kind.value, f.node, f.bytes) for f in fake.findings] == found


class FlattenedInPlace(nn.Module):
    """``torch.flatten(y, 3)`` (start_dim == end_dim) returns ``y`` itself: restriding it in place
    would restride ``y`` for its other reader too (eager keeps its strides)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.lin, self.fuse = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        a = torch.flatten(y, 3).sum()
        return self.fuse(nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear")) * a


def test_a_view_that_is_its_source_is_not_restrided() -> None:
    torch.manual_seed(0)
    model, x = FlattenedInPlace().train(), torch.randn(1, 3, 16, 16)
    real = nhwc_audit.audit(model, x, mode="real", bandwidth=1e10, train=True)
    fake = nhwc_audit.audit(model, x, mode="fake", bandwidth=1e10, train=True)
    assert [(f.kind, f.node, f.bytes) for f in fake.findings] == [(f.kind, f.node, f.bytes) for f in real.findings]


class NamedOutput(nn.Module):
    Out = collections.namedtuple("Out", ["feat", "out"])

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(self.a(x))
        return self.Out(y, self.b(y))


def test_a_fake_audit_of_a_namedtuple_output_runs() -> None:
    """The fake run's correction of a tuple rebuilt a namedtuple from a list (a TypeError)."""
    torch.manual_seed(0)
    model, x = NamedOutput().eval(), torch.randn(2, 3, 8, 8)
    real = nhwc_audit.audit(model, x, mode="real", bandwidth=1e10)
    _same(real, nhwc_audit.audit(model, x, mode="fake", bandwidth=1e10))


class _ScalarPower(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return 2.0**y


@pytest.mark.parametrize("op", [nn.LogSigmoid, _ScalarPower])
def test_an_op_too_large_to_probe_whole_is_asked_on_cut_copies(op: type[nn.Module]) -> None:
    """Above the probe's size (a 1 x 16 x 400 x 400 map: 5.1 M elements in and out) the CPU kernel
    is asked on copies with H and W cut to 3 in the same dim order: LogSigmoid and ``2 ** x`` write
    NCHW there, which the fake run predicted channels_last (no revert, no conversion)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), op(), nn.Conv2d(16, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 400, 400)
    real = nhwc_audit.audit(model, x, mode="real", bandwidth=1e10)
    assert [f.kind.value for f in real.findings] == ["revert", "conversion"]
    _same(real, nhwc_audit.audit(model, x, mode="fake", bandwidth=1e10))


class KeysFromAMap(nn.Module):
    """Keys made from a map as tokens, layer-normed over channels and read transposed by an
    attention matmul (torchvision mvit's pooled keys): the gradient reaches the LayerNorm
    transposed; its CPU backward writes a contiguous gradient (the map's channels_last order), its
    meta kernel one strided as the incoming gradient (NCHW order)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.q = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.norm(self.conv(x).flatten(2).transpose(1, 2))
        return self.q(k[:, :16]) @ k.transpose(1, 2)


def test_a_layer_norm_over_tokens_too_large_to_probe_whole_is_asked_with_its_channels_whole() -> None:
    """Above the probe's size (2 x 16,384 tokens x 64 channels: 2.1 M elements a tensor) the CPU
    kernel was asked on cut copies, which a layer norm refuses (its ``normalized_shape`` is the
    cut dim): the fake train audit took the meta kernel's strides and charged the convolution's
    backward 16.8 MB that a real audit, and eager, do not (mvit_v2_s: 598 MB against 560 MB)."""
    torch.manual_seed(0)
    model, x = KeysFromAMap().train(), torch.randn(2, 3, 128, 128)
    real = nhwc_audit.audit(model, x, mode="real", train=True, bandwidth=1e10)
    fake = nhwc_audit.audit(model, x, mode="fake", train=True, bandwidth=1e10)
    backward = [(f.node, f.bytes) for f in real.findings if f.kind.value == "backward"]
    assert backward == [(f.node, f.bytes) for f in fake.findings if f.kind.value == "backward"]
    assert [n.grads for n in fake.nodes if n.name == "conv"] == [n.grads for n in real.nodes if n.name == "conv"]
    from tests.eager_bytes import eager_backward_bytes

    truth = eager_backward_bytes(model, (x,))
    assert sum(b for _, b in backward) == truth.added and not relayed(real.findings) and truth.relayed == 0


class ScaledTokensThenGroupNorm(nn.Module):
    """A batch-1 map viewed back from tokens (strides (C, 1, W*C, C), as diffusers' attention
    leaves it), then a pointwise op, then GroupNorm, which follows ``suggest_memory_format``: the
    CPU's ``x / 2`` keeps the odd batch stride (GroupNorm then writes NCHW), ``relu(x)`` does not."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv, self.lin = nn.Conv2d(3, 64, 1), nn.Linear(64, 64)
        self.gn, self.out = nn.GroupNorm(8, 64), nn.Conv2d(64, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, c, hh, ww = h.shape
        h = self.lin(h.flatten(2).transpose(1, 2)).transpose(-1, -2).reshape(b, c, hh, ww)
        return self.out(self.gn(h / 2.0 if self.op == "div" else torch.relu(h)))


@pytest.mark.parametrize("op", ["div", "relu"])
def test_an_odd_batch_stride_is_asked_on_cut_copies_above_the_probes_size(op: str) -> None:
    """At 1x64x184x184 (4.3 M elements in and out, over the probe's 4M) the fake run kept
    FakeTensor's dense strides for ``x / 2`` and missed the revert's conversion after the
    GroupNorm (17.3 MB forward, 34.7 MB backward, as real mode and eager charge)."""
    torch.manual_seed(0)
    model, x = ScaledTokensThenGroupNorm(op).train(), torch.randn(1, 3, 184, 184)
    real = nhwc_audit.audit(model, x, mode="real", train=True, bandwidth=1e10)
    fake = nhwc_audit.audit(model, x, mode="fake", train=True, bandwidth=1e10)
    assert [(f.kind, f.node, f.bytes) for f in fake.findings] == [(f.kind, f.node, f.bytes) for f in real.findings]
    moved = sum(f.bytes for f in real.findings if f.kind.value != "backward") + sum(
        f.bytes for f in relayed(real.findings)
    )
    assert (moved > 0) == (op == "div")  # (the convolutions' weight gradients aside)


class WrittenIntoAView(nn.Module):
    """A conv's channels_last map written in place through a view: its first channels added to
    (``y[:, :4] += ...``), its left half added to, or its first channels scaled through a permute
    (``y.permute(0, 2, 3, 1)[..., :4] *= 0.5``)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.conv, self.side = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.where == "channels":
            y[:, :4] += self.side(x)[:, :4]
        elif self.where == "columns":
            y[:, :, :, :8] += self.side(x)[:, :, :, :8]
        elif self.where == "permuted":
            z = y.permute(0, 2, 3, 1)
            z[..., :4] *= 0.5
        else:  # the permuted slice itself is the output: NCHW's backward copies its gradient alike
            v = y.permute(0, 2, 3, 1)[..., :4]
            v *= 2.0
            return v
        return y


@pytest.mark.parametrize("where", ["channels", "columns", "permuted", "permuted_returned"])
def test_a_fake_train_audit_charges_the_backward_of_a_write_into_a_view_as_eager(where: str) -> None:
    """Autograd regenerates a view's backward after an in-place write to it: for a CPU tensor one
    ``AsStridedBackward0``, whose gradient is laid as the base's memory (channels_last here); for a
    fake tensor a replay of the view ops, whose gradient starts contiguous. The fake train audit
    charged 49,152 B and 65,536 B where real mode and eager charge 32,768 and 49,152 (the
    contiguous part summed into the base's channels_last gradient), and 0 where they charge 16,384
    (the permuted slice's gradient laid into the base). Where the permuted slice is the output,
    NCHW's backward lays its gradient into the base alike: both modes charged 16,384 where eager
    adds 0 (``as_strided``'s backward keeps order only where the view does: the NCHW baseline ran
    only for models that reorder dims)."""
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = WrittenIntoAView(where).train(), torch.randn(2, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    assert (eager_backward_bytes(model, (x,)).relayed > 0) == (where != "permuted_returned")
    for mode in ("real", "fake"):
        report = nhwc_audit.audit(model, x, mode=mode, train=True, bandwidth=1e10)  # type: ignore[arg-type]
        assert report.meta.backward
        assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth, mode


class IndexedTable(nn.Module):
    """A table indexed by a buffer in forward (torchvision MaxViT's relative position bias): the
    trace stows the flattened index as a tensor constant, a fake tensor in a fake audit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.table = nn.Parameter(torch.randn(16, 8))
        self.register_buffer("index", torch.arange(16).flip(0).reshape(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table[self.index.view(-1)]
        return self.conv(x) + bias.t().reshape(1, 8, 4, 4)


def test_a_fake_audit_of_a_model_whose_trace_stows_constants_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """Telling constants that share memory apart read each one's data pointer: a fake tensor's
    warns ("Accessing the data pointer of FakeTensor is deprecated") on stderr, and is 0 for all."""
    torch.manual_seed(0)
    for mode in ("real", "fake"):
        nhwc_audit.audit(IndexedTable().train(), torch.randn(2, 3, 4, 4), mode=mode, train=True, bandwidth=1e10)
    assert capfd.readouterr().err == ""


def test_a_convolutions_backward_too_large_to_ask_whole_is_asked_on_a_cut_copy() -> None:
    """The second convolution's gradient (2 x 16 x 384 x 384, over the probe's 4M elements) was
    never asked: the fake audit missed its weight gradient's copy inside the kernel, and the NCHW
    strided convolution's copy of its input gradient (37.7 MB), which real mode and eager see.
    Asked on a copy cut along H and W that picks the same backend, scaled back."""
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 8, 3, padding=1),
    ).train()
    x = torch.randn(2, 3, 384, 384)
    found = {}
    for mode in ("real", "fake"):
        r = nhwc_audit.audit(model, x, mode=mode, train=True, bandwidth=1e10)
        found[mode] = ([(f.node, f.bytes) for f in r.findings], [(n.name, n.nchw_backward_inside) for n in r.nodes])
    assert found["fake"] == found["real"]
    assert ("_2", 2 * 2 * 16 * 384 * 384 * 4) in found["real"][1]
    assert sum(b for _, b in found["real"][0]) == eager_backward_bytes(model, (x,)).added == 2 * 4 * (16 * 27 + 8 * 288)


def test_a_cut_scales_a_grouped_convolutions_copies_of_its_groups() -> None:
    """On the slow backend (one thread) a grouped convolution copies each group's view of its
    gradient and input, shaped (1, C / groups, H, W): the cut kept only copies shaped as the whole
    input or gradient, and the fake audit charged 0 where real mode charges 69.6 MB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.Conv2d(48, 48, 1, groups=3)).train()
    x = torch.randn(1, 3, 301, 301)  # 48 x 301 x 301: over the probe's 4M elements
    found = {}
    for mode in ("real", "fake"):
        r = nhwc_audit.audit(model, x, mode=mode, train=True, bandwidth=1e10, threads=1)
        found[mode] = [(f.node, f.bytes, f.intrinsic) for f in r.findings if f.kind.value == "backward"]
    assert found["fake"] == found["real"] and sum(b for _, b, _ in found["real"]) == 69_581_568


class _Gram(nn.Module):
    """A Gram matrix of a map's ``flatten(2)`` (style losses), or attention over its pixels."""

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.attention = attention
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        f = x.flatten(2)
        if self.attention:
            t = f.transpose(1, 2)
            return self.b((torch.softmax(t @ f, -1) @ t).transpose(1, 2).reshape(x.shape))
        g = f @ f.transpose(1, 2)
        return self.b(x * g.diagonal(dim1=1, dim2=2)[:, :, None, None])


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_bfloat16_matmul_of_a_flattened_map_is_asked_with_the_strides_eager_views_give(
    batch: int, attention: bool
) -> None:
    """Inside ``matmul`` a view of size-1 dims (the batch at batch 1) is strided by FakeTensor
    otherwise than by eager, and the CPU bfloat16 ``bmm`` reads those strides to decide which
    operand it copies: NCHW copies the transposed one, channels_last the other, the same bytes. A
    fake audit asked the NCHW kernel with the fake strides, saw no copy, and charged channels_last's
    (16,384 B where the real audit and eager charge 0)."""
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    m, x = _Gram(attention).eval().to(torch.bfloat16), torch.randn(batch, 3, 16, 16).to(torch.bfloat16)
    truth = eager_bytes(m, (x,)).added
    for mode in ("real", "fake"):
        r = nhwc_audit.audit(m, x, bandwidth=1e9, mode=mode)  # type: ignore[arg-type]
        assert r.summary.bytes_moved == truth, (mode, [(f.kind.value, f.op, f.bytes) for f in r.findings])


class NormOfAView(nn.Module):
    """A BatchNorm of a channels_last map viewed in no memory format (transposed, or a stepped slice): the
    CPU kernel writes NCHW, FakeTensor kept the view's strides, and fake mode charged nothing where real
    mode and eager charge the revert (a composition fuzz's find)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.stem, self.bn = how, nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.bn(y.transpose(2, 3) if self.how == "transpose" else y[..., ::2]))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("how", ["transpose", "stepped"])
def test_a_batch_norm_of_a_view_in_no_format_is_strided_as_the_cpu_kernel_strides_it(
    how: str, capture: str, train: bool
) -> None:
    torch.manual_seed(0)
    model, x = NormOfAView(how).train(train), torch.randn(1, 3, 8, 23)
    real = nhwc_audit.audit(model, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    fake = nhwc_audit.audit(model, x, bandwidth=1e9, capture=capture, mode="fake")  # type: ignore[arg-type]
    assert real.summary.bytes_moved > 0
    assert fake.summary.bytes_moved == real.summary.bytes_moved


class NormedTable(nn.Module):
    """A position table of batch 1 (a 4D parameter, converted channels_last) group-normed in forward
    and added to the map: the CPU kernel keeps it channels_last, the fake one writes NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.c1(x) + torch.nn.functional.group_norm(self.pos, 2))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_the_group_norm_correction_follows_a_parameter_as_an_activation(capture: str) -> None:
    """fx and export passed the fake-run corrections a node's activations only: a group_norm of a 4D
    parameter kept the fake kernel's NCHW (8,192 B: a revert and a mixed add, where eager and a real
    audit move nothing); the eager recording passed every input, and was right."""
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    model, x = NormedTable().eval(), torch.randn(2, 4, 8, 8)
    assert eager_bytes(model, (x,)).added == 0
    for mode in ("real", "fake"):
        r = nhwc_audit.audit(model, x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
        assert r.summary.bytes_moved == 0, (mode, [(f.kind.value, f.op, f.bytes) for f in r.findings])
