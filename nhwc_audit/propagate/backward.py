"""Backward audit: one backward pass from a loss on the outputs, recording the layout of the
gradient that arrives at each node's output (tensor hooks) and of each parameter gradient as
the op produced it (``torch.autograd.grad``; a leaf's ``.grad`` would be forced to the
parameter's own strides).

A real audit's propagation runs its forward with autograd when a backward follows
(:class:`GradRun`): the backward starts from it, and the model runs forward once. A fake run
(whose corrected nodes hand gradients back as eager would) runs a forward of its own here.

What the backward moves between layouts is seen from hooks on its autograd nodes
(:class:`Grads`), not at dispatch level: under any dispatch mode some backward formulas take
other code paths (``maximum``'s masks out of place, into a contiguous copy, where training masks
in place). A node re-lays what it reads (the gradients arriving, the tensors it saved) whose
memory runs in another order than the first gradient it hands on (:func:`_relay`: a ReLU's
backward writing a channels_last map's NCHW gradient, or a slice of one, in channels_last; a
convolution's re-laying its whole incoming gradient); a gradient summed from several consumers
moves each part in another order than the sum. Each is charged to the graph node whose forward
made the autograd node (:func:`hook_gradients` hooks them as the forward runs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from ..channels import relay_bytes
from ..layout import reorders, tensor_meta
from ..records import HiddenCopy, Layout, TensorMeta
from ..tensors import clone_value, iter_tensors, seeded, to_nchw
from .breaks import to_channels_last, without_grad_if_refused

__all__ = ["GradRun", "Grads", "backward_layouts", "hook_gradients", "param_grad_notes"]


Moved = dict[str, list[HiddenCopy]]
"""Node name -> the layout changes its backward made."""


@dataclass
class Grads:
    """What one backward hands the nodes of a run, collected by the hooks :func:`hook_gradients`
    puts on it as the forward runs (a collector, filled during the backward)."""

    layouts: dict[str, list[TensorMeta]] = field(default_factory=dict)
    """Node name -> the layouts of the gradients that arrived at its output's tensors."""
    moved: Moved = field(default_factory=dict)
    parts: dict[tuple[int, int], list[tuple[TensorMeta, str]]] = field(default_factory=dict)
    """(``id()`` of an autograd node, input slot) -> the 4D/5D gradients handed to it so far,
    and the graph node whose backward handed each on: summed before the node runs."""
    saved_names: dict[type, tuple[str, ...]] = field(default_factory=dict)


_NODE = "nhwc_audit.node"
"""The key, in an autograd node's ``metadata``, of the graph node whose forward made it."""


def hook_gradients(name: str, value: Any, grads: Grads) -> None:
    """Note in ``grads`` the layout of each gradient that arrives at ``value``'s tensors, and hook
    each autograd node the run of node ``name`` made (the walk back from its outputs stops at the
    nodes of earlier graph nodes) to note what its backward moves between layouts."""
    todo = []
    for t in iter_tensors(value):
        if t.requires_grad:

            def hook(g: torch.Tensor | None) -> None:
                if g is not None:  # None reaches an output of a multi-output op no gradient flows to
                    grads.layouts.setdefault(name, []).append(tensor_meta(g))

            t.register_hook(hook)
            todo.append(t.grad_fn)
    while todo:
        node = todo.pop()
        if node is None or _NODE in (meta := _metadata(node)):
            continue
        meta[_NODE] = name
        if type(node).__name__ != "AccumulateGrad":  # a leaf's: no backward of the model's
            _hook_node(node, name, grads)
        todo.extend(n for n, _ in node.next_functions)


def _metadata(node: Any) -> dict[str, Any]:
    """An autograd node's own dict (``Node.metadata``, a property the stubs call a method)."""
    meta: dict[str, Any] = node.metadata
    return meta


