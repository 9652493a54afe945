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

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..channels import relay_bytes
from ..layout import memory_order, reorders, tensor_meta
from ..records import HiddenCopy, TensorMeta
from ..tensors import iter_tensors, view_reorders
from .autograd_nodes import metadata, permuted_view, saved_tensors
from .backward_kernels import Answers, Call, KernelWatch
from .breaks import to_channels_last
from .order import KEEPS_ORDER

__all__ = ["KEEPS_ORDER", "EagerGrad", "Grads", "Moved", "hook_gradients", "hook_nodes"]


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
    """(``id()`` of an autograd node's metadata dict, input slot) -> the 4D/5D gradients handed to it so far,
    and the graph node whose backward handed each on: summed before the node runs."""
    saved_names: dict[type, tuple[str, ...]] = field(default_factory=dict)
    reordering: set[str] = field(default_factory=set)
    """The kinds of autograd node not in :data:`KEEPS_ORDER` that ran on tensors of rank 3 and up."""
    weights: frozenset[int] = frozenset()
    """``id()`` of the graph's parameters and buffers as the run read them (the audit's restrided
    views are no ``nn.Parameter``): what a backward reads of them is the weight rules' business;
    not a tensor constant or plain attribute, which the conversion leaves NCHW (read as data)."""
    params: frozenset[int] = frozenset()
    """Those of :attr:`weights` that are parameters: a backward other than a convolution's reads a
    buffer as data (a gather's index, a mask, a sampling grid the conversion made channels_last),
    as its forward did and as eager's does."""
    asked: Answers = field(default_factory=dict)
    """A fake run's backward convolutions asked on zeros (:class:`~.backward_kernels.KernelWatch`)."""
    kernels: dict[str, list[Call | None]] = field(default_factory=dict)
    """Node -> its convolutions' backward calls' :func:`~.backward_kernels.counterpart` (None: unknown)."""
    handed: weakref.WeakValueDictionary[int, torch.Tensor] = field(default_factory=weakref.WeakValueDictionary)
    """The gradients that arrived at the nodes' outputs, by ``id()`` while alive: a parameter's
    gradient among them is shared (``y = x + table`` at batch 1 hands one tensor to both operands)."""


_NODE = "nhwc_audit.node"
"""The key, in an autograd node's ``metadata``, of the graph node whose forward made it."""


def hook_gradients(name: str, value: Any, grads: Grads) -> None:
    """Note in ``grads`` the layout of each gradient that arrives at ``value``'s tensors, and hook
    each autograd node the run of node ``name`` made (the walk back from its outputs stops at the
    nodes of earlier graph nodes) to note what its backward moves between layouts."""
    todo = []
    for t in iter_tensors(value):
        if t.requires_grad:
            # read first: a view of a weight written in place under no_grad (a clipped weight, seen
            # through the NCHW run's views) makes its grad_fn here, and a hook registered before crashes
            todo.append(t.grad_fn)

            def hook(g: torch.Tensor | None) -> None:
                if g is not None:  # None reaches an output of a multi-output op no gradient flows to
                    grads.layouts.setdefault(name, []).append(tensor_meta(g))
                    grads.handed[id(g)] = g

            t.register_hook(hook)
            _replayed_view(t)
    hook_nodes(name, todo, grads)


_AS_STRIDED = "nhwc_audit.as_strided"
"""The key, in an autograd node's ``metadata``, of a view chain a fake run replays where eager
runs one ``AsStridedBackward0`` (:func:`_replayed_view`): the base's (shape, strides), whether the
node is the chain's first (handed the view's gradient) and its last (handing the base's on), and
whether the view reorders the base's dims (:func:`~nhwc_audit.tensors.view_reorders`)."""


