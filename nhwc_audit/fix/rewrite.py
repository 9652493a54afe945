"""Repair stage: rewrite the channels_last model's fx graph to remove avoidable transposes,
keeping the math. Every rewrite is tried on a private copy, re-measured (bytes moved by layout
changes), checked against the original model's outputs (and gradients), and kept only if it
removes bytes or a break without changing the results.

Rewrites (each logged with node, reason and bytes saved):

* ``view->reshape``        a ``view`` that breaks on NHWC becomes ``reshape`` (same result).
* ``swap-operands``        ``nchw + nhwc`` (add/mul, commutative in IEEE arithmetic) becomes
                           ``nhwc + nchw`` so the channels_last operand decides the output.
* ``contiguous-cl``        ``x.contiguous()`` becomes ``x.contiguous(memory_format=channels_last)``.
* ``instancenorm->groupnorm`` InstanceNorm (no running stats) becomes GroupNorm(C, C): the same
                           per-sample, per-channel statistics, with a channels_last kernel on CPU.
* ``softmax-nhwc``         softmax/log_softmax over dim 1 of a 4D tensor runs over the last dim
                           of its free (N, H, W, C) permutation.
* ``insert-contiguous-cl`` one ``.contiguous(memory_format=channels_last)`` right after an op
                           that reverts, when that costs less than the conversions downstream.
* ``alloc-cl``             a buffer allocated NCHW (``torch.zeros/ones/empty/full``) and then
                           filled from channels_last tensors is allocated channels_last instead
                           (``torch.empty(..., memory_format=...)`` then ``zero_``/``fill_``).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from ..analyze.findings import Analysis, analyze
from ..capture.fx import trace
from ..errors import ConversionError
from ..prepare.copy import clone_modules, convert, memory_format_for_rank, prepare_inputs
from ..propagate.interpreter import propagate
from ..records import FindingKind, Layout, NodeRecord
from ..tensors import clone_value, to_nchw

__all__ = ["RepairLog", "RepairStep", "repair_model"]

_COMMUTATIVE_FUNCS = {operator.add, operator.mul, torch.add, torch.mul}
_COMMUTATIVE_METHODS = {"add", "mul"}
_SOFTMAX_FUNCS = {"softmax", "log_softmax"}
# rewrites that change an op come before the one that adds an op (stable sort keeps graph order)
_ALLOC = {torch.zeros: "zero_", torch.ones: "fill_", torch.empty: None, torch.full: "fill_"}
_NEW_ALLOC = {"new_zeros": "zero_", "new_ones": "fill_", "new_empty": None, "new_full": "fill_"}

_PRIORITY = (
    "alloc-cl",
    "view->reshape",
    "contiguous-cl",
    "instancenorm->groupnorm",
    "softmax-nhwc",
    "swap-operands",
    "insert-contiguous-cl",
)


@dataclass(frozen=True, slots=True)
class RepairStep:
    """One accepted rewrite."""

    node: str
    kind: str
    reason: str
    bytes_saved: int
    breaks_removed: int = 0


@dataclass(frozen=True, slots=True)
class RepairLog:
    """What the repair changed, and the bytes moved by layout changes before and after."""

    steps: tuple[RepairStep, ...]
    bytes_before: int
    bytes_after: int
    breaks_before: int
    breaks_after: int
    refused: tuple[str, ...] = ()
    """Rewrites tried and dropped because they changed the outputs or gradients."""

    @property
    def changed(self) -> bool:
        return bool(self.steps)


@dataclass(frozen=True)
class _Candidate:
    node: str
    kind: str
    reason: str
    apply: Callable[[torch.fx.GraphModule], None]


def _clone_gm(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A private copy sharing parameters (read-only) and copying buffers."""
    out = _fresh(gm)
    assert isinstance(out, torch.fx.GraphModule)
    return out


def _node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            node: torch.fx.Node = n
            return node
    raise KeyError(name)


def _measure(
    gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], bw: float
) -> tuple[list[NodeRecord], Analysis]:
    private = _clone_gm(gm)
    records, _ = propagate(private, tree_map(clone_value, args), tree_map(clone_value, kwargs), record_hidden=True)
    return records, analyze(records, bandwidth=bw)


def _fmt(rank: int) -> torch.memory_format:
    fmt = memory_format_for_rank(rank)
    return fmt if fmt is not None else torch.contiguous_format


