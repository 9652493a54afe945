"""Ultralytics YOLO and RT-DETR, built from Ultralytics' own configs with random weights
(no weight or font download): the detector family people train most. fx cannot trace them
and their heads cache anchors on the module when the input shape changes; every mode must
audit them, and agree with eager PyTorch."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from nhwc_audit import AuditReport, audit
from nhwc_audit.zoo.models import build
from tests.eager import consistent, hook_layouts, report_module_layouts
from tests.support import BANDWIDTH

pytestmark = pytest.mark.slow
pytest.importorskip("ultralytics")

_ATTN = {
    ("revert", "model.10.m.0.attn"),  # v.reshape(B, C, H, W) of a (B, heads, d, H*W) view of NHWC qkv
    ("conversion", "model.10.m.0.attn.pe.conv"),
    ("conversion", "model.10.m.0.attn.proj.conv"),
    ("mixed", "model.10.m.0.attn"),
}
# the head's DFL: a 1x1 conv to one channel of the box distributions' softmax (1 x 16 x 4 x anchors,
# NCHW). Its weight is channels_last, so the kernel computes channels_last and copies that input
# whole: 1,075,200 B at 320 x 320, the profiler's aten::copy_ count (a second copy NCHW does not make)
_DFL8, _DFL11 = {("conversion", "model.22.dfl.conv")}, {("conversion", "model.23.dfl.conv")}
# at batch 1 the first bottleneck of each C2f (C3k2, and the PSA's attention) reads the second half
# of ``cv1(x).chunk(2, 1)``, a channel slice that channels_last memory holds in no dense order: its
# conv's kernel copies it whole first, where NCHW memory holds it densely (2,457,600 B in yolov8n,
# the profiler's aten::contiguous under aten::_convolution, in the channels_last run only)
_C2F8 = {("conversion", f"model.{i}.m.0.cv1.conv") for i in (2, 4, 6, 8, 12, 15, 18, 21)}
_C2F11 = (
    {("conversion", f"model.{i}.m.0.cv1.conv") for i in (2, 4, 6, 8, 13, 16, 19, 22)}
    | {
        ("conversion", f"model.{i}.m.0.cv2.conv")
        for i in (6, 8, 22)  # C3k: cv1 and cv2 read the same half
    }
    | {("conversion", "model.10.m.0.attn.qkv.conv")}
)
# name -> (kind, module path) of every finding, 1x3x320x320 on CPU, torch 2.14.1
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "ultralytics.yolov8n": _DFL8 | _C2F8,
    "ultralytics.yolov8n-seg": _DFL8 | _C2F8,
    "ultralytics.yolov8n-pose": _DFL8 | _C2F8,
    "ultralytics.yolo11n": _ATTN | _DFL11 | _C2F11,
    "ultralytics.yolo11n-seg": _ATTN | _DFL11 | _C2F11,
    "ultralytics.yolo11n-pose": _ATTN | _DFL11 | _C2F11,
    # the decoder's deformable attention samples value maps with grid_sample into NCHW in either
    # layout, and nothing after it is a map: those 18 copies (0 B) are no findings
    "ultralytics.rtdetr-l": {("conversion", "model.12.conv"), ("revert", "model.11")},
}


def _findings(report: AuditReport) -> set[tuple[str, str]]:
    return {(f.kind.value, f.module_path) for f in report.findings if f.kind.value != "backward"}


def _audit(name: str, training: bool = False, **options: Any) -> tuple[AuditReport, Any, tuple[Any, ...]]:
    """Audit a fresh build (``training``: in train mode; Detect then returns raw features)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, args, _ = build(name)
        return audit(model.train(training), args, bandwidth=BANDWIDTH, **options), model, args


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_mode_audits_and_agrees_with_eager(name: str) -> None:
    report, model, args = _audit(name)
    assert report.meta.capture == "hooks"  # fx cannot trace them; one eager forward records them
    assert report.meta.capture_notes[0].startswith("fx: torch.fx could not trace")
    assert _findings(report) == EXPECTED[name]
    # every module output's layout is one that forward hooks see on an eager channels_last run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observed = hook_layouts(model, args)
    assert consistent(report_module_layouts(report), observed) == {}
    # and torch.export's graph finds the same
    graph, _, _ = _audit(name, capture="export")
    assert graph.meta.capture == "export" and _findings(graph) == EXPECTED[name]


@pytest.mark.parametrize("name", ["ultralytics.yolov8n", "ultralytics.yolo11n", "ultralytics.rtdetr-l"])
def test_the_anchor_cache_never_leaks_into_later_runs(name: str) -> None:
    """export traces on fake tensors: what Detect caches there is put back afterwards, and said."""
    report, model, args = _audit(name, capture="export")
    assert any("sets attributes on its modules in forward" in n for n in report.meta.capture_notes)
    for _, m in model.named_modules():  # the user's model never sees a fake tensor either
        assert not any(type(v).__name__ == "FakeTensor" for v in vars(m).values())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fake_mode_predicts_the_same_findings(name: str) -> None:
    report, _, _ = _audit(name, mode="fake")
    assert report.meta.mode == "fake" and report.meta.capture == "hooks"
    assert _findings(report) == EXPECTED[name]


@pytest.mark.parametrize("name", ["ultralytics.yolov8n", "ultralytics.yolo11n-seg", "ultralytics.rtdetr-l"])
@pytest.mark.parametrize("model_mode", ["train", "eval"])
def test_backward_audit_runs(name: str, model_mode: str) -> None:
    report, _, _ = _audit(name, training=model_mode == "train")
    backward, _, _ = _audit(name, training=model_mode == "train", train=True)
    assert backward.meta.backward and any(n.startswith("backward: ") for n in backward.meta.capture_notes)
    assert _findings(backward) == _findings(report)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_attention_at_batch_2_is_charged_what_eager_moves(mode: str) -> None:
    """C2PSA's attention views the qkv conv's NHWC map as (B, heads, d, H*W): at batch 2 each matmul
    copies its operands to fold batch and heads, where NCHW views them (charged 131,072 B of
    eager's 196,608 at 128x128 before the recorder kept copies that reorder a map)."""
    import torch

    from tests.eager_bytes import eager_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build("ultralytics.yolo11n")
        model = model.eval()
        torch.manual_seed(0)
        x = torch.randn(2, 3, 128, 128)
        expected = eager_bytes(model, (x,)).added
        report = audit(model, x, bandwidth=BANDWIDTH, mode=mode)
    assert report.summary.bytes_moved == expected
    assert any(f.op == "matmul" and f.bytes > 0 for f in report.findings)
