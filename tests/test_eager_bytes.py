"""The eager byte checker itself: it must see the transposes it exists to count, and none
where nothing moves (else the accuracy tests could not fail)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from torch import nn

from nhwc_audit import audit
from tests import models as M
from tests.eager_bytes import eager_backward_bytes, eager_bytes
from tests.support import conv_backward_copies


class Reverting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.norm = nn.InstanceNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


class SameInBoth(nn.Module):
    """A permute + contiguous that copies in either layout: nothing added."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous() * 2


def test_checker_counts_a_revert_and_its_conversion() -> None:
    e = eager_bytes(Reverting().eval(), (torch.randn(1, 3, 8, 8),))
    act = 8 * 8 * 8 * 4
    assert e.added == 2 * act + 2 * act  # InstanceNorm's copy out, the conv's copy back in
    assert e.nchw == []


def test_checker_sees_nothing_on_a_plain_convnet() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    e = eager_bytes(m, (torch.randn(1, 3, 8, 8),))
    assert e.added == 0 and e.channels_last == []


def test_copies_made_in_either_layout_cancel() -> None:
    e = eager_bytes(SameInBoth(), (torch.randn(1, 3, 8, 8),))
    assert e.nchw and e.added == 0


class SwapHW(nn.Module):
    """A conv, then H and W swapped and made contiguous: a copy in either layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 1, 3, 2).contiguous()


def test_copies_made_in_either_layout_cancel_in_a_graph_module() -> None:
    # each copy of a GraphModule generates its code again, under another '<eval_with_key>.N' file:
    # the two runs' lines are the same lines of the graph's code
    for m in (SwapHW().eval(), torch.fx.symbolic_trace(SwapHW().eval())):
        e = eager_bytes(m, (torch.randn(1, 3, 8, 8),))
        assert e.nchw and e.channels_last and e.added == 0, e.by_site()


class TwoRanks(nn.Module):
    """2D and 3D convolutions in one model (diffusers' video UNets): ``Module.to(memory_format=...)``
    raises on it, whichever format is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(3, 8, 1)
        self.temporal = nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial(x)  # frames as the batch: (F, C, H, W)
        return self.temporal(y.permute(1, 0, 2, 3)[None])


def test_checker_converts_each_weight_by_its_rank() -> None:
    e = eager_bytes(TwoRanks().eval(), (torch.randn(4, 3, 8, 8),))
    assert e.channels_last  # it ran, converted: the frames' view into the Conv3d is not channels_last_3d


def test_checker_does_not_count_what_reads_only_a_shape() -> None:
    """A circular pad allocates its NCHW output with ``new_empty`` from the NHWC input (no data
    read), then copies the input in: one transpose of the input, then the conv's of the output."""

    e = eager_bytes(M.CircularPad().eval(), (torch.randn(1, 3, 8, 8),))
    assert sorted(t.op for t in e.channels_last) == ["convolution", "copy_"]
    assert e.added == 2 * 8 * 8 * 8 * 4 + 2 * 8 * 10 * 10 * 4


def test_checker_does_not_count_an_exit() -> None:
    """``torch.flatten(x, 1)`` of a 7x7 NHWC map copies it (a view in NCHW): an exit, as in the
    audit; a ``.contiguous()`` the model asks for before flattening is still counted."""
    e = eager_bytes(M.FlattenHead().eval(), (torch.randn(1, 3, 32, 32),))
    assert e.added == 0

    assert eager_bytes(M.ContiguousThenFlatten().eval(), (torch.randn(1, 3, 8, 8),)).added == 2 * 8 * 8 * 8 * 4


def test_checker_counts_a_weight_reshaped_in_forward_and_a_linear_of_an_nhwc_map() -> None:
    """Neither is an exit: a standardised weight's reshape to (1, O, -1) copies the NHWC weight
    every forward (BiT, NFNet), and ``linear`` over the last dim of a 4D channels_last buffer
    copies it to compute (Swin2SR's position-bias table); both are views in NCHW."""

    e = eager_bytes(nn.Sequential(M.StandardisedConv(8, 8, 3)).eval(), (torch.randn(1, 8, 8, 8),))
    assert e.added >= 2 * 8 * 8 * 3 * 3 * 4  # the weight's copy into NCHW order

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("coords", torch.randn(1, 7, 7, 2))
            self.mlp = nn.Linear(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.coords).view(-1, 4).sum()

    assert eager_bytes(Table().eval(), (torch.randn(1, 3, 8, 8),)).added == 2 * 7 * 7 * 2 * 4


class StackedHalves(nn.Module):
    """monai RegUNet's AdditiveUpSampleBlock: ``torch.stack(x.split(C // 2, 1), dim=-1)`` writes
    a contiguous 5D tensor, interleaving the channels_last halves: a transpose in channels_last
    only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.a(x).split(8, dim=1), dim=-1).sum(dim=-1)


def test_checker_counts_a_stack_that_transposes() -> None:
    e = eager_bytes(StackedHalves().eval(), (torch.randn(1, 3, 16, 16),))
    assert e.added == 2 * 8 * 16 * 16 * 2 * 4  # the 5D stack, written NCDHW-ordered from NHWC halves


class StackedWithTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return torch.stack([y, y.transpose(2, 3)], 1) * 1


def test_checker_reads_a_stacks_new_dim_from_its_argument() -> None:
    # batch 2 stacked 2 at dim 1: (2, 2, 8, 8, 8) holds the maps either way the shapes allow; in NCHW
    # only the transposed map is copied across orders, in channels_last both are
    e = eager_bytes(StackedWithTranspose().eval(), (torch.randn(2, 8, 8, 8),))
    one_map = 2 * 8 * 8 * 8 * 4
    assert [t.nbytes for t in e.nchw] == [2 * one_map]
    assert [t.nbytes for t in e.channels_last] == [2 * one_map, 2 * one_map]


class NormOfAStack(nn.Module):
    """The vector norm of two channels_last maps stacked at dim 0: ``linalg_vector_norm(x, ord, dim)``
    names its dims third, after the norm's order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return torch.stack([y, y * 2]).norm(dim=0) * 1


def test_checker_reads_a_reduction_s_dims_where_its_schema_names_them() -> None:
    # the norm writes NCHW from NHWC-ordered dims: its output read and written (the checker read the
    # order, 2, as the dim and saw no move)
    e = eager_bytes(NormOfAStack().eval(), (torch.randn(2, 8, 8, 8),))
    assert [(t.op, t.nbytes) for t in e.channels_last] == [("linalg_vector_norm", 2 * 2 * 8 * 8 * 8 * 4)]
    assert e.nchw == []


def test_backward_checker_counts_what_the_backward_re_lays() -> None:
    """Conv ``a`` re-lays the NCHW gradient InstanceNorm hands back; the norm's backward copies
    the channels_last gradient of ``b`` into its own (1, N * C, H, W) view; ``b`` re-lays the NCHW
    input it saved, for its weight's gradient. In NCHW nothing moves."""
    m = Reverting().train()
    e = eager_backward_bytes(m, (torch.randn(2, 3, 8, 8),))
    act = 2 * 8 * 8 * 8 * 4  # each moves one 8-channel activation (``a``'s gradient, the norm's, b's input)
    assert e.nchw == []
    assert [t.nbytes for t in e.channels_last if t.op != "convolution_backward"] == [2 * act] * 3


def test_backward_checker_sees_only_the_weight_gradients_copies_on_a_plain_convnet() -> None:
    """Nothing is re-laid; a channels_last convolution's backward kernel computes its weight gradient
    in NCHW and copies it into channels_last (CPU, oneDNN): 2 x 4 B x each weight, as many bytes as
    the profiler sees copied under ``aten::convolution_backward`` (the NCHW run: none)."""
    torch.manual_seed(0)
    m, x = (
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).train(),
        torch.randn(2, 3, 8, 8),
    )
    e = eager_backward_bytes(m, (x,))
    assert e.nchw == [] and {t.op for t in e.channels_last} == {"convolution_backward"}
    assert sorted(t.nbytes for t in e.channels_last) == [2 * 4 * 8 * 3 * 9, 2 * 4 * 8 * 8 * 9]
    assert conv_backward_copies(m, x) == 0
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    assert conv_backward_copies(cl, x.to(memory_format=torch.channels_last)) == e.added


