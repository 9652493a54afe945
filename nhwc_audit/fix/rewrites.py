"""The graph rewrites a repair can try, in the order it tries them. Each one matches a node of
the channels_last fx graph (by its record and finding) and changes a copy of the graph; none of
them judges whether it helped (that is :mod:`.repair`).

* ``view->reshape``        a ``view`` that breaks on NHWC becomes ``reshape`` (same result).
* ``swap-operands``        ``nchw + nhwc`` (add/mul, commutative in IEEE arithmetic) becomes
                           ``nhwc + nchw`` so the channels_last operand decides the output.
* ``contiguous-cl``        ``x.contiguous()`` becomes ``x.contiguous(memory_format=channels_last)``.
* ``instancenorm->groupnorm`` InstanceNorm (no running stats) becomes GroupNorm(C, C): the same
                           per-sample, per-channel statistics, with a channels_last kernel on CPU.
* ``softmax-nhwc``         softmax/log_softmax over the channels of a 4D/5D tensor (a call, or an
                           ``nn.Softmax``/``nn.LogSoftmax``/``nn.Softmax2d`` module) runs over the
                           last dim of its free (N, H, W, C) permutation (:mod:`.softmax`).
* ``standardise-weight``   a weight standardised through reshape, ``F.batch_norm`` and
                           ``reshape_as`` (timm's StdConv2d) is standardised over dims (1, 2, 3)
                           instead (:mod:`.standardise`).
* ``restride-ambiguous``   an op that makes NCHW out of ambiguous input only (a 1 x 1 map with
                           NCHW-order strides, upsampled: DeepLabV3's ASPP pooling) reads it
                           through ``.to(memory_format=channels_last)`` (:mod:`.restride`).
* ``contiguous-map-order`` a ``.contiguous()`` of a reordered view of a map that a view makes a
                           map again (a channel shuffle, a space-to-depth) copies in the order
                           that makes that map channels_last (:mod:`.maporder`).
* ``sum-as-adds``          a sum over the stacking dim of a stack of maps (selective kernel
                           attention) becomes the maps added one by one (:mod:`.stacksum`).
* ``insert-contiguous-cl`` one ``.contiguous(memory_format=channels_last)`` right after an op
                           that reverts, when that costs less than the conversions downstream.
* ``alloc-cl``             a buffer allocated NCHW (``torch.zeros/ones/empty/full``, ``new_*``,
                           ``zeros_like(x, memory_format=torch.contiguous_format)``) and then
                           read with channels_last tensors is allocated channels_last instead
                           (``torch.empty(..., memory_format=...)`` then ``zero_``/``fill_``).
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.fx
from torch import nn

from ..analyze.analysis import Analysis
from ..prepare.copy import memory_format_for_rank
from ..records import FindingKind, Layout, NodeRecord
from .maporder import copy_in_map_order, map_order_copies
from .matched import find_node
from .restride import ambiguous_origins, restride_inputs
from .softmax import softmax_last, softmax_over_channels
from .stacksum import sum_as_adds, sums_over_stacks
from .standardise import standardisation, standardise

__all__ = ["PRIORITY", "Candidate", "RepairKind", "candidates", "find_node", "rewritable_copy"]

RepairKind = Literal[
    "alloc-cl",
    "view->reshape",
    "contiguous-cl",
    "instancenorm->groupnorm",
    "softmax-nhwc",
    "swap-operands",
    "standardise-weight",
    "restride-ambiguous",
    "contiguous-map-order",
    "sum-as-adds",
    "insert-contiguous-cl",
]
PRIORITY: tuple[RepairKind, ...] = get_args(RepairKind)
"""The order a repair tries rewrites in: the ones that change an op come before the one that
adds an op (a stable sort keeps graph order within a kind)."""

_COMMUTATIVE_FUNCS = {operator.add, operator.mul, torch.add, torch.mul}
_COMMUTATIVE_METHODS = {"add", "mul"}
_ALLOC = {torch.zeros: "zero_", torch.ones: "fill_", torch.empty: None, torch.full: "fill_"}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
"""Allocations whose values do not depend on the layout (random ones do: rand_like fills memory
in order)."""
_NEW_ALLOC = {"new_zeros": "zero_", "new_ones": "fill_", "new_empty": None, "new_full": "fill_"}


@dataclass(frozen=True)
class Candidate:
    node: str
    kind: RepairKind
    reason: str
    apply: Callable[[torch.fx.GraphModule], None]


def _fmt(rank: int) -> torch.memory_format:
    fmt = memory_format_for_rank(rank)
    return fmt if fmt is not None else torch.contiguous_format


def candidates(gm: torch.fx.GraphModule, records: list[NodeRecord], analysis: Analysis) -> Iterator[Candidate]:
    by_name = {r.name: r for r in records}
    nodes = {n.name: n for n in gm.graph.nodes}
    for r in records:
        node = nodes[r.name]
        spatial = r.spatial_outputs
        allocates = (
            (node.op == "call_function" and node.target in _ALLOC)
            or (node.op == "call_method" and node.target in _NEW_ALLOC)
            or _like_contiguous(node)
        )
        if allocates and spatial and spatial[0].layout is Layout.CONTIGUOUS:
            fmt_alloc = _fmt(spatial[0].rank)

            def alloc_cl(g: torch.fx.GraphModule, name: str = r.name, fmt: torch.memory_format = fmt_alloc) -> None:
                _allocate_channels_last(g, name, fmt)

            yield Candidate(
                r.name,
                "alloc-cl",
                f"allocate {getattr(node.target, '__name__', 'buffer')}(...) channels_last",
                alloc_cl,
            )
    for r, producers in ambiguous_origins(records, analysis):
        yield Candidate(
            r.name,
            "restride-ambiguous",
            f"{r.site_op}: restride its ambiguous input (C == 1 or H == W == 1) to channels_last first",
            functools.partial(restride_inputs, name=r.name, producers=producers),
        )
    for name, perm in map_order_copies(gm, records, analysis):
        yield Candidate(
            name,
            "contiguous-map-order",
            f".contiguous() in the order that makes the map it is viewed as channels_last: permute{perm}",
            functools.partial(copy_in_map_order, name=name, order=perm),
        )
    for name, dim, terms in sums_over_stacks(gm, records, analysis):
        rewrite = functools.partial(sum_as_adds, name=name, dim=dim, terms=terms)
        yield Candidate(name, "sum-as-adds", f"sum over dim {dim}: its {terms} maps added one by one", rewrite)
    for f in analysis.findings:
        r = by_name[f.node]
        node = nodes[f.node]
        rank = r.spatial_outputs[0].rank if r.spatial_outputs else 4
        if f.kind in (FindingKind.BREAK, FindingKind.LATENT) and node.op == "call_method" and node.target == "view":

            def view_to_reshape(g: torch.fx.GraphModule, name: str = f.node) -> None:
                find_node(g, name).target = "reshape"

            yield Candidate(
                f.node, "view->reshape", "view() raises on NHWC; reshape gives the same tensor", view_to_reshape
            )
        elif f.kind is FindingKind.MIXED and _commutative(node) and _nchw_first(r):

            def swap(g: torch.fx.GraphModule, name: str = f.node) -> None:
                n = find_node(g, name)
                n.args = (n.args[1], n.args[0], *n.args[2:])

            yield Candidate(f.node, "swap-operands", f"{f.op}: put the channels_last operand first", swap)
        elif (
            f.kind is FindingKind.REVERT
            and node.op == "call_method"
            and node.target == "contiguous"
            and not node.kwargs
            and len(node.args) == 1
            and r.spatial_outputs  # (a 6D window's copy: contiguous-map-order)
        ):
            fmt_cl = _fmt(rank)

            def contiguous_cl(g: torch.fx.GraphModule, name: str = f.node, fmt: torch.memory_format = fmt_cl) -> None:
                find_node(g, name).kwargs = {"memory_format": fmt}

            yield Candidate(
                f.node, "contiguous-cl", ".contiguous() -> .contiguous(memory_format=channels_last)", contiguous_cl
            )
        elif f.kind is FindingKind.REVERT and node.op == "call_module" and _instance_norm(gm, node):

            def to_group_norm(g: torch.fx.GraphModule, target: str = str(node.target)) -> None:
                _swap_instance_norm(g, target)

            yield Candidate(
                f.node, "instancenorm->groupnorm", f"{f.module_path}: InstanceNorm -> GroupNorm(C, C)", to_group_norm
            )
        elif f.kind is FindingKind.REVERT and softmax_over_channels(gm, node, rank):
            order = "(N, D, H, W, C)" if rank == 5 else "(N, H, W, C)"
            rewrite = functools.partial(softmax_last, name=f.node, rank=rank)
            yield Candidate(f.node, "softmax-nhwc", f"{f.op} over channels computed in {order} order", rewrite)
        elif f.kind is FindingKind.REVERT and standardisation(gm, f.node):
            yield Candidate(
                f.node,
                "standardise-weight",
                "standardise the weight over dims (1, 2, 3) with keepdim: no reshape, no copy",
                functools.partial(standardise, name=f.node),
            )
        elif f.kind is FindingKind.REVERT and r.spatial_outputs and len(node.users) > 0:
            fmt_ins = _fmt(rank)

            def insert_cl(g: torch.fx.GraphModule, name: str = f.node, fmt: torch.memory_format = fmt_ins) -> None:
                n = find_node(g, name)
                with g.graph.inserting_after(n):
                    new = g.graph.call_method("contiguous", (n,), {"memory_format": fmt})
                n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)

            yield Candidate(
                f.node, "insert-contiguous-cl", f"convert {f.op}'s output back once, right after it", insert_cl
            )


def _like_contiguous(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and n.target in _LIKE and n.kwargs.get("memory_format") is torch.contiguous_format


def _allocate_channels_last(gm: torch.fx.GraphModule, name: str, fmt: torch.memory_format) -> None:
    """``torch.zeros(size)`` / ``x.new_zeros(size)`` (and ones, empty, full) become
    ``torch.empty(size, memory_format=fmt)`` followed by the same fill: identical values."""
    n = find_node(gm, name)
    if _like_contiguous(n):  # zeros_like(x, memory_format=torch.contiguous_format): ask for fmt
        n.kwargs = {**n.kwargs, "memory_format": fmt}
        return
    args = list(n.args)
    kwargs = {k: v for k, v in n.kwargs.items() if k != "fill_value"}
    if n.op == "call_method":  # x.new_zeros(size, ...): dtype and device default to x's
        method = str(n.target)
        fill = _NEW_ALLOC[method]
        source = args.pop(0)
        with gm.graph.inserting_before(n):
            kwargs.setdefault("dtype", gm.graph.call_function(getattr, (source, "dtype")))
            kwargs.setdefault("device", gm.graph.call_function(getattr, (source, "device")))
        kind = method.removeprefix("new_")
    else:
        fill = _ALLOC[n.target]  # type: ignore[index]
        kind = getattr(n.target, "__name__", "")
    value = None
    if kind == "full":
        value = args.pop(1) if len(args) > 1 else n.kwargs.get("fill_value")
    elif kind == "ones":
        value = 1
    kwargs["memory_format"] = fmt
    with gm.graph.inserting_after(n):
        empty = gm.graph.call_function(torch.empty, tuple(args), kwargs)
    new = empty
    if fill is not None:
        with gm.graph.inserting_after(empty):
            new = gm.graph.call_method(fill, (empty,) if value is None else (empty, value))
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)


def _commutative(node: torch.fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs:
        return False
    if node.op == "call_function" and node.target in _COMMUTATIVE_FUNCS:
        return True
    return node.op == "call_method" and node.target in _COMMUTATIVE_METHODS


def _nchw_first(r: NodeRecord) -> bool:
    acts = [i for i in r.activation_inputs if i.meta.is_spatial]
    return len(acts) >= 2 and acts[0].meta.layout is Layout.CONTIGUOUS and acts[1].meta.layout is Layout.CHANNELS_LAST


def _instance_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    m = gm.get_submodule(str(node.target))
    return isinstance(m, nn.modules.instancenorm._InstanceNorm) and not bool(m.track_running_stats)


def _swap_instance_norm(gm: torch.fx.GraphModule, target: str) -> None:
    m = gm.get_submodule(target)
    assert isinstance(m, nn.modules.instancenorm._InstanceNorm)
    gn = nn.GroupNorm(m.num_features, m.num_features, eps=m.eps, affine=m.affine)
    if m.affine:
        assert m.weight is not None and m.bias is not None
        gn.weight = m.weight
        gn.bias = m.bias
    gn.train(m.training)
    _put_module(gm, target, gn)


def _put_module(gm: torch.fx.GraphModule, target: str, new: nn.Module) -> None:
    """Put ``new`` at ``target`` in ``gm``, every module on the way there replaced by a shallow
    copy with its own table of children: the repair's copies of a graph share their modules
    (:func:`rewritable_copy`), and a module that is called and also holds the target (a leaf with
    an InstanceNorm child) must not change in the other copies."""
    *path, leaf = target.split(".")
    parent: nn.Module = gm
    for atom in path:
        child = copy.copy(getattr(parent, atom))
        child._modules = dict(child._modules)
        setattr(parent, atom, child)
        parent = child
    setattr(parent, leaf, new)


def rewritable_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy to rewrite: its own graph and tables of parameters, buffers and children, the modules
    themselves shared. Rewrites change the graph and put new modules in place of old ones (never
    change a module in place, :func:`.rewrites._put_module`), so the copy's rewrites never reach
    ``gm``. It has no code until the repair's ``_apply`` generates it (``compile``): a copy that is only
    measured runs its graph node by node, and generating code costs more than copying the graph."""
    new = torch.fx.GraphModule.__new__(type(gm))  # a class of its own: recompile sets its forward
    new.__dict__.update(gm.__dict__)
    for k, v in gm.__dict__.items():
        if isinstance(v, (dict, list)) and k != "meta":  # tables of modules, parameters, hooks
            new.__dict__[k] = copy.copy(v)
    for k in ("_code", "_lineno_map", "_prologue_start"):  # gm's: reading them is an error
        new.__dict__.pop(k, None)
    graph = copy.deepcopy(gm.graph)
    graph.owning_module = new
    new.__dict__["_graph"] = graph
    new.meta = copy.deepcopy(gm.meta)
    type(new).__name__ = type(gm).__name__  # the model's class name, as GraphModule(gm, ...) gives it
    return new
