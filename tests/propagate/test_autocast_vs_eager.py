"""Audits under autocast against eager PyTorch under the same autocast (:mod:`tests.eager_bytes`).

Autocast casts an op's inputs, keeping their layout, to the dtype the op computes in, and the
kernel re-lays the cast: a float32 weight standardised in forward (NFNet, BiT) is re-laid by a
bfloat16 convolution in bfloat16. The audit charged its float32 bytes (timm nfnet_l0 at 64x64:
71,154,432 B where eager moves 53,365,824)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from tests import models as M
from tests.eager_bytes import eager_backward_bytes, eager_bytes
from tests.propagate import test_backward_vs_eager as back


class PooledInFloat32(nn.Module):
    """CPU autocast runs ``avg_pool3d`` in float32 (CUDA's runs GroupNorm so): the bfloat16 volume is
    cast to float32 channels_last_3d, the pool writes NCDHW float32, and the next convolution re-lays
    the bfloat16 cast of it; joined with a bfloat16 map of it by a cat or an add."""

    def __init__(self, join: str = "") -> None:
        super().__init__()
        self.join = join
        self.a, self.b = nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(16 if join == "cat" else 8, 8, 3, padding=1)
        self.c = nn.Conv3d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.functional.avg_pool3d(self.a(x), 2)
        if self.join == "cat":  # CPU autocast casts the bfloat16 map to float32 first
            return self.b(torch.cat([p, self.c(p)], 1))
        return self.b(p + self.c(p) if self.join == "add" else p)  # an add reads each in its own dtype


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # one source line for every conv (UperNet's ConvModule)


class TokensThenConvs(nn.Module):
    """A map normed as tokens (channels_last-strided in the NCHW model too) into two convs on one
    source line: NCHW re-lays autocast's bfloat16 cast of the first conv's weight (a parameter's,
    which the ground truth charges no more than the parameter), channels_last converts the second
    conv's input (made NCHW by ``.contiguous()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.ln, self.a, self.b = nn.Conv2d(3, 16, 1), nn.LayerNorm(16), _Conv(16, 16), _Conv(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(self.a(h).contiguous())


class Float32Head(nn.Module):
    """A head forward keeps in float32 (``torch.autocast(..., enabled=False)``): fx traced its ops,
    not the block, and the audit ran it in bfloat16 (32,768 B where eager autocast moves 49,152)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n(self.a(x))
        with torch.autocast("cpu", enabled=False):
            return self.h(y.float())


class CatOfAPooledMap(nn.Module):
    """A map concatenated with its float32 mean broadcast back over it (``expand_as``): the NCHW
    baseline charged the broadcast's stored N x C a move (its channels innermost of what it holds),
    the channels_last cat's own record does not, and the node netted 128 B too little."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.cat([h, h.float().mean((2, 3), keepdim=True).expand_as(h)], 1))


CASES: dict[str, Callable[[], nn.Module]] = {
    "cat_of_a_pooled_map": CatOfAPooledMap,
    "float32_head": Float32Head,
    "tokens_then_convs_on_one_line": TokensThenConvs,
    "pooled_in_float32": PooledInFloat32,
    "float32_and_bfloat16_maps_concatenated": lambda: PooledInFloat32("cat"),
    "bfloat16_and_float32_maps_added": lambda: PooledInFloat32("add"),
    "standardised_conv": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), M.StandardisedConv(8, 8, 3)),
    "instance_norm": M.InstanceNormNet,
    "se_block": M.SEBlock,
    "cat_mixed": M.CatMixed,
    "convnext_block": lambda: nn.Sequential(nn.Conv2d(3, 8, 1), M.ConvNeXtBlock()),
}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_an_autocast_audit_charges_what_eager_autocast_moves(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = CASES[name]().eval()
    x = torch.randn(2, 3, 8, 8, 8) if isinstance(model, PooledInFloat32) else torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_bytes(model, (x,)).added
    report = audit(model, x, autocast=True, mode=mode, bandwidth=1e9)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == expected, [(f.kind.value, f.node, f.bytes) for f in report.findings]


def test_a_standardised_weight_is_charged_in_the_dtype_the_convolution_reads_it() -> None:
    torch.manual_seed(0)
    model = CASES["standardised_conv"]().eval()
    report = audit(model, torch.randn(2, 3, 16, 16), autocast=True, bandwidth=1e9)
    mixed = [f for f in report.findings if f.kind.value == "mixed"]
    assert [f.bytes for f in mixed] == [2 * 8 * 8 * 3 * 3 * 2]  # read and written, bfloat16


class NormedPooledHead(nn.Module):
    """EfficientNet's head: convolution, BatchNorm, SiLU, a global pool. In training the pool hands
    the SiLU an NCHW gradient; the CPU's BatchNorm backward writes it channels_last. Under bfloat16
    autocast a fake run asked the kernel with the saved statistics FakeTensor gives in bfloat16 (the
    CPU kernel keeps float32 ones and refuses others), took NCHW and charged the convolution too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(nn.functional.silu(self.bn(self.conv(x))), 1).flatten(1))


class GroupNormed(nn.Module):
    """A GroupNorm of an NCHW map between convolutions. Under bfloat16 autocast its CPU backward
    gives a bfloat16 NCHW gradient; a fake run asked the kernel with FakeTensor's bfloat16 N x G
    statistics, which it refuses ("mixed dtype"), and kept the meta kernel's float32 channels_last
    gradient: 65,536 B where eager moves 98,304 (over tokens: 196,608 where eager moves 163,840)."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.Conv2d(16, 16, 1)
        self.c, self.tokens = nn.Conv2d(16, 8, 1), tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if not self.tokens:
            return self.c(self.b(self.n(y.contiguous())))
        b, c, h, w = y.shape
        t = nn.functional.unfold(y, kernel_size=2, stride=2).reshape(b, c, 4, -1)
        t = t + self.b(self.n(t))
        return self.c(nn.functional.fold(t.reshape(b, c * 4, -1), output_size=(h, w), kernel_size=2, stride=2))


TRAIN_CASES: dict[str, Callable[[], nn.Module]] = {
    "normed_pooled_head": NormedPooledHead,
    "group_normed": GroupNormed,
    "group_normed_tokens": lambda: GroupNormed(tokens=True),
    **{
        n: back.CASES[n] for n in ("instance_norm", "se_block", "shuffle", "transposed_conv", "normed_tokens_then_conv")
    },
}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_an_autocast_train_audit_charges_what_eager_autocast_backward_adds(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = TRAIN_CASES[name]().train()
    x = torch.randn(2, 3, 4, 4) if name == "normed_pooled_head" else back._input(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, autocast=True, train=True, mode=mode, bandwidth=1e9)  # type: ignore[arg-type]
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == expected, [(f.node, f.bytes) for f in report.findings if f.kind.value == "backward"]


class MaskInItsDtype(nn.Module):
    """A tensor made in the dtype of a map (monai's drop_connect, diffusers' AlphaBlender), in a model
    fx cannot trace (``len(x)``): torch.export traced outside autocast baked float32 into the graph,
    and a second output read in float32 made the check reject it (no backward audited at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        y = nn.functional.relu(h * torch.ones(len(x), 1, 1, 1, dtype=h.dtype))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)), y.mean((1, 2, 3))


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_an_exported_graph_is_traced_in_the_dtypes_autocast_computes_in(mode: str) -> None:
    torch.manual_seed(0)
    model, x = MaskInItsDtype().train(), torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, autocast=True, train=True, mode=mode, bandwidth=1e9)  # type: ignore[arg-type]
    assert report.meta.capture == "export" and report.meta.backward, report.meta.capture_notes
    assert 0 < sum(f.bytes for f in report.findings if f.kind.value == "backward") == expected


class MixedWithoutAutocast(nn.Module):
    """Dtypes mixed by the model itself, no autocast: every op reads each input in its own dtype (a
    CPU cat casts first only under autocast)."""

    def __init__(self, join: str) -> None:
        super().__init__()
        self.join = join
        self.a, self.n, self.o = nn.Conv2d(3, 8, 1), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 1)
        self.pe = nn.Parameter(torch.randn(1, 8, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b = self.n(h)
        if self.join == "cat":
            y = torch.cat([h.half(), b], 1)[:, :8]
        elif self.join == "stack":
            y = torch.stack([h.half(), b], 0).sum(0)
        else:  # a float16 activation times a float32 parameter
            y = self.pe * b.half()
        return self.o(y.float())


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("join", ["cat", "stack", "parameter"])
def test_mixed_dtypes_without_autocast_are_read_in_their_own(join: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = MixedWithoutAutocast(join).eval(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, mode=mode, bandwidth=1e9)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added


class _CastLikeTheMap(nn.Module):
    """An instance norm in float32 cast back like the map (``type_as``, ``to(other)``): the cast reads
    the norm's NCHW output only; the map lends its dtype."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n = F.instance_norm(y.float())
        return self.b(n.type_as(y) if self.how == "type_as" else n.to(y))  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("how", ["type_as", "to"])
def test_a_cast_like_another_tensor_reads_only_its_source(how: str, capture: str, mode: str) -> None:
    """fx and export charged the cast 16,384 B ('mixed', then 'revert') for the layout of the
    tensor it takes its dtype from; eager moves nothing there."""
    torch.manual_seed(0)
    model, x = _CastLikeTheMap(how).eval(), torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, capture=capture, mode=mode, autocast=True)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in report.findings]


