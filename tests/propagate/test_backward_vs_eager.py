"""A train audit's backward findings against eager autograd (``tests/eager_bytes.py``: what each
autograd node of a plain ``loss.backward()`` re-lays, seen from node hooks, channels_last less
NCHW). The audit sees the same backward the same way, node by node, and nets it against the same
graph's NCHW backward; in every capture and in fake mode it must charge what eager adds."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nhwc_audit import audit
from tests import models as M
from tests.eager_bytes import eager_backward_bytes
from tests.support import conv_backward_copies


class Shuffle(nn.Module):
    """ShuffleNetV2's unit: half the channels through a branch, a cat and a channel shuffle. In
    backward the branch gets a slice of the NCHW-ordered gradient the shuffle hands back, and its
    ReLU's backward writes it channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(y)


class Maximum(nn.Module):
    """``torch.maximum`` of two channels_last maps: in training its backward masks in place; under
    any dispatch mode it masks into a contiguous copy (a recorder there would charge copies that
    training never makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.c(torch.maximum(y, self.b(y)))


class MeanGate(nn.Module):
    """An SE block that gates by the map's own mean: the mean's gradient, broadcast back NCHW, is
    summed into the channels_last gradient of the map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True))))


class PooledHead(nn.Module):
    """A global average pool before a classifier: its backward hands the last ReLU an NCHW
    gradient, which the ReLU's backward writes channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class PooledHead8(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def _transposed_conv() -> nn.Module:
    """A stride-2 transposed convolution from 16 channels to 4 (as many elements out as in, by
    chance: its gradients must not be compared as reshapes of each other) before an InstanceNorm,
    whose NCHW gradient it re-lays (monai's UNet decoder)."""
    up = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), up, nn.InstanceNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))


class FeaturesAndPooled(nn.Module):
    """Returns a channels_last map and its mean: the map's gradient sums the loss's seed (in the
    map's layout) and the mean's broadcast gradient (NCHW)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.a(x)
        return f, f.mean()


class ColumnMajor(nn.Module):
    """``linalg.inv`` of each 8x8 map: its result is column-major in an NCHW model too (no permute
    or transpose anywhere), so the NCHW backward has copies of its own to net."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.linalg.inv(self.a(x) + 8 * torch.eye(8)))


class NormedTokensThenConv(nn.Module):
    """A LayerNorm over the channels of a permuted map, permuted back, before a 5x5 convolution and an
    InstanceNorm: in the NCHW run the convolution writes channels_last (its input is), and its
    weight, read through an NCHW view, is no activation to charge."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln = nn.Conv2d(3, 64, 3, padding=1), nn.LayerNorm(64)
        self.b, self.n, self.c = nn.Conv2d(64, 64, 5, padding=2), nn.InstanceNorm2d(64), nn.Conv2d(64, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = self.b(y)
        return self.c(self.n(z))


def _checkpointed(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return checkpoint(lambda t: F.relu(F.conv2d(t, w, padding=1)), y, use_reentrant=False)


torch.fx.wrap("_checkpointed")  # a leaf of the graph: the checkpoint runs in the audit as in training


class Checkpointed(nn.Module):
    """A non-reentrant checkpoint the graph keeps: its saved tensors are unpacked once, by the
    backward that recomputes them; reading one before would make that backward fail."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(_checkpointed(self.a(x), self.w))


class StoredNchwWeights(nn.Module):
    """Weights the conversion leaves NCHW: a product of a parameter and a tensor made in forward
    (fx keeps it as a constant; the product's backward reads it into the parameter's
    channels_last gradient), and a conv weight made in forward (re-laid by the conv's backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(self.a(x), self.w * torch.ones(8, 8, 3, 3), padding=1)
        return self.c(F.conv2d(y, torch.ones(8, 8, 3, 3) / 72, padding=1))


class NchwThenActivation(nn.Module):
    """An NCHW map (``.contiguous()``) through a norm and an activation into a conv: the CPU
    backward of ELU (SELU, CELU), LogSigmoid, RReLU and GroupNorm strides the gradient otherwise
    than their meta kernels, as does the batch norm's before them."""

    def __init__(self, act: nn.Module, nchw: bool = True) -> None:
        super().__init__()
        self.a, self.bn, self.act, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), act, nn.Conv2d(16, 8, 1)
        self.nchw = nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(self.act(self.bn(y.contiguous() if self.nchw else y)))