class _Maximum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return torch.maximum(y, self.b(y))


def test_backward_checker_watches_without_a_dispatch_mode() -> None:
    """Under a dispatch mode ``maximum``'s backward masks into a contiguous copy (the recorder then
    sees copies); training masks in place: the node hooks see what training does."""
    m, x = _Maximum().train(), torch.randn(2, 3, 8, 8)
    for hooked, copies in ((False, True), (True, False)):  # the convolutions' weight gradients aside
        e = eager_backward_bytes(m, (x,), hooked=hooked)
        assert bool([t for t in e.channels_last if t.op != "convolution_backward"]) is copies


def test_backward_checker_on_a_model_with_nothing_to_train() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8)).train().requires_grad_(False)
    e = eager_backward_bytes(m, (torch.randn(2, 3, 8, 8),))
    assert e.nchw == [] and e.channels_last == []


def test_checker_charges_no_weight_that_autocast_casts_in_the_convs_layout() -> None:
    """Under autocast a convolution reads a bfloat16 copy of its weight (no Parameter), channels_last
    as the weight is: after a revert the kernel re-lays the NCHW input, not the weight."""
    model = Reverting().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = eager_bytes(model, (x,))
    assert [(t.op, t.shape) for t in e.channels_last] == [("clone", (1, 8, 8, 8)), ("convolution", (1, 4, 8, 8))]
    assert e.added == 2 * (2 * 8 * 8 * 8 * 2)