def _saved(node: Any, names: dict[type, tuple[str, ...]]) -> list[torch.Tensor]:
    """The 4D/5D tensors ``node`` saved for its backward (readable before it runs); ``names``:
    the ``_saved_*`` attributes of each autograd node class, found once."""
    kind = type(node)
    if kind not in names:
        names[kind] = tuple(a for a in dir(kind) if a.startswith("_saved_"))
    out: list[torch.Tensor] = []
    for attr in names[kind]:
        try:
            value = getattr(node, attr)
        except RuntimeError:  # released
            continue
        out += [t for t in iter_tensors(value) if t.dim() >= 4]
    return out


def _hook_node(node: Any, name: str, grads: Grads) -> None:
    """Hooks on autograd ``node`` (of graph node ``name``): before it runs, the parts of each
    gradient it receives that were summed from another layout; after, what it re-laid. A fake
    run's correction (:class:`_EagerGrad`) re-lays nothing eager does: only its parts count. The
    hooks find their node as the engine runs it (a node holding a hook that held the node would
    be a reference cycle, left to the cyclic collector)."""
    correction = isinstance(node, _EagerGrad._backward_cls)
    conv = type(node).__name__.startswith("ConvolutionBackward")
    saved: list[torch.Tensor] = []

    def pre(grad_outputs: Any) -> None:
        me = torch._C._current_autograd_node()
        for slot, g in enumerate(grad_outputs):
            parts = grads.parts.pop((id(me), slot), ())
            if len(parts) > 1 and isinstance(g, torch.Tensor):
                _summed(parts, tensor_meta(g), grads.moved)
        if not correction:
            saved[:] = _saved(me, grads.saved_names)

    def post(grad_inputs: Any, grad_outputs: Any) -> None:
        me = torch._C._current_autograd_node()
        if not correction:
            result = next((g for g in grad_inputs if isinstance(g, torch.Tensor) and g.dim() >= 4), None)
            if conv and grad_inputs[0] is None:  # the weight's gradient only: computed in its input's layout
                result = next((t for t in saved if not isinstance(t, nn.Parameter)), None)
            read = [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.dim() >= 4] + saved
            if result is not None and (copy := _relay(read, result, conv)) is not None:
                op = "convolution_backward" if conv else type(me).__name__
                grads.moved.setdefault(name, []).append(dataclasses.replace(copy, op=op))
            saved.clear()
        for g, (nxt, slot) in zip(grad_inputs, me.next_functions, strict=False):
            if nxt is not None and isinstance(g, torch.Tensor) and g.dim() >= 4:
                grads.parts.setdefault((id(nxt), slot), []).append((tensor_meta(g), name))

    node.register_prehook(pre)
    node.register_hook(post)


def _relay(read: Sequence[torch.Tensor], result: torch.Tensor, conv: bool) -> HiddenCopy | None:
    """What a backward node moves bringing the tensors it ``read`` (gradients arriving, tensors
    saved; parameters are left out, as in forward) into the memory order of ``result``, the
    first gradient it hands on: those of its rank whose memory runs in another order over the
    dims both hold (:func:`~nhwc_audit.layout.reorders`: a slice of an NCHW gradient read into a
    channels_last one as well as an NCHW gradient), by :func:`~nhwc_audit.channels.relay_bytes`."""
    om = tensor_meta(result)
    moved, first = 0, None
    for t in read:
        if t.dim() != result.dim() or isinstance(t, nn.Parameter) or t is result:
            continue
        m = tensor_meta(t)
        if reorders(m, om) and not torch._C._is_alias_of(result, t):  # type: ignore[attr-defined]
            moved += relay_bytes(m, om, conv=conv)
            first = first or m
    if first is None:
        return None
    return HiddenCopy("", first.layout, om.layout, first.shape, moved, computed=True)


def _summed(parts: Sequence[tuple[TensorMeta, str]], total: TensorMeta, moved: Moved) -> None:
    """Charge each part of a gradient summed from several consumers that runs in another memory
    order than the sum ``total`` to the node whose backward handed it on."""
    for m, who in parts:
        if reorders(m, total):
            copy = HiddenCopy(
                "add", m.layout, total.layout, total.shape, relay_bytes(m, total, conv=False), computed=True
            )
            moved.setdefault(who, []).append(copy)


