"""Random small CNNs built from a vocabulary of ops, one wrapper module per op (so every op's
output is a module output that forward hooks can observe)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

C = 8

OPS = (
    "conv",
    "dwconv",
    "bn",
    "gn",
    "inorm",
    "relu",
    "silu",
    "maxpool",
    "avgpool",
    "interp_nearest",
    "interp_bilinear",
    "interp_bicubic",
    "pad_constant",
    "pad_reflect",
    "pad_replicate",
    "pad_circular",
    "cat",
    "add_cl_first",
    "add_nchw_first",
    "contiguous",
    "permute_ln",
    "se",
    "softmax",
    "channel_shuffle",
)
HEADS = ("none", "flatten", "reshape", "view", "pool_flatten")


class Op(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.m = nn.Conv2d(C, C, 3, padding=1)
        elif kind == "dwconv":
            self.m = nn.Conv2d(C, C, 3, padding=1, groups=C)
        elif kind == "bn":
            self.m = nn.BatchNorm2d(C)
        elif kind == "gn":
            self.m = nn.GroupNorm(2, C)
        elif kind == "inorm":
            self.m = nn.InstanceNorm2d(C)
        elif kind == "cat":
            self.m = nn.Conv2d(C, C, 1)
            self.proj = nn.Conv2d(2 * C, C, 1)
        elif kind in ("add_cl_first", "add_nchw_first"):
            self.m = nn.InstanceNorm2d(C)
        elif kind == "permute_ln":
            self.m = nn.LayerNorm(C)
        elif kind == "se":
            self.fc1 = nn.Conv2d(C, 2, 1)
            self.fc2 = nn.Conv2d(2, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k in ("conv", "dwconv", "bn", "gn", "inorm"):
            out: torch.Tensor = self.m(x)
        elif k == "relu":
            out = F.relu(x)
        elif k == "silu":
            out = F.silu(x)
        elif k == "maxpool":
            out = F.max_pool2d(x, 3, 1, 1)
        elif k == "avgpool":
            out = F.avg_pool2d(x, 3, 1, 1)
        elif k.startswith("interp_"):
            mode = k.split("_", 1)[1]
            out = F.interpolate(x, size=(8, 8), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        elif k.startswith("pad_"):
            out = F.pad(x, (1, 1, 1, 1), mode=k.split("_", 1)[1])[:, :, 1:-1, 1:-1]
        elif k == "cat":
            out = self.proj(torch.cat([x, self.m(x)], dim=1))
        elif k == "add_cl_first":
            out = x + self.m(x)
        elif k == "add_nchw_first":
            out = self.m(x) + x
        elif k == "contiguous":
            out = x.contiguous()
        elif k == "permute_ln":
            out = self.m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif k == "se":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
            out = x * s
        elif k == "softmax":
            out = x.softmax(dim=1)
        elif k == "channel_shuffle":
            n, c, h, w = x.shape
            out = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        else:  # pragma: no cover
            raise ValueError(k)
        return out


class Head(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "flatten":
            return torch.flatten(x, 1)
        if self.kind == "reshape":
            return x.reshape(x.shape[0], -1)
        if self.kind == "view":
            return x.view(x.shape[0], -1)
        if self.kind == "pool_flatten":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x


class FuzzNet(nn.Module):
    def __init__(self, ops: list[str], head: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.body = nn.Sequential(*[Op(k) for k in ops])
        self.head = Head(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(self.stem(x)))
        return out


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    """Hypothesis settings of the fuzz tests: ``examples`` cases (``FUZZ_EXAMPLES`` overrides), the
    same ones each run unless ``FUZZ_RANDOM=1``."""
    return settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", str(examples))),
        deadline=None,
        derandomize=os.environ.get("FUZZ_RANDOM") != "1",
        suppress_health_check=[HealthCheck.too_slow],
    )


NETS = {
    "ops": st.lists(st.sampled_from(OPS), min_size=1, max_size=6),
    "head": st.sampled_from(HEADS),
    "batch": st.sampled_from([1, 2]),
    "train": st.booleans(),
}
"""The strategies of a random :class:`FuzzNet` and its sample (ops, head, batch size, training mode)."""