def test_checker_finds_the_models_line_under_a_folder_called_torch(tmp_path: Path) -> None:
    """A library installed under /opt/torch/venv/...: its lines are the model's, not torch's (they
    all fell to the caller's line, and per-line netting became one net over the model)."""
    folder = tmp_path / "torch" / "site"
    folder.mkdir(parents=True)
    (folder / "torch_folder_model.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1)\n"
        "    def forward(self, x):\n"
        "        y = self.a(x).contiguous()\n"
        "        return self.b(y)\n"
    )
    spec = importlib.util.spec_from_file_location("torch_folder_model", folder / "torch_folder_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    e = eager_bytes(module.M().eval(), (torch.randn(1, 3, 8, 8),))
    assert {t.site.rsplit("/", 1)[-1] for t in e.channels_last} == {
        "torch_folder_model.py:7",
        "torch_folder_model.py:8",
    }


def test_an_explicit_copy_of_a_parameter_re_laid_by_a_conv_is_charged() -> None:
    """Only autocast's casts of a parameter are weights as the parameter is: a copy the model asks
    for (NCHW in the channels_last model) is re-laid by the conv as any computed weight is."""

    class ExplicitCopy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.conv = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.conv.weight.to(memory_format=torch.contiguous_format)
            return torch.nn.functional.conv2d(self.pre(x), w, padding=1)

    torch.manual_seed(0)
    assert eager_bytes(ExplicitCopy().eval(), (torch.randn(2, 3, 8, 8),)).added == 2 * 4608


class SliceThenConv(nn.Module):
    """A conv on the second half of a map's channels (``torch.split``, as Res2Net, CSP and YOLO's C2f do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.split(self.a(x), 8, 1)[1])


def test_checker_sees_a_kernel_copy_a_slice_that_is_not_dense() -> None:
    """The conv's kernel copies a channel slice of a channels_last map whole first (dense in no
    order); an NCHW slice of one sample is dense and read in place; at batch 2 both are copied.
    The copy happens inside the kernel, where a dispatch mode sees nothing unless it runs the
    kernel itself (the profiler's ``aten::contiguous`` under ``aten::_convolution``)."""
    slice_bytes = 8 * 8 * 8 * 4
    one = eager_bytes(SliceThenConv().eval(), (torch.randn(1, 3, 8, 8),))
    assert one.nchw == [] and [(t.op, t.nbytes) for t in one.channels_last] == [("contiguous", 2 * slice_bytes)]
    assert one.added == 2 * slice_bytes
    two = eager_bytes(SliceThenConv().eval(), (torch.randn(2, 3, 8, 8),))
    assert [t.nbytes for t in two.nchw] == [t.nbytes for t in two.channels_last] == [4 * slice_bytes]
    assert two.added == 0


class _SharedNormBlock(nn.Module):
    """One GroupNorm line run by two blocks: the NCHW backward re-lays at the block whose output goes
    to tokens (a permute to N x H x W x C), the channels_last one at the block whose Linear mixes the
    pixels of each channel (an N x C x HW view)."""

    def __init__(self, tokens_last: bool) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, 16)
        self.tokens_last = tokens_last
        self.mix = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.tokens_last:
            return y.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 16)
        return self.mix(y.reshape(x.shape[0], 16, -1)).transpose(1, 2)


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = _SharedNormBlock(True), _SharedNormBlock(False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(self.a(h)) + self.head(self.b(h))


class _MatView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.w @ h.flatten(2)).view(h.shape)


