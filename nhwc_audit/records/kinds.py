"""The fixed vocabularies of the data model: layouts, finding kinds, and the option values a
user can ask for (mode, capture, fail_on), with how an op is labelled. Stdlib only."""

from __future__ import annotations

import enum
from typing import Literal

__all__ = [
    "ALLOCATING_OPS",
    "CONV_OPS",
    "GEMM_OPS",
    "FAIL_ON",
    "BandwidthSource",
    "CaptureMethod",
    "CaptureName",
    "FailOn",
    "FindingKind",
    "Layout",
    "Mode",
    "in_place_name",
    "op_label",
]


CONV_OPS = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convtranspose1d",
        "convtranspose2d",
        "convtranspose3d",
    }
)
"""Convolutions as fx and ATen graphs name them, and torch.nn's modules (lower case)."""

GEMM_OPS = frozenset(
    {
        "einsum",
        "tensordot",
        "matmul",
        "bmm",
        "mm",
        "baddbmm",
        "addmm",
        "addbmm",
        "linear",
        "scaled_dot_product_attention",
    }
)
"""Ops computed by a matrix multiply, which reads an operand strided either way (a
channels_last map viewed as B x C x HW) without a copy and writes its own row-major output:
the layout of the result is computed, not copied (a copy ATen makes first is a hidden copy)."""

ALLOCATING_OPS = frozenset(
    {
        *(f"{kind}_like" for kind in ("empty", "zeros", "ones", "full", "rand", "randn", "randint")),
        *(f"new_{kind}" for kind in ("empty", "empty_strided", "zeros", "ones", "full")),
    }
)
"""Ops that read only their tensor inputs' shape, dtype and device (``zeros_like(x)``,
``x.new_zeros(...)``): they allocate, whatever layout they choose, and copy nothing."""

Mode = Literal["real", "fake", "both"]
"""real: executed kernels on the audited device; fake: FakeTensors (a prediction); both: the
two on the same graph, every disagreement a finding."""

CaptureMethod = Literal["auto", "fx", "export", "hooks"]
"""Which capture to use: 'auto' tries fx, then export, then an eager recording ('hooks')."""

FailOn = Literal["never", "revert", "any"]
"""What ``check()`` and ``--fail-on`` treat as failure (see :data:`FAIL_ON`)."""

CaptureName = Literal["fx", "export", "hooks"]
"""How the model was captured: torch.fx symbolic trace, torch.export, or an eager run recorded
at the dispatch level."""

BandwidthSource = Literal["measured", "user", "assumed"]
"""Where the bandwidth came from: a transpose copy timed on the audited device, the caller, or
a typical figure for the device type (fake mode: nothing runs)."""


def in_place_name(name: str) -> bool:
    """The name of an op that writes its first operand: ``add_``, not ``__add__``.

    >>> in_place_name("add_"), in_place_name("__add__"), in_place_name("add")
    (True, False, False)
    """
    return name.endswith("_") and not name.endswith("__")


def op_label(op: str, detail: str) -> str:
    """An op with its mode, the one way every renderer shows it.

    >>> op_label("pad", "circular"), op_label("Conv2d", "")
    ('pad(circular)', 'Conv2d')
    """
    return f"{op}({detail})" if detail else op


class Layout(str, enum.Enum):
    """Memory layout of one tensor, decided by :func:`nhwc_audit.layout.classify_strides`.

    Rank-5 tensors use the same names (channels_last means channels_last_3d).
    """

    CHANNELS_LAST = "channels_last"
    """Dense in N(D)HWC order and not in NC(D)HW order."""
    CONTIGUOUS = "contiguous"
    """Dense in NC(D)HW order and not in N(D)HWC order."""
    AMBIGUOUS = "ambiguous"
    """Dense in both orders (C == 1, H == W == 1, ...): never a finding by itself."""
    STRIDED = "strided"
    """Neither: a permuted view, a slice, an expanded tensor."""
    NOT_SPATIAL = "not_spatial"
    """Rank other than 4 or 5."""

    def __str__(self) -> str:
        return self.value


class FindingKind(str, enum.Enum):
    """What is wrong at a node, in order of severity."""

    BREAK = "break"
    """The op raises on channels_last input (e.g. ``x.view(n, -1)``)."""
    LATENT = "latent_break"
    """The op runs only because its input arrives NCHW: it raises once the revert upstream is
    fixed and the input is channels_last (a ``view`` after an InstanceNorm)."""
    REVERT = "revert"
    """A channels_last input produced a contiguous (NCHW) output: the op left NHWC."""
    MIXED = "mixed"
    """The op's spatial inputs disagree in layout: an elementwise op's output follows its first
    operand, a cat's or stack's is NCHW."""
    CONVERSION = "conversion"
    """An NCHW input was converted back to channels_last (e.g. by a conv with NHWC weights)."""
    BACKWARD = "backward"
    """In backward, the gradient arriving at a channels_last activation is NCHW."""
    DIVERGENCE = "divergence"
    """Real kernels and fake (meta) kernels disagree on this node's output layout."""

    def __str__(self) -> str:
        return self.value


FAIL_ON: dict[FailOn, frozenset[FindingKind]] = {
    "never": frozenset(),
    "revert": frozenset({FindingKind.BREAK, FindingKind.LATENT, FindingKind.REVERT, FindingKind.MIXED}),
    "any": frozenset(FindingKind),
}
"""What each ``fail_on`` level treats as failure: 'revert' = anything that leaves
channels_last (breaks, reverts, mixed ops); 'any' = conversions too."""
