"""Backward audit: one backward pass from a loss on the outputs, recording the layout of the
gradient that arrives at each node's output (tensor hooks) and of each parameter gradient as
the op produced it (``torch.autograd.grad``; a leaf's ``.grad`` would be forced to the
parameter's own strides).

A real audit's propagation runs its forward with autograd when a backward follows
(:class:`GradRun`): the backward starts from it, and the model runs forward once. A fake run
(whose corrected nodes hand gradients back as eager would) runs a forward of its own here.

What each node's backward moves between layouts is seen from hooks on its autograd nodes
(:mod:`.grad_hooks`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves, tree_map

from ..capture.context import node_contexts
from ..layout import tensor_meta
from ..prepare.copy import memory_format_for_rank
from ..records import HiddenCopy, Layout, TensorMeta
from ..tensors import clone_value, iter_tensors, seeded, to_nchw
from .backward_kernels import Call
from .breaks import as_traced, to_channels_last
from .corrections import Corrections
from .fake_views import VIEWS, view_node, view_strides
from .fresh_args import FreshArgs
from .grad_hooks import EagerGrad, Grads, Moved, hook_gradients, hook_nodes

__all__ = ["Backward", "GradRun", "backward_layouts", "param_grad_notes"]


@dataclass(frozen=True)
class Backward:
    """What one backward pass handed the nodes of a run, and what it moved."""

    layouts: dict[str, tuple[TensorMeta, ...]]
    """Node name -> the layouts of the gradients that arrived at its outputs."""
    params: dict[str, TensorMeta]
    """Parameter name -> the layout of its gradient, as the op produced it."""
    moved: Moved
    reordering: frozenset[str]
    """The kinds of autograd node not in :data:`~.grad_hooks.KEEPS_ORDER` that ran (on tensors of
    rank 3 and up)."""
    kernels: dict[str, list[Call | None]]
    """Node name -> the NCHW counterparts of its convolutions' backward calls (:attr:`.grad_hooks.Grads.kernels`)."""


@dataclass(frozen=True)
class GradRun:
    """A forward the propagation ran with autograd, each node's output hooked
    (:func:`hook_gradients`): the graph's output, and the gradient layouts the hooks collect
    once a backward runs from it."""

    out: Any
    grads: Grads


