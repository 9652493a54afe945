"""Capture stage: model -> torch.fx GraphModule, plus each node's module path, module
type and source line. Never runs the model.
"""

from __future__ import annotations

import functools
import linecache
import os
import re
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import TraceError
from ..records import SourceLoc

__all__ = ["Capture", "NodeContext", "export", "node_context", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_FRAME_RE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')


@dataclass(frozen=True)
class Capture:
    """A captured graph and how it was obtained."""

    root: nn.Module
    """The module the graph's ``call_module``/``get_attr`` targets are paths into."""
    graph: torch.fx.Graph
    method: str
    """'fx' (symbolic_trace) or 'export' (torch.export, non-strict, ATen-level graph)."""
    notes: tuple[str, ...] = ()

    @functools.cached_property
    def gm(self) -> torch.fx.GraphModule:
        """The graph as a GraphModule, built on first use: generating its Python code costs
        about a third of a trace, and the audit itself runs ``graph`` on ``root`` directly."""
        if isinstance(self.root, torch.fx.GraphModule) and self.root.graph is self.graph:
            return self.root
        return torch.fx.GraphModule(self.root, self.graph, type(self.root).__name__)


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


_SOURCE_KEY = "nhwc_audit_source"


def _is_own(file: str) -> bool:
    """nhwc-audit's own code (the bundled examples count as user code)."""
    return file.startswith(_PKG_DIR) and not file.endswith("examples.py")


def user_frame() -> SourceLoc | None:
    """The innermost frame of the model's code on the stack of this function's caller (not
    torch's; an nhwc-audit frame means the op came from torch modules only: None). Used by
    the fx tracer and the eager dispatch recorder.

    Cheaper than fx's ``record_stack_traces`` (which imports torch._dynamo, ~1.5 s).
    """
    f: types.FrameType | None = sys._getframe(2)
    while f is not None:
        file = f.f_code.co_filename
        if file.startswith(_TORCH_DIR):
            f = f.f_back
            continue
        if _is_own(file):
            return None  # left the model's code: the node came from torch modules only
        line = f.f_lineno or 0
        return SourceLoc(file=file, line=line, function=f.f_code.co_name, code=linecache.getline(file, line).strip())
    return None


class _Tracer(torch.fx.Tracer):
    """fx Tracer that stores the user's source line of every node it creates."""

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[_SOURCE_KEY] = user_frame()
        return node


def trace(model: nn.Module, *, concrete_args: dict[str, Any] | None = None) -> Capture:
    """Symbolically trace ``model``, recording each node's module stack and source line.

    Raises :class:`TraceError` naming the failure and what to do about it.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {msg} "
            "(data-dependent control flow or non-torch calls in forward; make that code "
            "traceable, e.g. wrap it with torch.fx.wrap, or audit a traceable submodule)"
        ) from e
    return Capture(root=tracer.root, graph=graph, method="fx")


def _source_from_stack(stack_trace: str | None) -> SourceLoc | None:
    """The innermost frame of the user's code (not torch's, not ours)."""
    if not stack_trace:
        return None
    lines = stack_trace.splitlines()
    best: SourceLoc | None = None
    for i, line in enumerate(lines):
        m = _FRAME_RE.match(line)
        if not m:
            continue
        file = m.group("file")
        if file.startswith(_TORCH_DIR) or _is_own(file):
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME_RE.match(lines[i + 1]) else ""
        best = SourceLoc(file=file, line=int(m.group("line")), function=m.group("func"), code=code)
    return best


def _qualified_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:
        return getattr(target, "__name__", repr(target))


def _short_name(target: Any) -> str:
    opname = getattr(target, "_opname", None)  # an ATen OpOverload: aten.conv2d.default -> conv2d
    if isinstance(opname, str):
        return opname
    name = getattr(target, "__name__", None)
    if isinstance(name, str):
        return name
    return _qualified_name(target).rsplit(".", 1)[-1]


_DEFAULT_MODES = {"pad": "constant", "interpolate": "nearest", "upsample": "nearest"}


def _detail(node: torch.fx.Node, sub: nn.Module | None, op_name: str) -> str:
    mode: Any = node.kwargs.get("mode")
    if sub is not None:
        mode = getattr(sub, "mode", None)
    elif mode is None and op_name == "pad" and len(node.args) > 2:
        mode = node.args[2]
    elif mode is None and op_name == "interpolate" and len(node.args) > 3:
        mode = node.args[3]
    if mode is None and node.op != "call_module":
        mode = _DEFAULT_MODES.get(op_name)
    return mode if isinstance(mode, str) else ""


def node_context(node: torch.fx.Node, root: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> NodeContext:
    """Module path, module type, source line and display names of an fx node (``modules``:
    ``dict(root.named_modules())``, to look submodules up once per graph)."""
    stack = node.meta.get("nn_module_stack") or {}
    module_path, module_type = "", type(root).__name__
    in_leaf = False
    if stack:
        path, mtype = list(stack.values())[-1]
        module_path = str(path)
        qual = f"{mtype.__module__}.{mtype.__name__}" if isinstance(mtype, type) else str(mtype)
        module_type = qual.rsplit(".", 1)[-1]
        in_leaf = qual.startswith("torch.nn.modules.") and not qual.endswith(".Sequential")
    target = _qualified_name(node.target)
    sub: nn.Module | None = None
    if node.op == "call_module":
        sub = (modules or {}).get(str(node.target)) or root.get_submodule(str(node.target))
        module_path = str(node.target)
        module_type = type(sub).__name__
        op_name = module_type
        in_leaf = True
    elif node.op in ("call_function", "call_method"):
        op_name = _short_name(node.target)
    else:
        op_name = node.op
    return NodeContext(
        module_path=module_path,
        module_type=module_type,
        source=node.meta.get(_SOURCE_KEY) or _source_from_stack(node.stack_trace),
        op_name=op_name,
        target=target,
        detail=_detail(node, sub, op_name),
        in_leaf_module=in_leaf,
    )


def export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Capture:
    """Capture with ``torch.export.export(..., strict=False)``: an ATen-level graph whose nodes
    keep their module path (``nn_module_stack``) and stack trace. Export runs the model on
    fake tensors only; the layouts still come from running this graph on real tensors."""
    try:
        ep = torch.export.export(model, args, kwargs or None, strict=False)
        gm = ep.module()
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {msg}") from e
    assert isinstance(gm, torch.fx.GraphModule)
    return Capture(root=gm, graph=gm.graph, method="export")