def _candidates(gm: torch.fx.GraphModule, records: list[NodeRecord], analysis: Analysis) -> Iterator[_Candidate]:
    by_name = {r.name: r for r in records}
    for r in records:
        node = _node(gm, r.name)
        spatial = r.spatial_outputs
        allocates = (node.op == "call_function" and node.target in _ALLOC) or (
            node.op == "call_method" and node.target in _NEW_ALLOC
        )
        if allocates and spatial and spatial[0].layout is Layout.CONTIGUOUS:
            fmt_alloc = _fmt(spatial[0].rank)

            def alloc_cl(g: torch.fx.GraphModule, name: str = r.name, fmt: torch.memory_format = fmt_alloc) -> None:
                _allocate_channels_last(g, name, fmt)

            yield _Candidate(
                r.name,
                "alloc-cl",
                f"allocate {getattr(node.target, '__name__', 'buffer')}(...) channels_last",
                alloc_cl,
            )
    for f in analysis.findings:
        r = by_name[f.node]
        node = _node(gm, f.node)
        rank = r.spatial_outputs[0].rank if r.spatial_outputs else 4
        if f.kind is FindingKind.BREAK and node.op == "call_method" and node.target == "view":

            def view_to_reshape(g: torch.fx.GraphModule, name: str = f.node) -> None:
                _node(g, name).target = "reshape"

            yield _Candidate(
                f.node, "view->reshape", "view() raises on NHWC; reshape gives the same tensor", view_to_reshape
            )
        elif f.kind is FindingKind.MIXED and _commutative(node) and _nchw_first(r):

            def swap(g: torch.fx.GraphModule, name: str = f.node) -> None:
                n = _node(g, name)
                n.args = (n.args[1], n.args[0], *n.args[2:])

            yield _Candidate(f.node, "swap-operands", f"{f.op}: put the channels_last operand first", swap)
        elif (
            f.kind is FindingKind.REVERT
            and node.op == "call_method"
            and node.target == "contiguous"
            and not node.kwargs
            and len(node.args) == 1
        ):
            fmt_cl = _fmt(rank)

            def contiguous_cl(g: torch.fx.GraphModule, name: str = f.node, fmt: torch.memory_format = fmt_cl) -> None:
                _node(g, name).kwargs = {"memory_format": fmt}

            yield _Candidate(
                f.node, "contiguous-cl", ".contiguous() -> .contiguous(memory_format=channels_last)", contiguous_cl
            )
        elif f.kind is FindingKind.REVERT and node.op == "call_module" and _instance_norm(gm, node):

            def to_group_norm(g: torch.fx.GraphModule, target: str = str(node.target)) -> None:
                _swap_instance_norm(g, target)

            yield _Candidate(
                f.node, "instancenorm->groupnorm", f"{f.module_path}: InstanceNorm -> GroupNorm(C, C)", to_group_norm
            )
        elif f.kind is FindingKind.REVERT and _softmax_dim1(node) and rank == 4:

            def softmax_nhwc(g: torch.fx.GraphModule, name: str = f.node) -> None:
                _rewrite_softmax(g, name)

            yield _Candidate(
                f.node, "softmax-nhwc", f"{f.op} over channels computed in (N, H, W, C) order", softmax_nhwc
            )
        elif f.kind is FindingKind.REVERT and r.spatial_outputs and len(node.users) > 0:
            fmt_ins = _fmt(rank)

            def insert_cl(g: torch.fx.GraphModule, name: str = f.node, fmt: torch.memory_format = fmt_ins) -> None:
                n = _node(g, name)
                with g.graph.inserting_after(n):
                    new = g.graph.call_method("contiguous", (n,), {"memory_format": fmt})
                n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)

            yield _Candidate(
                f.node, "insert-contiguous-cl", f"convert {f.op}'s output back once, right after it", insert_cl
            )


def _allocate_channels_last(gm: torch.fx.GraphModule, name: str, fmt: torch.memory_format) -> None:
    """``torch.zeros(size)`` / ``x.new_zeros(size)`` (and ones, empty, full) become
    ``torch.empty(size, memory_format=fmt)`` followed by the same fill: identical values."""
    n = _node(gm, name)
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
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, gn)


def _softmax_dim1(node: torch.fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in _SOFTMAX_FUNCS or node.op not in ("call_method", "call_function"):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dim, int) and dim == 1 and set(node.kwargs) <= {"dim"}