def _replayed_view(t: torch.Tensor) -> None:
    """Mark the chain of autograd nodes a fake run made for view ``t`` just written in place, for
    :func:`_hook_node` to follow eager. Autograd regenerates a view's ``grad_fn`` after an in-place
    write to it: for a CPU tensor one ``AsStridedBackward0``, whose gradient is laid as the base's
    memory is (``as_strided_backward``); for a fake tensor (a Python subclass: no ``as_strided``
    for autograd) a replay of the view ops (``SliceBackward0``...), whose gradient starts
    contiguous. A chain from ``t`` through nodes no graph node made yet, to the ``CopySlices`` the
    write made; views merely read after a write to their base are not told apart here."""
    head = t.grad_fn
    if head is None or not t._is_view() or type(head).__name__ == "AsStridedBackward0":
        return
    chain: list[Any] = []
    node = head
    while type(node).__name__ != "CopySlices":
        nexts = [n for n, _ in node.next_functions if n is not None]
        if _NODE in metadata(node) or len(nexts) != 1 or len(chain) > 16:
            return
        chain.append(node)
        node = nexts[0]
    base = t._base
    if not chain or _NODE in metadata(node) or base is None:
        return
    geometry, permutes = (tuple(base.shape), tuple(base.stride())), view_reorders(t.shape, t.stride(), base)
    for i, n in enumerate(chain):
        metadata(n)[_AS_STRIDED] = (geometry, i == 0, i == len(chain) - 1, permutes)


def hook_nodes(name: str, todo: list[Any], grads: Grads) -> None:
    """Hook the autograd nodes reachable from ``todo`` that no earlier walk hooked, as node
    ``name``'s (:func:`_hook_node`)."""
    while todo:
        node = todo.pop()
        if node is None or _NODE in (meta := metadata(node)):
            continue
        meta[_NODE] = name
        if type(node).__name__ != "AccumulateGrad":  # a leaf's: no backward of the model's
            _hook_node(node, name, grads)
        todo.extend(n for n, _ in node.next_functions)


def _hook_node(node: Any, name: str, grads: Grads) -> None:
    """Hooks on autograd ``node`` (of graph node ``name``): before it runs, the parts of each
    gradient it receives that were summed from another layout; after, what it re-laid. A fake
    run's correction (:class:`EagerGrad`) re-lays nothing eager does: only its parts count. The
    hooks find their node as the engine runs it (a node holding a hook that held the node would
    be a reference cycle, left to the cyclic collector). A node is known by its metadata dict,
    which lives as long as it does: torch 2.11 hands out a new Python object for a node at each
    ``next_functions`` and ``_current_autograd_node()``, whose ids matched nothing, or a freed
    one's (summed gradients went uncharged, and at random)."""
    correction = isinstance(node, EagerGrad._backward_cls)
    conv = type(node).__name__.startswith("ConvolutionBackward")
    replayed = metadata(node).get(_AS_STRIDED)
    kind = "AsStridedBackward0" if replayed else type(node).__name__
    # (a correction stands for a kernel that keeps order: GroupNorm's gradient laid as eager lays it)
    reordering = not correction and kind.rstrip("0123456789").removesuffix("Backward") not in KEEPS_ORDER
    saved: list[torch.Tensor] = []
    watch: list[KernelWatch] = []  # a convolution's backward kernel, run with a mode: its own copies

    def pre(grad_outputs: Any) -> None:
        me = torch._C._current_autograd_node()
        for slot, g in enumerate(grad_outputs):
            parts = grads.parts.pop((id(metadata(me)), slot), ())
            if len(parts) > 1 and isinstance(g, torch.Tensor):
                _summed(parts, tensor_meta(g), grads.moved)
        if not correction:
            saved[:] = saved_tensors(me, grads.saved_names)
        if conv:
            watch[:] = [KernelWatch(grads.asked)]
            torch._C._push_on_torch_dispatch_stack(watch[0])

    def post(grad_inputs: Any, grad_outputs: Any) -> Any:
        me = torch._C._current_autograd_node()
        kernel = _popped(watch.pop()) if watch else None  # the kernel's own account: in place of the rules'
        if kernel is not None and kernel.copies:
            grads.moved.setdefault(name, []).extend(kernel.copies)
        if conv:  # (not asked by its kernel: None)
            grads.kernels.setdefault(name, []).extend(kernel.calls if kernel is not None else [None])
        if reordering and any(isinstance(g, torch.Tensor) and g.dim() >= 3 for g in grad_inputs):
            grads.reordering.add(kind)
        if replayed:
            grad_inputs = _as_strided(replayed, grad_inputs, grad_outputs, grads, name)
        elif not correction:
            result = next((g for g in grad_inputs if isinstance(g, torch.Tensor) and g.dim() >= 4), None)
            if conv and grad_inputs[0] is None:  # the weight's gradient only: computed in its input's layout
                result = next((t for t in saved if not isinstance(t, nn.Parameter)), None)
            read = [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.dim() >= 4] + saved
            op = "convolution_backward" if conv else type(me).__name__
            if (
                result is not None
                and kernel is None
                and (copy := _relay(op, read, result, conv, grads.weights if conv else grads.params)) is not None
            ):
                grads.moved.setdefault(name, []).append(copy)
                if kind.startswith("AsStrided") and permuted_view(me, result):  # into its base: NCHW's too
                    grads.reordering.add(kind)
            saved.clear()
        for g, (nxt, slot) in zip(grad_inputs, me.next_functions, strict=False):
            if nxt is not None and isinstance(g, torch.Tensor) and g.dim() >= 3:
                grads.parts.setdefault((id(metadata(nxt)), slot), []).append((tensor_meta(g), name))
        return grad_inputs if replayed else None

    node.register_prehook(pre)
    node.register_hook(post)


