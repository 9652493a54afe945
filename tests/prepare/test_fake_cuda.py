"""``--mode fake --device cuda`` predictions against what eager CUDA kernels did, measured on an
NVIDIA H200 with torch 2.11 (``python -m tests.cuda_check``; ``tests/test_cuda.py`` checks the same
on a GPU). On a CPU machine the prediction is all there is: each case here is one where the meta
kernels or FakeTensor's strides gave another layout than the CUDA kernel, and the audit's
corrections (:mod:`nhwc_audit.propagate.corrections`, :mod:`nhwc_audit.propagate.fake_strides`)
now follow the kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.cuda_check import _battery_case
from tests.propagate import test_op_cases_vs_eager as ops


def _fake(model: nn.Module, x: torch.Tensor, device: str = "cuda") -> list[tuple[str, str, int]]:
    r = audit(model, x, mode="fake", device=device, bandwidth=1e12)
    return [(f.kind.value, f.node, f.bytes) for f in r.findings]


@pytest.mark.parametrize("name", ["upsample_bilinear", "upsample_bilinear_aligned", "upsample_trilinear"])
def test_a_linear_upsample_under_16_channels_stays_channels_last_on_cuda(name: str) -> None:
    """The meta decomposition returns NCHW under 16 channels (the channels_last kernel's own choice
    of path); the CUDA kernel allocates its output in the input's format at any channel count."""
    model, x = _battery_case(name)
    assert _fake(model.eval(), x) == []


def test_a_linear_upsample_of_a_pooled_map_stays_channels_last_on_cuda() -> None:
    """An N x C x 1 x 1 pooled map is strided channels_last, which the kernel's
    ``suggest_memory_format()`` reads (ASPP's image pooling, upsampled back)."""
    model, x = _battery_case("upsample_of_pooled_1")
    assert _fake(model.eval(), x) == []


def test_pixel_unshuffle_reverts_on_cuda_not_on_the_cpu() -> None:
    """CUDA has no pixel_unshuffle kernel: its composite copies to NCHW; the CPU kernel keeps
    channels_last. The meta kernel kept channels_last for both."""
    model, x = _battery_case("pixel_unshuffle")
    assert [k for k, _, _ in _fake(model.eval(), x)] == ["revert", "conversion"]
    assert _fake(model.eval(), x, device="cpu") == []


class TokensBackToMap(nn.Module):
    """diffusers' attention at batch 1: tokens back to a map through a view whose batch stride is
    the channel count (as SDPA's output gives it), a residual ``(m + h) / 2``, and a cat of two such
    maps before a GroupNorm. TensorIterator keeps the odd batch stride through the add and the
    division; ``suggest_memory_format()`` then says NCHW, the cat writes NCHW and CUDA's GroupNorm
    copies nothing in the NCHW model. FakeTensor gave the division plain channels_last strides, so
    the fake NCHW run copied at the GroupNorm too and the revert was netted to nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.proj = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 16)
        self.norm, self.out = nn.GroupNorm(4, 32), nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        n, c, hh, ww = h.shape
        t = self.proj(h.flatten(2).transpose(1, 2)).view(hh * ww, 1, c).permute(1, 0, 2)
        r = (t.transpose(1, 2).reshape(n, c, hh, ww) + h) / 2
        y = torch.cat([r, r * 2], 1)  # channels_last; in NCHW a copy to NCHW
        return self.out(self.norm(y))


def test_a_group_norm_after_a_batch_1_attention_is_charged_on_cuda() -> None:
    torch.manual_seed(0)
    found = _fake(TokensBackToMap().eval(), torch.randn(1, 3, 8, 8))
    assert [(k, node) for k, node, _ in found] == [("revert", "norm"), ("conversion", "out")]
    assert all(b == 2 * 32 * 8 * 8 * 4 for _, _, b in found), found


def test_nan_to_num_keeps_a_pooled_maps_strides_on_cuda() -> None:
    """A pointwise op's strides come from TensorIterator code CPU and CUDA share: the CPU kernel
    answers for CUDA too (``nan_to_num`` of an N x C x 1 x 1 map keeps its channels_last strides,
    and the upsample after it stays channels_last)."""
    torch.manual_seed(0)
    model = ops.CASES["image_pooling_nan_to_num_upsampled"]().eval()
    assert _fake(model, torch.randn(2, 8, 16, 16)) == []


def test_a_half_precision_add_of_an_expanded_operand_keeps_channels_last() -> None:
    """FakeTensor computes a float16 add as its reference does, upcast first: the cast of an
    expanded operand (dense NCHW) picked the output's layout. TensorIterator reads the other."""
    model, x = _battery_case("expand_channel_slice")
    for device in ("cpu", "cuda"):
        r = audit(model.eval(), x, mode="fake", device=device, autocast=True, bandwidth=1e12)
        assert r.findings == (), device