def _rewrite_softmax(gm: torch.fx.GraphModule, name: str) -> None:
    n = _node(gm, name)
    method = n.target if n.op == "call_method" else getattr(n.target, "__name__", "softmax")
    x = n.args[0]
    with gm.graph.inserting_before(n):
        p = gm.graph.call_method("permute", (x, 0, 2, 3, 1))
        s = gm.graph.call_method(str(method), (p,), {"dim": -1})
        back = gm.graph.call_method("permute", (s, 0, 3, 1, 2))
    n.replace_all_uses_with(back)
    gm.graph.erase_node(n)


def _outputs(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], grads: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ctx = torch.enable_grad() if grads else torch.no_grad()
        with ctx:
            out = model(*tree_map(clone_value, args), **tree_map(clone_value, kwargs))
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            g: dict[str, torch.Tensor] = {}
            if grads:
                floats = [t for t in tensors if t.is_floating_point() and t.requires_grad]
                if floats:
                    # a fixed random linear loss (the sum of a softmax output has no gradient)
                    gen = torch.Generator().manual_seed(7)
                    weights = [torch.randn(t.shape, generator=gen).to(t.device) for t in floats]
                    loss = sum((t.float() * w).sum() for t, w in zip(floats, weights, strict=True))
                    assert isinstance(loss, torch.Tensor)
                    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                    got = torch.autograd.grad(loss, [p for _, p in names], allow_unused=True)
                    g = {n: gr for (n, _), gr in zip(names, got, strict=True) if gr is not None}
    return [t.detach() for t in tensors], g


def _fresh(model: nn.Module) -> nn.Module:
    """A private copy for a checking run (buffers copied: BatchNorm stats must not drift)."""
    return clone_modules(model, {id(p): p for p in model.parameters()})


def _deviation(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float((other.double() - ref.double()).norm())


def _double(v: Any) -> Any:
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _same(
    model: nn.Module,
    naive: nn.Module,
    trial: nn.Module,
    samples: list[tuple[tuple[Any, ...], dict[str, Any]]],
    grads: bool,
) -> str | None:
    """Does ``trial`` compute what ``model`` computes? Checked in float64, where layout-induced
    rounding differences vanish (~1e-12) and a changed formula still shows at the size of the
    values; in the model's own dtype, with a tolerance calibrated on the naive conversion,
    when the model cannot run in float64."""
    try:
        # full copies: Module.double() rewrites param.data, and _fresh shares parameters
        m64, t64 = copy.deepcopy(model).double(), copy.deepcopy(trial).double()
        samples64 = [(tree_map(_double, a), tree_map(_double, k)) for a, k in samples]
        _outputs(_fresh(m64), tree_map(to_nchw, samples64[0][0]), tree_map(to_nchw, samples64[0][1]), False)
    except Exception:
        return _same_calibrated(model, naive, trial, samples, grads)
    for args, kwargs in samples64:
        oa, ga = _outputs(_fresh(m64), tree_map(to_nchw, args), tree_map(to_nchw, kwargs), grads)
        ob, gb = _outputs(_fresh(t64), args, kwargs, grads)
        if len(oa) != len(ob):
            return "a different number of outputs"
        for i, (x, y) in enumerate(zip(oa, ob, strict=True)):
            try:
                torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9, equal_nan=True, check_stride=False)
            except AssertionError as e:
                return f"output {i} differs (float64): {str(e).strip().splitlines()[0]}"
        scale = max((float(g.abs().max()) for g in ga.values()), default=0.0)
        for name, g in ga.items():
            if name in gb:
                try:
                    torch.testing.assert_close(gb[name], g, rtol=1e-6, atol=1e-9 * max(scale, 1.0), check_stride=False)
                except AssertionError:
                    return f"gradient of {name} differs (float64)"
    return None