class NoGradBlock(nn.Module):
    """A norm computed under the model's own ``torch.no_grad()`` (a statistic it adds back): eager's
    backward has no node there; fx records no grad mode, so the graph's run had charged one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        with torch.no_grad():
            t = self.norm(y)
        return self.b(y + t)


class AddIntoAView(nn.Module):
    """timm GhostNet's block: ``out[:, :c] += shortcut`` on a slice of a cat. Eager writes into
    the cat (autograd: CopySlices), and the channels_last backward moves the gradients through
    it; a graph that records ``x + y`` has none of that (fx's own tracer does)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.b, self.head = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        shortcut = x
        x1 = self.a(x)
        y = torch.cat([x1, self.b(x1)], dim=1)[:, :16]
        y += shortcut
        return self.head(y)


class LayerNorm2dThenGroupNorm(nn.Module):
    """timm PoolFormerV2: a LayerNorm over channels by permutes leaves the map channels_last-strided
    in the model as built too, and the CPU GroupNorm keeps it so, in either layout. A fake train
    audit's NCHW backward baseline took GroupNorm's meta kernel (NCHW) as it came, and charged the
    MLP's backward 4,096 B that both of eager's runs move."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem, self.ln, self.gn = nn.Conv2d(3, c, 3, padding=1), nn.LayerNorm(c), nn.GroupNorm(1, c)
        self.fc1, self.fc2, self.fc = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1), nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.fc2(F.relu(self.fc1(self.gn(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TokensThenConvBlock(nn.Module):
    """A map back from tokens, made NCHW (RT-DETR's AIFI), through a conv, BatchNorm and SiLU
    called on one line (ultralytics' ``Conv``), read as tokens again. The gradient comes back in
    NHWC order: NCHW copies at the BatchNorm's (and SiLU's) backward, channels_last at the conv's,
    the same copy met at another node of one call; 16,384 B were charged where eager adds none."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem, self.lin = nn.Conv2d(3, c, 1), nn.Linear(c, c)
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU()
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        y = self.lin(x.flatten(2).permute(0, 2, 1)).permute(0, 2, 1).view(b, c, h, w).contiguous()
        z = self.act(self.bn(self.conv(y)))
        return self.head(z.flatten(2).permute(0, 2, 1))


class TokensThenConvBlockReadTwice(TokensThenConvBlock):
    """The same, its BatchNorm's output read by the SiLU and by a mean on the same line: NCHW
    copies at the SiLU's backward, channels_last at the BatchNorm's; the walk down the BatchNorm's
    single reader stopped there (32,768 B were charged where eager adds 16,384)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        y = self.lin(x.flatten(2).permute(0, 2, 1)).permute(0, 2, 1).view(b, c, h, w).contiguous()
        t = self.bn(self.conv(y)); z = self.act(t) + t.mean((2, 3), keepdim=True)  # fmt: skip # noqa: E702
        return self.head(z.flatten(2).permute(0, 2, 1))


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class InputLaidChannelsInnermost(nn.Module):
    """The model lays its own input out channels-innermost (a window partition: permute, contiguous,
    permute back; no autograd node, the input needs no gradient), then conv -> BatchNorm -> mean: the
    BatchNorm's backward re-lays the mean's NCHW gradient in both models alike. No autograd node
    reordered dims, so the NCHW baseline asked the convolution alone and charged the BatchNorm's
    re-lay and the weight gradient's copy (34,816 B at 2x16x8x8 where eager adds 0; a helper's find)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return self.bn(self.conv(w)).mean((2, 3))


class PositionTableUnderTwoNames(nn.Module):
    """A (1, C, H, W) table added to a map, its batch-summed gradient NCHW where the converted table
    is channels_last (``AccumulateGrad`` copies it), in a module registered under two names (monai's
    DynUNet: ``input_block`` and ``skip_layers.downsample``). torch.export names the parameter by the
    other name than ``named_parameters()`` does; the copy was looked up by name and dropped (export
    2,240 B where eager adds 6,336; a Conv3d block so aliased at batch 1: 317,440 of 400,384)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.table = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 1))
        self.table.pos = nn.Parameter(torch.randn(1, 8, 8, 8))
        self.again = self.table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(self.conv(x) + self.table.pos)


class SlidingWindowMax(nn.Module):
    """The max of 3-wide windows along W (``unfold``: an overlapping view) between convolutions:
    ``amax``'s backward reads the saved view, whose windows run along the channels in channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).unfold(3, 3, 1).amax(-1))


class EveryOtherPixelByItsStrides(nn.Module):
    """Every other pixel by the map's own strides (``as_strided``): torch.export fixes them from the
    channels_last sample, and the NCHW backward ran them over NCHW memory (export 4,608 B of eager's 9,216)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        st = y.stride()
        return self.b(y.as_strided((n, c, h // 2, w // 2), (st[0], st[1], 2 * st[2], 2 * st[3])))


class TemporalConv(nn.Module):
    """diffusers' TemporalConvLayer: frames stacked into a volume, ``h + conv1(h)`` with ``conv1`` a
    GroupNorm, a SiLU and a Conv3d over time. channels_last re-lays the Conv3d's NCDHW gradient at the
    SiLU's backward, NCHW sums the two gradients of ``h`` at the GroupNorm's: one copy a block,
    charged twice (the netting looked only downstream for NCHW's: 472,576 B where eager adds 341,504)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = nn.Sequential(nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv3d(32, 32, (3, 1, 1), padding=(1, 0, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h[None].reshape((-1, 2) + h.shape[1:]).permute(0, 2, 1, 3, 4)
        return h + self.conv1(h)


CASES: dict[str, Callable[[], nn.Module]] = {
    "temporal_conv": TemporalConv,
    "every_other_pixel_by_its_strides": EveryOtherPixelByItsStrides,
    "sliding_window_max": SlidingWindowMax,
    "position_table_under_two_names": PositionTableUnderTwoNames,
    "input_laid_channels_innermost": InputLaidChannelsInnermost,
    "no_grad_block": NoGradBlock,
    "add_into_a_view": AddIntoAView,
    "layer_norm_2d_then_group_norm": LayerNorm2dThenGroupNorm,
    # roll and channel_shuffle keep channels_last on the CPU (FakeTensor: NCHW), their backward too
    "roll": lambda: NchwThenActivation(_Fn(lambda y: y.roll(1, 2)), nchw=False),
    "nchw_then_roll": lambda: NchwThenActivation(_Fn(lambda y: y.roll(1, 2))),
    # but not by a whole turn of a dim (a shift of 0 or of its size): a cat with an empty slice, NCHW
    "roll_by_a_whole_turn": lambda: NchwThenActivation(_Fn(lambda y: y.roll((0, 3), (2, 3))), nchw=False),
    "channel_shuffle": lambda: NchwThenActivation(nn.ChannelShuffle(2), nchw=False),
    "nchw_then_logit": lambda: NchwThenActivation(_Fn(lambda y: torch.logit(y, eps=1e-3))),
    "nchw_then_elu": lambda: NchwThenActivation(nn.ELU()),
    "nchw_then_selu": lambda: NchwThenActivation(nn.SELU()),
    "nchw_then_logsigmoid": lambda: NchwThenActivation(nn.LogSigmoid()),
    "nchw_then_rrelu": lambda: NchwThenActivation(nn.RReLU()),
    "nchw_then_group_norm": lambda: NchwThenActivation(nn.GroupNorm(4, 16)),
    # channels_last in: the CPU kernels write NCHW (and save an NCHW buffer), the meta kernels do not
    "logsigmoid": lambda: NchwThenActivation(nn.LogSigmoid(), nchw=False),
    "rrelu": lambda: NchwThenActivation(nn.RReLU(), nchw=False),
    "checkpointed": Checkpointed,
    "stored_nchw_weights": StoredNchwWeights,
    "features_and_pooled": FeaturesAndPooled,
    "column_major": ColumnMajor,
    "normed_tokens_then_conv": NormedTokensThenConv,
    "transposed_conv": _transposed_conv,
    "convnext_block": lambda: nn.Sequential(M.ConvNeXtBlock(), M.ConvNeXtBlock(), PooledHead8()),
    "instance_norm": M.InstanceNormNet,
    "se_block": M.SEBlock,
    "mean_gate": MeanGate,
    "pooled_head": PooledHead,
    "shuffle": Shuffle,
    "maximum": Maximum,
    "tokens_then_conv_block": TokensThenConvBlock,
    "tokens_then_conv_block_read_twice": TokensThenConvBlockReadTwice,
    # NCHW's backward kernel computes this strided convolution's input gradient channels_last and
    # copies it back (262,144 B at 16 x 16): more than channels_last's copy of its weight gradient
    "strided_conv": lambda: nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 128, 1, stride=2)),
}


