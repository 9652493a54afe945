"""The eager capture: run the model once and record every ATen op it dispatches
(TorchDispatchMode), with the module it ran in (forward pre/post hooks on the audit's
private copy), the user's source line, and the torch function the model called
(TorchFunctionMode): an op is named as the model wrote it (``contiguous``, ``reshape``,
``conv2d``: the names torch.export's graphs use), not as ATen runs it (``clone``,
``convolution``). Used when torch.fx cannot capture the model. Module hooks alone would miss
layout changes between modules (shufflenet's channel shuffle), so the records are per ATen op.

A break (an ATen op that raises on channels_last input and runs on NCHW copies of its inputs)
is recorded with its error, and the run goes on with the NCHW result, as the graph captures'
propagation does (:func:`~nhwc_audit.propagate.breaks.retry_nchw`): what runs after a break is
audited too. An op that fails on NCHW copies as well is the model's own error, raised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..capture.context import aten_detail
from ..capture.reductions import reduced_dims
from ..capture.source import user_frame
from ..channels import hidden_copy
from ..errors import NhwcAuditError, first_line
from ..layout import classify, tensor_meta
from ..prepare.copy import plain_tensors
from ..records import Layout, NodeInput, NodeRecord, SourceLoc
from ..tensors import iter_tensors, to_nchw
from .breaks import to_channels_last
from .conv_kernels import Kernels, own_copies
from .corrections import Corrections
from .dispatch import GuardedMode, is_alias_of, out_tensors
from .kernel_copies import Asked, kernel_copies
from .revert_kernels import revert_copies

__all__ = ["record_eager"]

# ATen ops that only describe tensors or allocate: never layout findings, kept out of the graph
_SKIP = frozenset({"detach", "alias", "lift_fresh", "_local_scalar_dense", "empty", "empty_like", "zeros"})


def call_name(func: Any) -> str:
    """How the model wrote a torch call: ``contiguous``, ``conv2d``; in-place operators as
    their methods (``x += y`` is ``add_``), other operators without underscores (``getitem``)."""
    name = str(getattr(func, "__name__", "") or func)
    if name.startswith("__") and name.endswith("__"):
        bare = name[2:-2]
        in_place = bare.startswith("i") and bare[1:] in ("add", "sub", "mul", "truediv", "floordiv", "and", "or", "xor")
        return bare[1:].replace("truediv", "div") + "_" if in_place else bare
    return name


class _Calls(TorchFunctionMode):
    """The torch function the model is in (only the outermost reaches a mode: inside its
    handler, the mode is off)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.source: SourceLoc | None = None
        """The model's line that made the call (taken here: below, this frame is nhwc-audit's)."""
        self.index: int | None = None
        """Which call this is, counting from 1 (None outside any)."""
        self.at_site: int | None = None
        """Which call of this function from this line it is, counting from 0: the same in a run
        in either layout, where one call dispatches ATen ops in one layout only (a
        ``.contiguous()`` that copies in one) and a model's branches run other calls elsewhere."""
        self._count = 0
        self._sites: dict[tuple[str, str, int], int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        outer = self.current, self.source, self.index, self.at_site
        self._count += 1
        name, source = call_name(func), user_frame()
        site = (name, source.file, source.line) if source is not None else (name, "", 0)
        at_site = self._sites.get(site, 0)
        self._sites[site] = at_site + 1
        self.current, self.source, self.index, self.at_site = name, source, self._count, at_site
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.current, self.source, self.index, self.at_site = outer


class _Recorder(GuardedMode):
    def __init__(
        self,
        stack: list[tuple[str, str]],
        shared: frozenset[int],
        corrections: Corrections | None = None,
        buffers: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(shared)
        self.buffers = buffers
        """``id()`` of the model's parameters and buffers: stored tensors, as a graph's get_attr
        inputs are."""
        self.calls = _Calls()
        self.corrections = corrections
        self.stack = stack
        self.records: list[dict[str, Any]] = []
        self.producer: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.counts: dict[str, int] = {}
        self.asked: Asked = {}  # a fake run's kernels asked on zeros
        self.kernels: Kernels = {}  # the convolutions' own copies, by kernel path

    def _name(self, op: str) -> str:
        n = self.counts.get(op, 0)
        self.counts[op] = n + 1
        return op if n == 0 else f"{op}_{n}"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.guard(func, args, kwargs)
        op = func.overloadpacket.__name__
        given = out_tensors(func, kwargs)  # (``torch.add(y, 1, out=buf)``: ``buf`` is written, not read)
        ins = [t for t in iter_tensors((args, kwargs)) if not any(t is o for o in given)]
        if op in _SKIP or func.namespace == "prim":  # prim.device: a fake tensor's C++ device() query
            out = func(*args, **kwargs)
            for t in iter_tensors(out):
                src = next(iter(ins), None)
                if src is not None and src in self.producer:
                    self.producer[t] = self.producer[src]
            return out
        path, mtype = self.stack[-1] if self.stack else ("", "")
        rec: dict[str, Any] = {
            "name": self._name(op),
            "target": str(func),
            "op_name": self.calls.current or op,
            "module_path": path,
            "module_type": mtype,
            "source": self.calls.source if self.calls.current is not None else user_frame(),
            "inputs": [
                NodeInput(
                    producer=self.producer.get(t),
                    meta=tensor_meta(t),
                    is_param=isinstance(t, nn.Parameter) or id(t) in self.buffers,
                )
                for t in ins
            ],
            "detail": aten_detail(op, args, kwargs),
            "reduced": reduced_dims(op, args, kwargs),
            "call": self.calls.index,
            "at_site": self.calls.at_site,
        }
        inside = None  # what its kernel copied (torchvision's roi_align: its input; a slice made dense)
        try:
            inside = own_copies(func, args, kwargs, self.guard, self.kernels) or kernel_copies(
                func, args, kwargs, self.guard, self.asked
            )
            out = func(*args, **kwargs) if inside is None else inside[0]
        except NhwcAuditError:
            raise  # the audit's own (a guard of a nested mode)
        except Exception as e:
            out = _on_nchw(func, args, kwargs)
            if out is _FAILED:
                raise  # the model's own error (or one its code catches): no record
            rec["error"] = first_line(e)
        if self.corrections is not None:
            out = self.corrections.apply(rec["name"], (op,), rec["detail"], ins, out)
        outs = list(iter_tensors(out))
        rec["outputs"] = [tensor_meta(t) for t in outs]
        rec["aliases"] = any(is_alias_of(t, i) for t in outs for i in ins)
        if rec["aliases"] and rec["op_name"] == "view" and op == "view":
            rec["latent"] = _latent_view_error(func, args, kwargs, outs, ins)
        copy = hidden_copy(func, args, out)
        # a convolution's of its weight: its own (result); a kernel that reverted by copying its input whole
        copies = inside[1] if inside is not None else revert_copies(func, args, kwargs, out, self.guard, self.asked)
        rec["hidden"] = ([copy] if copy is not None else []) + [c for c in copies if not c.result]
        rec["inside"] = tuple(c for c in copies if c.result)
        for t in outs:
            self.producer[t] = rec["name"]
        self.records.append(rec)
        return out


def _latent_view_error(func: Any, args: Any, kwargs: dict[str, Any], outs: list[Any], ins: list[Any]) -> str | None:
    """For the model's ``x.view(...)`` of an NCHW activation: the error it raises when that
    activation is channels_last (a break fixing the revert upstream would expose), as the
    graph captures find it (:func:`~nhwc_audit.propagate.breaks.latent_error`)."""
    from torch.utils._pytree import tree_map

    if not any(t.dim() in (4, 5) and classify(t) is Layout.CONTIGUOUS and is_alias_of(outs[0], t) for t in ins):
        return None
    try:
        func(*tree_map(to_channels_last, args), **tree_map(to_channels_last, kwargs))
    except Exception as e:
        return first_line(e)
    return None


_FAILED = object()


def _on_nchw(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """A failed op run again on NCHW copies of its inputs: its result when that works (a
    break), :data:`_FAILED` when it has no channels_last input or fails there too."""
    from torch.utils._pytree import tree_map

    if not any(t.dim() in (4, 5) and not t.is_contiguous() for t in iter_tensors((args, kwargs))):
        return _FAILED
    try:
        return func(*tree_map(to_nchw, args), **tree_map(to_nchw, kwargs))
    except Exception:
        return _FAILED


def record_eager(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    shared: frozenset[int] = frozenset(),
    corrections: Corrections | None = None,
) -> tuple[list[NodeRecord], Any]:
    """Run ``model`` (the audit's private copy) once and return per-op records and its output
    (a break's record carries its error; the run goes on past it). ``shared`` as in
    :func:`~nhwc_audit.propagate.interpreter.propagate`."""
    stack: list[tuple[str, str]] = []
    handles = []
    torch_nn: dict[str, bool] = {}  # module path -> a torch.nn module (looked up once per module)
    for name, mod in model.named_modules():
        if not name or isinstance(mod, torch.jit.ScriptModule):
            continue  # (TorchScript takes no hooks: its ops are recorded under the module that calls it)
        torch_nn[name] = type(mod).__module__.startswith("torch.nn.modules")

        def pre(m: nn.Module, a: Any, name: str = name) -> None:
            stack.append((name, type(m).__name__))

        def post(m: nn.Module, a: Any, o: Any) -> None:
            if stack:
                stack.pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))
    # stored tensors as the model holds them now (the NCHW baseline swaps in plain tensors), and
    # tensors kept as plain attributes, which a graph reads with get_attr as it reads buffers
    # (held for the run: a forward that replaces one, old spectral_norm's pre-hook, a cache set
    # on the module, frees it, and an activation made later could take its id())
    held = (*model.parameters(), *model.buffers(), *(t for _, t in plain_tensors(model)))
    stored = frozenset(id(t) for t in held)
    rec = _Recorder(stack, shared, corrections, stored)
    try:
        with torch.no_grad(), rec.calls, rec:
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    raw = rec.records
    users: dict[str, list[str]] = {}
    for r in raw:
        for i in r["inputs"]:
            if i.producer is not None and r["name"] not in users.setdefault(i.producer, []):
                users[i.producer].append(r["name"])
    records: list[NodeRecord] = []
    for idx, r in enumerate(raw):
        records.append(
            NodeRecord(
                index=idx,
                name=r["name"],
                op="call_function",
                target=r["target"],
                op_name=r["op_name"],
                module_path=r["module_path"],
                module_type=r["module_type"] or type(model).__name__,
                source=r["source"],
                inputs=tuple(r["inputs"]),
                outputs=tuple(r["outputs"]),
                aliases_input=r["aliases"],
                users=tuple(users.get(r["name"], [])),
                detail=r["detail"],
                reduced=r.get("reduced"),
                error=r.get("error"),
                in_leaf_module=torch_nn.get(r["module_path"], False),  # paths come from the hooks above
                hidden=tuple(r["hidden"]),
                inside=r.get("inside", ()),
                call=r["call"],
                call_at_site=r["at_site"],
                latent_error=r.get("latent"),
            )
        )
    return records, out
