"""The NCHW baseline: the captured model run as built (NCHW weights and inputs), so each
revert can be charged only the bytes channels_last adds. A copy the model makes in either
layout (``x.permute(...).contiguous()`` in an attention block) is where channels_last is lost,
but it costs nothing extra.

The audit's own copy runs again with every 4D/5D parameter and buffer seen through NCHW
strides over the same storage (``as_strided``: nothing is copied; ``torch.func.functional_call``
swaps them in for the run only) and the sample made NCHW, in the same mode as the audit (real
kernels in real mode, fake tensors in fake mode), under the guard on the user's weights. Graph
captures run their graph; the hooks capture runs the model eagerly. Nodes are matched by name in
a graph, and for the hooks capture, whose op sequence may differ between layouts, by module path,
call, ATen op, source line, output shapes and occurrence.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..channels import dense_strides
from ..errors import SharedWeightWrite, first_line
from ..prepare.fake import fake_mode
from ..records import HiddenCopy, NodeRecord
from ..tensors import SharedStorages, iter_tensors
from .backward import backward_layouts
from .captured import Captured
from .corrections import Corrections
from .eager import record_eager
from .interpreter import LayoutProp
from .module_state import attributes_restored
from .runner import Runner

__all__ = ["match_nodes", "nchw_backward", "nchw_records", "split_moves", "training_fails"]


def _nchw_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` seen with NCHW strides: the same storage when it is dense, else a copy."""
    if t.dim() not in (4, 5):
        return t
    strides = dense_strides(t.shape, range(t.dim()))
    dense = t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.as_strided(t.shape, strides) if dense or t.is_contiguous() else t.contiguous()


class _Graph(nn.Module):
    """Runs ``graph`` on ``root`` (its targets are paths into it), as the propagation did: no
    GraphModule is built (generating its code cost ~50 ms on maxvit_t's 1,633 nodes)."""

    def __init__(
        self, root: nn.Module, graph: torch.fx.Graph, shared: frozenset[int], corrections: Corrections | None
    ) -> None:
        super().__init__()
        self.inner = root
        self.graph = graph
        self.shared = shared
        self.corrections = corrections
        self.records: list[NodeRecord] = []

    def forward(self, *values: Any) -> Any:
        interp = LayoutProp(
            self.inner, graph=self.graph, record_hidden=True, shared=self.shared, corrections=self.corrections
        )
        out = interp.run(*values, enable_io_processing=False)
        self.records = interp.records
        return out


class _Eager(nn.Module):
    def __init__(self, model: nn.Module, shared: frozenset[int], corrections: Corrections | None) -> None:
        super().__init__()
        self.inner = model
        self.shared = shared
        self.corrections = corrections
        self.records: list[NodeRecord] = []

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.records, out = record_eager(self.inner, args, kwargs, shared=self.shared, corrections=self.corrections)
        return out


class _Backward(nn.Module):
    """Runs the audit's backward (:func:`~.backward.backward_layouts`) through ``gm``, a forward of
    its own then the backward, keeping what each node's backward moved between layouts; a fake
    run corrects the nodes whose meta kernels stride otherwise than eager (``corrections``: the
    CPU GroupNorm of a map a permute left channels_last-strided keeps it so in an NCHW model too)."""

    def __init__(self, gm: torch.fx.GraphModule, data: frozenset[str], corrections: Corrections | None) -> None:
        super().__init__()
        self.inner, self.data, self.corrections = gm, data, corrections
        self.moved: dict[str, tuple[int, int]] = {}

    def forward(self, *values: Any) -> None:
        moved = backward_layouts(self.inner, list(values), data=self.data, corrections=self.corrections).moved
        self.moved = {name: split_moves(copies) for name, copies in moved.items()}


def split_moves(copies: Sequence[HiddenCopy]) -> tuple[int, int]:
    """(bytes of a backward's copies but those its kernels made inside, bytes of those)."""
    inside = sum(c.bytes for c in copies if c.result)
    return sum(c.bytes for c in copies) - inside, inside


