"""Notes on how the audit converted the model and its sample, for the report: where the user's
own conversion would differ (:func:`conversion_note`, :func:`one_channel_note`), or a train audit
of a model in eval mode (:func:`eval_train_note`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tensors import iter_tensors

__all__ = ["conversion_note", "eval_train_note", "one_channel_note"]


def conversion_note(model: nn.Module, input_rank: int | None) -> str | None:
    """What to tell the user when ``model.to(memory_format=...)``, in the format of its input's
    rank (channels_last for 4D, channels_last_3d for 5D; either, without such an input), raises:
    it holds parameters or buffers of the other rank (timm's LambdaLayer: a Conv3d in a 2D
    network). The audit converts each by its rank, as :func:`convert` does; None when the call
    works."""
    # the ranks first, from the modules' own tables (the names only for a note: most models need none)
    ranks = {
        t.dim()
        for m in model.modules()
        for table in (m._parameters, m._buffers)
        for t in table.values()
        if t is not None
    }
    other = 4 if input_rank == 5 else 5
    if other not in ranks or (input_rank not in (4, 5) and 9 - other not in ranks):
        return _converted_note(model)  # the call for the input's rank converts every tensor (without one: either)
    fmt = "channels_last_3d" if input_rank == 5 else "channels_last"
    held = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.dim() == other]
    names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    return (
        f"model.to(memory_format=torch.{fmt}) raises on this model: it holds {other}D parameters or "
        f"buffers ({names}); the audit converts each tensor by its rank (4D to channels_last, 5D to "
        "channels_last_3d), as nhwc_audit.convert(model) does: convert the model that way"
    )


def _converted_note(model: nn.Module) -> str | None:
    """What to tell the user whose model holds channels_last convolution weights already (converted
    before the audit): the bytes are still what channels_last adds over the model in NCHW, as the
    audit's baseline runs it, not 0 (a reference run of the model as it is would be channels_last)."""
    for m in model.modules():
        w = m._parameters.get("weight") if isinstance(m, nn.modules.conv._ConvNd) else None
        if w is None or w.dim() not in (4, 5) or w.is_contiguous() or w.shape[2:].numel() == 1:
            continue  # (a 1x1 weight is dense in both formats)
        fmt = torch.channels_last if w.dim() == 4 else torch.channels_last_3d
        if w.is_contiguous(memory_format=fmt):
            return (
                "the model's convolution weights are channels_last already (converted before the audit): "
                "the bytes are what channels_last adds over the same model in NCHW, whose run the audit "
                "compares with (NCHW views of the same weights)"
            )
    return None


def one_channel_note(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """What to tell the user when an input has one channel (a grayscale image, a CT volume):
    ``x.to(memory_format=...)`` strides it channels_last (the channel stride 1), as the audit does,
    where ``x.contiguous(memory_format=...)`` leaves it as it is (row-major, already contiguous in
    that format); a kernel that picks its layout by its input's strides (a 1x1 convolution) then
    computes NCHW. None when no input has one channel."""
    for t in iter_tensors((args, kwargs)):
        if t.dim() in (4, 5) and t.shape[1] == 1 and t.shape[2:].numel() > 1:
            fmt = "channels_last_3d" if t.dim() == 5 else "channels_last"
            shape = "x".join(map(str, t.shape))
            return (
                f"a {shape} input has one channel: the audit converts it as x.to(memory_format=torch.{fmt}) "
                f"does (channel stride 1); x.contiguous(memory_format=torch.{fmt}) leaves it row-major, and "
                "kernels that follow their input's strides (a 1x1 convolution) then compute NCHW: convert inputs "
                "with .to()"
            )
    return None


def eval_train_note(model: nn.Module, train: bool) -> str | None:
    """What to tell the user when a train audit's model is in eval mode: its backward runs through
    eval-mode layers (BatchNorm normalising by its running statistics, no dropout), which is not a
    training step; the audit keeps the mode the model is in (a frozen norm in a training model is the
    user's choice). None otherwise."""
    if not train or model.training:
        return None
    return (
        "train audit of a model in eval mode: forward and backward ran as eval mode runs them (BatchNorm "
        "by its running statistics, no dropout), not as training does: call model.train() before the audit "
        "(in the build function for the CLI)"
    )
