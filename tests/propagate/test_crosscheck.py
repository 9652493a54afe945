"""Cross-check against eager PyTorch: every module's output layout recorded by the audit
equals what forward hooks observe on the same channels_last run (torchvision models,
random weights, small inputs)."""

from __future__ import annotations

import pytest
import torch

from nhwc_audit import audit
from tests import models as M
from tests.eager import hook_layouts, report_module_layouts

tvm = pytest.importorskip("torchvision.models")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("resnet18", (1, 3, 64, 64), {"revert": 0, "conversion": 0, "mixed": 0, "break": 0}),
        ("mobilenet_v3_small", (1, 3, 64, 64), {"revert": 0, "conversion": 0, "mixed": 0, "break": 0}),
        ("convnext_tiny", (1, 3, 64, 64), {"revert": 0, "conversion": 0, "mixed": 0, "break": 0}),
        ("densenet121", (1, 3, 64, 64), {"revert": 0, "conversion": 0, "mixed": 0, "break": 0}),
        # channel_shuffle's 5D .contiguous() leaves NHWC in each stage's first block (3 reverts);
        # the 13 following blocks cat an NCHW half with an NHWC branch (13 mixed).
        ("shufflenet_v2_x0_5", (1, 3, 64, 64), {"revert": 3, "conversion": 18, "mixed": 13, "break": 0}),
    ],
)
def test_torchvision_module_layouts_match_eager_hooks(
    name: str, shape: tuple[int, ...], expected: dict[str, int]
) -> None:
    torch.manual_seed(0)
    model = getattr(tvm, name)()
    x = torch.randn(shape)
    report = audit(model, x, bandwidth=1e9)
    recorded = report_module_layouts(report)
    observed = hook_layouts(model, (x,))
    assert recorded.keys() == observed.keys()
    mismatches = {p: (recorded[p], observed[p]) for p in observed if recorded[p] != observed[p]}
    assert mismatches == {}
    counts = {k: sum(1 for f in report.findings if f.kind.value == k) for k in expected}
    assert counts == expected


def test_shufflenet_fix_is_the_channel_shuffle_line() -> None:
    report = audit(tvm.shufflenet_v2_x0_5(), torch.randn(1, 3, 64, 64), bandwidth=1e9)
    (fix,) = report.fixes
    assert fix.op == "contiguous" and fix.source is not None
    assert fix.source.file.endswith("shufflenetv2.py") and "contiguous" in fix.source.code
    # 34 layout changes, plus the view after each of the 3 reverting .contiguous() calls: it raises
    # once that .contiguous() keeps channels_last_3d, so it is a latent break of the same fix
    assert fix.findings == len(report.findings) == 37 and len(fix.roots) == 16
    assert [f.op for f in report.findings if f.kind.value == "latent_break"] == ["view"] * 3


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (M.InstanceNormNet(), (1, 3, 8, 8)),
        (M.CatMixed(), (1, 3, 8, 8)),
        (M.AddOrder(True), (1, 3, 8, 8)),
        (M.ConvNeXtBlock(), (1, 8, 8, 8)),
        (M.Conv3dNet(), (2, 2, 16, 16, 16)),
        (M.Conv3dNet(), (1, 2, 8, 8, 8)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "x".join(map(str, v)),
)
def test_small_models_match_eager_hooks(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    report = audit(model, x, bandwidth=1e9)
    assert report_module_layouts(report) == hook_layouts(model, (x,))
