"""The data model: frozen records of plain values shared by every pipeline stage.

Nothing here holds a Tensor, an fx Node or a Module, and nothing here imports torch,
networkx or jinja2: the analysis and the reports work from these records alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AuditMeta",
    "FAIL_ON",
    "BandwidthSource",
    "CaptureMethod",
    "CaptureName",
    "FailOn",
    "Mode",
    "Finding",
    "FindingKind",
    "HiddenCopy",
    "Fix",
    "Hotspot",
    "Layout",
    "NodeInput",
    "NodeRecord",
    "Region",
    "SourceLoc",
    "Summary",
    "TensorMeta",
    "op_label",
]


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
    REVERT = "revert"
    """A channels_last input produced a contiguous (NCHW) output: the op left NHWC."""
    MIXED = "mixed"
    """The op's spatial inputs disagree in layout; the first operand decided the output."""
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
    "revert": frozenset({FindingKind.BREAK, FindingKind.REVERT, FindingKind.MIXED}),
    "any": frozenset(FindingKind),
}
"""What each ``fail_on`` level treats as failure: 'revert' = anything that leaves
channels_last (breaks, reverts, mixed ops); 'any' = conversions too."""


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape, strides and dtype of one tensor, and its layout."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    itemsize: int
    layout: Layout

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's logical elements (numel x itemsize)."""
        return self.numel * self.itemsize

    @property
    def is_spatial(self) -> bool:
        return self.rank in (4, 5)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape) if self.shape else "scalar"


@dataclass(frozen=True, slots=True)
class NodeInput:
    """One tensor a node reads: which node produced it, and whether it is a parameter."""

    producer: str | None
    """Name of the graph node that produced the tensor (None for a leaf module's own weight)."""
    meta: TensorMeta
    is_param: bool
    """True for weights and buffers (get_attr nodes, a leaf module's own parameters)."""


@dataclass(frozen=True, slots=True)
class SourceLoc:
    """The user's source line that created a node."""

    file: str
    line: int
    function: str
    code: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class HiddenCopy:
    """A layout-changing copy an op made internally (clone, copy_, _to_copy at ATen level)."""

    op: str
    layout_in: Layout
    layout_out: Layout
    shape: tuple[int, ...]
    bytes: int
    """2 x numel x itemsize (read + write)."""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Everything recorded about one graph node during propagation (no judgement)."""

    index: int
    name: str
    op: str
    """fx op kind: placeholder, get_attr, call_module, call_function, call_method, output."""
    target: str
    """Qualified target: ``torch.cat``, ``contiguous``, or a submodule path."""
    op_name: str
    """Short display name: the module class for call_module, else the function/method name."""
    module_path: str
    """Qualified name of the innermost module the node runs in ('' for the root)."""
    module_type: str
    source: SourceLoc | None
    inputs: tuple[NodeInput, ...]
    outputs: tuple[TensorMeta, ...]
    aliases_input: bool
    """Some output shares storage with some input: the op moved no data (a view, in-place op)."""
    users: tuple[str, ...]
    """Names of the nodes that consume this node's output, in graph order."""
    detail: str = ""
    """The op's mode where it has one (pad 'circular', interpolate 'bilinear')."""
    error: str | None = None
    """For a break: the error the op raised on channels_last input."""
    in_leaf_module: bool = False
    """The node is (or runs inside) a torch.nn leaf module (fixes group by module type)."""
    hidden: tuple[HiddenCopy, ...] = ()
    """Layout-changing copies seen at ATen level while this node ran (real mode)."""
    grads: tuple[TensorMeta, ...] = ()
    """With ``train=True``: the gradients that arrived at this node's outputs in backward."""

    @property
    def activation_inputs(self) -> tuple[NodeInput, ...]:
        return tuple(i for i in self.inputs if not i.is_param)

    @property
    def spatial_inputs(self) -> tuple[NodeInput, ...]:
        return tuple(i for i in self.inputs if not i.is_param and i.meta.is_spatial)

    @property
    def spatial_outputs(self) -> tuple[TensorMeta, ...]:
        return tuple(o for o in self.outputs if o.is_spatial)

    @property
    def output_layout(self) -> Layout:
        """Layout of the first spatial output (else NOT_SPATIAL)."""
        spatial = self.spatial_outputs
        return spatial[0].layout if spatial else Layout.NOT_SPATIAL

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def location(self) -> str:
        return str(self.source) if self.source else ""

    @property
    def op_label(self) -> str:
        """The op as shown: ``pad(circular)``, ``Conv2d``."""
        return op_label(self.op_name, self.detail)


