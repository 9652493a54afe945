"""What the records say about a node besides its tensors: module path and type, source line,
op name and the op's mode (``detail``). The one place for the op-detail rule, used for fx and
export graph nodes and for the eager recorder's ATen ops.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from ..records import SourceLoc
from .proxies import IN_PLACE_OPERATORS, in_place_operator
from .source import source_from_stack

__all__ = [
    "AUTOCAST_KEY",
    "CHECKPOINT_KEY",
    "CHECKPOINT_OPTIONS_KEY",
    "FUNCTION_KEY",
    "GRAD_ON_KEY",
    "reentrant",
    "NO_GRAD_KEY",
    "SOURCE_KEY",
    "NodeContext",
    "aten_detail",
    "first_names",
    "node_context",
    "node_contexts",
]

SOURCE_KEY = "nhwc_audit_source"
"""``node.meta`` key where the fx tracer keeps the user's source line of a node."""
NO_GRAD_KEY = "nhwc_audit_no_grad"
"""Set on an fx node traced inside forward's own ``torch.no_grad()``: fx records no grad mode, so
a run with autograd runs such a node without it, as eager does."""

FUNCTION_KEY = "nhwc_audit_function"
"""Set on a node made inside an ``autograd.Function``'s forward: (the grad mode the outermost one was
applied in, its class's name). Autograd runs a Function's forward without grad; the node runs in the
mode the model runs the Function in, and its backward is autograd's of the node, not the Function's own."""

CHECKPOINT_KEY = "nhwc_audit_checkpoint"
"""Set on a node traced inside ``torch.utils.checkpoint.checkpoint``'s function (either variant):
the checkpoints open around it, outermost first, each a number unique in its trace (negative for a
reentrant one, ``use_reentrant=True``). A training
step's backward recomputes a checkpointed function's forward once per checkpoint around it; a
graph records no checkpoint, and runs the nodes once."""


def reentrant(checkpoint: int) -> bool:
    """A checkpoint's number (:data:`CHECKPOINT_KEY`) is a reentrant one's (``use_reentrant=True``)."""
    return checkpoint < 0


CHECKPOINT_OPTIONS_KEY = "nhwc_audit_checkpoint_options"
"""Set with :data:`CHECKPOINT_KEY`: each checkpoint's arguments but its function's, by number (a
selective checkpoint's ``context_fn``, ``early_stop``, ``preserve_rng_state``), one table a trace's
nodes share."""

GRAD_ON_KEY = "nhwc_audit_grad_on"
"""Set by the export capture on a node made while the model's code ran with grad on (a non-strict
export runs the Python for real). Export's own grad-mode blocks can be wrong: a nested non-reentrant
checkpoint's pack hook runs a ``no_grad`` block, and export put every op after it in a
``set_grad_enabled(False)`` block (a train audit then ran no backward); the mode the code ran in wins."""

AUTOCAST_KEY = "nhwc_audit_autocast"
"""Set on an fx node traced inside forward's own ``torch.autocast(...)`` blocks: their arguments
(device, dtype, enabled, cache), outermost first. fx records no autocast block either."""

_DEFAULT_MODES = {"pad": "constant", "interpolate": "nearest", "upsample": "nearest", "grid_sample": "bilinear"}
_ATEN_MODES = {"constant_pad_nd": "constant", "reflection_pad": "reflect", "replication_pad": "replicate"}
"""The mode an ATen pad kernel's name says, as ``F.pad``'s argument says it under fx."""
_GRID_MODES = ("bilinear", "nearest", "bicubic")  # grid_sampler's interpolation_mode


