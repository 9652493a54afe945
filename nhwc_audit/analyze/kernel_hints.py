"""Hints for what kernels copy inside, that no layout of a node's shows (a channel slice made dense,
a convolution's copies of its weight or of what it computed): rows of (finding kind, hint keys, text)
that :func:`.hints.default_hints` registers with the rest."""

from __future__ import annotations

from collections.abc import Sequence

from ..records import FindingKind, HiddenCopy, Layout, NodeRecord
from .hint_keys import (
    ACCUMULATE_GRAD,
    BACKWARD_DENSE,
    BACKWARD_INSIDE,
    BACKWARD_POOLED,
    DENSE_COPY,
    FORWARD_GROUPS,
    FORWARD_INSIDE,
    HIDDEN,
    VIEW_COPY,
    WHOLE_COPY,
)

__all__ = ["KERNEL_HINTS", "average_pool", "backward_hint", "forward_inside", "inside_hint"]


def forward_inside(copies: Sequence[HiddenCopy], x: tuple[int, ...]) -> str:
    """The hint key of a forward convolution's own copies: each group's channel slice of its input,
    shaped ``x`` (a grouped Conv2d on the CPU's slow backend at batch 1, one group at a time), else its
    weight or what it made (the slow backend of a Conv3d at batch 1)."""
    whole = x[:1] + x[2:]
    slices = all(
        len(c.shape) == len(x) > 2 and c.shape[1] < x[1] and c.shape[:1] + c.shape[2:] == whole for c in copies
    )
    return FORWARD_GROUPS if slices else FORWARD_INSIDE


def backward_hint(copies: Sequence[HiddenCopy], inside: bool, pooled: bool = False) -> str | None:
    """The hint key of a node's backward copies: a kernel's of what it computed (``inside``), a
    parameter gradient's into its parameter's strides, a global average pool's gradient (``pooled``: the
    node is one, or reads one's gradient), a saved slice made dense, or the default."""
    if inside:
        return BACKWARD_INSIDE
    if all(c.op.startswith("AccumulateGrad") for c in copies):
        return ACCUMULATE_GRAD
    if pooled:
        return BACKWARD_POOLED
    return BACKWARD_DENSE if all(c.densified for c in copies) else None


_AVERAGES = frozenset({"mean", "adaptive_avg_pool2d", "adaptiveavgpool2d", "adaptive_avg_pool3d", "adaptiveavgpool3d"})


def average_pool(r: NodeRecord) -> bool:
    """``r`` averages a map over all its spatial dims (a global average pool, ``mean((2, 3))``): its
    backward divides the broadcast gradient into a new tensor, NCHW (:data:`BACKWARD_POOLED`)."""
    if r.op_name.lower() not in _AVERAGES or not r.inputs or r.inputs[0].meta.rank not in (4, 5) or not r.outputs:
        return False
    return all(d == 1 for d in r.outputs[0].shape[2:])


def inside_hint(copies: Sequence[HiddenCopy], writes_map: bool) -> str:
    """The hint key of a node's layout changes made inside: slices made dense, a map copied whole
    into NCHW by a kernel that writes no map (``writes_map``: the node has a 4D/5D output), views
    of a map in fewer dims copied row-major, or other copies."""
    if all(h.densified for h in copies):
        return DENSE_COPY
    whole = all(
        h.computed and h.layout_in is Layout.CHANNELS_LAST and h.layout_out is Layout.CONTIGUOUS for h in copies
    )
    if whole and not writes_map:
        return WHOLE_COPY
    return VIEW_COPY if all(len(h.shape) < 4 for h in copies) else HIDDEN


_FORWARD_INSIDE = (
    "the kernel of {op} on {device} copies inside, every call, what the NCHW model's does not ({detail}): at "
    "this shape the CPU runs it on its slow backend (a float32 Conv3d or ConvTranspose3d at batch 1 on a small "
    "volume), which "
    "computes in contiguous (NCHW, NCDHW) order and copies a {channels_last} weight into that order (its input's "
    "re-lay is charged apart). No change to the model's ops removes it: a batch of 2 or more, a larger volume "
    "or bfloat16 may pick oneDNN, which reads the weight as it is (audit at your training shapes); weigh it "
    "against what {channels_last} saves elsewhere"
)

_FORWARD_GROUPS = (
    "the kernel of {op} on {device} copies inside, every call, what the NCHW model's does not ({detail}): at "
    "this shape the CPU runs this grouped convolution on its slow backend, one group at a time, and a group's "
    "channel slice of a {channels_last} map is dense in no order, so the kernel copies each group's input first "
    "(NCHW memory holds one sample's group densely). No change to the model's ops removes it: a batch of 2 or "
    "more or bfloat16 may pick oneDNN, which reads the map as it is (audit at your training shapes); weigh it "
    "against what {channels_last} saves elsewhere"
)


