"""Tiny models, one per behaviour the audit must get right (CPU, torch 2.14.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv2(F.relu(self.bn(self.conv(x)))))


class InstanceNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm(self.conv(x)))


class SoftmaxChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).softmax(dim=1)


class CircularPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.pad(self.conv(x), (1, 1, 1, 1), mode="circular"))


class ContiguousCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).contiguous()


class CatMixed(nn.Module):
    """cat of a channels_last tensor and an NCHW one (made NCHW by InstanceNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.norm(self.b(x))], dim=1)


class AddOrder(nn.Module):
    """NCHW + CL (nchw_first=True) or CL + NCHW."""

    def __init__(self, nchw_first: bool) -> None:
        super().__init__()
        self.nchw_first = nchw_first
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = self.a(x)
        nchw = self.norm(self.b(x))
        if self.nchw_first:
            return nchw + cl
        return cl + nchw


class SEBlock(nn.Module):
    """Squeeze-excitation: a (N, C, 1, 1) gate (ambiguous) times a channels_last map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return y * s


class ViewHead(nn.Module):
    """x.view(n, -1) on a channels_last map: a break; the InstanceNorm after it must still be found."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        logits = self.fc(y.view(y.shape[0], -1))
        return logits, self.norm(y)


class FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


class ConvNeXtBlock(nn.Module):
    """permute to (N, H, W, C), LayerNorm + Linear, permute back: free on channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pw = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw(self.norm(y)).permute(0, 3, 1, 2)
        return x + y


class PoolingBranch(nn.Module):
    """DeepLabV3's ASPP pooling: a 1x1 pooled (ambiguous) tensor is upsampled to NCHW and the
    next conv converts it back: a conversion whose hint names the upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        p = F.relu(self.bn(self.proj(self.pool(y))))
        p = F.interpolate(p, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(p)


class Conv3dNet(nn.Module):
    """A 3D conv followed by InstanceNorm3d (reverts) and a conv (converts back)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 3, padding=1)
        self.norm = nn.InstanceNorm3d(8)
        self.conv2 = nn.Conv3d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm(self.conv(x)))


class StandardisedConv(nn.Conv2d):
    """BiT's and NFNet's weight standardisation: the NHWC weight reshaped to (1, O, -1) in every
    forward (a copy in channels_last, a view in NCHW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, self.out_channels, -1)
        w = ((w - w.mean(-1, keepdim=True)) / (w.std(-1, keepdim=True) + 1e-5)).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=1)


class ContiguousThenFlatten(nn.Module):
    """A ``.contiguous()`` the model asks for, flattened on the next line: a revert (the copy is
    the model's own), unlike a flatten that copies on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).contiguous()
        return y.flatten(1)