def test_backward_moves_net_per_call_as_the_audit_nets_them_per_node() -> None:
    """Two calls of one line: a norm line run by two blocks, and ``nn.Sequential``'s children (their
    calls fall to its caller's line). The NCHW backward re-lays at one call, the channels_last one at
    the other: per line they cancel; per call (:attr:`EagerBytes.added_per_call`) the channels_last
    copy stays, as the audit charges it at its node (a real cost: the other module's saving does
    not remove it)."""
    from nhwc_audit import audit

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _MatView(), nn.Conv2d(16, 8, 1))
    for model in (_TwoBlocks(), seq):
        x = torch.randn(2, 3, 16, 16)
        e = eager_backward_bytes(model.train(), (x,))
        assert e.added_per_call > e.added  # a copy only NCHW makes cancelled one only channels_last makes
        for mode in ("real", "fake"):
            r = audit(model, x, train=True, mode=mode, bandwidth=1e9)  # type: ignore[arg-type]
            assert sum(f.bytes for f in r.findings if f.kind.value == "backward") == e.added_per_call, mode


class _JoinedTwice(nn.Module):
    """One method concatenates twice (MONAI SwinUNETR's decoder blocks): once a map only the NCHW model
    copies (a skip with channels_last strides in both runs), once one only the channels_last model
    copies (a ``.contiguous()`` map)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def join(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.cat((p, q), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        skip = a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return self.join(a, skip) + self.join(a, self.c2(x).contiguous())


def test_forward_moves_net_per_call_as_the_audit_nets_them_per_node() -> None:
    """Per line, the NCHW model's copy at the first call cancelled the channels_last model's at the
    second (a sweep of public models: SwinUNETR 24,576 B over the reference); per call (the outermost
    torch call, :attr:`EagerBytes.added_per_call`) the channels_last copy stays, as the audit charges
    it at its node. Where no line is called twice, the two agree."""
    torch.manual_seed(0)
    model, x = _JoinedTwice().eval(), torch.randn(2, 3, 32, 48)
    e = eager_bytes(model, (x,))
    assert e.added_per_call > e.added
    assert audit(model, x, bandwidth=1e9).summary.bytes_moved == e.added_per_call
    plain = eager_bytes(Reverting().eval(), (torch.randn(1, 3, 8, 8),))
    assert plain.added_per_call == plain.added > 0


def test_a_conv3d_bias_broadcast_is_no_copy_of_a_layout() -> None:
    """The CPU's slow Conv3d fills its output with the bias viewed C x 1 x 1 x 1 (strides all 1, no
    stride 0): a broadcast, in either layout. The checker charged it where channels_last made the
    kernel watched (128 B on this LambdaLayer-like model; timm lambda_resnet26t 384 B over the audit)."""

    class LambdaPos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.pos = nn.Conv3d(1, 16, (3, 3, 1), padding=(1, 1, 0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            b, c, h, w = x.shape
            v = x.reshape(b, c, h * w).transpose(-1, -2)
            return self.pos(v.reshape(b, 1, h, w, c))

    torch.manual_seed(0)
    model, x = LambdaPos().eval(), torch.randn(1, 8, 4, 6)
    assert eager_bytes(model, (x,)).added == audit(model, x, bandwidth=1e9).summary.bytes_moved


class _TwoWeightsOfOneSize(nn.Module):
    """Two convolutions with weights of one size: ``b`` reads a map laid channels-innermost in the NCHW
    model too (a LayerNorm over channels between permutes), so its weight gradient arrives channels_last
    and ``AccumulateGrad`` copies it into the NCHW parameter; ``c``'s arrives as its parameter is."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm(16)
        self.b, self.c, self.d = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        t = self.b(self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.d(torch.cat([t, self.c(h)], 1))


def test_backward_checker_charges_a_gradients_copy_to_its_own_parameter() -> None:
    """The profiler's copies under ``AccumulateGrad`` name no parameter, only a shape: among parameters
    of one size the copy goes to the one whose gradient arrives re-laid (``b``'s line), not the first in
    the graph (``c``'s, where it cancelled ``c``'s channels_last cost: 47,104 B where the audit and a
    direct measurement find 65,536; the diffusers UNet2DModel's mid-block convolutions)."""
    torch.manual_seed(0)
    m, x = _TwoWeightsOfOneSize().train(), torch.randn(1, 3, 16, 16)
    e = eager_backward_bytes(m, (x,))
    line = next(i for i, s in enumerate(Path(__file__).read_text().splitlines(), 1) if "t = self.b(self.ln(" in s)
    assert [t.site.rsplit(":", 1)[1] for t in e.nchw if t.op == "AccumulateGrad"] == [str(line)]
    report = audit(m, x, bandwidth=1e9, train=True)
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == e.added == 65536


class FmodOfASlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.fmod(self.a(x)[:, :4], 0.5))


