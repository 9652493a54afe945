"""torch.fx capture: symbolic trace with the user's source line on every node. Never runs
the model.
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
from torch import nn
from torch.fx.proxy import Proxy, Scope, TracerBase

from ..errors import TraceError, first_line
from .blocks import AutocastBlock, Checkpoints, autocast_blocks_noted, checkpoints_noted, function_grad_noted
from .constants import BUFFER_VIEW_KEY, buffer_view, fresh_constants
from .context import AUTOCAST_KEY, CHECKPOINT_KEY, CHECKPOINT_OPTIONS_KEY, FUNCTION_KEY, NO_GRAD_KEY, SOURCE_KEY
from .kept import holds
from .proxies import TracerProxy
from .source import failing_at, user_frame
from .state import module_state, put_back_proxied, put_back_state
from .untraceable import RECORDED, untraceable

__all__ = ["Capture", "GraphMethod", "trace"]

GraphMethod = Literal["fx", "export"]


@dataclass(frozen=True)
class Capture:
    """A captured graph and how it was obtained."""

    root: nn.Module
    """The module the graph's ``call_module``/``get_attr`` targets are paths into."""
    graph: torch.fx.Graph
    method: GraphMethod
    """'fx' (symbolic_trace) or 'export' (torch.export, non-strict, ATen-level graph)."""
    maps_traced: bool = False
    """An fx trace traced what forward computes from 4D/5D buffers (:func:`trace`)."""
    traced_writes: tuple[str, ...] = ()
    """Buffers forward wrote while torch.fx traced it, in training mode: an update it ran once, in
    Python, that may not be in the graph (timm's BatchNormAct2d counting ``num_batches_tracked``)."""

    @property
    def flat_inputs(self) -> bool:
        """The graph takes the pytree leaves of (args, kwargs), as torch.export graphs do."""
        return self.method == "export"

    @functools.cached_property
    def gm(self) -> torch.fx.GraphModule:
        """The graph as a GraphModule, built on first use: generating its Python code costs
        about a third of a trace, and the audit itself runs ``graph`` on ``root`` directly."""
        if isinstance(self.root, torch.fx.GraphModule) and self.root.graph is self.graph:
            return self.root
        return torch.fx.GraphModule(self.root, self.graph, type(self.root).__name__)

    def compiled(self) -> torch.fx.GraphModule:
        """:attr:`gm`, or :class:`TraceError` when torch.fx's code for it does not compile (a
        submodule named by a Python keyword: ``nn.ModuleDict({"in": ...})`` gives ``self.heads.in``)."""
        try:
            return self.gm
        except SyntaxError as e:
            raise TraceError(f"torch.fx's code for the graph does not compile ({first_line(e)})") from e

    def release(self) -> None:
        """Let go of the graph's GraphModule (:attr:`gm`, or an export's root): the graph no
        longer names it its owner. A GraphModule and its graph are a reference cycle, and it
        holds the modules (the audit's private copy): without this they wait for the cyclic
        collector once the audit is over. The graph itself stays, to be run on a root or copied."""
        self.__dict__.pop("gm", None)
        self.graph.owning_module = None


class _ModuleStack(OrderedDict[str, Any]):
    """fx's stack of the modules being traced, copied into each node's meta
    (``nn_module_stack``): copied by its own ``__copy__`` (``copy.copy`` of a plain OrderedDict
    goes through ``__reduce_ex__``, ~3 us a node)."""

    def __copy__(self) -> _ModuleStack:
        return _ModuleStack(self)


class _Scope(Scope):
    """fx's current scope, copied on entering each module call: by its own ``__copy__``."""

    def __copy__(self) -> Scope:
        return Scope(self.module_path, self.module_type)


_PLAIN_ARGS = frozenset({Proxy, TracerProxy, tuple, list, dict, int, float, bool, str, type(None)})