@dataclass(frozen=True, slots=True)
class Finding:
    """A node that leaves, breaks or re-enters channels_last, with its cost and a fix."""

    node: str
    index: int
    kind: FindingKind
    op: str
    target: str
    module_path: str
    module_type: str
    source: SourceLoc | None
    layout_in: Layout
    layout_out: Layout
    shape: tuple[int, ...]
    detail: str
    """The op's mode where it has one (pad 'circular', interpolate 'bilinear')."""
    bytes: int
    """Bytes moved by the layout change: 2 x numel x itemsize (read + write)."""
    est_seconds: float
    hint: str
    producer: str | None = None
    """For conversions and mixed ops: the node that produced the NCHW input."""
    origin: str | None = None
    """The node where that NCHW tensor's chain started (the root cause to fix)."""
    origin_op: str | None = None
    error: str | None = None

    @property
    def location(self) -> str:
        return str(self.source) if self.source else ""

    @property
    def op_label(self) -> str:
        """The op as shown: ``pad(circular)``, ``Conv2d``."""
        return op_label(self.op, self.detail)

    @property
    def module_label(self) -> str:
        """``path (Type)``, or the type alone at the root module."""
        return f"{self.module_path} ({self.module_type})" if self.module_path else self.module_type


@dataclass(frozen=True, slots=True)
class Hotspot:
    """A finding that moves data, ranked by bytes."""

    rank: int
    finding: Finding
    share: float
    """This hotspot's share of all bytes moved by layout changes."""


@dataclass(frozen=True, slots=True)
class Fix:
    """One change to make: a root-cause op, the findings it causes, and what it costs.

    Conversions and mixed ops count towards the revert that made their input NCHW.
    """

    kind: FindingKind
    op: str
    """The module type to replace, or the op to change at ``source``."""
    source: SourceLoc | None
    """For a function or method root: the source line to change (None for module roots)."""
    hint: str
    roots: tuple[str, ...]
    """Nodes to change (the root causes), in graph order."""
    findings: int
    """Findings removed by the change, root causes included."""
    bytes: int
    """Bytes moved by all those findings per forward."""


@dataclass(frozen=True, slots=True)
class Region:
    """A connected run of nodes executing in NCHW between channels_last nodes."""

    id: int
    nodes: tuple[str, ...]
    entries: tuple[str, ...]
    """Finding nodes (reverts, mixed ops) where the region starts."""
    exits: tuple[str, ...]
    """Conversion nodes right after the region, where NHWC is re-adopted."""
    bytes: int
    """Output bytes of the nodes executed in NCHW."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Headline numbers of one audit."""

    nodes: int
    spatial_nodes: int
    """Nodes with a channels_last, contiguous or strided 4D/5D output (ambiguous excluded)."""
    nchw_nodes: int
    """Nodes inside NCHW regions."""
    spatial_bytes: int
    nchw_bytes: int
    reverts: int
    conversions: int
    mixed: int
    breaks: int
    backward: int
    bytes_moved: int
    est_seconds: float
    divergences: int = 0
    """With mode='both': nodes where real and fake kernels disagree."""

    @property
    def findings(self) -> int:
        return self.reverts + self.conversions + self.mixed + self.breaks + self.backward + self.divergences

    @property
    def channels_last_node_share(self) -> float:
        if self.spatial_nodes == 0:
            return 1.0
        return 1.0 - self.nchw_nodes / self.spatial_nodes

    @property
    def channels_last_byte_share(self) -> float:
        if self.spatial_bytes == 0:
            return 1.0
        return 1.0 - self.nchw_bytes / self.spatial_bytes


@dataclass(frozen=True, slots=True)
class AuditMeta:
    """How the audit ran: what model, which capture, where, at what shapes."""

    model: str
    torch_version: str
    capture: CaptureName
    capture_notes: tuple[str, ...]
    """Why earlier captures were not used, one line each."""
    mode: Mode
    device: str
    dtype: str
    autocast: str | None
    """The torch.autocast dtype the audit ran under, if any."""
    training: bool
    inputs: tuple[TensorMeta, ...]
    """The sample inputs as audited (after conversion to channels_last)."""
    bandwidth: float
    """Bytes per second used to estimate the time of layout changes."""
    bandwidth_source: BandwidthSource
    backward: bool = False
    """The audit ran one backward pass (``train=True``) and recorded gradient layouts."""
