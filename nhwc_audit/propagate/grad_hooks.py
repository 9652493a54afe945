"""What a backward moves between layouts is seen from hooks on its autograd nodes
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
from torch import nn

from ..channels import relay_bytes
from ..layout import reorders, tensor_meta
from ..records import HiddenCopy, TensorMeta
from ..tensors import iter_tensors
from .breaks import to_channels_last

__all__ = ["REORDERING", "EagerGrad", "Grads", "Moved", "hook_gradients"]


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
    reordering: set[str] = field(default_factory=set)
    """The kinds of autograd node in :data:`REORDERING` that ran on tensors of rank 3 and up."""


REORDERING = frozenset(
    {
        "PermuteBackward0",
        "TransposeBackward0",
        "TransposeBackward1",
        "TBackward0",
        "UnfoldBackward0",
        "NativeChannelShuffleBackward0",
    }
)
"""Autograd nodes of ops that hand on a tensor whose dims run in another memory order than their
input's (``permute``, ``transpose``, ``movedim`` and ``einsum`` made of them, a window
``unfold``; not ``as_strided``, which the audit itself puts on weights it restrides and on size-1
dims it strides as eager does): in a model without them (and without an explicit memory format), every 4D/5D
tensor of an NCHW run runs in NCHW order, forward and backward, and its backward moves nothing.
Counted on tensors of rank 3 and up: a transpose of tokens (N, H * W, C) reshaped back to a map is
channels_last-strided in an NCHW model; a Linear's ``weight.t()`` is no such op."""


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
    run's correction (:class:`EagerGrad`) re-lays nothing eager does: only its parts count. The
    hooks find their node as the engine runs it (a node holding a hook that held the node would
    be a reference cycle, left to the cyclic collector)."""
    correction = isinstance(node, EagerGrad._backward_cls)
    conv = type(node).__name__.startswith("ConvolutionBackward")
    reordering = type(node).__name__ in REORDERING
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
        if reordering and any(isinstance(g, torch.Tensor) and g.dim() >= 3 for g in grad_inputs):
            grads.reordering.add(type(me).__name__)  # not a Linear's weight.t()
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
    dims both hold, by position (:func:`~nhwc_audit.layout.reorders`: a slice of an NCHW gradient read into a
    channels_last one as well as an NCHW gradient), by :func:`~nhwc_audit.channels.relay_bytes`."""
    om = tensor_meta(result)
    moved, first = 0, None
    for t in read:
        if t.dim() != result.dim() or isinstance(t, nn.Parameter) or t is result:
            continue
        m = tensor_meta(t)
        if reorders(m, om, positional=True) and not torch._C._is_alias_of(result, t):  # type: ignore[attr-defined]
            moved += relay_bytes(m, om, conv=conv)
            first = first or m
    if first is None:
        return None
    return HiddenCopy("", first.layout, om.layout, first.shape, moved, computed=True)


def _summed(parts: Sequence[tuple[TensorMeta, str]], total: TensorMeta, moved: Moved) -> None:
    """Charge each part of a gradient summed from several consumers that runs in another memory
    order than the sum ``total`` to the node whose backward handed it on."""
    for m, who in parts:
        if reorders(m, total, positional=True):
            copy = HiddenCopy(
                "add", m.layout, total.layout, total.shape, relay_bytes(m, total, conv=False), computed=True
            )
            moved.setdefault(who, []).append(copy)


class EagerGrad(torch.autograd.Function):  # here: its hooks tell its nodes from the model's
    """Identity forward; backward hands on the gradient channels_last, as the eager kernel of an
    op fake tensors get wrong (GroupNorm on CPU) would produce it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = to_channels_last(grad)
        return out
