"""Public models outside the zoo where audits were checked against eager and found wrong
(random weights, small inputs): the reproductions, kept. timm's MaxViT relative-position bias
(a 2D table permuted to (1, heads, N, N): channels_last-strided in the NCHW model too) gave
false reverts; torchvision's Swin V2 had latent breaks in fx that the eager capture missed;
monai UNETR's ``proj_feat`` copies in NCHW on its last call only, and the eager capture charged
another call for it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from nhwc_audit import audit, check

pytestmark = pytest.mark.slow


def test_maxvit_relative_position_bias_is_no_finding() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("maxvit_pico_rw_256", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "fx"
    assert report.findings == ()
    check(model, x, bandwidth=1e9, fail_on="revert")


def test_swin_v2_findings_are_the_same_in_a_graph_and_the_eager_capture() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.swin_v2_t(weights=None).eval(), torch.randn(1, 3, 64, 64)
    found = {}
    for capture in ("fx", "hooks"):
        report = audit(model, x, bandwidth=1e9, capture=capture)
        found[capture] = Counter((f.kind.value, f.module_path, f.bytes) for f in report.findings)
    assert found["fx"] == found["hooks"]
    assert Counter(k for k, _, _ in found["fx"].elements()) == {"revert": 12, "latent_break": 12}


def _unetr() -> tuple[torch.nn.Module, torch.Tensor]:
    """monai's UNETR, small, and a 32^3 one-channel volume."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.UNETR(
        in_channels=1,
        out_channels=2,
        img_size=32,
        spatial_dims=3,
        feature_size=8,
        hidden_size=96,
        mlp_dim=192,
        num_heads=4,
    )
    return model.eval(), torch.randn(1, 1, 32, 32, 32)


def test_unetr_projections_are_charged_where_nchw_does_not_copy() -> None:
    model, x = _unetr()
    copies: list[bool] = []  # eager, as built: does each proj_feat call's .contiguous() copy?
    proj = model.proj_feat

    def watched(t: torch.Tensor) -> torch.Tensor:
        viewed = t.view([t.size(0), *model.proj_view_shape]).permute(model.proj_axes)
        copies.append(not viewed.is_contiguous())
        return proj(t)

    model.proj_feat = watched  # type: ignore[method-assign]
    with torch.no_grad():
        model(x)
    del model.proj_feat
    assert copies == [False, False, False, True]
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "hooks"
    charged = [
        f.bytes for f in report.findings if f.kind.value == "revert" and f.source and f.source.function == "proj_feat"
    ]
    nbytes = 96 * 2 * 2 * 2 * 4 * 2  # read and written
    assert charged == [0 if copied else nbytes for copied in copies]


def test_unetr_export_keeps_the_projections_copies() -> None:
    """torch.export traced UNETR's patch embedding (a Conv3d of a C == 1 volume) NCDHW, where eager
    gives channels_last_3d, and so wrote only one of ``proj_feat``'s four ``.contiguous()`` into its
    graph: three reverts were blamed on the ConvTranspose3d after them. A train audit of a model fx
    cannot trace runs this capture."""
    model, x = _unetr()
    found = {
        capture: sorted((f.kind.value, f.op, f.bytes) for f in audit(model, x, capture=capture, bandwidth=1e9).findings)
        for capture in ("export", "hooks")
    }
    assert found["export"] == found["hooks"]
    assert [nbytes for _, op, nbytes in found["export"] if op == "contiguous"] == [0, 6144, 6144, 6144]


