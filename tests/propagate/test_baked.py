"""Strides torch.export fixed from the channels_last sample, read as NCHW steps for the NCHW runs."""

from __future__ import annotations

import pytest
import torch

from nhwc_audit.propagate.baked import relaid

SHAPE = (2, 8, 16, 16)


@pytest.mark.parametrize("dim", range(4))
@pytest.mark.parametrize("times", [1, 2, 3])
def test_a_step_of_one_dim_is_the_same_dim_s_step_in_nchw(dim: int, times: int) -> None:
    cl = torch.empty(SHAPE).to(memory_format=torch.channels_last).stride()
    assert relaid(times * cl[dim], SHAPE) == times * torch.empty(SHAPE).stride()[dim]


def test_a_step_of_several_dims_and_a_3d_map() -> None:
    # one row down, two pixels right and three channels on; a volume's one plane deeper
    assert relaid(128 + 2 * 8 + 3, SHAPE) == 16 + 2 + 3 * 256
    volume = (1, 4, 6, 8, 8)
    cl = torch.empty(volume).to(memory_format=torch.channels_last_3d).stride()
    assert relaid(cl[2], volume) == torch.empty(volume).stride()[2]


def test_a_negative_step_is_none() -> None:
    assert relaid(-1, SHAPE) is None