def nchw_backward(captured: Captured, runner: Runner) -> dict[str, tuple[int, int]] | str:
    """Node -> the bytes its backward moves between layouts when the model runs NCHW, and those its
    kernels copy inside (:func:`split_moves`; the audit's
    graph run forward and back as built, in the audit's mode), or why that could not run. The
    backward of an NCHW model copies too: a ConvNeXt block's gradient comes back through its
    permutes in NHWC order, and the depthwise convolution's NCHW backward re-lays it. A real
    audit runs it for real, never on fake tensors: the meta kernels' backward strides differ
    from eager's on an NCHW model too (diffusers' UNet2DModel with attention at batch 1: 7
    nodes move data on fake tensors, 4 for real), and the corrections a fake run makes are
    checked on channels_last runs."""
    graph, changed = captured.as_built
    if captured.gm is None or graph is None or captured.inputs is None:
        return f"the {captured.method} capture has no graph to run backward through"
    corrections = runner.corrections()  # the run's own: its kernels' strides and its nodes' outputs
    gm = captured.gm if not changed else torch.fx.GraphModule(captured.gm, graph, type(captured.gm).__name__)
    holder = _Backward(gm, captured.unconverted, corrections)
    call = tuple(tree_map(runner.built, v) for v in captured.inputs)
    why = _run_as_built(holder, call, runner, corrections, left=captured.unconverted)
    return why if why is not None else holder.moved


class _Trains(nn.Module):
    """One forward of ``model`` and a backward from the sum of its outputs that need gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        outs = [t for t in iter_tensors(self.inner(*args, **kwargs)) if t.requires_grad]
        if outs:
            torch.autograd.backward([t.float().sum() for t in outs])


def training_fails(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], runner: Runner) -> str | None:
    """Why one eager forward and backward of ``model`` as built (NCHW weights and inputs, in the
    audit's mode) raises, or None when it trains: the model's own error, not one of its
    channels_last run (a ``.view`` that breaks there)."""
    call = (tuple(tree_map(runner.built, a) for a in args), {k: tree_map(runner.built, v) for k, v in kwargs.items()})
    return _run_as_built(_Trains(model), call, runner, corrections=None)


def _run_as_built(
    holder: nn.Module,
    call: tuple[Any, ...],
    runner: Runner,
    corrections: Corrections | None,
    *,
    left: frozenset[str] = frozenset(),
) -> str | None:
    """Run ``holder`` on ``call`` (NCHW inputs) with its module's 4D/5D parameters and buffers seen
    through NCHW strides, in the audit's mode; why it failed, or None. ``left``: the tensors the
    conversion left as they are (a GraphModule registers the tensor constants fx stowed as buffers:
    ``torch.ones(1, C, H, 1).expand(...)`` made in forward is broadcast in either run)."""
    inner = holder.inner
    assert isinstance(inner, nn.Module)
    state = {
        f"inner.{n}": _nchw_view(t)
        for n, t in [*inner.named_parameters(), *inner.named_buffers()]
        if t.dim() in (4, 5) and n not in left
    }
    try:
        if runner.fake_mode is not None:
            call = tree_map(lambda v: _to_fake(v, runner.fake_mode), call)
        with runner.context(guard=False, corrections=corrections), runner.grad_mode():
            torch.func.functional_call(holder, state, call, strict=False)
    except SharedWeightWrite as e:
        return str(e)
    except Exception as e:  # the comparison refines an estimate; it is never a reason to fail
        return first_line(e)
    return None


FAKE_SECONDS_PER_NODE = 1e-3
"""What a fake NCHW run costs per node, about (0.3-1.5 ms on this project's 2-core CPU: the
FakeTensor dispatch of each ATen op and the recording)."""


FAKE_MIN_SECONDS = 1.0
"""Below this, the audit's own run never sends the baseline to fake tensors: what a fake run
would save is small, and an audit's fixed costs (the trace, the copy, a first call's set-up on a
busy machine) are not the model's."""


def fake_pays(run_seconds: float, nodes: int) -> bool:
    """Is a real audit's NCHW baseline cheaper on fake tensors? The real run costs about what
    the audit's own capture took (``run_seconds``), the fake one :data:`FAKE_SECONDS_PER_NODE`
    a node; fake is chosen at twice that and past :data:`FAKE_MIN_SECONDS`, so that a model near
    the line, or a small one on a busy machine, keeps one way."""
    return run_seconds > max(2 * FAKE_SECONDS_PER_NODE * nodes, FAKE_MIN_SECONDS)


