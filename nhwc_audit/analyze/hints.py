"""Fix hints: one registration table keyed by (finding kind, op name).

Op names are the records' ``op_name`` lower-cased: a module class (``instancenorm2d``),
a function (``cat``, ``pad``) or a method (``contiguous``, ``view``). Hints may use the
fields ``{origin}``, ``{device}`` and ``{detail}``, and name a memory format or a dim order by
``{channels_last}``, ``{nhwc}``, ``{to_nhwc}``, ``{to_nchw}`` (:mod:`.hint_render`: a volume's
are 3D). An entry may hold for one device type only (``instancenorm2d@cuda``): it wins over the
entry for every device.
"""

from __future__ import annotations

from ..records import FindingKind
from .hint_keys import (
    AMBIGUOUS_ORIGIN,
    COMPUTED_WEIGHT,
    HEAD_FOLD,
    HIDDEN,
    LOW_RANK_TABLE,
    ND_TRANSPOSE,
    ONE_CHANNEL,
    STACK_REDUCE,
    STORED_OPERAND,
    STORED_TABLE,
    TOKENS_TO_MAP,
    WEIGHT_RESHAPE,
)
from .kernel_hints import KERNEL_HINTS

__all__ = [
    "HintTable",
    "KIND_DEFAULTS",
    "default_hints",
]

HintTable = dict[tuple[FindingKind, str], str]

KIND_DEFAULTS: dict[FindingKind, str] = {
    FindingKind.BREAK: (
        "this op raises on channels_last input: use a layout-agnostic equivalent "
        "(reshape instead of view), or make its input .contiguous() right before it"
    ),
    FindingKind.LATENT: (
        "{op} runs only because its input arrives NCHW from {origin}: it raises once that input is "
        "channels_last, so change it together with that op (a layout-agnostic equivalent, e.g. "
        ".reshape() instead of .view())"
    ),
    FindingKind.REVERT: (
        "{op} has no channels_last kernel on {device} and returns NCHW: replace it with an "
        "equivalent that keeps channels_last, move it off the hot path, or accept one "
        "transpose here and one at the next conv"
    ),
    FindingKind.MIXED: (
        "inputs disagree in layout (an elementwise op's output follows its first operand, a cat's is "
        "NCHW); the NCHW input comes from {origin}: keep that op channels_last"
    ),
    FindingKind.CONVERSION: (
        "converts an NCHW input back to channels_last; the NCHW tensor comes from "
        "{origin}: fix that op so it stays channels_last, and this conversion disappears"
    ),
    FindingKind.BACKWARD: (
        "in backward, this node's gradient ops move data between layouts where the NCHW model's "
        "backward does not ({detail}): a gradient arrives in another layout than the tensors it "
        "meets. Where a consumer is kept NCHW in forward, keeping it channels_last fixes this"
    ),
}

_RESTRIDE = (  # the fix of an NCHW map made from ambiguous input only (the AMBIGUOUS_ORIGIN hints)
    ", whose input is ambiguous (C == 1 or H == W == 1) with NCHW-order strides, so that op chose NCHW: "
    "restride its input with .to(memory_format={channels_last}) (a tiny copy; .contiguous(memory_format=...) "
    "is a no-op on ambiguous tensors) and it stays channels_last"
)


def _register(
    table: HintTable, kind: FindingKind, ops: tuple[str, ...], text: str, *, device: str | None = None
) -> None:
    """Add ``text`` for ``kind`` at each op; with ``device`` (a device type), for that device
    only (it then wins over the entry for every device)."""
    for op in ops:
        key = (kind, op.lower() + (f"@{device}" if device else ""))
        if key in table:
            raise ValueError(f"duplicate hint for {kind.value} {key[1]!r}")
        table[key] = text


