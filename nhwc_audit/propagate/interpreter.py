"""Propagate stage: run the channels_last sample through the captured graph and record, per node, the
layouts, shapes, strides, dtypes and bytes of what it reads and writes. It records; it never judges (that
is :mod:`nhwc_audit.analyze.findings`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves

from ..capture.context import node_context
from ..capture.proxies import in_place_operator, settle_in_place
from ..capture.reductions import reduced_dims
from ..errors import PropagationError, first_line
from ..layout import tensor_meta
from ..records import HiddenCopy, NodeInput, NodeRecord, TensorMeta
from ..tensors import iter_tensors
from .blind import function_blind, maybe_blind, recorder_blind
from .breaks import as_traced, autocast_in, latent_error, retry_nchw
from .conv_kernels import CONV_MODULES, call_key, known
from .corrections import Corrections
from .dispatch import CopyRecorder, inner_copies, is_alias_of
from .fresh_args import FreshArgs
from .grad_hooks import Grads, hook_gradients
from .inputs import PerNode, operands, own_weights, positional_inputs, sorted_users, versions_of, written
from .runner import autograd
from .skeleton import Skeleton

__all__ = ["LayoutProp", "ProgressFn", "propagate"]

ProgressFn = Callable[[int, int], None]


class LayoutProp(FreshArgs):
    """An Interpreter that records a :class:`NodeRecord` for every node it runs.

    A node that raises on channels_last input (a *break*, e.g. ``x.view(n, -1)``) is run again on
    NCHW copies of its inputs; if that works, the error is recorded and the audit goes on."""

    def __init__(
        self,
        gm: torch.nn.Module,
        *,
        graph: torch.fx.Graph | None = None,
        progress: ProgressFn | None = None,
        record_hidden: bool = True,
        shared: frozenset[int] = frozenset(),
        skeleton: Skeleton | None = None,
        corrections: Corrections | None = None,
        grad: bool = False,
        grads: Grads | None = None,
        reordering: set[str] | None = None,
    ):
        super().__init__(gm, garbage_collect_values=True, graph=graph)
        self.corrections, self.grads, self._retry_without_grad = corrections, grads, grad
        self.record_hidden, self.shared, self.skeleton, self.extra_traceback = record_hidden, shared, skeleton, False
        seen = reordering if record_hidden else None  # (the ops it sees: those it records)
        self._recorder = CopyRecorder(shared, recording=False, reordering=seen) if (record_hidden or shared) else None
        self._blind_ok = False  # calls the recorder cannot see into may run without it (.blind)
        # the repair's measurements (fix.measure): every value by name; asked after each node, True stops
        self.kept: dict[str, Any] | None = None
        self.until: Callable[[torch.fx.Node, dict[torch.fx.Node, Any]], bool] | None = None
        self.records: list[NodeRecord] = []
        self._pending: list[Any] = []
        self._amp: dict[str, bool | None] = {}  # the run's own autocast per device (breaks.autocast_in)
        self._progress = progress
        self._nodes = list(self.graph.nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        self._modules: dict[str, torch.nn.Module] = self.submodules  # Interpreter's own path -> module map
        # per node, made on first use (none of them refers back to the interpreter: no cycle)
        self._contexts = PerNode(functools.partial(node_context, root=gm, modules=self._modules, names={}))
        self._operands = PerNode(operands)
        self._users = PerNode(functools.partial(sorted_users, index=self._index))
        modules = [n for n in self._nodes if n.op == "call_module"]
        self._callee = {n: self._modules.get(str(n.target)) or self.fetch_attr(str(n.target)) for n in modules}
        self._leaf_weights = PerNode(functools.partial(own_weights, callee=self._callee))  # static during the run
        self._blind_functions = {n for n in self._nodes if n.op == "call_function" and maybe_blind(n.target)}
        self._convs = {n for n, m in self._callee.items() if isinstance(m, CONV_MODULES)}

    def _inputs(self, n: torch.fx.Node) -> list[tuple[NodeInput, torch.Tensor]]:
        out: list[tuple[NodeInput, torch.Tensor]] = []
        for inp in self._operands[n]:
            is_param = inp.op == "get_attr"
            value = self.env.get(inp)
            for t in (value,) if isinstance(value, torch.Tensor) else iter_tensors(value):
                out.append((NodeInput(producer=inp.name, meta=tensor_meta(t), is_param=is_param), t))
        out.extend(self._leaf_weights[n])
        return out

    def run_node(self, n: torch.fx.Node) -> Any:
        load = self.env.__getitem__
        return self._step(n, map_arg(n.args, load), map_arg(n.kwargs, load))

    def _call(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return as_traced(self._run_target, n, args, kwargs, grad=self._retry_without_grad)

    def _run_target(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        op, (args, kwargs) = n.op, self.fresh_args(n, args, kwargs)
        if op == "call_module":
            return self._callee[n](*args, **kwargs)  # looked up once per graph, not per call
        if op == "call_function":
            if args and in_place_operator(n.target):  # x += y on an int or a tuple: out of place
                settle_in_place(n, args[0])
            return n.target(*args, **kwargs)  # type: ignore[operator]
        return getattr(self, op)(n.target, args, kwargs)

    def _step(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        inputs = self._inputs(n)
        error: str | None = None
        hidden: list[HiddenCopy] = []
        own: tuple[HiddenCopy, ...] = ()
        rec, answer = self._recorder, None  # a conv module's kernel is asked once a path (.conv_kernels)
        sk = self.skeleton
        versions = versions_of(inputs)
        try:
            if rec is None:
                result = self._call(n, args, kwargs)
            elif (
                self._blind_ok
                and (
                    recorder_blind(self._callee[n], (args, kwargs), rec.shared)
                    if n in self._callee
                    else n in self._blind_functions and function_blind(n.target, args, kwargs, rec.shared)
                )
                and rec.off_stack()  # (before the key: choosing a conv backend dispatches an op)
                and (
                    n not in self._convs
                    or (answer := known(rec.kernels, call_key(self._callee[n], args, kwargs))) is not None
                )
            ):
                # asked per call: the model's code may add a hook or change a setting between two calls
                result = self._call(n, args, kwargs)
                if answer is not None:  # its kernel's copies: those of its path's first call, at its sizes
                    own = answer.at(args[0], cast(torch.Tensor, self._callee[n].weight), result)
            else:  # one mode for the whole run: pushing one per node costs more
                if not rec.on_stack:
                    torch._C._push_on_torch_dispatch_stack(rec)
                    rec.on_stack = True
                rec.start(frozenset(id(t) for _, t in inputs), self.record_hidden)
                try:
                    result = self._call(n, args, kwargs)
                finally:
                    rec.recording = False
                relayed = rec.settled(result)
                hidden = rec.copies + inner_copies(relayed, [t for _, t in inputs], result) if relayed else rec.copies
                own = tuple(rec.own)
            if sk is not None:
                sk.note(n, [(i.producer, t) for i, t in inputs], versions, result)
        except PropagationError:
            raise
        except Exception as e:
            if sk is not None:
                sk.disable(f"node {n.name} raised")
            result = retry_nchw(self._call, n, self._contexts[n], args, kwargs, inputs, e)
            error = first_line(e)
        ctx = self._contexts[n]
        detail = ctx.detail_at(args, kwargs)  # a roll's by its shifts
        reduced = reduced_dims(ctx.args_name, args, kwargs)
        if self.corrections is not None and error is None:
            # (a 4D parameter too: a fake group_norm of a channels_last table writes NCHW, as of an activation)
            result = self.corrections.apply(n.name, ctx.names, detail, [t for _, t in inputs], result)
        latent = latent_error(self._call, n, ctx.op_name, args, kwargs, inputs, result) if error is None else None
        if not (n.op == "call_module" and n.target == "_guards_fn"):  # torch.export's input guards
            wrote = error is None and written(inputs, versions)
            self._record(n, inputs, result, error, tuple(hidden), latent, wrote, own, detail, reduced)
        if self.grads is not None and n.op not in ("output", "get_attr"):
            hook_gradients(n.name, result, self.grads)
        if self._progress is not None:
            self._progress(self._index[n] + 1, len(self._nodes))
        return result

    def run(
        self, *args: Any, initial_env: dict[torch.fx.Node, Any] | None = None, enable_io_processing: bool = True
    ) -> Any:
        """``Interpreter.run`` in one tight loop (without its progress bar and per-node context
        managers, ~20 us a node): every value is dropped after its last use."""
        if enable_io_processing:
            args = self.graph.process_inputs(*args)
        rec, self._amp = self._recorder, {}
        if rec is not None:  # a fake run keeps no layout change of a meta kernel known to be wrong
            fake = any(isinstance(t, FakeTensor) for t in iter_tensors(args))
            rec.relays = not fake or self.corrections is not None
            rec.untrusted = self.corrections.untrusted if fake and self.corrections is not None else frozenset()
        # decided per run: autocast's casts are copies; CPU kernels only
        self._blind_ok = (
            rec is not None
            and not torch._C._is_any_autocast_enabled()
            and all(t.device.type == "cpu" for t in iter_tensors(args))
        )
        with rec if rec is not None else contextlib.nullcontext():
            if rec is not None:
                rec.on_stack = True
            try:
                out = self._run(args, initial_env)
            finally:
                if rec is not None and not rec.on_stack:
                    torch._C._push_on_torch_dispatch_stack(rec)  # the mode's exit pops it
                    rec.on_stack = True
        self._built()
        return self.graph.process_outputs(out) if enable_io_processing else out

    def _run(self, args: tuple[Any, ...], initial_env: dict[torch.fx.Node, Any] | None) -> Any:
        env = self.env = dict(initial_env or {})
        self.args_iter = iter(args)
        step, last_uses, load, kept, until = self._step, self.user_to_last_uses, env.__getitem__, self.kept, self.until
        for n in self._nodes:
            if n in env:
                continue
            env[n] = step(n, map_arg(n.args, load), map_arg(n.kwargs, load))
            if kept is not None:
                kept[n.name] = env[n]
            for dead in last_uses.get(n, ()):
                del env[dead]
            if n.op == "output" or (until is not None and until(n, env)):
                return env.get(n) if n.op == "output" else None
        return None

    def _record(
        self,
        n: torch.fx.Node,
        inputs: list[tuple[NodeInput, torch.Tensor]],
        result: Any,
        error: str | None,
        hidden: tuple[HiddenCopy, ...] = (),
        latent: str | None = None,
        wrote: bool = False,
        own: tuple[HiddenCopy, ...] = (),
        detail: str = "",
        reduced: tuple[int, ...] | None = None,
    ) -> None:
        outputs, aliases, in_tensors = list[TensorMeta](), False, [t for _, t in inputs]
        if n.op != "output":
            for t in (result,) if isinstance(result, torch.Tensor) else iter_tensors(result):
                outputs.append(tensor_meta(t))
                if not aliases:
                    aliases = any(is_alias_of(t, i) for i in in_tensors)
        first = in_tensors or iter_tensors(result)
        amp = autocast_in(n, first[0].device.type, self._amp) if first else None  # forward's own blocks too
        ins = tuple(i for i, _ in inputs)
        self._pending.append((n, ins, tuple(outputs), aliases, error, latent, hidden, wrote, own, detail, amp, reduced))

    def _built(self) -> None:
        for n, inputs, outputs, aliases, error, latent, hidden, wrote, own, detail, amp, reduced in self._pending:
            ctx = self._contexts[n]
            self.records.append(
                NodeRecord(
                    index=self._index[n],
                    name=n.name,
                    op=n.op,
                    target=ctx.target,
                    op_name=ctx.op_name,
                    module_path=ctx.module_path,
                    module_type=ctx.module_type,
                    source=ctx.source,
                    inputs=inputs,
                    outputs=outputs,
                    aliases_input=aliases,
                    in_place=aliases and wrote,
                    users=self._users[n],
                    detail=detail,
                    reduced=reduced,
                    autocast=amp,
                    error=error,
                    latent_error=latent,
                    in_leaf_module=ctx.in_leaf_module,
                    hidden=hidden,
                    inside=own,
                )
            )
        self._pending.clear()


def propagate(
    gm: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    graph: torch.fx.Graph | None = None,
    progress: ProgressFn | None = None,
    record_hidden: bool = True,
    flat_inputs: bool = False,
    shared: frozenset[int] = frozenset(),
    skeleton: Skeleton | None = None,
    corrections: Corrections | None = None,
    grad: bool = False,
    grads: Grads | None = None,
    reordering: set[str] | None = None,
) -> tuple[list[NodeRecord], Any]:
    """Run ``gm`` (a GraphModule, or the root module of ``graph``) on the (already channels_last) sample under
    ``no_grad``; return one record per node, in graph order, and the graph's output. The caller owns copying the
    model and the sample. ``flat_inputs``: the graph takes the pytree leaves of (args, kwargs), as torch.export
    graphs do. ``shared``: storages of the user's weights the graph reads in place; a write to one raises
    :class:`SharedWeightWrite` before it happens. ``skeleton`` collects what the replay check needs
    (:mod:`.replay`). ``corrections`` (fake runs) makes known meta-kernel errors follow eager
    (:mod:`.corrections`). ``grad``: run with autograd, as training does; ``grads``: each node's output hooked
    for its gradients (:mod:`.backward`); ``reordering`` collects the ops that may not keep NCHW order."""
    interp = LayoutProp(
        gm,
        graph=graph,
        progress=progress,
        record_hidden=record_hidden,
        shared=shared,
        skeleton=skeleton,
        corrections=corrections,
        grad=grad,
        grads=grads,
        reordering=reordering,
    )
    kw = kwargs or {}
    values = list(tree_leaves((args, kw))) if flat_inputs else positional_inputs(interp.graph, args, kw)
    with autograd(grad):
        out = interp.run(*values, enable_io_processing=False)
    return interp.records, out
