"""A module registered under two names (MONAI DynUNet's ``input_block`` is also
``skip_layers.downsample``) is named by its first name in ``named_modules()`` in every capture:
torch.export named it by the path forward reached it through, so its findings had other keys
(and an ``allow=`` pattern written from one capture missed the other)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nhwc_audit import audit


class Skip(nn.Module):
    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.blk = blk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk(x)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8))  # its first name
        self.skip = Skip(self.block)  # the name forward reaches it through
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.skip(x))


def test_a_shared_module_has_one_name_in_every_capture() -> None:
    x = torch.randn(2, 8, 16, 16)
    paths = {
        capture: sorted(
            (f.kind.value, f.module_path) for f in audit(Shared(), x, capture=capture, bandwidth=1e9).findings
        )
        for capture in ("fx", "export", "hooks")
    }
    assert paths["export"] == paths["fx"] == paths["hooks"] == [("conversion", "out"), ("revert", "block.1")]


class Rev(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous() * 1.0  # back to NCHW


class Blk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.rev = Rev()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rev(self.conv(x))


class Sliced(nn.Module):
    """Blocks run through a slice of a ModuleList (torch.export names them
    ``blocks.slice(1, None, None).0``: the sliced list numbers from 0 again), one of them shared."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        shared = Blk()
        self.first = shared
        self.blocks = nn.ModuleList([Blk(), shared, Blk()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks[1:]:
            x = b(x)
        return x


def test_a_module_reached_through_a_slice_has_its_own_name() -> None:
    x = torch.randn(1, 3, 16, 16)
    paths = {
        capture: sorted(
            {(f.kind.value, f.module_path) for f in audit(Sliced(), x, capture=capture, bandwidth=1e9).findings}
        )
        for capture in ("fx", "export", "hooks")
    }
    assert paths["export"] == paths["fx"] == paths["hooks"]
    assert paths["fx"] == [("conversion", "blocks.2.conv"), ("revert", "blocks.2.rev"), ("revert", "first.rev")]


class Reverts(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.transpose(2, 3).contiguous()


class Stages(nn.Module):
    """Ultralytics Conv blocks fused as ``DetectionModel.fuse()`` fuses them (a new conv, and
    ``forward = forward_fuse`` set on the instance), run as its BaseModel runs its layers."""

    def __init__(self) -> None:
        super().__init__()
        conv = pytest.importorskip("ultralytics.nn.modules.conv")
        utils = pytest.importorskip("ultralytics.utils.torch_utils")
        self.model = nn.Sequential(conv.Conv(3, 8, 1), Reverts(), conv.Conv(8, 8, 3, 1, g=8))
        for m in self.model:
            if isinstance(m, conv.Conv):
                m.conv = utils.fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.model:
            x = m(x)
        return x


def test_a_module_reached_through_a_forward_set_on_its_parent_has_its_own_name() -> None:
    """torch.export names the conv of a fused block relative to it (``conv``)."""
    model = Stages().eval()
    x = torch.randn(1, 3, 8, 8)
    paths = {
        capture: sorted(
            {(f.kind.value, f.module_path) for f in audit(model, x, capture=capture, bandwidth=1e9).findings}
        )
        for capture in ("fx", "export", "hooks")
    }
    assert paths["export"] == paths["fx"] == paths["hooks"]
    assert ("conversion", "model.2.conv") in paths["fx"]
