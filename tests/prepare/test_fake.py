"""Fake mode: FakeTensors instead of weights and compute; layouts are predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from nhwc_audit.examples import UNet
from tests import models as M
from tests.eager_bytes import eager_backward_bytes
from tests.support import relayed


class Mixed(nn.Module):
    """conv, bn, relu, pools, interpolation, cat: fake and real agree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        p = F.interpolate(F.max_pool2d(y, 2), scale_factor=2, mode="bilinear")
        return self.conv2(torch.cat([y, F.avg_pool2d(p, 3, 1, 1)], 1))


class WithGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv2(self.norm(self.conv(x)))
        return out


def _layouts(report) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r.name: r.output_layout.value for r in report.nodes}


def test_fake_agrees_with_real_on_common_ops() -> None:
    x = torch.randn(1, 3, 16, 16)
    real = audit(Mixed(), x, bandwidth=1e9)
    fake = audit(Mixed(), x, mode="fake", bandwidth=1e9)
    assert fake.meta.mode == "fake" and real.meta.mode == "real"
    assert _layouts(fake) == _layouts(real)
    assert fake.findings == real.findings == ()
    assert fake.meta.capture_notes == ()


def test_group_norm_is_the_known_divergence_on_cpu() -> None:
    """Meta kernels return NCHW for GroupNorm where eager CPU keeps channels_last: a fake CPU
    audit follows eager there and says so; mode 'both' keeps the raw meta layout it compares."""
    x = torch.randn(1, 3, 16, 16)
    real, fake = audit(WithGroupNorm(), x, bandwidth=1e9), audit(WithGroupNorm(), x, mode="fake", bandwidth=1e9)
    assert _layouts(fake) == _layouts(real) and _layouts(real)["norm"] == "channels_last"
    assert fake.summary.findings == real.summary.findings == 0
    assert fake.meta.capture_notes[0] == (
        "prediction corrected at 1 node(s) to what eager cpu kernels do (GroupNorm: eager keeps channels_last "
        "there, the meta kernels return NCHW)"
    )
    both = audit(WithGroupNorm(), x, mode="both", bandwidth=1e9)
    assert [(f.node, f.kind.value) for f in both.findings] == [("norm", "divergence")]
    cuda = audit(WithGroupNorm(), x, mode="fake", device="cuda", bandwidth=1e9)
    assert [(f.node, f.kind.value) for f in cuda.findings][:1] == [("norm", "revert")]
    assert "no eager swap keeps channels_last" in cuda.findings[0].hint  # never "use GroupNorm" on cuda


def test_meta_device_model_audits_in_fake_mode_like_real_weights() -> None:
    with torch.device("meta"):
        meta_model = UNet(width=8)
    fake = audit(meta_model, torch.empty(1, 3, 64, 64, device="meta"), mode="fake", bandwidth=1e9)
    torch.manual_seed(0)
    real = audit(UNet(width=8), torch.randn(1, 3, 64, 64), bandwidth=1e9)
    assert _layouts(fake) == _layouts(real)
    assert [(f.node, f.kind, f.bytes) for f in fake.findings] == [(f.node, f.kind, f.bytes) for f in real.findings]
    assert all(p.device.type == "meta" for p in meta_model.parameters())
    assert fake.timing["peak_rss_bytes"] > 0


def test_fake_mode_predicts_cuda_without_a_gpu() -> None:
    r = audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), mode="fake", device="cuda")
    assert r.meta.device == "cuda" and r.meta.bandwidth_source == "assumed"
    assert [(f.node, f.kind.value) for f in r.findings] == [("norm", "revert"), ("conv2", "conversion")]


