"""Real-model corpus (random weights, small inputs): capture succeeds (and which one), the
audit completes, and every module output's recorded layout is one eager forward hooks observe
on the same channels_last run. Known facts of torch 2.14.1 on CPU are pinned."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

from nhwc_audit import AuditReport, audit
from nhwc_audit.zoo.models import build
from tests.eager import consistent, hook_layouts, report_module_layouts

pytestmark = pytest.mark.slow

# name -> (capture, reverts, conversions, mixed, breaks)
EXPECTED = {
    "torchvision.resnet18": ("fx", 0, 0, 0, 0),
    "torchvision.mobilenet_v3_small": ("fx", 0, 0, 0, 0),
    "torchvision.convnext_tiny": ("fx", 0, 0, 0, 0),
    "torchvision.densenet121": ("fx", 0, 0, 0, 0),
    "torchvision.shufflenet_v2_x0_5": ("fx", 3, 18, 13, 0),
    "torchvision.swin_t": ("fx", 0, 0, 0, 0),
    "torchvision.deeplabv3_mobilenet_v3_large": ("fx", 0, 1, 1, 0),
    "timm.convnext_atto": ("fx", 0, 0, 0, 0),
    # 6 mixed: ctx.expand_as(v) * v, ctx NCHW after its sum; 9 of the conversions: the softmax of the query,
    # a one-channel slice of qkv (qkv.split([1, d, d], 1)), which its kernel copies whole first (batch 1)
    "timm.mobilevitv2_050": ("hooks", 12, 24, 21, 0),
    # each attention's GroupNorm reads the map's view(B, C, H * W), not row-major in channels_last: its
    # kernel copies it row-major first (the mid block's is copied in NCHW too, charged nothing)
    "diffusers.UNet2DModel": ("hooks", 0, 3, 0, 0),
    "diffusers.UNet2DConditionModel": ("hooks", 4, 4, 0, 0),
    # post_quant_conv reads the mean, a channel half of the latent distribution's parameters (torch.chunk);
    # the mid blocks' attention GroupNorms copy the map's view row-major (as UNet2DModel's)
    "diffusers.AutoencoderKL": ("hooks", 0, 3, 0, 0),
    "monai.BasicUNet2d": ("hooks", 18, 22, 4, 0),
    "monai.UNet2d": ("fx", 4, 4, 0, 0),
    "monai.UNet3d": ("fx", 1, 0, 0, 0),
    "monai.SegResNet2d": ("fx", 0, 0, 0, 0),
    "smp.Unet": ("fx", 0, 0, 0, 0),
    "smp.FPN": ("hooks", 1, 1, 0, 0),  # torch.stack(maps).sum(dim=0) writes NCHW, the conv converts back
    # Hugging Face transformers from small configs: torch.fx cannot trace them (they need their own
    # HFTracer); the eager recording captures them
    "transformers.ConvNext": ("hooks", 0, 0, 0, 0),
    "transformers.ResNet": ("hooks", 0, 0, 0, 0),
    "transformers.MobileViT": ("hooks", 4, 2, 0, 0),
    "transformers.Segformer": ("hooks", 7, 4, 0, 0),  # tokens back to maps with .contiguous(), bilinear upsample
    "transformers.Detr": ("hooks", 0, 0, 0, 0),
    "transformers.Swin2SR": ("hooks", 2, 0, 0, 0),  # linear over a 4D coords buffer .to(channels_last) made NHWC
}


def _audit(name: str, **options: object) -> tuple[AuditReport, object, tuple[object, ...], dict[str, object]]:
    family = name.split(".")[0]
    pytest.importorskip({"smp": "segmentation_models_pytorch"}.get(family, family))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, args, kwargs = build(name)
        return audit(model, args, example_kwargs=kwargs, bandwidth=1e9, **options), model, args, kwargs  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [n for n, (capture, *_) in EXPECTED.items() if capture == "hooks"])
def test_eager_recording_and_export_find_the_same(name: str) -> None:
    """For the models fx cannot trace, the eager recording (the default after fx) and
    torch.export's graph give the same findings: kind, module and bytes (ops are named as the
    model calls them; export names a few by their ATen op: upsample_bilinear2d for interpolate)."""
    eager, *_ = _audit(name)
    graph, *_ = _audit(name, capture="export")
    assert (eager.meta.capture, graph.meta.capture) == ("hooks", "export")

    def found(r: AuditReport) -> Counter[tuple[str, str, int]]:
        # latent breaks need a graph to re-run a view on channels_last input: export only
        return Counter((f.kind.value, f.module_path, f.bytes) for f in r.findings if f.kind.value != "latent_break")

    assert found(eager) == found(graph)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_model(name: str) -> None:
    report, model, args, kwargs = _audit(name)
    capture, reverts, conversions, mixed, breaks = EXPECTED[name]
    s = report.summary
    assert (report.meta.capture, s.reverts, s.conversions, s.mixed, s.breaks) == (
        capture,
        reverts,
        conversions,
        mixed,
        breaks,
    ), report.meta.capture_notes
    if capture != "fx":
        assert report.meta.capture_notes and report.meta.capture_notes[0].startswith("fx: ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observed = hook_layouts(model, args, kwargs=kwargs)  # type: ignore[arg-type]
    recorded = report_module_layouts(report)
    assert len(recorded) > 10
    assert consistent(recorded, observed) == {}
    for f in report.findings:
        assert f.module_path or f.module_type
        if capture == "hooks":  # the eager recording still names the user's modules and source lines
            assert f.source is not None


def test_monai_unet_instance_norms_are_the_fix() -> None:
    report, *_ = _audit("monai.UNet2d")
    assert [(x.op, x.kind.value) for x in report.fixes] == [("InstanceNorm2d", "revert")]
    assert all(f.module_type == "InstanceNorm2d" for f in report.findings if f.kind.value == "revert")


def test_diffusers_transformer_contiguous_is_found_with_source_line() -> None:
    report, *_ = _audit("diffusers.UNet2DConditionModel")
    (fix,) = report.fixes
    assert fix.op == "contiguous" and fix.source is not None and "transformer" in fix.source.file


def test_monai_basic_unet_falls_back_because_fx_graph_fails() -> None:
    report, *_ = _audit("monai.BasicUNet2d")
    assert report.meta.capture == "hooks"
    note = report.meta.capture_notes[0]
    assert note.startswith("fx: the captured graph is wrong: it raises ") and "where the eager model runs" in note
    assert "input shapes" not in note


@pytest.mark.parametrize("name", [n for n, (capture, *_) in EXPECTED.items() if capture == "fx"])
@pytest.mark.parametrize("batch", [1, 2])
def test_replay_vouches_for_real_fx_graphs(name: str, batch: int) -> None:
    """The fx check of every fx-captured model here is the replay: no eager forward runs."""
    import torch

    from nhwc_audit.prepare.copy import prepare_audit_copy, prepare_inputs
    from nhwc_audit.propagate.chain import capture_and_propagate
    from nhwc_audit.propagate.runner import Runner

    family = name.split(".")[0]
    pytest.importorskip({"smp": "segmentation_models_pytorch"}.get(family, family))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, args, kwargs = build(name)
        args = tuple(torch.cat([a] * batch) if isinstance(a, torch.Tensor) and a.dim() >= 4 else a for a in args)
        copy = prepare_audit_copy(model)
        sample, sample_kwargs = prepare_inputs(args, kwargs, dtype=None, device=torch.device("cpu"))
        captured = capture_and_propagate(copy.module, sample, sample_kwargs, runner=Runner(shared=copy.shared))
    assert captured.method == "fx" and captured.notes == ()
    assert captured.checked == "replay"