def test_checker_runs_a_scalar_overload_of_a_tensor_not_dense() -> None:
    # fmod.Scalar's kernel, run by its key, calls fmod.Tensor with the scalar a mode is given unwrapped:
    # the checker raised; the CPU keeps the slice's order and copies nothing
    e = eager_bytes(FmodOfASlice().eval(), (torch.randn(2, 8, 8, 8),))
    assert e.channels_last == [] and e.nchw == []


class KthOfAProduct(nn.Module):
    """``(y.unsqueeze(-1) * k).kthvalue(2)``: the default dim, -1, is not among the ATen op's arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)
        self.register_buffer("k", torch.randn(1, 1, 1, 1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x).unsqueeze(-1) * self.k).kthvalue(2).values * 1


def test_checker_reads_a_reduction_s_default_dim() -> None:
    # the product's last dim is innermost; kthvalue over it writes N, C, H, W from N, H, W, C-ordered dims
    e = eager_bytes(KthOfAProduct().eval(), (torch.randn(2, 8, 8, 8),))
    assert [(t.op, t.nbytes) for t in e.channels_last] == [("kthvalue", 2 * 2 * 8 * 8 * 8 * 4)]


class SlidingWindowMax(nn.Module):
    """3-wide windows along W by ``unfold`` (an overlapping view: the windows' dim and their positions'
    both of stride 1 in NCHW), max over each: ``amax``'s backward reads the saved view."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).unfold(3, 3, 1).amax(-1))


def test_backward_checker_reads_an_overlapping_view_in_its_logical_order() -> None:
    # NCHW's saved view strides its windows and positions alike (1, 1): read in memory order, no move
    # (the checker took the tie the other way and charged AmaxBackward0 in NCHW too, netting eager's
    # channels_last move away: 70,656 B where the audit, rightly, charged 156,672)
    torch.manual_seed(0)
    e = eager_backward_bytes(SlidingWindowMax().train(), (torch.randn(2, 3, 8, 8),))
    assert [t.op for t in e.nchw if "Amax" in t.op] == []
    assert [t.op for t in e.channels_last if "Amax" in t.op] == ["AmaxBackward0"]