def default_hints() -> HintTable:
    """A fresh copy of the built-in table (callers may add their own entries to it)."""
    t: HintTable = {}
    _register(
        t,
        FindingKind.BREAK,
        ("view",),
        "view() cannot merge or split dims of a channels_last tensor: use .reshape() or "
        ".flatten(1) (they copy only when needed)",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("instancenorm1d", "instancenorm2d", "instancenorm3d", "instance_norm", "groupnorm", "group_norm"),
        "{op} returns NCHW on {device}, and so does every eager normalization over (H, W) there (ATen's "
        "group_norm and instance_norm make non-CPU inputs contiguous): no eager swap keeps channels_last; "
        "convert back once right after it (.contiguous(memory_format={channels_last})) so the rest "
        "stays NHWC, or let torch.compile fuse the norm",
        device="cuda",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("instancenorm1d", "instancenorm2d", "instancenorm3d", "instance_norm"),
        "InstanceNorm calls .contiguous() and returns NCHW on {device}: use "
        "nn.GroupNorm(num_groups=C, num_channels=C, affine=...) (the same per-channel "
        "statistics, keeps channels_last on CPU), or accept the cost",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("softmax", "_softmax", "log_softmax", "_log_softmax", "softmin", "softmax2d", "logsoftmax"),
        "softmax over the channel dim returns NCHW: permute to {nhwc}, softmax over "
        "dim=-1 and permute back (both permutes are free on a channels_last tensor)",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("contiguous",),
        ".contiguous() returns NCHW: write .contiguous(memory_format={channels_last}), "
        "or drop it if nothing after it needs NCHW",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("pad",),
        "pad(mode={detail}) returns NCHW on {device}: use a mode that keeps channels_last "
        "(constant, reflect, replicate), or build the wrap-around with torch.cat of slices",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("pad",),
        "pad(mode={detail}) returns NCHW on {device}, as every mode but constant does there (measured on an H200): "
        "pad with zeros (mode='constant') where the model allows, build the border with torch.cat of slices "
        "(cat keeps channels_last), or accept one transpose here and one at the next conv",
        device="cuda",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("conv3d", "conv2d", "conv_transpose3d", "conv_transpose2d", "convolution"),
        "the convolution kernel chose NCHW/NCDHW output for this input size on {device} "
        "(CPU Conv3d does so for small volumes, and by thread count): layouts here hold only for the "
        "audited shapes and threads; audit at your training batch, volume and --threads",
    )
    _register(
        t,
        FindingKind.REVERT,
        (
            "avgpool3d",
            "adaptiveavgpool3d",
            "adaptivemaxpool3d",
            "avg_pool3d",
            "adaptive_avg_pool3d",
            "adaptive_max_pool3d",
        ),
        "{op} has no channels_last_3d kernel on {device}: replace it (e.g. mean over "
        "spatial dims for global pooling: x.mean((2, 3, 4), keepdim=True)) or accept the cost",
    )
    _register(
        t,
        FindingKind.REVERT,
        ("to",),
        ".to(memory_format=torch.contiguous_format) converts back to NCHW: drop it or use torch.channels_last",
    )
    mixed_elementwise = (
        "the first operand decides the output layout and it is NCHW here: put the "
        "channels_last operand first (e.g. skip + x instead of x + skip), or keep the NCHW "
        "operand's source, {origin}, channels_last"
    )
    _register(
        t,
        FindingKind.MIXED,
        tuple("add sub mul truediv div where maximum minimum add_ sub_ mul_ div_ iadd isub imul".split()),
        mixed_elementwise,
    )
    _register(
        t,
        FindingKind.MIXED,
        ("cat", "concat", "concatenate", "stack"),
        "cat keeps channels_last only when every input is channels_last, and an input "
        "here is NCHW; it comes from {origin}: keep that op channels_last",
    )
    _register(
        t,
        FindingKind.CONVERSION,
        ("to", "contiguous"),
        "explicit conversion back to channels_last after {origin} made "
        "the tensor NCHW: fix that op instead and drop this conversion",
    )
    _register(
        t,
        FindingKind.CONVERSION,
        (ONE_CHANNEL,),
        "{op} has one output channel, laid alike in either layout, so its channels_last weight decides "
        "the kernel's format: it copies its NCHW input whole to read it channels_last. Keep this conv's "
        "weight NCHW after converting (conv.weight.data = conv.weight.data.to(memory_format=torch.contiguous_format);"
        " .contiguous() keeps a 1 x 1 weight as it is): the kernel then "
        "reads its input as it is; or give it a channels_last input",
    )
    _register(
        t,
        FindingKind.CONVERSION,
        (TOKENS_TO_MAP,),
        "converts an NCHW input back to channels_last; {origin} makes the map from values of fewer dims in "
        "channel-major order, (N, C, H*W), which is NCHW: compute them as (N, H*W, C) instead (a matmul's "
        "operands swapped and transposed: bmm(attn, v.transpose(1, 2)) for bmm(v, attn.transpose(1, 2))) and "
        "make the map with .transpose(1, 2).reshape(N, C, H, W), which is channels_last (a view), and this "
        "conversion disappears",
    )
    for kind, lead in (
        (FindingKind.CONVERSION, "converts an NCHW input back to channels_last; the NCHW tensor comes from {origin}"),
        (FindingKind.MIXED, "{op}'s inputs disagree in layout; the NCHW one comes from {origin}"),
    ):
        _register(t, kind, (AMBIGUOUS_ORIGIN,), lead + _RESTRIDE)
    _register(
        t,
        FindingKind.REVERT,
        (ND_TRANSPOSE,),
        "{op} copies a view of a channels_last tensor into row-major (NCHW) order, moving the "
        "channel axis out of the innermost position (e.g. channel shuffle: view, transpose, "
        "contiguous): do it in {nhwc} order instead, x.permute{to_nhwc}, reshape/"
        "transpose the last dims, permute{to_nchw}, so the copy keeps channels innermost",
    )
    _register(
        t,
        FindingKind.REVERT,
        (STACK_REDUCE,),
        "{op} reduces a stack of channels_last maps over the stacking dim (torch.stack(maps)"
        ".sum(dim=0)) and writes NCHW: the stack keeps each map's NHWC strides, so the channels "
        "are not dim 1 and the reduction picks row-major order; add the maps instead "
        "(functools.reduce(operator.add, maps), or sum(maps)), which keeps channels_last",
    )
    _register(
        t,
        FindingKind.MIXED,
        (COMPUTED_WEIGHT,),
        "{op}'s weight is computed in forward ({origin}) and comes out NCHW, so the convolution "
        "re-lays the weight on every call or follows it and returns NCHW: compute it without "
        "reshaping (a weight standardisation over dims (1, 2, 3) with keepdim=True: w.mean(...), "
        "w.var(..., unbiased=False)), which keeps the weight's channels_last strides, and nothing "
        "moves; weight.contiguous(memory_format=torch.channels_last) after reshape_as would only move "
        "the copy out of the convolution",
    )
    _register(
        t,
        FindingKind.MIXED,
        (STORED_OPERAND,),
        "{op} reads a stored tensor ({origin}: a parameter, a buffer, a plain tensor attribute, or a "
        "tensor made in forward that the graph keeps as a constant) in the other layout than the "
        "activation it meets, and re-lays it on every call: model.to(memory_format=torch.channels_last) "
        "restrides every 4D parameter and buffer, also one that holds tokens (a position embedding), "
        "but no plain attribute or tensor made in forward; give it the activation's layout (register "
        "it as a buffer made once in __init__, .contiguous() it after converting, or store it 3D and "
        "reshape in forward; make a tensor in forward like the activation: torch.ones_like(x))",
    )
    _register(
        t,
        FindingKind.MIXED,
        (LOW_RANK_TABLE,),
        "{op} broadcasts a tensor of fewer dims than the map ({origin}; a (C, H, W) table, say) onto "
        "a channels_last map and reads it across layouts on every call, element by element in another "
        "order: model.to(memory_format=torch.channels_last) re-lays 4D and 5D tensors only, so such a "
        "table stays row-major; store it with its leading dims of size 1 ((1, C, H, W), which the "
        "conversion re-lays with the model's weights), or permute it once to the map's order after "
        "converting (p.permute(1, 2, 0).contiguous().permute(2, 0, 1)); make a tensor made in forward "
        "like the activation (torch.ones_like(x))",
    )
    _register(
        t,
        FindingKind.REVERT,
        (WEIGHT_RESHAPE,),
        "{op} of a weight in forward copies the channels_last weight into NCHW order on every call "
        "(a view in NCHW), and the convolution then re-lays the computed weight: standardise it "
        "without reshaping (over dims (1, 2, 3) with keepdim=True: w.mean(...), "
        "w.var(..., unbiased=False)), which keeps its channels_last strides, and neither copy happens",
    )
    _register(
        t,
        FindingKind.REVERT,
        (STORED_TABLE,),
        "{op} reads a 4D stored tensor that model.to(memory_format=torch.channels_last) restrided "
        "(every 4D parameter and buffer is, also one that holds a table of coordinates or tokens, "
        "not an image) and copies it back to row-major order on every call: store it 3D and "
        "reshape in forward, or .contiguous() it after converting",
    )
    for kind in (FindingKind.CONVERSION, FindingKind.REVERT):
        _register(
            t,
            kind,
            (HEAD_FOLD,),
            "{op} on views of a channels_last map folds their batch and heads into one dim, which "
            "only a copy of each operand can do at batch > 1 (NCHW memory views them): "
            "torch.nn.functional.scaled_dot_product_attention reads such strided heads without "
            "copying; or accept the cost",
        )
        _register(
            t,
            kind,
            (HIDDEN,),
            "{op} keeps its input and output layouts but transposes data internally (ATen-level "
            "copies between NHWC and NCHW while it runs, e.g. padding_mode='circular' pads in NCHW "
            "first): use a variant without the internal copy, or accept the cost",
        )
    for kind, keys, text in KERNEL_HINTS:
        _register(t, kind, keys, text)
    return t
