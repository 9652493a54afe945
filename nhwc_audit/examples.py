"""Example models for trying nhwc-audit: ``nhwc-audit nhwc_audit.examples:unet``.

``unet`` is a small segmentation UNet written the way many are (milesial/Pytorch-UNet
style ``Up`` blocks with bilinear upsampling, size-matching ``F.pad`` and ``torch.cat``;
InstanceNorm in the decoder as in nnU-Net-style models; softmax over classes at the
end). On CPU its InstanceNorm layers and the final softmax return NCHW, the decoder's
``cat`` then mixes an NHWC skip with an NCHW path, and the next convolutions convert
back: the audit shows each of these with module path and source line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "resnet_block", "unet"]


class DoubleConv(nn.Module):
    """(conv 3x3 -> norm -> ReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm == "batch" else nn.InstanceNorm2d
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            norm_layer(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            norm_layer(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return out


class Down(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(self.pool(x))
        return out


class Up(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_ch, out_ch, norm="instance")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        diff_y = x2.size(2) - x1.size(2)
        diff_x = x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        x = torch.cat([x2, x1], dim=1)
        out: torch.Tensor = self.conv(x)
        return out


class UNet(nn.Module):
    """A 4-level UNet for segmentation with ``n_classes`` softmax outputs."""

    def __init__(self, in_channels: int = 3, n_classes: int = 4, width: int = 16):
        super().__init__()
        w = width
        self.inc = DoubleConv(in_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.up1 = Up(12 * w, 4 * w)
        self.up2 = Up(6 * w, 2 * w)
        self.up3 = Up(3 * w, w)
        self.outc = nn.Conv2d(w, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(x4, x3)
        x = self.up2(x, x2)
        x = self.up3(x, x1)
        out: torch.Tensor = self.outc(x).softmax(dim=1)
        return out


def unet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The example UNet with a 1x3x128x128 sample (random weights, seeded)."""
    torch.manual_seed(0)
    model = UNet()
    return model, (torch.randn(1, 3, 128, 128),)


def resnet_block() -> nn.Module:
    """A conv/bn/relu residual block that stays channels_last: an audit finds nothing."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn1(self.conv1(x)).relu()
            out: torch.Tensor = (y + self.bn2(self.conv2(y))).relu()
            return out

    return Block()
