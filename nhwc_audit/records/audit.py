"""Per-audit records: findings, their hotspots, fixes and regions, the summary, and how the
audit ran. Stdlib only."""

from __future__ import annotations

from dataclasses import dataclass

from .kinds import BandwidthSource, CaptureName, FindingKind, Layout, Mode, in_place_name, op_label
from .node import SourceLoc, TensorMeta

__all__ = ["BACKWARD_NOT_AUDITED", "AuditMeta", "Finding", "Fix", "Hotspot", "Region", "Summary", "finding_key"]

BACKWARD_NOT_AUDITED = "backward: not audited"
"""How the note begins when a backward pass was asked for (``train=True``) and could not run."""


_ATEN_NAMES = {"truediv": "div", "floordiv": "floor_divide", "mod": "remainder"}
"""Python operators as torch.fx names them, and the ATen op the other captures record."""


def finding_key(kind: str, module_path: str, op: str, detail: str, file: str | None) -> str:
    """Kind, module path, op and source file: ``revert:up1.conv.block.1:InstanceNorm2d:examples.py``
    (the file's base name, so that keys hold on any checkout; no line number, so that they hold
    when code moves within the file: findings sharing a key count together). An in-place op is
    keyed as its out-of-place op: ``out += x`` is ``add_`` in every capture (torch's own fx
    tracer records ``add``). The one rule for findings and for findings read back from a JSON report.

    >>> finding_key("revert", "norm", "pad", "circular", "/x/m.py")
    'revert:norm:pad(circular):m.py'
    >>> finding_key("mixed", "layer1.0", "add_", "", "resnet.py")
    'mixed:layer1.0:add:resnet.py'
    >>> finding_key("mixed", "", "truediv", "", "m.py")  # torch.fx's name of x / y
    'mixed::div:m.py'
    """
    op = op[:-1] if in_place_name(op) else op
    op = _ATEN_NAMES.get(op, op)
    where = file.replace(chr(92), "/").rsplit("/", 1)[-1] if file else ""
    return f"{kind}:{module_path}:{op_label(op, detail)}:{where}"


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
    intrinsic: bool = False
    """A cost of the layout on the device audited that no change to the model's ops removes: a
    convolution kernel's copy of its weight or of what it computed (on the CPU a channels_last
    convolution copies its weight gradient, computed NCHW, into channels_last every step; the slow
    backend of a Conv3d at batch 1 its channels_last_3d weight into NCDHW every call). Counted in
    bytes and shown; never an offender of ``check()``, ``--fail-on`` or
    :attr:`~nhwc_audit.AuditReport.incompatible_nodes`."""
    recomputed: int = 0
    """How many more times a training step makes this forward layout change: a checkpointed
    block's forward runs again in backward (``torch.utils.checkpoint``), once per checkpoint
    around the node. ``bytes`` counts every run."""

    @property
    def kind_label(self) -> str:
        """Its kind as tables show it: an intrinsic one marked the kernel's."""
        return f"{self.kind.value} (kernel)" if self.intrinsic else self.kind.value

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

    @property
    def key(self) -> str:
        """A name for this finding that survives renumbered graph nodes and code moved within
        its file (:func:`finding_key`)."""
        return finding_key(
            self.kind.value, self.module_path, self.op, self.detail, self.source.file if self.source else None
        )


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
    """Bytes moved by all those findings per forward (per training step in a train audit: :attr:`Summary.per`)."""


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
    """Of these counts, none is of an :attr:`Finding.intrinsic` finding (a kernel's own copy)."""
    conversions: int
    mixed: int
    breaks: int
    backward: int
    bytes_moved: int
    est_seconds: float
    latent_breaks: int = 0
    """Views that run only because their input arrives NCHW (they raise once it is channels_last)."""
    divergences: int = 0
    """With mode='both': nodes where real and fake kernels disagree."""
    trained: bool = False
    """The records carry one backward pass (a train audit's, or its repair's): bytes are per step."""
    intrinsic: int = 0
    """:attr:`Finding.intrinsic` findings (a kernel's own copies), counted apart from the kinds'."""
    intrinsic_bytes: int = 0
    """Of :attr:`bytes_moved`, the :attr:`Finding.intrinsic` findings': what the convolution kernels copy
    inside on the device audited whatever the model does (a CPU convolution's weight gradient, the slow
    backends' copy of a channels_last weight)."""

    @property
    def findings(self) -> int:
        return (
            self.reverts
            + self.conversions
            + self.mixed
            + self.breaks
            + self.latent_breaks
            + self.backward
            + self.divergences
        )

    @property
    def per(self) -> str:
        """What :attr:`bytes_moved` is counted over: a forward, or a training step where a backward
        pass was audited (:attr:`trained`) or backward findings are among them."""
        return "per training step (forward and backward)" if self.backward or self.trained else "per forward"

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
    """The sample's positional tensors as audited (after conversion to channels_last)."""
    bandwidth: float
    """Bytes per second used to estimate the time of layout changes."""
    bandwidth_source: BandwidthSource
    backward: bool = False
    """The audit ran one backward pass (``train=True``) and recorded gradient layouts (False when
    one was asked for and could not run: a note beginning :data:`BACKWARD_NOT_AUDITED` says why)."""
    threads: int = 1
    """``torch.get_num_threads()`` during the audit: CPU kernels (Conv3d) choose layouts by it."""
    modules: tuple[tuple[str, str], ...] = ()
    """(path, class name) of every module of the audited model in definition order; ``''`` is the
    root. The report's module tree names containers (``ModuleList``) that run no op of their own."""
    keyword_inputs: tuple[tuple[str, TensorMeta], ...] = ()
    """The sample's tensors passed by keyword, as audited: (name, tensor), ``name[i]`` for the
    i-th tensor of a keyword given a list, tuple or dict of them."""

    @property
    def inputs_str(self) -> str:
        """The inputs' shapes, keywords named: ``1x3x64x64, t=1x4``."""
        shapes = [t.shape_str for t in self.inputs] + [f"{k}={t.shape_str}" for k, t in self.keyword_inputs]
        return ", ".join(shapes) or "none"

    @property
    def compute_dtype(self) -> str:
        """The dtype the convolutions run in: autocast's where the audit ran under it."""
        return self.autocast or self.dtype
