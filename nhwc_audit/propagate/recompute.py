"""How many more times a training step runs each node of a checkpointed block: a backward
recomputes the function of a ``torch.utils.checkpoint`` when it needs the tensors the block did not
keep. A reentrant checkpoint runs its whole function again; a non-reentrant one stops once it has
made the last tensor the backward needs (torch's early stop: a block ending in a convolution, which
saves its input before its kernel runs, does not run that kernel again), and a nested one runs as
torch runs it. So the counts are measured, not derived: the graph runs forward and backward once
more with its blocks outlined and checkpointed again (:mod:`~nhwc_audit.capture.outline`), each
block's nodes counted as each run of them completes. Nodes inside a reentrant checkpoint count one
run per checkpoint around them (the outlined blocks run non-reentrant)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from ..capture.context import CHECKPOINT_KEY, NO_GRAD_KEY, reentrant
from ..capture.outline import ORIGIN_KEY, outlined
from ..errors import first_line
from ..tensors import clone_value, iter_tensors, seeded, to_nchw
from .breaks import as_traced
from .dispatch import RecordingMode
from .fresh_args import FreshArgs
from .module_state import attributes_restored
from .onednn import stepped_around

__all__ = ["recompute_counts", "state_kept"]


class _Ran(RecordingMode):
    """Counts the ATen ops that return under it: a node whose run returned one ran its kernels, as
    far as they went (torch's early stop interrupts a recompute at the last tensor it needs saved:
    after the kernel of an op that saves its output, a softmax's; before that of one that saves its
    inputs, a convolution's). An op a selective checkpoint's policy kept is served from its cache,
    in a mode above this one: it does not run, and is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.returned = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        with stepped_around(func, args):  # a oneDNN kernel that would crash the audit's process
            out = func(*args, **(kwargs or {}))
        if not _aliases(func):  # (saving a tensor for backward detaches it first: no kernel of the node's)
            self.returned += 1
        return out


@functools.cache
def _aliases(func: Any) -> bool:
    """An ATen op that returns a view of an input (``detach``, ``view``): no data made."""
    return any(r.alias_info is not None for r in func._schema.returns)


class _Counting(FreshArgs):
    """Runs each node as the audit's backward run does (:func:`~.breaks.as_traced`: forward's autocast
    and no-grad blocks; a break on NCHW copies) and counts the runs of the captured graph's nodes."""

    def __init__(self, gm: torch.fx.GraphModule, counts: Counter[str], ran: _Ran, breaks: frozenset[str]) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # (torch's early stop is an exception it catches by type)
        self.counts, self.ran, self.breaks = counts, ran, breaks

    def _run_target(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return getattr(self, n.op)(n.target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        name = n.meta.get(ORIGIN_KEY, n.name)
        before = self.ran.returned
        try:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                if name in self.breaks:  # raises on channels_last: run on NCHW, as the audit did
                    args, kwargs = tree_map(to_nchw, args), tree_map(to_nchw, kwargs)
                # (forward's no-grad blocks by hand: the retry of a refused write would swallow torch's early stop)
                with torch.no_grad() if n.meta.get(NO_GRAD_KEY) else contextlib.nullcontext():
                    return as_traced(self._run_target, n, args, kwargs, grad=False)
        finally:
            if self.ran.returned > before:
                self.counts[name] += 1


class _Counted(nn.Module):
    """An outlined block, its nodes run one by one and counted."""

    def __init__(self, gm: torch.fx.GraphModule, counts: Counter[str], ran: _Ran, breaks: frozenset[str]) -> None:
        super().__init__()
        self.gm = gm
        self.counts, self.ran, self.breaks = counts, ran, breaks

    def forward(self, *args: Any) -> Any:
        return _Counting(self.gm, self.counts, self.ran, self.breaks).run(*args, enable_io_processing=False)


@contextlib.contextmanager
def state_kept(gm: torch.fx.GraphModule) -> Iterator[None]:
    """``gm``'s buffers (BatchNorm statistics in train mode) and module attributes put back after
    a measuring run. A buffer whose elements share memory (a graph constant ``idx.expand(...)``)
    cannot be written in place, by the model or by the restore."""
    buffers = [(b, b.clone()) for b in gm.buffers() if torch._debug_has_internal_overlap(b) != 1]
    try:
        with attributes_restored(gm):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def recompute_counts(
    gm: torch.fx.GraphModule,
    flat_inputs: Sequence[Any],
    moving: Callable[[], Container[str]] | None = None,
    breaks: frozenset[str] = frozenset(),
) -> tuple[dict[str, int], str | None]:
    """Node name -> how many more times a training step runs it (nodes in no checkpoint: absent),
    and a note where the counting run failed (then every checkpointed node counts one run per
    checkpoint around it, as a reentrant checkpoint runs). ``moving``: the nodes whose forward
    moves bytes, asked only of a graph with checkpoints (None: any may); where no checkpointed node is one of them, the counts change no
    figure and nothing runs (a timm ResNet's checkpointed stages: a second training step spared).
    ``breaks``: the nodes that raise on channels_last, run on NCHW copies as the audit ran them."""
    marks = {n.name: n.meta[CHECKPOINT_KEY] for n in gm.graph.nodes if n.meta.get(CHECKPOINT_KEY)}
    static = {name: len(ids) for name, ids in marks.items()}
    busy = moving() if marks and moving is not None else None
    if not marks or (busy is not None and not any(name in busy for name in marks)):
        return {}, None
    counts: Counter[str] = Counter()
    ran = _Ran()
    try:
        with state_kept(gm), seeded(0, list(flat_inputs)), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = outlined(gm, lambda g: _Counted(g, counts, ran, breaks), variant=False)
            top = _Counting(run, counts, ran, breaks)
            with ran:
                out = top.run(*[clone_value(v) for v in flat_inputs], enable_io_processing=False)
            outs = [t for t in iter_tensors(out) if t.is_floating_point() and t.requires_grad]
            params = [p for p in run.parameters() if p.requires_grad]
            if outs and params:
                loss = sum((t * torch.randn_like(t)).sum() for t in outs)
                assert isinstance(loss, torch.Tensor)
                with ran:
                    torch.autograd.grad(loss, params, allow_unused=True)
    except Exception as e:  # noqa: BLE001 (the whole-block count is the fallback, said in a note)
        why = f"backward: checkpointed blocks counted whole per checkpoint (the counting run failed: {first_line(e)})"
        return static, why
    return {
        name: static[name] if any(map(reentrant, ids)) else max(0, counts[name] - 1) for name, ids in marks.items()
    }, None
