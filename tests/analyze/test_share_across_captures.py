"""The channels_last share does not depend on the capture: the eager capture records every ATen
op a call dispatches (InstanceNorm's copy, view, batch norm and view back) where a graph has one
node for the call, and only the call's last op counts."""

from __future__ import annotations

import pytest
import torch

from nhwc_audit import audit
from nhwc_audit.examples import unet
from tests import models as M


@pytest.mark.parametrize("model", [M.InstanceNormNet, lambda: M.AddOrder(True), lambda: unet()[0], M.FlattenHead])
def test_the_share_is_the_same_in_every_capture(model: object) -> None:
    torch.manual_seed(0)
    m = model()  # type: ignore[operator]
    x = torch.randn(1, 3, 32, 32)
    shares = {}
    for capture in ("fx", "export", "hooks"):
        s = audit(m, x, bandwidth=1e9, capture=capture).summary
        shares[capture] = (s.spatial_nodes, s.nchw_nodes, round(s.channels_last_node_share, 6))
    assert shares["hooks"] == shares["fx"] == shares["export"], shares
