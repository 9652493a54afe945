"""A module registered under two names (MONAI DynUNet's ``input_block`` is also
``skip_layers.downsample``) is named by its first name in ``named_modules()`` in every capture:
torch.export named it by the path forward reached it through, so its findings had other keys
(and an ``allow=`` pattern written from one capture missed the other)."""

from __future__ import annotations

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
