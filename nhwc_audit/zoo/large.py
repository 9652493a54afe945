"""Models too large to build with weights in a test: built on the meta device, for
``--mode fake`` (``nhwc-audit nhwc_audit.zoo.large:sd15_meta --mode fake``; the benchmarks)."""

from __future__ import annotations

import torch
from torch import nn

from .models import Built

__all__ = ["sd15_meta"]


def sd15_meta() -> Built:
    """Stable Diffusion 1.5's UNet2DConditionModel (860 M parameters) built on the meta device,
    1x4x32x32 latents and 77x768 text states: for ``--mode fake`` (no weights are made)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        m: nn.Module = UNet2DConditionModel(cross_attention_dim=768).eval()
        args = (torch.empty(1, 4, 32, 32), torch.tensor([10]), torch.empty(1, 77, 768))
    return m, args, {}