def nchw_records(
    captured: Captured,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    runner: Runner,
    *,
    fake: bool = False,
) -> tuple[list[NodeRecord] | str, bool]:
    """The records of the NCHW run of the capture ``captured`` came from (``model`` and the
    sample are the audit's channels_last copies), or why it could not run; and whether a real
    audit's run went on fake tensors.

    ``fake``: a real audit runs it on fake tensors first (:func:`fake_pays`). The baseline
    needs layouts, not values, and a real run costs what the audit's own forward costs: it
    doubled a compute-bound audit (diffusers' UNet2DConditionModel at 96x96: 3.6 s, 1.8 s
    of it the baseline; on fake tensors 0.23 s, the same records). Where a fake run cannot
    go (an op without a meta kernel, a value read into Python, a shape made from values),
    the run is real."""
    if fake and not runner.fake:
        fake_runner = dataclasses.replace(runner, fake_mode=fake_mode(real_inputs=True))
        # what forward caches on the modules is put back: a fake run that fails must not leave
        # FakeTensors there for the real run after it
        with attributes_restored(captured.capture.root if captured.capture is not None else model):
            got = _nchw_run(captured, model, args, kwargs, fake_runner)
        if not isinstance(got, str):
            return got, True
    return _nchw_run(captured, model, args, kwargs, runner), False


def _nchw_run(
    captured: Captured, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], runner: Runner
) -> list[NodeRecord] | str:
    holder: _Graph | _Eager
    # a fake run follows eager where meta kernels are known to differ, as the audit's own run did
    # no backward follows (as in the audit's own run, whose autograd mode kernels may read: CPU SDPA
    # picks its kernel by whether the mask needs a gradient), so a view that needs a gradient is
    # strided as eager strides it too (fake_strides.view_strides)
    corrections = runner.corrections()
    if corrections is not None:
        corrections = dataclasses.replace(corrections, backward=False)
    # a fake run writes to no storage: only a real one is guarded, and its weights, seen through
    # NCHW strides, have the model's values (shapes made from values are the model's)
    shared: frozenset[int] = frozenset() if runner.fake else _values_kept(runner.shared)
    graph = captured.as_built[0]
    if captured.capture is not None and graph is not None and captured.inputs is not None:
        holder = _Graph(captured.capture.root, graph, shared, corrections)
        call: tuple[Any, ...] = tuple(tree_map(runner.built, v) for v in captured.inputs)
    else:
        holder = _Eager(model, shared, corrections)
        call = (tree_map(runner.built, args), tree_map(runner.built, kwargs))
    why = _run_as_built(holder, call, runner, corrections)
    return why if why is not None else holder.records


def _values_kept(shared: frozenset[int]) -> frozenset[int]:
    """``shared`` for a run that reads the weights with their own values."""
    if isinstance(shared, SharedStorages) and shared.permuted:
        return SharedStorages(shared.spans, permuted=False)
    return shared


def _to_fake(v: Any, mode: Any) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
        return mode.from_tensor(v)
    return v


def match_nodes(channels_last: Sequence[NodeRecord], nchw: Sequence[NodeRecord], *, by_name: bool) -> dict[str, str]:
    """Channels_last record name -> the NCHW record of the same op (by name in a graph; by module
    path, ATen op, source line, which call from that line, output shapes and occurrence for the
    eager capture)."""
    if by_name:
        names = {r.name for r in nchw}
        return {r.name: r.name for r in channels_last if r.name in names}

    def keys(records: Sequence[NodeRecord], at_site: bool) -> dict[tuple[Any, ...], str]:
        seen: Counter[tuple[Any, ...]] = Counter()
        out: dict[tuple[Any, ...], str] = {}
        for r in records:
            where = (r.source.file, r.source.line) if r.source else ("", 0)
            # which call from its line (counted in both runs alike: a ``.contiguous()`` that copies
            # in one layout only is a call in both), the ATen op and the shapes: an op that one
            # layout makes and the other does not must not shift the pairing of the ops after it
            site = (r.call_at_site,) if at_site else ()
            key: tuple[Any, ...] = (
                r.module_path,
                r.op_name,
                r.target,
                *where,
                tuple(o.shape for o in r.outputs),
                *site,
            )
            out[(*key, seen[key])] = r.name
            seen[key] += 1
        return out

    def paired(ours: Sequence[NodeRecord], others: Sequence[NodeRecord], at_site: bool) -> dict[str, str]:
        theirs = keys(others, at_site)
        return {name: theirs[key] for key, name in keys(ours, at_site).items() if key in theirs}

    first = paired(channels_last, nchw, True)
    # then the others, counted among the unpaired: a call one layout makes and the other does not
    # (``if not x.is_contiguous(): x = x.contiguous()``) shifts the count of calls from its line
    taken = set(first.values())
    rest = [r for r in channels_last if r.name not in first], [r for r in nchw if r.name not in taken]
    return {**first, **paired(*rest, False)}