def own_block(inner: bool) -> contextlib.AbstractContextManager[object]:
    """Forward's own autocast block (``inner``), or none: the audit's autocast, or eager's around the
    call, applies (``autocast(enabled=False)`` would turn theirs off)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if inner else contextlib.nullcontext()


class FlowWarpInItsOwnAutocast(nn.Module):
    """A flow warp inside forward's own autocast block: CPU autocast runs ``grid_sample`` in float32,
    casting the bfloat16 map and the permuted bfloat16 grid first; the NCHW model's kernel makes the
    float32 cast of the grid contiguous. The NCHW baseline sized that copy in bfloat16 (fx and export
    charged 45,056 B where eager moves 40,960): an op whose floating inputs share one dtype and which
    writes another computes in the one it writes."""

    def __init__(self, inner: bool) -> None:
        super().__init__()
        self.inner = inner
        self.c1, self.flow, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_block(self.inner):
            y = self.c1(x)
            return self.c2(F.grid_sample(y, self.flow(y).permute(0, 2, 3, 1), align_corners=False))


class OneChannelProjection(nn.Module):
    """A non-local block's projection to one channel, viewed back from tokens and projected up: in
    bfloat16 the oneDNN kernel of the 1 x 1 convolution of the one-channel map copies its output in
    either layout. A kernel path was keyed by the formats its tensors are dense in, and the 3 -> 1
    convolution before it (no copy) answered for it in the NCHW run: its copy was charged as
    channels_last's (2,880 B where eager moves 1,440)."""

    def __init__(self, inner: bool) -> None:
        super().__init__()
        self.inner = inner
        self.c1, self.g = nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(3, 1, 1)
        self.o, self.c2 = nn.Conv2d(1, 3, 1), nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_block(self.inner):
            y = self.c1(x)
            n, _, h, w = y.shape
            return self.c2(y + self.o(self.g(y).flatten(1).view(n, 1, h, w)))