class _Tracer(torch.fx.Tracer):
    """fx Tracer that stores the user's source line of every node it creates."""

    def __init__(self, proxy_maps: bool) -> None:
        super().__init__()
        self.proxy_maps = proxy_maps
        self.proxied_maps = False
        self.scope = _Scope("", None)
        self.module_stack = _ModuleStack()
        self._code: dict[types.CodeType, tuple[list[int], list[dis.Instruction]]] = {}
        self._names: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
        self.autocasts: list[AutocastBlock] = []  # forward's open autocast blocks (:mod:`.blocks`)
        self.functions: list[tuple[bool, str]] = []  # open autograd.Functions (:func:`.blocks.function_grad_noted`)
        self.checkpoints = Checkpoints()  # open torch.utils.checkpoint calls

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # a TorchScript module is called as a module: traced into, fx made a call on its C++ object
        # (``inner._c.forward``), and the graph held neither it as a module nor its parameters
        return isinstance(m, torch.jit.ScriptModule) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: torch.fx.Node) -> Proxy:
        return TracerProxy(node, self)

    def instructions(self, code: types.CodeType) -> tuple[list[int], list[dis.Instruction]]:
        """The offsets and instructions of ``code``, disassembled once per trace."""
        got = self._code.get(code)
        if got is None:
            insts = list(dis.get_instructions(code))
            got = self._code[code] = ([i.offset for i in insts], insts)
        return got

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        self._code.clear()
        self._names.clear()

        def registered(*_: Any) -> None:  # a module registered something in forward: look again
            self._names.clear()

        # torch's own hooks on every registration (a buffer made lazily in forward may give a
        # tensor an earlier name), held for this trace only; a name deleted is caught by
        # _name_of's check. Module tables edited as dicts in forward are not seen.
        handles = [
            nn.modules.module.register_module_parameter_registration_hook(registered),
            nn.modules.module.register_module_buffer_registration_hook(registered),
            nn.modules.module.register_module_module_registration_hook(registered),
        ]
        try:
            with (
                autocast_blocks_noted(self.autocasts),
                function_grad_noted(self.functions, self.checkpoints),
                checkpoints_noted(self.checkpoints),
            ):
                return super().trace(root, concrete_args)
        finally:
            for h in handles:
                h.remove()

    def _name_of(self, t: torch.Tensor, kind: str) -> str | None:
        """The first name under which the root holds ``t`` as a parameter (``kind`` 'p') or a
        buffer ('b'), as torch's Tracer finds it by walking the whole module tree on every
        lookup: walked once per trace here (again after a registration, see :meth:`trace`,
        or when the name found is no longer ``t``'s); None when the root does not hold it."""
        for fresh in (False, True):
            table = None if fresh else self._names.get(kind)
            if table is None:
                named = self.root.named_parameters() if kind == "p" else self.root.named_buffers()
                table = self._names[kind] = {}
                for name, held in named:
                    table.setdefault(id(held), (name, held))
            entry = table.get(id(t))
            if entry is None:
                return None
            if entry[1] is t and holds(self.root, entry[0], kind) is t:
                return entry[0]
        return None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Proxy]) -> Any:
        # torch's Tracer finds a parameter's name by a walk of the whole module tree per access. A
        # 4D/5D buffer is traced too: torch's Tracer runs what forward computes from buffers alone
        # and stows the result as a constant, so the audit would not see a tile of a position map
        kind = None
        if isinstance(attr_val, nn.Parameter):
            kind = None if self.param_shapes_constant else "p"
        elif self.proxy_maps and isinstance(attr_val, torch.Tensor) and attr_val.dim() >= 4:
            kind = "b"
        name = self._name_of(attr_val, kind) if kind is not None else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        self.proxied_maps = self.proxied_maps or kind == "b"
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        # a proxy, a plain value, a tuple, list or dict: torch's Tracer would find it is none of the
        # values it turns into get_attr nodes (parameters, buffers, modules, named tuples,
        # constants) by ~10 isinstance checks each before handing it to TracerBase, which
        # looks its exact type up in a table: go there directly
        kind = type(a)
        if kind is TracerProxy:
            return a.node
        if kind is list or kind is tuple:  # torch.cat's list of maps: its proxies looked up here
            args = [x.node if type(x) is TracerProxy else self.create_arg(x) for x in a]
            return args if kind is list else tuple(args)
        if kind in _PLAIN_ARGS:
            return TracerBase.create_arg(self, a)
        if isinstance(a, torch.Tensor):  # a parameter or buffer of the root: its name, found once
            name = self._name_of(a, "p" if isinstance(a, nn.Parameter) else "b")
            if name is not None:
                return self.create_node("get_attr", name, (), {})
            if type(a) is torch.Tensor:  # none of the root's: a constant, stowed as torch stows it
                node = self.create_node("get_attr", self._constant(a), (), {})
                node.meta[BUFFER_VIEW_KEY] = buffer_view(a, lambda t: self._name_of(t, "b"))  # (a repaired model's)
                return node
        return super().create_arg(a)

    def _constant(self, a: torch.Tensor) -> str:
        """The root attribute that holds the tensor constant ``a`` (``_tensor_constant3``),
        set on first use: what torch's Tracer does once its walk of every buffer has not
        found ``a`` (the table above has already looked)."""
        qualname = self.tensor_attrs.get(a)
        if not qualname:
            qualname = str(self.get_fresh_qualname("_tensor_constant"))
            self.tensor_attrs[a] = qualname
            setattr(self.root, qualname, a)
        return qualname

    def create_node(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> torch.fx.Node:
        # the node is made without arguments and given them after: torch's Graph.create_node
        # walks every call's arguments with pytree (~10 us a node) to warn about SymInts, which
        # a symbolic trace never makes; the node, its name and its users come out the same
        if self.check_mutable_operations:  # torch's check reads the arguments
            return self._sourced(super().create_node(kind, target, args, kwargs, name, type_expr))
        node = super().create_node(kind, target, (), {}, name, type_expr)
        if args:
            node.args = tuple(args)
        if kwargs:
            node.kwargs = kwargs
        return self._sourced(node)

    def _sourced(self, node: torch.fx.Node) -> torch.fx.Node:
        node.meta[SOURCE_KEY] = user_frame()
        if self.functions:
            node.meta[FUNCTION_KEY] = self.functions[0]
        if not (self.functions[0][0] if self.functions else torch.is_grad_enabled()):  # forward's own no_grad()
            node.meta[NO_GRAD_KEY] = True  # (the trace runs with grad)
        if self.autocasts:
            node.meta[AUTOCAST_KEY] = tuple(self.autocasts)
        if self.checkpoints.open:
            node.meta[CHECKPOINT_KEY] = tuple(self.checkpoints.open)
            node.meta[CHECKPOINT_OPTIONS_KEY] = self.checkpoints.options
        return node


def trace(model: nn.Module, *, concrete_args: dict[str, Any] | None = None, trace_maps: bool = True) -> Capture:
    """Symbolically trace ``model``, recording each node's module stack and source line.

    ``trace_maps``: what forward computes from 4D/5D buffers alone is traced too (torch's Tracer
    runs it and stows the result: a tile of a position map would not be seen), unless forward
    reads their values in Python: then traced again, from the modules as they were, with them
    stowed. No proxy is left on the modules. Raises :class:`TraceError` naming what to do. In
    training mode, the buffers forward wrote while traced are noted (:attr:`Capture.traced_writes`)."""
    versions = {n: b._version for n, b in model.named_buffers() if not b.is_inference()} if model.training else {}
    cap = _traced(model, concrete_args, trace_maps)
    writes = tuple(n for n, b in model.named_buffers() if n in versions and b._version != versions[n])
    return dataclasses.replace(cap, traced_writes=writes) if writes else cap


def _traced(model: nn.Module, concrete_args: dict[str, Any] | None, trace_maps: bool) -> Capture:
    if not trace_maps or not any(b.dim() >= 4 for b in model.buffers()):
        return _trace(model, concrete_args, proxy_maps=False)
    state = module_state(model)
    try:
        cap = _trace(model, concrete_args, proxy_maps=True)
    except _MapsProxied:
        put_back_state(state)  # what forward cached on its modules holds the failed trace's proxies
        return _trace(model, concrete_args, proxy_maps=False)
    put_back_proxied(state)
    return cap


class _MapsProxied(Exception):
    """A trace that traced 4D/5D buffers failed."""


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None, *, proxy_maps: bool) -> Capture:
    if isinstance(model, torch.jit.ScriptModule):  # (torch.fx says 'traced_func_name=forward doesn't exist')
        raise TraceError(f"torch.fx cannot trace a TorchScript module ({type(model).__name__}): {RECORDED}")
    tracer = _Tracer(proxy_maps)
    try:
        with torch.enable_grad():  # so that a torch.no_grad() block in forward shows (NO_GRAD_KEY)
            graph = tracer.trace(model, concrete_args=concrete_args)
        proxied = tracer.proxied_maps
    except Exception as e:
        if tracer.proxied_maps:
            raise _MapsProxied from e
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "torch.fx docs" in msg:  # torch's pointer to its docs: what it means follows, in our words
            msg = msg.split(". ", 1)[0]
        plain = f"torch.fx could not trace {type(model).__name__}{failing_at(e)}: {type(e).__name__}: {msg}"
        raise TraceError(f"{plain} ({untraceable(msg)})", plain=f"{plain} ({untraceable(msg, audit=False)})") from e
    finally:
        root: nn.Module = getattr(tracer, "root", model)
        # torch's Tracer.trace leaves a recursive closure that holds the tracer (a reference
        # cycle): its per-trace tables (a scope per node, the code cache) would otherwise wait
        # for the cyclic collector, ~10 objects a node
        vars(tracer).clear()
    fresh_constants(graph, root)
    # a GraphModule pickles the tracer's class to trace its code again when loaded: torch's own,
    # which takes no arguments (a repaired module saved with torch.save could not be loaded)
    graph._tracer_cls = None
    return Capture(root=root, graph=graph, method="fx", maps_traced=proxied)