def _input(name: str) -> torch.Tensor:
    return torch.randn(2, 8 if name == "convnext_block" else 3, 8, 8)


@pytest.mark.parametrize("how", [{}, {"capture": "export"}, {"mode": "fake"}], ids=["fx", "export", "fake"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_findings_charge_what_eager_adds(name: str, how: dict[str, str]) -> None:
    torch.manual_seed(0)
    model, x = CASES[name]().train(), _input(name)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
    assert report.meta.backward, report.meta.capture_notes
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == truth, [(f.node, f.bytes, f.hint) for f in report.findings if f.kind.value == "backward"]


def test_convnext_blocks_net_their_backward_against_nchws() -> None:
    """Two blocks before a pooled head: channels_last's backward sums the second block's input
    gradient from parts in two orders (the residual's, the permuted branch's); NCHW's backward
    re-lays as much at the same node (its depthwise convolution reads the gradient the permutes
    hand back in NHWC order). No finding, and a note that says why."""
    torch.manual_seed(0)
    model = nn.Sequential(M.ConvNeXtBlock(), M.ConvNeXtBlock(), PooledHead8()).train()
    report = audit(model, _input("convnext_block"), bandwidth=1e9, train=True)
    moved = [n for n in report.nodes if any(not c.result for c in n.backward)]
    assert moved and all(n.nchw_backward_bytes >= sum(c.bytes for c in n.backward if not c.result) for n in moved)
    # what is charged: the depthwise convolutions' weight gradients, copied inside their kernels
    backward = [f for f in report.findings if f.kind.value == "backward"]
    assert {f.node for f in backward} == {"_0_dw", "_1_dw"} and all(f.bytes == 2 * 8 * 49 * 4 for f in backward)
    assert any(n.startswith("NCHW baseline of the backward") for n in report.meta.capture_notes)


def test_the_finding_names_the_ops_and_where_the_gradient_comes_from() -> None:
    torch.manual_seed(0)
    report = audit(PooledHead().train(), _input("pooled_head"), bandwidth=1e9, train=True)
    (finding,) = [f for f in report.findings if f.kind.value == "backward" and f.node == "relu"]
    assert finding.node == "relu" and finding.layout_in.value == "contiguous"
    assert "ReluBackward0" in finding.hint and "adaptive_avg_pool2d" in finding.hint
    assert finding.bytes == 2 * 2 * 8 * 8 * 8 * 4


def _no_nchw_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    from nhwc_audit import refine

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the NCHW backward ran")

    monkeypatch.setattr(refine, "nchw_backward", fail)


def test_a_model_whose_backward_moves_nothing_runs_no_nchw_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_nchw_backward(monkeypatch)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(3)).train()
    report = audit(model, torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    assert report.meta.backward and not [n for n in report.nodes if n.backward]


class _ConvFreeMeanGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return y * torch.sigmoid(self.fc(y.mean((2, 3))))[:, :, None, None]


NO_CONV = {
    "pooled_head": lambda: nn.Sequential(
        nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)
    ),
    "mean_gate": _ConvFreeMeanGate,
}


@pytest.mark.parametrize("name", sorted(NO_CONV))
def test_a_model_that_reorders_no_dims_runs_no_nchw_backward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a permute, a transpose or an explicit memory format, every tensor of the NCHW run
    runs in NCHW order and its backward moves nothing: with no kernel that copies inside (no
    convolution), the baseline would only cost a training step."""
    _no_nchw_backward(monkeypatch)
    torch.manual_seed(0)
    model, x = NO_CONV[name]().train(), torch.randn(2, 3, 8, 8)
    report = audit(model, x, bandwidth=1e9, train=True)
    assert [n for n in report.nodes if n.backward]  # channels_last's backward moves data
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == eager_backward_bytes(model, (x,)).added > 0


@pytest.mark.parametrize("how", [{}, {"mode": "fake"}], ids=["real", "fake"])
def test_a_conv_models_backward_kernels_are_netted_against_nchws(how: dict[str, str]) -> None:
    """A convolution's backward kernel copies inside in either layout: channels_last's copies each
    weight gradient it computed NCHW into channels_last; NCHW's computes a strided 1 x 1
    convolution's input gradient channels_last and copies it back (the oneDNN kernel, 2 x 16 x 16
    here). The NCHW backward runs, though no dim is reordered: the second convolution's weight copy
    nets against NCHW's larger one; the first's is charged whole."""
    torch.manual_seed(0)
    model, x = CASES["strided_conv"]().train(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
    by_name = {n.name: n for n in report.nodes}
    assert [c.bytes for c in by_name["_1"].backward] == [2 * 128 * 64 * 4]
    assert by_name["_1"].nchw_backward_inside == 2 * 2 * 64 * 16 * 16 * 4
    charged = {f.node: f.bytes for f in report.findings if f.kind.value == "backward"}
    assert charged == {"_0": 2 * 64 * 3 * 9 * 4} and sum(charged.values()) == eager_backward_bytes(model, (x,)).added
    assert "weight gradient" in next(f.hint for f in report.findings if f.node == "_0")


class _AsksChannelsLast(nn.Module):
    """``.contiguous(memory_format=torch.channels_last)``: a no-op in the channels_last run, a copy
    into channels_last in the NCHW one, whose backward then re-lays what the convolution hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x).contiguous(memory_format=torch.channels_last))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(
    "build", [Shuffle, _AsksChannelsLast, CASES["convnext_block"]], ids=["transpose", "format", "permute"]
)
def test_a_model_that_reorders_dims_runs_the_nchw_backward(build: Callable[[], nn.Module]) -> None:
    from nhwc_audit.capture.fx import trace
    from nhwc_audit.propagate.backward import backward_layouts
    from nhwc_audit.refine import reorders_dims

    torch.manual_seed(0)
    model = build().train()
    gm = trace(model).gm
    x = torch.randn(2, 8 if build is CASES["convnext_block"] else 3, 8, 8)
    assert reorders_dims(gm.graph, backward_layouts(gm, [x]).reordering)