class MixedDtypesAutocastCasts(nn.Module):
    """Ops with a float32 and a bfloat16 activation inside forward's own autocast block, which the
    device's autocast casts to one dtype before the kernel runs (PyTorch's dispatcher has an
    autocast kernel for them): ``grid_sample`` to float32 (a float32 map warped by a bfloat16 flow:
    fx and export charged 45,056 B where eager moves 40,960), the CPU's ``cat`` and ``stack`` to the
    widest (a NCHW float32 map beside a bfloat16 one: 11,520 where eager moves 13,824). Their nodes
    ran under autocast without the audit's: each record says so."""

    def __init__(self, inner: bool, op: str) -> None:
        super().__init__()
        self.inner, self.op = inner, op
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.flow, self.c3 = nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(8 if op == "grid_sample" else 16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_block(self.inner):
            y = self.c1(x)
            if self.op == "grid_sample":
                return self.c3(F.grid_sample(y.float(), self.flow(y).permute(0, 2, 3, 1), align_corners=False))
            z = self.c2(x).float().contiguous()
            both = torch.cat([y, z], 1) if self.op == "cat" else torch.stack([y, z], 1).flatten(1, 2)
            return self.c3(both)


class ExpandedGridAutocastCasts(nn.Module):
    """A stored sampling grid (restrided by the conversion, as every 4D buffer), cast to bfloat16 and
    expanded over the batch, into ``grid_sample`` beside a float32 map: autocast casts the grid to
    float32 first, and the cast of an expanded tensor is a dense copy of every element, which the kernel
    then makes contiguous. fx and export sized that copy by what the expand stores, one batch's (81,920 B
    where eager moves 98,304)."""

    def __init__(self, inner: bool) -> None:
        super().__init__()
        self.inner, self.conv, self.c2 = inner, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.register_buffer("pos", torch.randn(1, 8, 16, 16))
        self.register_buffer("grid", torch.rand(1, 16, 16, 2) * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with own_block(self.inner):
            a = self.conv(x)
            grid = self.grid.to(a.dtype).expand(a.shape[0], -1, -1, -1)
            return self.c2(F.grid_sample(self.pos.expand(a.shape[0], -1, -1, -1), grid, align_corners=False) + a)


INNER_CASES: dict[str, tuple[Callable[[bool], nn.Module], tuple[int, ...]]] = {
    "flow_warp": (FlowWarpInItsOwnAutocast, (2, 8, 16, 16)),
    "expanded_grid": (ExpandedGridAutocastCasts, (2, 3, 16, 16)),
    "one_channel_projection": (OneChannelProjection, (2, 8, 6, 10)),
    **{
        f"mixed_dtypes_{op}": (functools.partial(MixedDtypesAutocastCasts, op=op), (2, 8, 6, 6))
        for op in ("grid_sample", "cat", "stack")
    },
}
"""Models with an autocast block of their own (``inner``), audited as they are or without it under the
audit's autocast, and the input shape each is audited at."""


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("inner", [True, False], ids=["forward_autocast", "audit_autocast"])
@pytest.mark.parametrize("name", sorted(INNER_CASES))
def test_forward_s_own_autocast_is_charged_what_eager_moves(name: str, inner: bool, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    build, shape = INNER_CASES[name]
    model, x = build(inner).eval(), torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, capture=capture, mode=mode, autocast=not inner)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in report.findings]


class MixedInABlockWithoutAutocast(nn.Module):
    """Under the audit's autocast, a bfloat16 map and a float32 buffer met inside forward's own
    ``torch.autocast(enabled=False)`` block: no cast there, each read in its own dtype. The audit's
    autocast alone decided, and fx and export charged a cast first (196,608 B where eager moves 131,072;
    a review's find). The eager capture's records are ATen ops, below autocast: an op there meets the
    dtypes autocast left it, and charged the same 196,608 B while it followed the audit's setting."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op, self.conv = op, nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("pos", torch.randn(1, 8, 32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        with torch.autocast("cpu", enabled=False):
            p = self.pos.expand(a.shape[0], -1, -1, -1)
            y = torch.cat([a, p], 1) if self.op == "cat" else torch.stack([a, p], 2).flatten(1, 2)
        return y.float().sum((2, 3))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("op", ["cat", "stack"])
def test_a_block_without_autocast_is_run_and_charged_without_it(op: str, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = MixedInABlockWithoutAutocast(op).eval(), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, capture=capture, mode=mode, autocast=torch.bfloat16)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == expected == 131072
