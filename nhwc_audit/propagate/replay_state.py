"""The replay check's state (:mod:`.replay`): what each eager tensor stands for, the graph's
next call, and the matching of one eager call with it (:class:`ReplayState`)."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..capture.kept import attribute
from ..errors import SharedWeightWrite
from .call_keys import call_name, eager_calls, graph_call, mapped, tensor_methods, tensors_in, writes_first
from .dispatch import CopyRecorder
from .replay_values import UNANSWERABLE, Differs, Matching, Origin, device_read
from .skeleton import Leaf, Skeleton, extent, is_plain, rebuild, standin

__all__ = ["ReplayState"]

Extent = tuple[int, int, int]


class ReplayState(Matching, TorchFunctionMode):
    """The eager run of a replay as a torch function mode: each call matched with the graph's
    next one and answered with stand-ins of its value; leaf module calls come in through
    :meth:`leaf`."""

    def __init__(self, gm: nn.Module, modules: Iterable[nn.Module], graph: torch.fx.Graph, skeleton: Skeleton) -> None:
        """``modules``: every module of ``gm`` (``gm.modules()``)."""
        super().__init__()
        self.gm = gm
        self.sk = skeleton
        nodes = list(graph.nodes)
        self.attrs: dict[int, torch.Tensor] = {
            id(t): t for m in modules for t in [*m._parameters.values(), *m._buffers.values()] if t is not None
        }
        self.canon: dict[str, Origin] = {}
        """Graph node -> what its value stands for now (after an in-place write, the writer)."""
        for n in nodes:
            if n.op == "get_attr":
                value = attribute(gm, str(n.target))
                self.attrs[id(value)] = value
                self.canon[n.name] = ("attr", (id(value),))
            elif self._access(n):  # an item of a tuple a call returned: no call of its own
                name, path = self.canon[n.args[0].name]
                self.canon[n.name] = (name, self.resolve(name, (*path, n.args[1])))
            else:
                self.canon[n.name] = (n.name, ())
        self.calls = [n for n in nodes if self._is_call(n)]
        self.methods = tensor_methods()
        self.keys = [graph_call(n, self.methods) for n in self.calls]
        self.pos = 0
        self.origin: dict[int, Origin] = {}
        self.keep: list[Any] = []  # every tracked object stays alive, so that ids are not reused
        self.memory: dict[int, Leaf | Extent | None] = {}
        """Tracked tensor -> the memory of the graph's tensor it stands for."""
        self.on_storage: dict[int | None, list[torch.Tensor]] = {}
        """Storage -> the tracked tensors noted on it (None: on memory not known), so that a
        write looks only at the tensors it may reach."""
        self.devices: dict[int, torch.device] = {}
        self.metas: dict[int, torch.Tensor] = {}
        self.stale_attrs: dict[int, str] = {}
        self._attrs_on: dict[int, list[int]] | None = None

    def attrs_on(self) -> dict[int, list[int]]:
        """Storage -> the model tensors on it (worked out once, when first needed)."""
        if self._attrs_on is None:
            self._attrs_on = {}
            for key, t in self.attrs.items():
                if t.device.type != "meta":
                    self._attrs_on.setdefault(t.untyped_storage().data_ptr(), []).append(key)
        return self._attrs_on

    def _note_memory(self, t: torch.Tensor, where: Leaf | Extent | None) -> None:
        self.memory[id(t)] = where
        storage = None if where is None else where.storage if isinstance(where, Leaf) else where[0]
        self.on_storage.setdefault(storage, []).append(t)

    def _access(self, n: torch.fx.Node) -> bool:
        parent = n.args[0] if n.args else None
        return (
            n.op == "call_function"
            and n.target in (getattr, operator.getitem)
            and isinstance(parent, torch.fx.Node)
            and parent.name in self.sk.containers
        )

    def _is_call(self, n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return True
        if n.op not in ("call_function", "call_method") or self._access(n):
            return False
        return n.name not in self.sk.plain or n.name in self.sk.written

    # what eager values stand for
    def _leaf(self, origin: Origin) -> Leaf | None:
        value: Any = self.sk.values.get(origin[0]) if origin[0] not in ("attr", "made", "stale") else None
        for key in origin[1]:
            value = value[key] if isinstance(value, (tuple, list, dict)) else None
        return value if isinstance(value, Leaf) else None

    def tag(self, t: torch.Tensor, origin: Origin) -> torch.Tensor:
        """Note that eager's ``t`` stands for ``origin`` from now on."""
        leaf = self._leaf(origin)
        self.origin[id(t)] = origin
        self.keep.append(t)
        self._note_memory(t, leaf)
        if leaf is not None:
            self.devices[id(t)] = leaf.device
        return t

    def track(self, value: Any, origin: Origin) -> Any:
        """``value``, each tensor in it tagged with ``origin`` and its key path in ``value``."""
        name, base = origin
        return rebuild(value, lambda t, path: self.tag(t, (name, (*base, *path))))

    def _constant(self, t: torch.Tensor) -> bool:
        origin = self.origin.get(id(t))
        if origin is not None:
            return bool(origin[0] == "made")
        return id(t) in self.attrs and id(t) not in self.stale_attrs and t.device.type != "meta"

    def _meta(self, v: Any) -> Any:
        """An eager value with every real tensor as a meta tensor of its layout (one per tensor)."""
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            return v
        got = self.metas.get(id(v))
        if got is None:
            got = self.metas[id(v)] = standin(v)
            self.keep.append(v)
        return got

    def answer(self, n: torch.fx.Node, tensors: list[torch.Tensor], eager_writes: torch.Tensor | None) -> Any:
        """The result of graph call ``n`` as eager gets it, after its in-place writes: inputs the
        graph's call wrote stand for ``n`` from now on. A write eager makes and the graph does
        not (``x += y`` recorded as ``x + y``) must give the graph's dtype and shape, and makes
        every other tensor on that memory unusable (eager changed it, the graph did not)."""
        written = self.sk.written.get(n.name, ())
        graph_wrote = {self.canon[p] for p in written}
        for p in written:
            self.canon[p] = (n.name, ())
        if eager_writes is not None and self.origin.get(id(eager_writes)) not in graph_wrote:
            value = self.sk.values.get(n.name)
            if not (
                isinstance(value, Leaf) and value.shape == eager_writes.shape and value.dtype == eager_writes.dtype
            ):
                raise Differs(f"eager writes {n.name} in place where the graph makes another tensor")
            self._stale(eager_writes, n)
            return self.tag(eager_writes, (n.name, ()))
        for t in tensors:
            if self.origin.get(id(t)) in graph_wrote:
                self.tag(t, (n.name, ()))
        if n.name in self.sk.plain:
            return self.sk.plain[n.name]
        same = self.sk.same.get(n.name)
        if same is not None:  # the graph's value is that input itself: so is eager's
            want = self.canon[same]
            for t in tensors:
                if self.origin.get(id(t)) == want:
                    self.canon[n.name] = want
                    return t
        value = self.sk.values[n.name]
        if isinstance(value, Leaf):
            return self.tag(value.standin(), (n.name, ()))
        return self.track(rebuild(value, lambda leaf, _: leaf.standin()), (n.name, ()))

    def _stale(self, written: torch.Tensor, n: torch.fx.Node) -> None:
        """Every other tracked tensor and model attribute on ``written``'s memory (all of them
        when that memory is not known) now holds what eager changed."""
        mem = _extent(self.memory.get(id(written)))
        reach = self.keep if mem is None else [*self.on_storage.get(mem[0], ()), *self.on_storage.get(None, ())]
        for t in reach:
            if t is written or not isinstance(t, torch.Tensor) or id(t) not in self.origin:
                continue
            if mem is None or _overlap(_extent(self.memory.get(id(t))), mem):
                self.origin[id(t)] = ("stale", n.name)
        on = self.attrs_on()
        keys = [k for ks in on.values() for k in ks] if mem is None else on.get(mem[0], [])
        for key in keys:
            if mem is None or _overlap(extent(self.attrs[key]), mem):
                self.stale_attrs[key] = n.name

    def leaf(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A leaf module's call (or a function fx keeps whole): the graph's next call."""
        with torch._C.DisableTorchFunction(), _own_work():  # the replay's own work, not the model's calls
            key = ("module", target) if isinstance(target, str) else ("fn", target)
            n = self._next([(key, args)], kwargs)
            if isinstance(n, str):
                raise Differs(f"eager calls {getattr(target, '__name__', target)} {n}")
            return self.answer(n, tensors_in(args, kwargs), None)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = tensors_in(args, kwargs)
        name = getattr(func, "__name__", "")
        if name in _READS:  # metadata a stand-in would answer wrongly
            stand = [t for t in tensors if t.device.type == "meta" and id(t) in self.origin]
            if stand:
                known, value = device_read(func, self.devices.get(id(stand[0]), stand[0].device))
                if known:
                    return value
                if name in UNANSWERABLE or name == "__set__":
                    raise Differs(f"eager reads or sets {call_name(func)} of a tensor: the replay cannot answer it")
        calls = eager_calls(func, tuple(args), self.methods)
        with _own_work():
            n = self._next(calls, kwargs)
            if not isinstance(n, str):
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                return self.answer(n, tensors, first if writes_first(func, self.methods) else None)
        if all(self._constant(t) for t in tensors):
            return self._folded(func, args, kwargs)
        with _own_work():  # a call that only reads metadata (x.shape, x.size(0)), on the stand-ins
            margs, mkwargs = mapped((args, kwargs), self._meta)
            metas = tensors_in(margs, mkwargs)
            before = [t._version for t in metas]
            out = func(*margs, **mkwargs)
            if is_plain(out) and before == [t._version for t in metas]:
                return out
        raise Differs(f"eager calls {call_name(func)} {n}")

    def _folded(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A call on the model's constants only (buffers fx does not trace, tensors its code
        makes): fx ran it while tracing and keeps the result as a constant. It runs for real,
        and must neither write to the model's tensors nor draw random numbers."""
        state = torch.random.get_rng_state()
        try:
            with CopyRecorder(frozenset(self.attrs_on())):
                out = func(*args, **kwargs)
        except SharedWeightWrite:
            raise Differs(f"eager writes to a model tensor ({call_name(func)}) where the graph does not") from None
        if not torch.equal(state, torch.random.get_rng_state()):
            raise Differs(f"eager draws random numbers ({call_name(func)}) where the graph keeps a constant")
        return out if is_plain(out) else rebuild(out, lambda t, _: self._made(t))

    def _made(self, t: torch.Tensor) -> torch.Tensor:
        self.origin[id(t)] = ("made", t)
        self.keep.append(t)
        self._note_memory(t, extent(t) if t.device.type != "meta" else None)
        return t


def _extent(where: Leaf | Extent | None) -> Extent | None:
    return where.memory if isinstance(where, Leaf) else where


def _overlap(a: Extent | None, b: Extent) -> bool:
    return a is None or (a[0] == b[0] and a[1] < b[2] and b[1] < a[2])


_READS = UNANSWERABLE | {"__get__", "__set__", "get_device"}


def _own_work() -> Any:
    """The replay's own tensors (stand-ins, meta tensors) bypass dispatch modes, the caller's
    guard among them: they hold no memory a write could reach, and a Python mode costs more
    than them."""
    return torch._C._DisableTorchDispatch()
