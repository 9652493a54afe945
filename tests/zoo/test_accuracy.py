"""The audit's bytes against an independent eager measurement (:mod:`tests.eager_bytes`):
on every model of the zoo, within ±20% of what channels_last adds in eager, or both zero.
The table for people is ``reports/accuracy.md`` (``python -m tests.accuracy``)."""

from __future__ import annotations

import pytest

from nhwc_audit.zoo.models import MODELS
from tests.accuracy import compare, within

pytestmark = pytest.mark.slow

_PACKAGES = {"smp": "segmentation_models_pytorch"}


@pytest.mark.parametrize("name", list(MODELS))
def test_audit_bytes_match_eager(name: str) -> None:
    family = name.split(".")[0]
    pytest.importorskip(_PACKAGES.get(family, family))
    row = compare(name)
    assert within(row), row


@pytest.mark.parametrize("name", ["monai.UNet2d", "monai.BasicUNet2d", "monai.AttentionUnet2d"])
def test_monai_unets_are_exact(name: str) -> None:
    pytest.importorskip("monai")
    row = compare(name)
    assert row.eager_bytes > 0 and row.audit_bytes == row.eager_bytes


AUTOCAST_EXACT = [
    "timm.nfnet_l0",  # float32 weights standardised in forward, re-laid by bfloat16 convolutions
    "torchvision.deeplabv3_mobilenet_v3_large",
    "monai.BasicUNet2d",
    "monai.UNet3d",
    "timm.cspdarknet53",
    "timm.skresnet18",
    "smp.DeepLabV3Plus",
    "ultralytics.yolo11n",
    "diffusers.UNet2DConditionModel",
]
"""Models whose bfloat16 autocast audit equals eager's under the same autocast, real and fake (the
whole atlas does, but monai's SwinUNETR and transformers' MobileViT, off in float32 too)."""


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("name", AUTOCAST_EXACT)
def test_autocast_audits_are_exact(name: str, mode: str) -> None:
    import torch

    from nhwc_audit import audit
    from nhwc_audit.zoo.models import build
    from tests.eager_bytes import eager_bytes

    family = name.split(".")[0]
    pytest.importorskip(_PACKAGES.get(family, family))
    torch.manual_seed(0)
    model, args, kwargs = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_bytes(model.eval(), tuple(args), kwargs).added
    r = audit(model, tuple(args), example_kwargs=kwargs or None, autocast=True, mode=mode, bandwidth=1e12)  # type: ignore[arg-type]
    assert r.summary.bytes_moved == expected
