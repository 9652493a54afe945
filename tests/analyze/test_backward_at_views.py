"""A backward finding is the gradient of one tensor: an ``nn.Identity`` (timm's DropPath in eval,
ConvNeXt V2's and PoolFormer's) returns its input, so the gradient arriving there is its
producer's, found once (a graph's Identity node, which export drops, must not count it again)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit, convert
from tests.support import relayed


class IdentityAfterConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.drop_path = nn.Identity()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.drop_path(self.conv(x)), 1).flatten(1))


def test_a_gradient_through_an_identity_is_found_once() -> None:
    torch.manual_seed(0)
    model, x = IdentityAfterConv().train(), torch.randn(2, 3, 8, 8)
    cl = convert(model)
    y = cl.conv(x.contiguous(memory_format=torch.channels_last))
    assert cl.drop_path(y) is y  # eager: one tensor, one gradient
    found = {}
    for capture in ("fx", "export"):
        r = audit(model, x, train=True, capture=capture, bandwidth=1e9)
        found[capture] = [(f.module_path, f.bytes) for f in relayed(r.findings)]
    assert found["fx"] == found["export"] == [("conv", 2 * 2 * 16 * 2 * 2 * 4)]


class InPlaceAfterConv(nn.Module):
    """A ReLU in place after the conv (torchvision's and timm's ResNets), as a module or as a
    function: an op of its own, whose output's gradient is not the conv's."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.relu(y, inplace=True) if self.functional else self.relu(y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _eager_gradient_strides(model: nn.Module, x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The strides of the gradients eager hands the conv's output and the ReLU's."""
    cl = convert(model)
    seen: dict[str, tuple[int, ...]] = {}
    y = cl.conv(x.contiguous(memory_format=torch.channels_last))
    y.register_hook(lambda g: seen.__setitem__("conv", g.stride()))
    z = torch.relu_(y)
    z.register_hook(lambda g: seen.__setitem__("relu", g.stride()))
    out = cl.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))
    out.sum().backward()
    return seen["conv"], seen["relu"]


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_an_in_place_op_has_a_gradient_of_its_own(functional: bool) -> None:
    """Its output aliases its input, as a view's does, but autograd hands it another gradient:
    the adaptive pool's backward gives it NCHW where the ReLU's backward gives the conv
    channels_last. The in-place ReLU's backward finding was missed (resnet18: none at
    layer4.1.relu)."""
    torch.manual_seed(0)
    model, x = InPlaceAfterConv(functional).train(), torch.randn(2, 3, 8, 8)
    conv_grad, relu_grad = _eager_gradient_strides(model, x)
    assert conv_grad == (64, 1, 32, 16) and relu_grad == (64, 4, 2, 1)  # eager: NHWC, then NCHW
    found = {}
    for capture in ("fx", "export"):
        r = audit(model, x, train=True, capture=capture, bandwidth=1e9)
        found[capture] = [(f.op, f.bytes) for f in relayed(r.findings)]
    assert len(found["fx"]) == len(found["export"]) == 1, found
    assert found["fx"][0][1] == found["export"][0][1] == 2 * 2 * 16 * 2 * 2 * 4
