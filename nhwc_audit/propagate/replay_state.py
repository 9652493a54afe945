"""The replay check's state (:mod:`.replay`): what each eager tensor stands for, the graph's
next call, and the matching of one eager call with it (:class:`ReplayState`)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .call_keys import Call, eager_calls, graph_call, mapped, tensor_methods, tensors_in, writes_first
from .skeleton import PLAIN_TYPES, Leaf, Skeleton, is_plain, rebuild, standin

__all__ = ["Differs", "Origin", "ReplayState"]

Origin = tuple[Any, ...]
"""What an eager tensor stands for: ``(node name, key path)`` in the graph, ``("attr", (id,))``
for a parameter, buffer or tensor attribute of the model, ``("made", tensor)`` for a
constant the model's code makes (fx folds those; compared by value with the graph's)."""


class Differs(Exception):
    """The eager run differs from the graph: why."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.at: list[Any] = []
        """Where in the compared values, innermost first."""


class ReplayState(TorchFunctionMode):
    """The eager run of a replay as a torch function mode: each call matched with the graph's
    next one and answered with stand-ins of its value; leaf module calls come in through
    :meth:`leaf`."""

    def __init__(self, gm: nn.Module, graph: torch.fx.Graph, skeleton: Skeleton) -> None:
        super().__init__()
        self.gm = gm
        self.sk = skeleton
        nodes = list(graph.nodes)
        self.canon: dict[str, Origin] = {}
        """Graph node -> what its value stands for now (after an in-place write, the writer)."""
        self.attrs: dict[int, torch.Tensor] = {
            id(t): t
            for m in gm.modules()
            for t in [*m._parameters.values(), *m._buffers.values()]
            if isinstance(t, torch.Tensor)
        }
        for n in nodes:
            if n.op == "get_attr":
                value = self.fetch(n)
                self.attrs[id(value)] = value
                self.canon[n.name] = ("attr", (id(value),))
            elif self._access(n):  # an item of a tuple a call returned: no call of its own
                name, path = self.canon[n.args[0].name]
                self.canon[n.name] = (name, (*path, n.args[1]))
            else:
                self.canon[n.name] = (n.name, ())
        self.calls = [n for n in nodes if self._is_call(n)]
        self.methods = tensor_methods()
        self.keys = [graph_call(n, self.methods) for n in self.calls]
        self.pos = 0
        self.origin: dict[int, Origin] = {}
        self.keep: list[Any] = []  # every tracked object stays alive, so that ids are not reused
        self.by_storage: dict[int | None, list[torch.Tensor]] = {}
        """Tracked tensors by where the graph's tensor they stand for kept its memory."""
        self.metas: dict[int, torch.Tensor] = {}

    def fetch(self, n: torch.fx.Node) -> Any:
        value: Any = self.gm
        for part in str(n.target).split("."):
            value = getattr(value, part)
        return value

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
    def track(self, value: Any, origin: Origin) -> Any:
        """``value``, each tensor in it noted as standing for ``origin`` (a node's value), at
        its key path in ``value``."""
        name, base = origin

        def leaf(t: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
            self.origin[id(t)] = where = (name, (*base, *path))
            self.keep.append(t)
            self.by_storage.setdefault(self._storage(where), []).append(t)
            return t

        return rebuild(value, leaf)

    def made(self, t: torch.Tensor) -> torch.Tensor:
        self.origin[id(t)] = ("made", t)
        self.keep.append(t)
        return t

    def _origin(self, t: torch.Tensor) -> Origin:
        got = self.origin.get(id(t))
        if got is not None:
            return got
        if id(t) in self.attrs:
            return ("attr", (id(t),))
        raise Differs(f"eager computes with a tensor the graph never had ({tuple(t.shape)} {t.dtype})")

    def _constant(self, t: torch.Tensor) -> bool:
        origin = self.origin.get(id(t))
        return origin[0] == "made" if origin is not None else id(t) in self.attrs and t.device.type != "meta"

    def _meta(self, v: Any) -> Any:
        """An eager value with every real tensor as a meta tensor of its layout (one per tensor)."""
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            return v
        got = self.metas.get(id(v))
        if got is None:
            got = self.metas[id(v)] = standin(v)
            self.keep.append(v)
        return got

    # matching
    def same(self, g: Any, e: Any) -> None:
        """Raise :class:`Differs` unless eager's value ``e`` is the graph's ``g`` (its ``at``
        says where inside them, for the message)."""
        if isinstance(g, torch.fx.Node):
            name = g.name
            if name in self.sk.plain:
                self.same(self.sk.plain[name], e)
            elif name in self.sk.containers:
                node, base = self.canon[name]
                rebuild(e, lambda t, path: self._same_tensor(g, t, (node, (*base, *path))))
            else:
                self._same_tensor(g, e, self.canon[name])
            return
        if isinstance(g, (tuple, list)) and isinstance(e, (tuple, list)) and len(g) == len(e):
            for i in range(len(g)):
                try:
                    self.same(g[i], e[i])
                except Differs as err:
                    err.at.append(i)
                    raise
            return
        if isinstance(g, dict) and isinstance(e, dict) and list(g) == list(e):
            for k in g:
                try:
                    self.same(g[k], e[k])
                except Differs as err:
                    err.at.append(k)
                    raise
            return
        if isinstance(g, slice) and isinstance(e, slice):
            for part in ("start", "stop", "step"):
                self.same(getattr(g, part), getattr(e, part))
            return
        if isinstance(g, torch.device) and isinstance(e, torch.device) and e.type == "meta":
            return  # a device read from a stand-in: the graph read its tensor's own
        if isinstance(e, torch.Tensor) or not isinstance(e, (*PLAIN_TYPES, tuple, list, dict)):
            raise Differs(f"eager passes {type(e).__name__} where the graph passes {_short(g)}")
        try:
            equal = bool(g == e)
        except Exception:
            equal = False
        if not equal:
            raise Differs(f"eager passes {_short(e)}, the graph {_short(g)}")

    def _same_tensor(self, g: torch.fx.Node, t: Any, want: Origin) -> Any:
        if not isinstance(t, torch.Tensor):
            raise Differs(f"eager passes {type(t).__name__} where the graph passes {g.name}")
        got = self.origin.get(id(t)) or self._origin(t)
        if got == want:
            return t
        if got[0] == "made" and want[0] == "attr":
            ref = self.attrs[want[1][0]]
            if ref.dtype == got[1].dtype and ref.shape == got[1].shape and torch.equal(ref, got[1]):
                return t
            raise Differs(f"eager makes another constant than the graph's {g.target}")
        raise Differs(f"eager passes {_name(got)} where the graph passes {_name(want)}")

    def _next(self, calls: list[Call], kwargs: dict[str, Any]) -> torch.fx.Node | str:
        """The graph's next call when it is one of ``calls``, else why not."""
        if self.pos >= len(self.calls):
            return "after the graph's last call"
        n = self.calls[self.pos]
        gkey, gargs = self.keys[self.pos]
        why: str = f"where the graph calls {n.name} ({getattr(n.target, '__name__', n.target)})"
        first = True
        for key, args in calls:
            if key != gkey:
                continue
            what = "argument"
            try:
                self.same(tuple(gargs), tuple(args))
                what = "keyword argument"
                self.same(dict(n.kwargs), kwargs)
            except Differs as e:
                if first:  # the arguments as written (a swapped order is only a second try)
                    at = "".join(f"[{k!r}]" for k in reversed(e.at))
                    why, first = f"with other inputs than the graph's {n.name}: {what}{at}: {e}", False
                continue
            self.pos += 1
            node: torch.fx.Node = n
            return node
        return why

    def answer(self, n: torch.fx.Node, tensors: list[torch.Tensor], eager_writes: torch.Tensor | None) -> Any:
        """The result of graph call ``n`` as eager gets it (stand-ins), after its in-place
        writes: inputs the graph's call wrote stand for ``n`` from now on; a write eager makes
        and the graph does not (``+=`` recorded as ``+``) also makes every other tensor on
        that memory unusable (eager changed it, the graph did not)."""
        written = self.sk.written.get(n.name, ())
        graph_wrote = {self.canon[p] for p in written}
        eager_only = eager_writes is not None and self.origin.get(id(eager_writes)) not in graph_wrote
        for p in written:
            self.canon[p] = (n.name, ())
        for t in tensors:
            if self.origin.get(id(t)) in graph_wrote:
                self.origin[id(t)] = (n.name, ())
        if eager_only and eager_writes is not None:
            self._stale(eager_writes, n)
            self.origin[id(eager_writes)] = (n.name, ())
        if n.name in self.sk.plain:
            return self.sk.plain[n.name]
        value = self.sk.values[n.name]
        if isinstance(value, Leaf):  # the common case, without the walks
            t = value.standin()
            self.origin[id(t)] = (n.name, ())
            self.keep.append(t)
            self.by_storage.setdefault(value.storage, []).append(t)
            return t
        return self.track(rebuild(value, lambda leaf, _: leaf.standin()), (n.name, ()))

    def _stale(self, written: torch.Tensor, n: torch.fx.Node) -> None:
        storage = self._storage(self.origin.get(id(written)))
        # the tensors on that memory; on memory it cannot place, every tracked tensor
        for t in self.by_storage.get(storage, ()) if storage is not None else self.keep:
            if t is not written and isinstance(t, torch.Tensor) and id(t) in self.origin:
                self.origin[id(t)] = ("stale", n.name)

    def _storage(self, origin: Origin | None) -> int | None:
        """Where the graph's tensor of ``origin`` kept its memory (None: unknown)."""
        if origin is None or origin[0] in ("attr", "made", "stale"):
            return None
        value: Any = self.sk.values.get(origin[0])
        for key in origin[1]:
            value = value[key] if value is not None else None
        return value.storage if isinstance(value, Leaf) else None

    def leaf(self, target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A leaf module's call (or a function fx keeps whole): the graph's next call."""
        with torch._C.DisableTorchFunction(), _own_work():  # the replay's own work, not the model's calls
            n = self._next(
                [(("module", target), args)] if isinstance(target, str) else [(("fn", target), args)], kwargs
            )
            if isinstance(n, str):
                raise Differs(f"eager calls {getattr(target, '__name__', target)} {n}")
            return self.answer(n, tensors_in(args, kwargs), None)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        calls = eager_calls(func, tuple(args), self.methods)
        tensors = tensors_in(args, kwargs)
        with _own_work():
            n = self._next(calls, kwargs)
            if not isinstance(n, str):
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                return self.answer(n, tensors, first if writes_first(func, self.methods) else None)
        if all(self._constant(t) for t in tensors):
            # from the model's constants only (buffers fx does not trace, tensors its code
            # makes): fx ran it while tracing and keeps the result as a constant. It runs for
            # real, under the caller's guard on the user's weights
            out = func(*args, **kwargs)
            return out if is_plain(out) else rebuild(out, lambda t, _: self.made(t))
        with _own_work():  # a call that only reads metadata (x.shape, x.size(0)), on the stand-ins
            margs, mkwargs = mapped((args, kwargs), self._meta)
            metas = tensors_in(margs, mkwargs)
            before = [t._version for t in metas]
            out = func(*margs, **mkwargs)
            if is_plain(out) and before == [t._version for t in metas]:
                return out
        raise Differs(f"eager calls {getattr(func, '__name__', func)} {n}")


def _own_work() -> Any:
    """The replay's own tensors (stand-ins, meta tensors) bypass dispatch modes, the caller's
    guard among them: they hold no memory a write could reach, and a Python mode costs more
    than them."""
    return torch._C._DisableTorchDispatch()


def _name(origin: Origin) -> str:
    if origin[0] == "attr":
        return "a model attribute"
    if origin[0] == "stale":
        return f"a tensor on memory eager changed in place at {origin[1]} (the graph copies it there)"
    if origin[0] == "made":
        return "a constant"
    return str(origin[0]) + "".join(f"[{k!r}]" for k in origin[1])


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