@dataclass(frozen=True, slots=True)
class NodeContext:
    """Where a node comes from in the user's code."""

    module_path: str
    module_type: str
    source: SourceLoc | None
    op_name: str
    target: str
    detail: str = ""
    """The op's mode where it has one (pad, interpolate, upsample): 'circular', 'bilinear'."""
    in_leaf_module: bool = False
    """The node is (or runs inside) a torch.nn leaf module such as InstanceNorm2d."""
    called_as: str = ""
    """The ATen op whose arguments the node holds, where :attr:`op_name` is the torch.nn.functional
    call it came from (a torch.export node of ``F.normalize``: ``linalg_vector_norm``); else empty."""

    @property
    def args_name(self) -> str:
        """The name the node's arguments are read by (a reduction's ``dim``): its ATen op's where
        :attr:`op_name` is another call's (``normalize(x, p, dim)`` is no ``linalg_vector_norm(x, ord, dim)``)."""
        return self.called_as or self.op_name

    def detail_at(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """The op's mode at a call with ``args``: a roll's by its tensor's sizes (:func:`_roll_detail`)."""
        return _roll_detail(args, kwargs) if self.op_name == "roll" else self.detail

    @property
    def names(self) -> tuple[str, ...]:
        """The names a rule about the node's op may use: the op's, and in a leaf module the
        module type's (``InstanceNorm2d``)."""
        return (self.op_name, self.module_type) if self.in_leaf_module else (self.op_name,)


def _detail(op_name: str, mode: Any) -> str:
    """The op's mode as recorded: the one given, else the op's default mode."""
    if mode is None:
        mode = _DEFAULT_MODES.get(op_name)
    return mode if isinstance(mode, str) else ""


def aten_detail(op: str, args: Any, kwargs: Mapping[str, Any]) -> str:
    """The mode of an ATen op call (``pad``'s mode argument, ``upsample_bilinear2d`` ->
    'bilinear')."""
    if op == "pad":
        return _detail(op, kwargs.get("mode", args[2] if len(args) > 2 else None))
    if op == "roll":
        return _roll_detail(args, kwargs)
    if op.startswith("upsample_"):
        return op.removeprefix("upsample_").removesuffix("2d").removesuffix("3d").removesuffix("1d")
    if op.startswith("grid_sampler") and len(args) > 2 and args[2] in (0, 1, 2):
        return _GRID_MODES[args[2]]
    return next((mode for kernel, mode in _ATEN_MODES.items() if op.startswith(kernel)), _detail(op, None))


def _roll_detail(args: Any, kwargs: Mapping[str, Any]) -> str:
    """A roll's mode: 'flattened' without dims (it rolls the flattened tensor: an NCHW copy on the
    CPU); 'whole turn' where a shift is a multiple of its dim's size, the call's tensor known (the
    CPU kernel cats the dim's whole with an empty slice, which writes NCHW; torch 2.14.1); else ''."""
    dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
    if dims in (None, (), []):
        return "flattened"
    shifts = kwargs.get("shifts", args[1] if len(args) > 1 else None)
    shape = getattr(args[0] if args else kwargs.get("input"), "shape", None)  # (torch.roll(input=y, ...) too)
    pairs = zip(*(v if isinstance(v, (tuple, list)) else (v,) for v in (shifts, dims)), strict=False)
    whole = shape is not None and any(type(s) is int and type(d) is int and s % (shape[d] or 1) == 0 for s, d in pairs)
    return "whole turn" if whole else ""


def _node_detail(node: torch.fx.Node, sub: nn.Module | None, op_name: str) -> str:
    if sub is not None:  # a module keeps its mode as an attribute (nn.Upsample), else none
        own = sub.__dict__.get("mode")  # most have none: no failed lookup through Module.__getattr__
        if own is None and hasattr(type(sub), "mode"):  # a class attribute or a property
            own = getattr(sub, "mode", None)
        return own if isinstance(own, str) else ""
    if op_name == "roll":  # its shifts are judged at each call (:meth:`NodeContext.detail_at`)
        return _roll_detail(node.args, node.kwargs)
    mode: Any = node.kwargs.get("mode")
    if mode is None and op_name == "pad" and len(node.args) > 2:
        mode = node.args[2]
    elif mode is None and op_name == "interpolate" and len(node.args) > 3:
        mode = node.args[3]
    return _detail(op_name, mode)


_SLICE = re.compile(r"\.?slice\([^)]*\)")


def _module_path(path: str) -> str:
    """torch.export's module path with the slices of containers taken out: iterating
    ``self.model[:-1]`` records ``model.slice(None, -1, None).11``, and a slice of an
    ``nn.Sequential`` keeps its children's names (``model.11``).

    >>> _module_path("model.slice(None, -1, None).11")
    'model.11'
    """
    return _SLICE.sub("", path).lstrip(".") if "slice(" in path else path


_SLICE_PART = re.compile(r"^slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)$")


def _resolved(model: nn.Module, path: str) -> Any:
    """The module at torch.export's ``path``, its slices applied (``blocks.slice(1, None, None).0``
    is ``model.blocks[1:][0]``: a sliced ModuleList numbers its children from 0 again)."""
    m: Any = model
    for part in path.split(".") if path else ():
        sliced = _SLICE_PART.match(part)
        if sliced:
            m = m[slice(*(None if g == "None" else int(g) for g in sliced.groups()))]
        else:
            m = m._modules[part]
    return m


def first_names(graph: torch.fx.Graph, model: nn.Module) -> None:
    """Rename the modules of ``graph``'s ``nn_module_stack`` (torch.export's: each module by the
    path forward reached it through) by their first name in ``model.named_modules()``, as the fx
    tracer and the eager capture name them: a module registered twice (MONAI DynUNet's
    ``input_block``, also ``skip_layers.downsample``) got another name, so another finding key."""
    first: dict[int, str] = {}
    for name, m in model.named_modules():
        first.setdefault(id(m), name)
    renamed: dict[tuple[str, str], str] = {}
    for n in graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        outer = ""
        for key, (path, mtype) in list(stack.items()):
            # a path relative to the module around it (a forward replaced on the instance, as
            # Ultralytics' fuse() does: export names the fused Conv's conv ``conv``)
            if (outer, path) not in renamed:
                renamed[outer, path] = next(
                    (first.get(id(m), p) for p in (path, f"{outer}.{path}") if (m := _module_at(model, p)) is not None),
                    path,
                )
            outer = renamed[outer, path]
            stack[key] = (outer, mtype)


def _module_at(model: nn.Module, path: str) -> Any:
    try:
        return _resolved(model, str(path))
    except (AttributeError, IndexError, KeyError, TypeError):  # no module there
        return None


def _qualified_name(target: Any, names: dict[Any, str] | None = None) -> str:
    """``target``'s qualified name; ``names``: the names already found in this graph (naming
    a target walks its module, ~5 us, and graphs repeat a few targets many times)."""
    if isinstance(target, str):
        return target
    if names is not None:
        try:
            got = names.get(target)
        except TypeError:  # unhashable: named each time
            got = None
        if got is None:
            got = _qualified_name(target)
            with contextlib.suppress(TypeError):
                names[target] = got
        return got
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:
        return getattr(target, "__name__", repr(target))


def _short_name(target: Any, names: dict[Any, str] | None = None) -> str:
    opname = getattr(target, "_opname", None)  # an ATen OpOverload: aten.conv2d.default -> conv2d
    if isinstance(opname, str):
        return opname
    if in_place_operator(target):
        return IN_PLACE_OPERATORS[target]  # operator.iadd: add_, as the other captures name x += y
    name = getattr(target, "__name__", None)
    if isinstance(name, str):
        return name
    return _qualified_name(target, names).rsplit(".", 1)[-1]


def node_contexts(
    nodes: Iterable[torch.fx.Node], root: nn.Module, modules: Mapping[str, nn.Module] | None = None
) -> dict[torch.fx.Node, NodeContext]:
    """:func:`node_context` of each of ``nodes`` (one graph's), each distinct target named once."""
    names: dict[Any, str] = {}
    return {n: node_context(n, root, modules, names) for n in nodes}


def node_context(
    node: torch.fx.Node,
    root: nn.Module,
    modules: Mapping[str, nn.Module] | None = None,
    names: dict[Any, str] | None = None,
) -> NodeContext:
    """Module path, module type, source line and display names of an fx node (``modules``:
    ``dict(root.named_modules())``, to look submodules up once per graph; ``names``: targets
    already named in this graph)."""
    stack = node.meta.get("nn_module_stack") or {}
    module_path, module_type = "", type(root).__name__
    in_leaf = False
    if stack:
        path, mtype = next(reversed(stack.values()))
        module_path = _module_path(str(path))
        qual = f"{mtype.__module__}.{mtype.__name__}" if isinstance(mtype, type) else str(mtype)
        module_type = qual.rsplit(".", 1)[-1]
        in_leaf = qual.startswith("torch.nn.modules.") and not qual.endswith(".Sequential")
    target = _qualified_name(node.target, names)
    sub: nn.Module | None = None
    if node.op == "call_module":
        sub = (modules or {}).get(str(node.target)) or root.get_submodule(str(node.target))
        module_path = str(node.target)
        module_type = type(sub).__name__
        op_name = module_type
        in_leaf = True
    elif node.op in ("call_function", "call_method"):
        op_name = _short_name(node.target, names)
    else:
        op_name = node.op
    detail, called_as = _node_detail(node, sub, op_name), ""
    called = node.meta.get("torch_fn")  # torch.export's: the torch.nn.functional call an ATen op came from
    if called and str(called[1]).startswith("function.") and isinstance(getattr(node.target, "_opname", None), str):
        # named as the model called it, as fx and the eager capture name it (interpolate, not upsample_bilinear2d)
        called_as = op_name
        op_name, detail = str(called[1]).removeprefix("function."), aten_detail(op_name, node.args, node.kwargs)
    return NodeContext(
        module_path=module_path,
        module_type=module_type,
        source=node.meta.get(SOURCE_KEY) or source_from_stack(node.stack_trace),
        op_name=op_name,
        target=target,
        detail=detail,
        in_leaf_module=in_leaf,
        called_as=called_as,
    )