def _same_calibrated(
    model: nn.Module,
    naive: nn.Module,
    trial: nn.Module,
    samples: list[tuple[tuple[Any, ...], dict[str, Any]]],
    grads: bool,
) -> str | None:
    """Compare the repaired ``trial`` (NHWC input) with the original ``model`` (NCHW input).

    Converting to channels_last alone changes float summation order, so deviations are
    judged against the naive channels_last model's own deviation from the original: a
    rewrite may deviate at most 4x as much plus 1e-4 of the value's norm (the naive model may
    not run at all: it breaks where the repair fixes a view). A rewrite that changes the math
    deviates by the size of the values themselves.
    """
    for args, kwargs in samples:
        oa, ga = _outputs(_fresh(model), tree_map(to_nchw, args), tree_map(to_nchw, kwargs), grads)
        try:
            on, gn = _outputs(_fresh(naive), args, kwargs, grads)
        except Exception:
            on, gn = list(oa), dict(ga)  # no noise estimate: the relative floor alone
        ob, gb = _outputs(_fresh(trial), args, kwargs, grads)
        if len(oa) != len(ob):
            return "a different number of outputs"
        for i, (x, n, y) in enumerate(zip(oa, on, ob, strict=True)):
            if x.shape != y.shape:
                return f"output {i} changes shape"
            if not x.is_floating_point():
                if not torch.equal(x, y):
                    return f"output {i} differs"
                continue
            allowed = 4 * _deviation(x, n) + 1e-4 * float(x.double().norm()) + 1e-6
            if _deviation(x, y) > allowed:
                return f"output {i} differs (deviation {_deviation(x, y):.3g}, allowed {allowed:.3g})"
        for name, g in ga.items():
            if name in gb and name in gn:
                allowed = 4 * _deviation(g, gn[name]) + 1e-4 * float(g.double().norm()) + 1e-6
                if _deviation(g, gb[name]) > allowed:
                    return f"gradient of {name} differs"
    return None


def repair_model(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    bandwidth: float = 1e9,
    grads: bool = True,
    max_passes: int = 4,
) -> tuple[torch.fx.GraphModule, RepairLog]:
    """Return a repaired channels_last GraphModule of ``model`` and the log of what changed.

    The model is never modified. Needs a torch.fx-traceable model. Outputs (and, with
    ``grads``, parameter gradients of a fixed random linear loss) are checked against the
    original model on the sample and on a second random input of the same shapes, at the
    float tolerance that converting to channels_last itself costs; a rewrite that changes
    them is refused.
    """
    kwargs = kwargs or {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sample_args, sample_kwargs = prepare_inputs(args, kwargs, dtype=None, device=device)
    g = torch.Generator(device="cpu").manual_seed(1)
    second = tree_map(
        lambda t: (
            torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
            if isinstance(t, torch.Tensor) and t.is_floating_point()
            else t
        ),
        (sample_args, sample_kwargs),
    )
    samples = [(sample_args, sample_kwargs), second]
    try:
        gm = trace(convert(model)).gm
    except Exception as e:
        raise ConversionError(f"repair needs a torch.fx-traceable model: {e}") from e
    naive = _clone_gm(gm)
    records, analysis = _measure(gm, sample_args, sample_kwargs, bandwidth)
    before_bytes, before_breaks = analysis.summary.bytes_moved, analysis.summary.breaks
    steps: list[RepairStep] = []
    refused: list[str] = []
    tried: set[tuple[str, str]] = set()
    for _ in range(max_passes):
        progressed = False
        ordered = sorted(_candidates(gm, records, analysis), key=lambda c: _PRIORITY.index(c.kind))
        for cand in ordered:
            if (cand.node, cand.kind) in tried:
                continue
            tried.add((cand.node, cand.kind))
            trial = _clone_gm(gm)
            try:
                cand.apply(trial)
                trial.graph.lint()
                trial.recompile()
                t_records, t_analysis = _measure(trial, sample_args, sample_kwargs, bandwidth)
            except Exception:
                continue
            saved = analysis.summary.bytes_moved - t_analysis.summary.bytes_moved
            fixed_breaks = analysis.summary.breaks - t_analysis.summary.breaks
            if fixed_breaks < 0 or (saved <= 0 and fixed_breaks <= 0):
                continue
            problem = _same(model, naive, trial, samples, grads)
            if problem is not None:
                refused.append(f"{cand.kind} at {cand.node}: {problem}")
                continue
            gm, records, analysis = trial, t_records, t_analysis
            steps.append(RepairStep(cand.node, cand.kind, cand.reason, saved, fixed_breaks))
            progressed = True
        if not progressed:
            break
    log = RepairLog(
        steps=tuple(steps),
        bytes_before=before_bytes,
        bytes_after=analysis.summary.bytes_moved,
        breaks_before=before_breaks,
        breaks_after=analysis.summary.breaks,
        refused=tuple(refused),
    )
    return gm, log
