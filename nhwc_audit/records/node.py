"""Per-node records: what propagation saw at each node (tensors, layouts, source line). No
judgement here; stdlib only."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .kinds import CONV_OPS, GEMM_OPS, Layout, op_label

__all__ = ["HiddenCopy", "NodeInput", "NodeRecord", "SourceLoc", "TensorMeta"]


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
    def stored_nbytes(self) -> int:
        """Bytes of the elements it stores: a broadcast dim (stride 0, an ``expand``) once."""
        if 0 not in self.strides:
            return self.nbytes
        return math.prod(n for n, st in zip(self.shape, self.strides, strict=True) if st != 0) * self.itemsize

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
    """A layout change an op made internally: a copy (clone, copy_, _to_copy at ATen level), or
    (``computed``) an ATen op that computes its output in another layout than it reads an
    input: a convolution re-laying its padded input inside a circular-padding Conv2d, a 2D
    pool run on a token map that AvgPool1d unsqueezed from an NHWC map."""

    op: str
    layout_in: Layout
    layout_out: Layout
    shape: tuple[int, ...]
    bytes: int
    """What it moves, read and written (a copy: 2 x numel x itemsize)."""
    computed: bool = False
    """Made by an op that computes, not by a copy: never a reshape's exit."""
    reorder: bool = False
    """A copy that reorders dims other than the channels' between NHWC and NCHW (a matmul folding
    the batch and heads of a map's view, :func:`~nhwc_audit.channels.hidden_copy`): a move in no
    layout's direction, neither a revert nor a conversion by itself."""
    densified: bool = False
    """A kernel's copy of an input not dense in memory into a dense one of the same order
    (:func:`~nhwc_audit.channels.kernel_copy`: a channel slice of a channels_last map)."""
    result: bool = False
    """A kernel's copy of a tensor it computed itself or of its weight (a CPU channels_last
    convolution's backward: its weight gradient, computed NCHW, into channels_last; the slow
    backends' copy of a channels_last weight into NCHW; :mod:`~nhwc_audit.propagate.backward_kernels`):
    its own doing at its call, whatever the model does, netted only against what the same node's
    kernels copy so in NCHW."""


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
    in_place: bool = False
    """The op wrote its output into an input it returns (``ReLU(inplace=True)``, ``relu_``): an op
    of its own, with a gradient of its own, where a view (an Identity) only names its input."""
    detail: str = ""
    """The op's mode where it has one (pad 'circular', interpolate 'bilinear')."""
    error: str | None = None
    """For a break: the error the op raised on channels_last input."""
    latent_error: str | None = None
    """For a view of an NCHW input: the error it raises when that input is channels_last (a
    break that fixing the revert upstream exposes)."""
    in_leaf_module: bool = False
    """The node is (or runs inside) a torch.nn leaf module (fixes group by module type)."""
    hidden: tuple[HiddenCopy, ...] = ()
    """Layout-changing copies seen at ATen level while this node ran (real mode)."""
    inside: tuple[HiddenCopy, ...] = ()
    """What its convolution's kernel copied of its weight or of what it made
    (:attr:`HiddenCopy.result`; the CPU's slow backends copy a channels_last weight into NCHW every
    call, :mod:`~nhwc_audit.propagate.conv_kernels`)."""
    nchw_inside: int = 0
    """Bytes the same node's kernels copy so (:attr:`inside`) when the model runs NCHW."""
    grads: tuple[TensorMeta, ...] = ()
    """With ``train=True``: the gradients that arrived at this node's outputs in backward."""
    backward: tuple[HiddenCopy, ...] = ()
    """With ``train=True``: the layout changes this node's backward made (seen from hooks on the
    autograd nodes its forward made)."""
    nchw_backward_bytes: int = 0
    """Bytes the same node's backward moves between layouts when the model runs NCHW (its kernels'
    copies inside aside)."""
    nchw_backward_inside: int = 0
    """Bytes the same node's backward kernels copy inside (:attr:`HiddenCopy.result`) when the
    model runs NCHW (a oneDNN convolution's input gradient of a small map, computed channels_last)."""
    nchw_bytes: int = 0
    """Bytes the same node moves between layouts when the model runs NCHW, as built (a copy it
    makes in either layout): what channels_last adds here is the difference."""
    recomputed: int = 0
    """How many more times a training step runs this node's forward: a backward recomputes the
    function of each ``torch.utils.checkpoint`` around it (0 but in a train audit's records)."""
    autocast: str | None = None
    """The device type whose autocast was on when the node ran in a graph (the audit's, or forward's
    own block); None without, and in eager capture, whose records are the ATen ops after its casts."""
    call: int | None = None
    """Eager capture: which of the model's torch calls dispatched this ATen op (the ops of one
    call, InstanceNorm's four, are one node of a graph); None in graphs."""
    call_at_site: int | None = None
    """Eager capture: which call of its torch function from its source line that call is (from
    0), the same in a run in either layout; None in graphs."""
    reduced: tuple[int, ...] | None = None
    """A reduction over some dims (``sum(1)``, ``amax((2, 3))``): those dims of its input, from 0; None
    for any other op (and a reduction over all dims)."""

    @property
    def convolves(self) -> bool:
        """A convolution (:data:`~.kinds.CONV_OPS`), as fx, ATen or torch.nn names it."""
        return self.op_name.lower() in CONV_OPS

    @property
    def convolves_or_multiplies(self) -> bool:
        """A convolution or a matrix multiply (:data:`~.kinds.GEMM_OPS`): a kernel that reads its
        operands strided either way and picks the layout it writes."""
        return self.op_name.lower() in CONV_OPS or self.op_name.lower() in GEMM_OPS

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
    def all_channels_last(self) -> bool:
        """It reads and writes only channels_last maps of one rank and dense vectors (a conv's
        bias, a norm's statistics): nothing in it is in another memory order."""
        metas = (*(i.meta for i in self.inputs), *self.outputs)
        rank = self.outputs[0].rank if self.outputs else 0
        return bool(self.outputs) and all(
            (m.layout is Layout.CHANNELS_LAST and m.rank == rank) or (m.rank <= 1 and 0 not in m.strides) for m in metas
        )

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

    @property
    def site_op(self) -> str:
        """The op a finding names: for an ATen op that a torch.nn module runs (the hooks and
        export captures record them), that module, as fx names it (``InstanceNorm3d``)."""
        return self.module_type if self.in_leaf_module and self.op != "call_module" else self.op_name