def test_the_nchw_backward_charges_no_weight() -> None:
    """The NCHW run reads the weights through NCHW views (no ``nn.Parameter``): what convolution
    ``b``'s backward moves there is its activations' re-lay only, as eager's NCHW backward."""
    torch.manual_seed(0)
    model, x = NormedTokensThenConv().train(), torch.randn(2, 3, 4, 4)
    report = audit(model, x, bandwidth=1e9, train=True)
    (b,) = [n for n in report.nodes if n.name == "b"]
    assert b.source is not None
    line = f"{b.source.file}:{b.source.line}"
    nchw = sum(t.nbytes for t in eager_backward_bytes(model, (x,)).nchw if t.site.endswith(line))
    assert 0 < b.nchw_backward_bytes == nchw


class EmaOfActivation(nn.Module):
    """A running average of an activation updated under ``torch.no_grad()`` in forward: torch.fx
    runs the buffer's ``mul_`` while tracing, the check drops its graph, and torch.export
    follows. The dropped run had left the buffer with its autograd history, and the export
    capture's backward ran into it: 16,384 B charged where eager's backward moves nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("ema", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * y.mean())
        return self.b(y - self.ema)


def test_a_dropped_capture_leaves_nothing_for_the_next_ones_backward() -> None:
    torch.manual_seed(0)
    model, x = EmaOfActivation().train(), torch.randn(2, 3, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True)
    assert report.meta.capture != "fx" and report.meta.backward, report.meta.capture_notes
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth
    assert not [c for n in report.nodes for c in n.backward if not c.result]  # the convs' weight gradients only


class _AroundAMap(nn.Module):
    """``fn(self, x)`` with two convs and a stored map at hand (8 channels, 16 x 16, batch 2)."""

    def __init__(self, fn: Callable[[_AroundAMap, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("m", torch.randn(2, 8, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _gated_without_grad(y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        g = y.mT.sigmoid()
    return y * g


OUTSIDE_AUTOGRAD: dict[str, Callable[[_AroundAMap, torch.Tensor], torch.Tensor]] = {
    # a transpose no autograd node made (detached, under no_grad, of a buffer or of the input): the
    # NCHW backward was skipped as reordering nothing, and the conv's backward copy, made in NCHW
    # too, was charged whole (32,768-98,304 B where eager adds 0)
    "conv_of_a_detached_transpose": lambda s, x: s.b(s.a(x).detach().mT),
    "gate_of_a_transpose_made_without_grad": lambda s, x: s.b(_gated_without_grad(s.a(x))),
    "product_with_a_transposed_buffer": lambda s, x: s.b(s.a(x) * s.m.mT),
    "conv_of_the_transposed_input": lambda s, x: s.b(s.a(x.mT)),
    "where_by_a_transposes_sign": lambda s, x: s.b((lambda y: torch.where(y.mT > 0, y, 0.5 * y))(s.a(x))),
    "product_with_a_transposes_mask": lambda s, x: s.b((lambda y: y * (y.mT > 0))(s.a(x))),
    # losses whose CPU backward writes NCHW from a channels_last map (BCE's: channels_last from
    # NCHW), where the meta kernels do the other: a fake audit charged 0 (real: 131,072 B)
    "mse_to_a_stored_map": lambda s, x: s.b(F.mse_loss(s.a(x), s.m, reduction="none")),
    "huber_to_a_transposed_map": lambda s, x: s.b(F.huber_loss(s.a(x), s.m.mT, reduction="none")),
    "smooth_l1_to_a_stored_map": lambda s, x: s.b(F.smooth_l1_loss(s.a(x), s.m, reduction="none")),
    "bce_to_a_stored_map": lambda s, x: s.b(F.binary_cross_entropy(s.a(x).sigmoid(), s.m.sigmoid(), reduction="none")),
}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(OUTSIDE_AUTOGRAD))
def test_a_backward_around_maps_autograd_did_not_make_is_charged_what_eager_adds(
    name: str, capture: str, mode: str
) -> None:
    torch.manual_seed(0)
    model, x = _AroundAMap(OUTSIDE_AUTOGRAD[name]).train(), torch.randn(2, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert report.meta.backward, report.meta.capture_notes
    charged = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert charged == truth, [(f.node, f.bytes, f.hint) for f in report.findings if f.kind.value == "backward"]


class _SplitThenConv(nn.Module):
    """Half a map's channels into a convolution (YOLO's C2f): at batch 1 the slice is dense in NCHW
    memory, in no order in channels_last, and the convolution's backward kernel copies the slice it
    saved whole for its weight's gradient, in channels_last only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        return torch.cat((a, self.conv(b)), dim=1)


