"""What a convolution's kernel copies inside, named as it is: each group's input slice or the weight.

At batch 1 the CPU runs a grouped Conv2d (fastvit, repvit, mobileone, ghostnetv3, efficientvit_b0's
depthwise 1 x 1 convolutions) on its slow backend, one group at a time, and clones each group's
channel slice of a channels_last input (a slice dense in no order; NCHW memory holds one sample's group
densely). The bytes were right (eager's count); the hint said a Conv3d's slow backend copied a
channels_last weight, which such a model has not. A Conv3d's slow backend does copy its weight, and
keeps that hint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_bytes


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One CPU thread, as the audits below run (the CPU picks its slow backend by thread count too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("groups", [48, 3])
def test_a_grouped_convolution_s_copies_of_its_groups_are_named_so(groups: int, one_thread: None) -> None:
    torch.manual_seed(0)
    model, x = nn.Conv2d(48, 48, 1, groups=groups).eval(), torch.randn(1, 48, 12, 24)
    report = audit(model, x, bandwidth=1e9, threads=1)
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added == 110_592
    (f,) = report.findings
    assert f.intrinsic and "one group at a time" in f.hint and "weight" not in f.hint and "Conv3d" not in f.hint
    assert audit(model, torch.randn(2, 48, 12, 24), bandwidth=1e9, threads=1).findings == ()


def test_a_conv3d_s_copy_of_its_weight_keeps_its_hint() -> None:
    torch.manual_seed(0)
    model, x = nn.Conv3d(16, 32, 3, padding=1).eval(), torch.randn(1, 16, 4, 8, 12)
    report = audit(model, x, bandwidth=1e9, threads=1)
    inside = [f for f in report.findings if f.intrinsic]
    assert inside and all("it copies its weight" in f.hint and "weight into that order" in f.hint for f in inside)