def _popped(watch: KernelWatch) -> KernelWatch | None:
    """``watch`` taken off the dispatch stack (where the node's run left it on top), if it ran its
    kernel (:attr:`~.backward_kernels.KernelWatch.ran`)."""
    depth = torch._C._len_torch_dispatch_stack()
    if depth and torch._C._get_dispatch_stack_at(depth - 1) is watch:
        torch._C._pop_torch_dispatch_stack(None)
    return watch if watch.ran else None


def _as_strided(replayed: Any, grad_inputs: Any, grad_outputs: Any, grads: Grads, name: str) -> Any:
    """A node of a view chain a fake run replays (:func:`_replayed_view`), run as eager's one
    ``AsStridedBackward0``: the first charges bringing the view's gradient into the base's memory
    order; the last hands the base's gradient on laid as the base is."""
    (shape, strides), first, last, permutes = replayed
    g = grad_outputs[0]
    if first and isinstance(g, torch.Tensor) and g.dim() >= 4:
        laid = g.new_empty_strided(shape, strides)
        if (copy := _relay("AsStridedBackward0", [g], laid, False, grads.weights)) is not None:
            grads.moved.setdefault(name, []).append(copy)
            if permutes:  # a permuted view's gradient into its base: NCHW's too
                grads.reordering.add("AsStridedBackward0")
    out = grad_inputs[0]
    if last and isinstance(out, torch.Tensor) and tuple(out.shape) == shape:
        return (out.new_empty_strided(shape, strides).copy_(out), *grad_inputs[1:])
    return grad_inputs


def _relay(
    op: str, read: Sequence[torch.Tensor], result: torch.Tensor, conv: bool, weights: frozenset[int]
) -> HiddenCopy | None:
    """What backward node ``op`` moves bringing the tensors it ``read`` (gradients arriving, tensors
    saved; parameters are left out, as in forward) into the memory order of ``result``, the
    first gradient it hands on: those of its rank whose memory runs in another order over the
    dims both hold, by position (:func:`~nhwc_audit.layout.reorders`: a slice of an NCHW gradient read into a
    channels_last one as well as an NCHW gradient), by :func:`~nhwc_audit.channels.relay_bytes`."""
    om = tensor_meta(result)
    moved, first = 0, None
    for t in read:
        if t.dim() != result.dim() or isinstance(t, nn.Parameter) or id(t) in weights or t is result:
            continue
        m = tensor_meta(t)
        if reorders(m, om, positional=True) and not torch._C._is_alias_of(result, t):  # type: ignore[attr-defined]
            moved += relay_bytes(m, om, conv=conv)
            first = first or m
    return None if first is None else HiddenCopy(op, first.layout, om.layout, first.shape, moved, computed=True)


def _summed(parts: Sequence[tuple[TensorMeta, str]], total: TensorMeta, moved: Moved) -> None:
    """Charge each part of a gradient summed from several consumers that runs in another memory
    order than the sum ``total`` to the node whose backward handed it on; of a map's, and of a 3D
    view of one (tokens ``y.flatten(2)``, channel-minor where ``y`` is channels_last, read by two ops)."""
    for m, who in parts:
        held = memory_order(m, held=True) if m.rank == 3 == total.rank and m.shape == total.shape else ()
        if reorders(m, total, positional=True) or list(held) != [d for d in memory_order(total) if d in held]:
            n = relay_bytes(m, total, conv=False)
            moved.setdefault(who, []).append(HiddenCopy("add", m.layout, total.layout, total.shape, n, computed=True))


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