@pytest.mark.parametrize("how", [{}, {"capture": "export"}, {"mode": "fake"}], ids=["fx", "export", "fake"])
def test_a_saved_slice_copied_by_the_backward_kernel_is_charged_as_eager_and_is_not_intrinsic(
    how: dict[str, str],
) -> None:
    """At batch 1 and 16 x 16 the CPU picks the slow backend: it copies the saved slice three times
    (the profiler: ``aten::copy_`` under ``convolution_backward``'s ``contiguous`` and twice under
    ``_slow_conv2d_backward``'s, which is handed the slice too), and copies no weight gradient."""
    torch.manual_seed(0)
    model, x = _SplitThenConv().train(), torch.randn(1, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
    (backward,) = [f for f in report.findings if f.kind.value == "backward"]
    assert backward.bytes == eager_backward_bytes(model, (x,)).added == 3 * 2 * 8 * 16 * 16 * 4
    assert backward.module_path == "conv" and not backward.intrinsic and "channel slice" in backward.hint
    assert [n.module_path for n in report.incompatible_nodes] == ["conv"]  # (its forward's copy of the slice too)


def test_a_train_check_of_a_plain_convnet_passes_with_its_weight_gradients_copies_reported() -> None:
    """On the CPU every channels_last convolution's backward copies its weight gradient: a cost
    the report counts (and the verdict weighs), which no change to the model removes, so neither
    ``check()`` nor ``incompatible_nodes`` names it, and the fixes list it apart."""
    from nhwc_audit import check

    torch.manual_seed(0)
    model, x = M.ConvBnRelu().train(), torch.randn(2, 3, 8, 8)
    report = check(model, x, bandwidth=1e9, train=True)
    assert report.findings and all(f.intrinsic for f in report.findings)
    assert report.summary.intrinsic_bytes == report.summary.bytes_moved == eager_backward_bytes(model, (x,)).added
    assert report.incompatible_nodes == [] and report.findings_of({report.findings[0].kind}) == []
    assert all(f["intrinsic"] for f in report.to_dict()["findings"])
    assert any("weight gradients" in r for r in report.verdict.reasons)


class _PermutedIntoTwoConvs(nn.Module):
    """A map permuted to NHWC order and back before a conv, in either run (channels_last strides in
    both): both kernels copy the gradient's slice into a dense channels_last tensor, NCHW's as a
    re-lay, channels_last's as a same-order densify; charged apart, they did not net (1,069,312 B
    where channels_last adds the weight gradients' copies alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.s = (
            nn.Conv2d(3, 64, 3, padding=1),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.Conv2d(3, 32, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return torch.cat([self.b(h), self.s(x)], 1)


def _lite_mla() -> nn.Module:
    from timm.models.efficientvit_mit import LiteMLA

    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), LiteMLA(64, 64, dim=16))


KERNELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str, list[int]]] = {
    # the CPU's slow 3D backend copies the channels_last_3d weight and the saved input into NCHW (the
    # rule charged the gradient's re-lay, 65,536 B, where the profiler sees 67,584)
    "slow_conv3d": (
        lambda: nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1)),
        (1, 3, 8, 8, 8),
        "2",
        [16, 16, 3, 3, 3],
    ),
    # timm EfficientViT's LiteMLA: its qkv convolution's gradient arrives NCHW and the kernel copies
    # it twice (the rule charged once); the grouped 1 x 1 on the slow 2D backend copies each group's
    # gradient (the rule charged 0); the depthwise one's arrives channels_last (the rule charged a re-lay)
    "lite_mla_qkv": (_lite_mla, (2, 3, 4, 4), "1.qkv.conv", [192, 64, 1, 1]),
    "lite_mla_grouped": (_lite_mla, (2, 3, 4, 4), "1.aggreg.0.1", [192, 16, 1, 1]),
}


@pytest.mark.parametrize("how", [{}, {"capture": "export"}, {"mode": "fake"}], ids=["fx", "export", "fake"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_convolutions_backward_is_charged_what_its_kernel_copies(name: str, how: dict[str, str]) -> None:
    """A convolution's backward is charged what its kernel and the ops it calls copy (the profiler's
    ``copy_`` under its ``convolution_backward``, channels_last run less NCHW's); the whole backward
    what eager's adds."""
    torch.manual_seed(0)
    build, shape, path, weight = KERNELS[name]
    model, x = build().train(), torch.randn(*shape)
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    cl = copy.deepcopy(model).to(memory_format=fmt)
    profiled = conv_backward_copies(cl, x.to(memory_format=fmt), weight)
    profiled -= conv_backward_copies(copy.deepcopy(model), x, weight)
    report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
    backward = [f for f in report.findings if f.kind.value == "backward"]
    assert sum(f.bytes for f in backward) == eager_backward_bytes(model, (x,)).added
    # (the slow 3D backend's weight gradient comes out NCHW: loss.backward() copies it into the
    # channels_last_3d parameter's .grad too, a finding of its own, not the kernel's)
    kernel = [f for f in backward if f.module_path == path and "AccumulateGrad" not in f.hint]
    assert sum(f.bytes for f in kernel) == profiled > 0


@pytest.mark.parametrize("how", [{}, {"mode": "fake"}], ids=["real", "fake"])
def test_a_gradient_slice_both_kernels_copy_nets(how: dict[str, str]) -> None:
    torch.manual_seed(0)
    model, x = _PermutedIntoTwoConvs().train(), torch.randn(2, 3, 32, 32)
    report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
    backward = {f.module_path: f.bytes for f in report.findings if f.kind.value == "backward"}
    assert backward == {"a": 2 * 64 * 27 * 4, "s": 2 * 32 * 27 * 4}  # the weight gradients' copies alone
    assert sum(backward.values()) == eager_backward_bytes(model, (x,)).added


def test_a_fake_cut_keeps_the_backend_of_the_whole_problem() -> None:
    """Halving D, H and W together switched the CPU's choice from oneDNN to Slow3d (it reads
    N x C x D x H) and the fake audit asked nothing: halved W first, a dim at a time, it asks a cut
    that picks the whole problem's backend, and charges what real mode charges."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1)).train()
    x = torch.randn(1, 3, 64, 72, 72)
    found = {}
    for mode in ("real", "fake"):
        r = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
        found[mode] = sorted((f.node, f.bytes, f.intrinsic) for f in r.findings if f.kind.value == "backward")
    assert found["fake"] == found["real"] and any(intrinsic for _, _, intrinsic in found["real"])


def test_a_convolution_whose_kernel_copies_alike_in_nchw_is_netted() -> None:
    """A grouped 1 x 1 convolution on the slow backend (one thread) copies each group's gradient in
    either layout: the NCHW backward ran only where a kernel copied a weight gradient, and a lone
    such convolution was charged 393,216 B where channels_last adds nothing."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(48, 48, 1, groups=3)).train(), torch.randn(2, 48, 16, 16)
    report = audit(model, x, bandwidth=1e9, train=True, threads=1)
    assert report.meta.backward and any(n.backward for n in report.nodes)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        truth = eager_backward_bytes(model, (x,)).added
    finally:
        torch.set_num_threads(previous)
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth == 0


def test_a_grouped_convolutions_own_copies_of_its_groups_are_intrinsic() -> None:
    """On the slow backend (one thread) a grouped convolution copies each group's view of its dense
    gradient and input: the kernel's own doing, which no change to the model removes; it was charged
    as a re-lay with the saved-slice hint (make each part its own output), and check() failed."""
    from nhwc_audit import check

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(48, 48, 1, groups=3)).train(), torch.randn(1, 48, 16, 16)
    report = check(model, x, bandwidth=1e9, train=True, threads=1)
    (finding,) = [f for f in report.findings if f.kind.value == "backward"]
    assert finding.intrinsic and finding.bytes == 2 * 2 * 48 * 16 * 16 * 4 and "split" not in finding.hint