def test_backward_audit_finds_nchw_gradients() -> None:
    r = audit(M.InstanceNormNet(), torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    grads = {n.name: [g.layout.value for g in n.grads] for n in r.nodes if n.grads}
    # InstanceNorm's backward hands the conv before it an NCHW gradient
    assert grads == {"conv": ["contiguous"], "norm": ["channels_last"], "conv2": ["channels_last"]}
    back = relayed(r.findings)
    # the conv re-lays that gradient; InstanceNorm's own backward copies its channels_last gradient
    # into its (1, N * C, H, W) view; conv2 re-lays the NCHW input it saved for its weight's gradient
    one = 2 * 2 * 8 * 8 * 8 * 4
    assert [(f.node, f.bytes) for f in back] == [("conv", one), ("norm", one), ("conv2", one)]
    every = sum(f.bytes for f in r.findings if f.kind.value == "backward")  # the weight gradients' copies too
    assert every == eager_backward_bytes(M.InstanceNormNet(), (torch.randn(2, 3, 8, 8),)).added
    assert "InstanceNorm2d" in back[0].hint
    assert r.summary.backward == len(back) < len([f for f in r.findings if f.kind.value == "backward"])  # (own apart)
    assert r.to_dict()["nodes"][1]["grad_layouts"] == ["contiguous"]


def test_backward_audit_of_a_conv_bn_chain_is_clean() -> None:
    model = M.ConvBnRelu()
    before = [p.detach().clone() for p in model.parameters()]
    r = audit(model, torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    assert [f.kind.value for f in r.findings] == ["backward"] * len(r.findings) and not relayed(r.findings)
    assert all(g.layout.value == "channels_last" for n in r.nodes for g in n.grads)
    assert any(n.startswith("backward: all 2 4D/5D parameter gradients") for n in r.meta.capture_notes)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_mode_both_reports_divergences_only_where_kernels_disagree() -> None:
    x = torch.randn(1, 3, 16, 16)
    r = audit(WithGroupNorm(), x, bandwidth=1e9, mode="both")
    assert r.meta.mode == "both" and r.summary.divergences == 1
    (d,) = [f for f in r.findings if f.kind.value == "divergence"]
    assert (d.node, d.layout_in.value, d.layout_out.value) == ("norm", "channels_last", "contiguous")
    assert ", 1 divergence;" in r.headline
    clean = audit(Mixed(), x, bandwidth=1e9, mode="both")
    assert clean.findings == () and clean.summary.divergences == 0


def test_backward_in_fake_mode_matches_real() -> None:
    x = torch.randn(2, 3, 8, 8)
    real = audit(M.InstanceNormNet(), x, bandwidth=1e9, train=True)
    fake = audit(M.InstanceNormNet(), x, bandwidth=1e9, train=True, mode="fake")
    grads = {n.name: [g.layout for g in n.grads] for n in real.nodes}
    assert grads == {n.name: [g.layout for g in n.grads] for n in fake.nodes}
    assert [f.kind.value for f in fake.findings] == [f.kind.value for f in real.findings]


def test_fake_backward_follows_eager_where_forward_was_corrected() -> None:
    """GroupNorm on CPU: the fake forward is corrected to channels_last, and so are the
    gradients it hands back; fake --train then agrees with real --train."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    real = audit(m, x, bandwidth=1e9, train=True)
    fake = audit(m, x, bandwidth=1e9, train=True, mode="fake")
    assert [(f.node, f.bytes) for f in real.findings] == [(f.node, f.bytes) for f in fake.findings]
    assert not relayed(real.findings) and all(f.kind.value == "backward" for f in real.findings)
    assert {n.name: [g.layout for g in n.grads] for n in fake.nodes} == {
        n.name: [g.layout for g in n.grads] for n in real.nodes
    }


def test_fake_copy_holds_what_the_ops_under_fake_mode_would_make() -> None:
    """The copy wraps meta tensors itself (faster than ``empty_strided`` and ``nn.Parameter``
    under the mode): each weight must be what those ops make, on either device."""
    from nhwc_audit.prepare.fake import fake_copy, fake_mode

    model = Mixed()
    model.conv.bias.requires_grad_(False)
    for device in (torch.device("cpu"), torch.device("cuda")):
        mode = fake_mode()
        copy = fake_copy(model, mode, device, torch.float16)
        with mode:
            for (name, got), (_, p) in zip(copy.named_parameters(), model.named_parameters(), strict=True):
                want = nn.Parameter(
                    torch.empty(p.shape, dtype=torch.float16, device=device).to(
                        memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format
                    ),
                    requires_grad=p.requires_grad,
                )
                assert type(got) is type(want) and isinstance(got, nn.Parameter), name
                assert (got.shape, got.stride(), got.dtype, got.device) == (
                    want.shape,
                    want.stride(),
                    want.dtype,
                    want.device,
                ), name
                assert (got.requires_grad, got.is_leaf, got.fake_mode) == (p.requires_grad, True, mode), name
            for (name, got), (_, b) in zip(copy.named_buffers(), model.named_buffers(), strict=True):
                dtype = torch.float16 if b.is_floating_point() else b.dtype
                assert (type(got).__name__, got.shape, got.dtype, got.device.type) == (
                    "FakeTensor",
                    b.shape,
                    dtype,
                    device.type,
                ), name
                assert not isinstance(got, nn.Parameter) and got.fake_mode is mode, name
            out = copy(
                torch.empty(1, 3, 8, 8, dtype=torch.float16, device=device).to(memory_format=torch.channels_last)
            )
            assert out.device.type == device.type and out.shape == (1, 8, 8, 8)
    assert all(type(p) is nn.Parameter for p in model.parameters())  # the user's model untouched


@pytest.mark.parametrize("order", [(1, 4), (4, 1)])
def test_a_fake_audit_predicts_the_conv3d_layouts_of_its_own_thread_count(order: tuple[int, int]) -> None:
    """A CPU Conv3d picks its backend, and so its output's layout, by the thread count: at batch 2 a
    1x1x1 one writes NCDHW at one thread, channels_last_3d at four. FakeTensorMode's dispatch cache
    (one per process) is keyed without it: a fake audit kept the layouts of the thread count of the
    first fake audit in the process (MONAI SegResNet: 2,654,208 B where eager at 4 threads moves 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 32, 3, padding=1), nn.Conv3d(32, 16, 1, bias=False), nn.Conv3d(16, 8, 3, padding=1)
    ).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    for threads in order:
        real = audit(model, x, bandwidth=1e9, threads=threads).summary.bytes_moved
        fake = audit(model, x, bandwidth=1e9, threads=threads, mode="fake").summary.bytes_moved
        assert fake == real == (393216 if threads == 1 else 0), threads


class _PlainList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks = nn.Conv2d(3, 8, 3), [nn.Conv2d(8, 8, 3)]  # a plain list: not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](self.stem(x))


def test_a_fake_audit_of_a_submodule_held_in_a_plain_list_says_to_register_it() -> None:
    """Its parameters are no parameters of the model: the fake copy leaves them real, and the fake run
    met them ("Please convert all Tensors to FakeTensors first"), told as an op fake tensors need values
    for; a real audit reads them as the model does."""
    from nhwc_audit.errors import PropagationError

    model, x = _PlainList().eval(), torch.randn(2, 3, 16, 16)
    assert audit(model, x, bandwidth=1e9).summary.breaks == 0
    with pytest.raises(PropagationError, match="nn.ModuleList"):
        audit(model, x, bandwidth=1e9, mode="fake")