RECORDED_CUDA_BYTES = {
    "torchvision.deeplabv3_mobilenet_v3_large": 663_552,
    "torchvision.lraspp_mobilenet_v3_large": 0,
    "smp.FPN": 905_216,
    "monai.SegResNet2d": 1_376_256,
    "diffusers.UNet2DModel": 7_864_320,
    "diffusers.AutoencoderKL": 7_340_032,
    "diffusers.UNet2DConditionModel": 2_719_744,
}
"""What a real audit on an H200 (torch 2.11, float32) charged, equal to what eager CUDA adds
(``python -m tests.cuda_check --only models``); the fake predictions differed on every one."""


def test_a_cuda_autocast_prediction_runs_in_float16_on_a_machine_without_cuda() -> None:
    """``torch.autocast('cuda')`` disables itself where CUDA is not available (a warning), and a
    float16 prediction ran in float32: twice the bytes. Fake CUDA tensors follow CUDA's autocast
    policy when its flags are set: convolutions in float16, GroupNorm in float32."""
    from tests.prepare.test_fake import WithGroupNorm

    torch.manual_seed(0)
    r = audit(WithGroupNorm().eval(), torch.randn(1, 3, 8, 8), mode="fake", device="cuda", autocast=True)
    dtypes = {n.name: n.outputs[0].dtype for n in r.nodes if n.outputs}
    assert (dtypes["conv"], dtypes["norm"], dtypes["conv2"]) == ("float16", "float32", "float16")
    assert not torch.is_autocast_enabled("cuda")


RECORDED_CUDA_FP16_BYTES = {
    "torchvision.deeplabv3_mobilenet_v3_large": 331_776,  # a cat of float16 and float32 (upsampled) maps
    "diffusers.UNet2DModel": 5_832_704,
    "diffusers.AutoencoderKL": 5_341_184,
    "monai.SegResNet2d": 1_032_192,
    "monai.BasicUNet2d": 486_912,
    "monai.UNet2d": 69_632,
    "smp.FPN": 700_416,
}
"""Under ``torch.autocast('cuda', torch.float16)`` on the same H200: what eager CUDA added and a real
audit charged. A CPU machine's prediction ran in float32 (autocast disabled itself), and charged a
convolution's float32 input at float32 where the kernel re-lays its float16 cast."""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "autocast"),
    [(n, False) for n in sorted(RECORDED_CUDA_BYTES)] + [(n, True) for n in sorted(RECORDED_CUDA_FP16_BYTES)],
)
def test_a_cuda_prediction_charges_what_a_cuda_audit_measured(name: str, autocast: bool) -> None:
    from nhwc_audit.zoo.models import build

    pytest.importorskip({"smp": "segmentation_models_pytorch"}.get(name.split(".")[0], name.split(".")[0]))
    torch.manual_seed(0)
    model, args, kwargs = build(name)
    r = audit(
        model, tuple(args), example_kwargs=kwargs or None, mode="fake", device="cuda", autocast=autocast, bandwidth=1e12
    )
    assert r.summary.bytes_moved == (RECORDED_CUDA_FP16_BYTES if autocast else RECORDED_CUDA_BYTES)[name]


@pytest.mark.parametrize("name", ["pad_reflect", "pad_replicate", "pad_circular", "pad3d_reflect"])
def test_a_pad_revert_on_cuda_never_recommends_a_mode_that_reverts_there(name: str) -> None:
    """On CUDA reflect and replicate padding return NCHW too (only constant keeps channels_last):
    the hint written for the CPU recommended them."""
    model, x = _battery_case(name)
    r = audit(model.eval(), x, mode="fake", device="cuda", bandwidth=1e12)
    (hint,) = [f.hint for f in r.findings if f.kind.value == "revert"]
    assert "mode='constant'" in hint and "(constant, reflect, replicate)" not in hint