@dataclass(frozen=True)
class GradRun:
    """A forward the propagation ran with autograd, each node's output hooked
    (:func:`hook_gradients`): the graph's output, and the gradient layouts the hooks collect
    once a backward runs from it."""

    out: Any
    grads: Grads


class _EagerGrad(torch.autograd.Function):
    """Identity forward; backward hands on the gradient channels_last, as the eager kernel of an
    op fake tensors get wrong (GroupNorm on CPU) would produce it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = to_channels_last(grad)
        return out


def _eager_input(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() in (4, 5) and v.requires_grad:
        return _EagerGrad.apply(v)
    return v


class _GradProp(torch.fx.Interpreter):
    def __init__(
        self,
        gm: torch.fx.GraphModule,
        grads: Grads,
        breaks: frozenset[str] = frozenset(),
        corrected: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.grads = grads
        self.breaks = breaks
        self.corrected = corrected

    def _run_target(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return getattr(self, n.op)(n.target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.name in self.breaks:  # raises on channels_last: run on NCHW, as the forward audit did
                args, kwargs = tree_map(to_nchw, args), tree_map(to_nchw, kwargs)
            if n.name in self.corrected:  # a fake run's known meta-kernel error: follow eager both ways
                args, kwargs = tree_map(_eager_input, args), tree_map(_eager_input, kwargs)
            out = without_grad_if_refused(self._run_target, n, args, kwargs)
            if n.name in self.corrected:
                out = tree_map(to_channels_last, out)
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
) -> tuple[dict[str, tuple[TensorMeta, ...]], dict[str, TensorMeta], Moved]:
    """Run ``gm`` (the audit's private graph) forward with autograd and back from a fixed random
    linear loss whose seed gradient has each output's own layout (as an elementwise loss on a
    channels_last output gives). ``breaks``: nodes that raise on channels_last input (the
    forward audit's breaks), run on NCHW copies of their inputs as the forward audit ran them.
    ``corrected``: nodes a fake run corrected to eager (:mod:`.corrections`): their outputs and
    the gradients they hand back are channels_last here too. ``ran``: the propagation's own
    forward of ``gm``'s graph, run with autograd: the backward starts there, with no forward here
    (unless a check after it wrote in place to a tensor autograd saved: then it runs again).
    Returns node -> gradient layouts, parameter -> layout, and node -> the layout changes its
    backward made."""
    if ran is not None:
        try:
            with seeded(seed, flat_inputs), torch.enable_grad():
                return _back(ran.out, ran.grads, gm)
        except RuntimeError:  # a check after the run wrote in place to what autograd saved
            pass
    grads = Grads()
    with seeded(seed, flat_inputs), torch.enable_grad():
        out = _GradProp(gm, grads, breaks, corrected).run(
            *[clone_value(v) for v in flat_inputs], enable_io_processing=False
        )
        return _back(out, grads, gm)


def _back(
    out: Any, grads: Grads, gm: torch.fx.GraphModule
) -> tuple[dict[str, tuple[TensorMeta, ...]], dict[str, TensorMeta], Moved]:
    """The backward from ``out`` (its run's nodes hooked into ``grads``), the parameter
    gradients' layouts, and what each node's backward moved between layouts."""
    outs = [t for t in iter_tensors(out) if t.is_floating_point() and t.requires_grad]
    params = [(name, p) for name, p in gm.named_parameters() if p.requires_grad]
    param_grads: dict[str, TensorMeta] = {}
    if outs:
        loss = sum((t * torch.randn_like(t)).sum() for t in outs)
        assert isinstance(loss, torch.Tensor)
        got = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        param_grads = {name: tensor_meta(g) for (name, _), g in zip(params, got, strict=True) if g is not None}
    return {k: tuple(v) for k, v in grads.layouts.items()}, param_grads, grads.moved


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