def test_halonet_zero_byte_reverts_are_the_same_in_every_capture() -> None:
    """timm halonet26t's attention copies its blocks in either layout (0 B reverts), with the same
    keys in fx, the eager capture and export (a walk along NCHW outputs only kept 11 in fx and 9 in
    the eager capture). The three folds of the attention's output back into blocks stay findings
    (NCHW flows from them to the convolutions after, whose conversions are charged); the reshapes of
    q and kv and the attention scores, whose data flows on only as tokens and channels-innermost maps,
    are none (they were, 14 findings in all, until a 0 B revert's path had to stay off channels_last)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("halonet26t", pretrained=False).eval(), torch.randn(1, 3, 256, 256)
    keys = {
        c: Counter(f.key for f in audit(model, x, bandwidth=1e9, capture=c).findings) for c in ("fx", "hooks", "export")
    }
    assert keys["fx"] == keys["hooks"] == keys["export"]
    assert sum(keys["fx"].values()) == 6
    assert sorted(k.split(":")[0] for k in keys["fx"]) == ["conversion"] * 3 + ["revert"] * 3


@pytest.mark.parametrize("name", ["levit_conv_128s", "efficientvit_b0"])
def test_attention_on_a_conv_map_at_batch_2_is_charged_what_eager_moves(name: str) -> None:
    """The heads of a channels_last conv's map, folded with the batch by matmul (a copy at batch 2,
    a view in NCHW): 671,744 and 393,216 B of eager's 2,654,208 and 1,179,648 at 128x128 before
    the recorder kept copies that reorder a map (EfficientViT's through a ReLU of the heads)."""
    timm = pytest.importorskip("timm")
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    size = {"img_size": 128} if name.startswith("levit") else {}  # LeViT's attention biases are sized by it
    model = timm.create_model(name, pretrained=False, num_classes=10, **size).eval()
    x = torch.randn(2, 3, 128, 128)
    expected = eager_bytes(model, (x,)).added
    for capture in ("auto", "hooks"):
        assert audit(model, x, bandwidth=1e9, capture=capture).summary.bytes_moved == expected, capture


def test_ghostnet_adds_into_a_view_in_place_and_trains_as_eager() -> None:
    """timm GhostNetV2's blocks add the shortcut into a slice of a cat in place (``x += ...``):
    eager's backward moves gradients through that write (CopySlices). torch.fx's own tracer
    records an out-of-place add, and the train audit charged 964,608 B of eager's 2,498,560."""
    timm = pytest.importorskip("timm")
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = timm.create_model("ghostnetv2_100", pretrained=False).train(), torch.randn(2, 3, 64, 64)
    truth = eager_backward_bytes(model, (x,)).added
    assert truth > 964_608
    for how in ({}, {"mode": "fake"}):
        report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
        assert report.meta.capture == "fx" and report.meta.backward
        assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth, how


@pytest.mark.parametrize(
    "name,old",
    [("convnext_tiny", 491_520), ("efficientnet_b0", 163_840), ("shufflenet_v2_x0_5", 403_456)],
)
def test_train_audits_charge_the_backward_eager_adds(name: str, old: int) -> None:
    """torchvision at 64x64, batch 2, training. Before backward findings were seen node by node and
    netted against NCHW's backward: ConvNeXt got false alarms (NCHW's backward re-lays as much),
    EfficientNet's squeeze-excite sums (a mean's NCHW gradient added to the channels_last one)
    were missed, and so were ShuffleNet's ReLUs writing slices of an NCHW gradient channels_last
    (``old``: what the audit charged then)."""
    torchvision = pytest.importorskip("torchvision")
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = getattr(torchvision.models, name)(weights=None).train(), torch.randn(2, 3, 64, 64)
    truth = eager_backward_bytes(model, (x,)).added
    assert truth != old
    for how in ({}, {"mode": "fake"}):
        report = audit(model, x, bandwidth=1e9, train=True, **how)  # type: ignore[arg-type]
        assert report.meta.capture == "fx" and report.meta.backward
        assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth, how


@pytest.mark.parametrize(
    "build",
    ["diffusers_vqmodel", "monai_vnet"],
)
def test_a_fake_train_audit_charges_the_backward_a_real_one_charges(build: str) -> None:
    """diffusers' VQModel (its attention's batch-1 views: the NCHW backward baseline on fake
    tensors netted 131,072 B that the real one does not) and monai's VNet (ELU's CPU backward
    strides the gradient otherwise than its meta kernel): fake train audits were 38% and 28% off."""
    torch.manual_seed(0)
    if build == "diffusers_vqmodel":
        diffusers = pytest.importorskip("diffusers")
        model = diffusers.VQModel(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=16,
            num_vq_embeddings=32,
            vq_embed_dim=4,
        )
        x = torch.randn(1, 3, 32, 32)
    else:
        nets = pytest.importorskip("monai.networks.nets")
        model, x = nets.VNet(spatial_dims=3, in_channels=1, out_channels=2), torch.randn(1, 1, 32, 32, 32)
    found = {}
    for mode in ("real", "fake"):
        report = audit(model.train(), x, bandwidth=1e9, mode=mode, train=True)
        found[mode] = Counter((f.kind.value, f.node, f.bytes) for f in report.findings)
    assert sum(b for (k, _, b) in found["real"] if k == "backward") > 0
    assert found["fake"] == found["real"]


def test_a_segformer_that_hooks_itself_in_forward_is_audited_from_an_eager_run() -> None:
    """transformers' ``capture_outputs`` registers hooks on the encoder's blocks in forward and sets
    a flag saying so. fx's failed trace had set both; the flag was put back and the hooks stayed, so
    the eager recording registered them again, and every hidden state was captured twice: a false
    'model's own error' at the decode head. Charged what eager moves."""
    transformers = pytest.importorskip("transformers")
    from tests.eager_bytes import eager_bytes

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(pixel_values=x).logits

    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_channels=3, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64,
        num_attention_heads=[1, 2, 2, 4], num_labels=3,
    )  # fmt: skip
    model, x = Logits(transformers.SegformerForSemanticSegmentation(config)).eval(), torch.randn(1, 3, 64, 64)
    report = audit(model, x, bandwidth=1e9)
    assert report.meta.capture == "hooks" and report.summary.bytes_moved == eager_bytes(model, (x,)).added > 0


def test_swinunetr_decoder_cats_are_charged_per_call() -> None:
    """monai's SwinUNETR joins each decoder's upsampled map with its skip in one method: the deepest
    skip (the rearranged tokens) copies in the NCHW model only, the others in the channels_last model
    only. Per source line the reference netted one against the others (24,576 B under the audit, a
    sweep of public models); per call it charges what the audit charges."""
    from tests.eager_bytes import eager_bytes

    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.SwinUNETR(in_channels=3, out_channels=2, spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64)
    e = eager_bytes(model.eval(), (x,))
    assert audit(model, x, bandwidth=1e9).summary.bytes_moved == e.added_per_call > e.added