class OwnCudaAutocast(nn.Module):
    """A model that opens its own ``torch.autocast('cuda')`` block (diffusers pipelines do)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        with torch.autocast("cuda", dtype=torch.float16):
            return self.d(y)


@pytest.mark.parametrize("capture", ["auto", "hooks"])
def test_a_models_own_cuda_autocast_block_runs_as_on_cuda(capture: str) -> None:
    """On a machine without CUDA that block switched autocast off inside (a warning), and its
    convolution met the float16 map of the audit's autocast: the audit failed, blaming the model."""
    r = audit(
        OwnCudaAutocast().eval(), torch.randn(2, 3, 8, 8), mode="fake", device="cuda", autocast=True, capture=capture
    )  # type: ignore[arg-type]
    assert {n.outputs[0].dtype for n in r.nodes if n.outputs and n.name != "x"} == {"float16"}
    assert not torch.is_autocast_enabled("cuda")


def test_nn_upsampling_bilinear2d_is_corrected_like_interpolate() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(8, 8, 1))
    assert _fake(model.eval(), torch.randn(2, 3, 16, 16)) == []


def test_pixel_unshuffle_of_a_channel_slice_reverts_on_cuda() -> None:
    """CUDA's composite ends in a contiguous clone whatever the input's strides."""

    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(nn.functional.pixel_unshuffle(self.a(x)[:, :4], 2))

    r = audit(Sliced().eval(), torch.randn(2, 3, 16, 16), mode="fake", device="cuda", bandwidth=1e12)
    assert [(f.kind.value, f.node) for f in r.findings] == [("revert", "pixel_unshuffle"), ("conversion", "o")]


def test_the_verdict_of_a_float16_cuda_audit_does_not_call_it_float32() -> None:
    """The verdict's "float32 on GPU" reason read the model's dtype, not autocast's."""
    from tests.prepare.test_fake import WithGroupNorm

    model, x = WithGroupNorm().eval(), torch.randn(1, 3, 8, 8)
    plain = audit(model, x, mode="fake", device="cuda")
    amp = audit(model, x, mode="fake", device="cuda", autocast=True)
    assert any("float32 on GPU" in r for r in plain.verdict.reasons)
    assert not any("float32 on GPU" in r for r in amp.verdict.reasons)


class ConvAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        n, c, hh, ww = h.shape
        q = h.flatten(2).transpose(1, 2).reshape(n, hh * ww, 2, c // 2).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, q, q)
        return self.o(y.transpose(1, 2).reshape(n, hh, ww, c).permute(0, 3, 1, 2))


def test_a_cuda_prediction_says_attention_is_its_math_path() -> None:
    """FakeTensor cannot ask a GPU which attention kernel it picks and runs the math path; an
    H200's fused kernels return other strides (timm coatnet_nano_rw_224 in float32: 2,709,504 B
    predicted, none measured). The prediction says so; a CPU audit has nothing to say."""
    model, x = ConvAttention().eval(), torch.randn(2, 3, 8, 8)
    cuda = audit(model, x, mode="fake", device="cuda", bandwidth=1e12)
    assert any("scaled_dot_product_attention at 1 node(s)" in n for n in cuda.meta.capture_notes)
    cpu = audit(model, x, mode="fake", device="cpu", bandwidth=1e12)
    assert not any("scaled_dot_product_attention" in n for n in cpu.meta.capture_notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the backward runs")
def test_a_cuda_train_prediction_without_a_gpu_audits_forward_and_says_why_not_backward() -> None:
    """torch's autograd engine sets up a CUDA device for a backward of CUDA tensors, fake ones too:
    on a machine without one the train audit raised a raw RuntimeError (hasPrimaryContext)."""
    from tests.prepare.test_fake import WithGroupNorm

    r = audit(WithGroupNorm().train(), torch.randn(2, 3, 8, 8), mode="fake", device="cuda", train=True)
    assert not r.meta.backward
    assert [f.kind.value for f in r.findings] == ["revert", "conversion"]
    assert any(n.startswith("backward: not audited (torch's autograd engine") for n in r.meta.capture_notes)
