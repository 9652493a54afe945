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