KERNEL_HINTS: tuple[tuple[FindingKind, tuple[str, ...], str], ...] = (
    (
        FindingKind.CONVERSION,
        (DENSE_COPY,),
        "{op} reads a slice of a channels_last map along its channels (torch.split, chunk, x[:, a:b]), "
        "which channels_last memory holds in no dense order, so its kernel copies it whole first; NCHW "
        "memory holds one sample's channel slice densely (batch 1) and reads it in place: make each "
        "part its own output (two convolutions rather than one and a split), or accept the cost",
    ),
    (
        FindingKind.CONVERSION,
        (VIEW_COPY,),
        "{op} reads a view of a channels_last map flattened to fewer dims (x.flatten(2), x.view(B, C, H * W)): "
        "in channels_last memory its channels are innermost, so the view is not row-major and {op} copies it "
        "whole into row-major order first, where the NCHW map's view is row-major already. Apply {op} to the "
        "4D map before flattening where it has a 4D form (GroupNorm, softmax over a dim of the map), or "
        "flatten to tokens instead (x.flatten(2).transpose(1, 2): B x HW x C, row-major in channels_last) "
        "and compute on those",
    ),
    (
        FindingKind.REVERT,
        (WHOLE_COPY,),
        "the kernel of {op} on {device} copies its whole channels_last input into NCHW order first "
        "(input.contiguous()) and computes from the copy (F.unfold's im2col, median along a dim), where the "
        "NCHW model's input is in that order already; its output is no map, so nothing after it changes. "
        "Compute the same with ops that read channels_last (a convolution with fixed one-hot weights for "
        "F.unfold), or accept the cost",
    ),
    (
        FindingKind.BACKWARD,
        (BACKWARD_INSIDE,),
        "in backward, the kernel of {op} on {device} copies inside, every step, what it computed into another "
        "layout, where the NCHW model's does not ({detail}): a channels_last convolution's backward on the "
        "CPU (oneDNN) computes its weight gradient in NCHW and copies it into channels_last (as large as the "
        "weights at any batch; the slow backend the CPU picks for small maps copies other tensors instead). "
        "No change to the model removes it: weigh it against what channels_last saves in forward and backward",
    ),
    (
        FindingKind.BACKWARD,
        (BACKWARD_DENSE,),
        "in backward, the kernel of {op} on {device} copies inside, every step, what the NCHW model's "
        "does not ({detail}): a channel slice of a channels_last map it saved (torch.split, chunk, "
        "x[:, a:b]), dense in no memory format, is copied whole first, where NCHW memory holds one "
        "sample's slice densely; a weight gradient it copies besides is the kernel's own. Make each "
        "part its own output (two convolutions rather than one and a split), or accept the cost",
    ),
    (
        FindingKind.BACKWARD,
        (BACKWARD_POOLED,),
        "in backward, a global average pool's gradient reaches {op} in NCHW ({detail}): the mean's backward "
        "divides the broadcast gradient by H x W into a new tensor, in NCHW order, which meets the channels_last "
        "map here (a pooled head, squeeze-excite), where the NCHW model's is in that order already. Pool by a "
        "sum and divide after it, x.sum((2, 3), keepdim=True) / (H * W), in place of AdaptiveAvgPool2d(1) or "
        "x.mean((2, 3)): the gradient then stays a broadcast view, which any layout reads as it is",
    ),
    (
        FindingKind.BACKWARD,
        (ACCUMULATE_GRAD,),
        "in backward, a training step's loss.backward() copies this parameter's gradient into the parameter's "
        "own strides ({detail}): the ops compute it in another layout than the converted channels_last "
        "parameter (a (1, C, H, W) table added to a map: its gradient, summed over the batch, comes out NCHW), "
        "and a .grad keeps its parameter's layout (AccumulateGrad), where the NCHW model's gradient is in its "
        "parameter's order already. As large as the parameter at any batch: weigh it, or keep this parameter "
        "NCHW after converting (then the forward reads it across layouts instead)",
    ),
    (FindingKind.REVERT, (FORWARD_INSIDE,), _FORWARD_INSIDE),
    (FindingKind.CONVERSION, (FORWARD_INSIDE,), _FORWARD_INSIDE),
    (FindingKind.REVERT, (FORWARD_GROUPS,), _FORWARD_GROUPS),
    (FindingKind.CONVERSION, (FORWARD_GROUPS,), _FORWARD_GROUPS),
)