def _eager_input(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() in (4, 5) and v.requires_grad:
        return EagerGrad.apply(v)
    return v


class _GradProp(FreshArgs):
    def __init__(
        self,
        gm: torch.fx.GraphModule,
        grads: Grads,
        breaks: frozenset[str] = frozenset(),
        corrected: frozenset[str] = frozenset(),
        corrections: Corrections | None = None,
    ) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.grads = grads
        self.breaks = breaks
        self.corrected = corrected
        self.corrections = corrections
        self._contexts = node_contexts(gm.graph.nodes, gm) if corrections is not None else {}

    def _diverges(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> bool:
        """A fake run's node that ``corrections`` would follow eager at, views aside (strided below)."""
        assert self.corrections is not None
        ctx = self._contexts[n]
        names = ctx.names
        if {name.lower() for name in names} & VIEWS:
            return False
        before = len(self.corrections.applied)
        self.corrections.apply(
            n.name,
            names,
            ctx.detail_at(args, kwargs),
            [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)],
            out,
        )
        return len(self.corrections.applied) > before

    def _run_target(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return getattr(self, n.op)(n.target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.name in self.breaks:  # raises on channels_last: run on NCHW, as the forward audit did
                args, kwargs = tree_map(to_nchw, args), tree_map(to_nchw, kwargs)
            if n.name in self.corrected:  # a fake run's known meta-kernel error: follow eager both ways
                args, kwargs = tree_map(_eager_input, args), tree_map(_eager_input, kwargs)
            out = as_traced(self._run_target, n, args, kwargs, grad=True)
            if n.name not in self.corrected and self.corrections is not None and self._diverges(n, args, kwargs, out):
                # found here (a run with no propagation before it: the NCHW baseline's): run again, as corrected
                args, kwargs = tree_map(_eager_input, args), tree_map(_eager_input, kwargs)
                out = tree_map(to_channels_last, as_traced(self._run_target, n, args, kwargs, grad=True))
            elif n.name in self.corrected:
                out = tree_map(to_channels_last, out)
            elif isinstance(out, FakeTensor) and args and isinstance(args[0], torch.Tensor) and view_node(n):
                out = view_strides(args[0], out)  # as the propagation strided it (:class:`.corrections.Corrections`)
        if n.op not in ("output", "get_attr"):
            hook_gradients(n.name, out, self.grads)
        return out


def backward_layouts(
    gm: torch.fx.GraphModule,
    flat_inputs: list[Any],
    seed: int = 0,
    *,
    breaks: frozenset[str] = frozenset(),
    corrected: frozenset[str] = frozenset(),
    ran: GradRun | None = None,
    data: frozenset[str] = frozenset(),
    corrections: Corrections | None = None,
) -> Backward:
    """Run ``gm`` (the audit's private graph) forward with autograd and back from a fixed random
    linear loss whose seed gradient has each output's own layout (as an elementwise loss on a
    channels_last output gives). ``breaks``: nodes that raise on channels_last input (the
    forward audit's breaks), run on NCHW copies of their inputs as the forward audit ran them.
    ``corrected``: nodes a fake run corrected to eager (:mod:`.corrections`): their outputs and
    the gradients they hand back are channels_last here too. ``ran``: the propagation's own
    forward of ``gm``'s graph, run with autograd: the backward starts there, with no forward here
    (unless a check after it wrote in place to a tensor autograd saved: then it runs again).
    ``data``: ``gm``'s buffers a backward reads as data, not as weights (a tensor constant).
    ``corrections``: a fake run with no propagation before it finds the nodes to correct itself.
    Returns what the backward handed each node and parameter, and what it moved."""
    if ran is not None:
        try:
            with seeded(seed, flat_inputs), torch.enable_grad():
                return _back(ran.out, ran.grads, gm, data)
        except RuntimeError:  # a check after the run wrote in place to what autograd saved
            pass
    grads = Grads()
    with seeded(seed, flat_inputs), torch.enable_grad():
        out = _GradProp(gm, grads, breaks, corrected, corrections).run(
            *[clone_value(v) for v in flat_inputs], enable_io_processing=False
        )
        return _back(out, grads, gm, data)


LOSS = "(loss)"
"""The name the loss's autograd nodes are hooked under: no graph node's."""


def _back(out: Any, grads: Grads, gm: torch.fx.GraphModule, data: frozenset[str]) -> Backward:
    """The backward from ``out`` (its run's nodes hooked into ``grads``), the parameter
    gradients' layouts, and what each node's backward moved between layouts; ``data``: names of
    ``gm``'s buffers read as data, not weights (:attr:`.captured.Captured.unconverted`)."""
    outs = [t for t in iter_tensors(out) if t.is_floating_point() and t.requires_grad]
    params = [(name, p) for name, p in gm.named_parameters() if p.requires_grad]
    param_grads: dict[str, TensorMeta] = {}
    if outs:
        loss = sum((t * torch.randn_like(t)).sum() for t in outs)
        assert isinstance(loss, torch.Tensor)
        # the loss's own nodes hand on the seed gradients: a part of any sum with an output the
        # model reads too (``return f, f.mean()``); what they move is no graph node's
        hook_nodes(LOSS, [loss.grad_fn], grads)
        stored = [*gm.named_parameters(), *gm.named_buffers()]
        grads.weights = frozenset(id(t) for name, t in stored if name not in data)
        grads.params = frozenset(id(t) for _, t in gm.named_parameters())
        got = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        param_grads = {name: tensor_meta(g) for (name, _), g in zip(params, got, strict=True) if g is not None}
        for node, copy in _accumulated(gm, params, got, grads):
            grads.moved.setdefault(node, []).append(copy)
    layouts = {k: tuple(v) for k, v in grads.layouts.items()}
    return Backward(layouts, param_grads, grads.moved, frozenset(grads.reordering), grads.kernels)


def _obeys(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """autograd's ``obeys_layout_contract``: a parameter's ``.grad`` takes the gradient as it is where
    its strides are the parameter's on every dim of size above 1 (the parameter dense), and copies
    it into the parameter's strides otherwise (``AccumulateGrad``, ``clone_obey_contract``)."""
    fmt = memory_format_for_rank(param.dim())
    if not param.is_contiguous() and not (fmt is not None and param.is_contiguous(memory_format=fmt)):
        return True  # (other strides: not a layout of the conversion's)
    return all(g == p or (n == 1 and g != 0) for n, g, p in zip(grad.shape, grad.stride(), param.stride(), strict=True))


def _accumulated(
    gm: torch.fx.GraphModule,
    params: Sequence[tuple[str, torch.Tensor]],
    got: Sequence[torch.Tensor | None],
    grads: Grads,
) -> list[tuple[str, HiddenCopy]]:
    """The copies a training step's ``loss.backward()`` makes of 4D/5D parameter gradients into the
    parameters' strides (:func:`_obeys`; ``torch.autograd.grad``, which the audit runs, makes none),
    each at the first node that reads the parameter: a (1, C, H, W) position table added to a map,
    whose gradient, summed over the batch, comes out NCHW while the converted table is channels_last.
    A gradient some other tensor holds too (:attr:`~.grad_hooks.Grads.handed`: the table's at batch 1 is
    the one the add's output got) is copied in NCHW as well, where the ``.grad`` cannot take it as it is:
    the NCHW model moves as much, and channels_last adds nothing."""
    copied = [
        (name, p, g)
        for (name, p), g in zip(params, got, strict=True)
        if g is not None and p.dim() in (4, 5) and not _obeys(g, p) and grads.handed.get(id(g)) is not g
    ]
    if not copied:  # (most often: the graph's walk below spared)
        return []
    readers: dict[int, str] = {}  # by the tensor: a module registered under two names is read by either
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users and (q := _parameter(gm, str(n.target))) is not None:
            readers.setdefault(id(q), next(iter(n.users)).name)
        elif n.op == "call_module":
            for q in gm.get_submodule(str(n.target)).parameters():
                readers.setdefault(id(q), n.name)
    return [
        (
            readers[id(p)],
            HiddenCopy(
                f"AccumulateGrad of {name}",
                tensor_meta(g).layout,
                tensor_meta(p).layout,
                tuple(p.shape),
                2 * p.numel() * p.element_size(),
            ),
        )
        for name, p, g in copied
        if id(p) in readers
    ]


def _parameter(gm: torch.fx.GraphModule, target: str) -> torch.Tensor | None:
    """The parameter of ``gm``'s a get_attr node's ``target`` names (what its module holds there: the
    NCHW baseline's run holds a view of it, :func:`torch.func.functional_call`); None for anything else."""
    path, _, name = target.rpartition(".")
    try:
        return gm.get_submodule(path)._parameters.get(name)
    except AttributeError:
        return None


def param_grad_notes(param_grads: dict[str, TensorMeta]) -> tuple[str, ...]:
    """One note naming 4D/5D parameter gradients the ops produced in NCHW (a leaf's .grad is
    forced to the parameter's strides, so this is the layout the backward kernel chose)."""
    if not param_grads:
        return ()
    nchw = sorted(n for n, m in param_grads.items() if m.is_spatial and m.layout is Layout.CONTIGUOUS)
    spatial = sum(1 for m in param_grads.values() if m.is_spatial)
    if not nchw:
        return (f"backward: all {spatial} 4D/5D parameter gradients produced channels_last or ambiguous",)
    return (f"backward: {len(nchw)} of {spatial} 4D/5D parameter gradients produced NCHW: {', '.join(nchw[:8])}",)
