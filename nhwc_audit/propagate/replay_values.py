"""How the replay check (:mod:`.replay`) compares eager's values with the graph's (:class:`Matching`)
and answers metadata reads on its stand-ins."""

from __future__ import annotations

import math
from typing import Any

import torch

from .call_keys import Call
from .skeleton import PLAIN_TYPES, Leaf, Skeleton, rebuild

__all__ = ["UNANSWERABLE", "Differs", "Matching", "Origin", "device_read", "same_plain", "short"]


class Differs(Exception):
    """The eager run differs from the graph: why."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.at: list[Any] = []
        """Where in the compared values, innermost first."""


UNANSWERABLE = frozenset(
    {"data_ptr", "untyped_storage", "storage", "storage_offset", "_base", "_cdata", "is_set_to", "_is_view", "set_"}
)
"""Reads a meta stand-in would answer wrongly (its memory is not the graph's tensor's)."""

_DEVICE_PROPERTIES = {
    "device": lambda d: d,
    "is_meta": lambda d: d.type == "meta",
    "is_cpu": lambda d: d.type == "cpu",
    "is_cuda": lambda d: d.type == "cuda",
    "is_mps": lambda d: d.type == "mps",
    "is_xpu": lambda d: d.type == "xpu",
}


def device_read(func: Any, device: torch.device) -> tuple[bool, Any]:
    """(True, the answer) when ``func`` reads the device of a tensor on ``device`` (a
    stand-in says 'meta' where the graph's tensor was on ``device``)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        read = _DEVICE_PROPERTIES.get(getattr(getattr(func, "__self__", None), "__name__", ""))
        if read is not None:
            return True, read(device)
    if name == "get_device":
        return True, device.index if device.index is not None else -1
    return False, None


def same_plain(g: Any, e: Any) -> bool:
    """Plain values as equal as computing with them: the same type (``2`` is not ``2.0``,
    ``True`` is not ``1``), floats to the sign of zero and NaN."""
    if isinstance(g, torch.device) and isinstance(e, torch.device) and e.type == "meta":
        return True  # a device read from a stand-in: the graph read its tensor's own
    if type(g) is not type(e):
        return False
    if isinstance(g, float):
        return (g == e and math.copysign(1.0, g) == math.copysign(1.0, e)) or (math.isnan(g) and math.isnan(e))
    if isinstance(g, complex):
        return same_plain(g.real, e.real) and same_plain(g.imag, e.imag)
    try:
        return bool(g == e)
    except Exception:
        return False


def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


Origin = tuple[Any, ...]
"""What an eager tensor stands for: ``(node name, key path)`` in the graph, ``("attr", (id,))``
for a parameter, buffer or tensor attribute of the model, ``("made", tensor)`` for a
constant the model's code makes (fx folds those; compared by value with the graph's),
``("stale", node)`` for a tensor eager changed in place where the graph did not."""


class Matching:
    """The comparison of eager's values with the graph's, and of eager's next call with the
    graph's (the state lives in :class:`~nhwc_audit.propagate.replay_state.ReplayState`)."""

    sk: Skeleton
    canon: dict[str, Origin]
    origin: dict[int, Origin]
    attrs: dict[int, torch.Tensor]
    stale_attrs: dict[int, str]

    calls: list[torch.fx.Node]
    keys: list[Call]
    pos: int

    def resolve(self, node: str, path: tuple[Any, ...]) -> tuple[Any, ...]:
        """``path`` into node's value with negative indices and slices of tuples and lists
        turned into the positions eager's Python indexing reaches (``parts[-1]`` ->
        ``parts[3]``, ``parts[1:][0]`` -> ``parts[1]``); a trailing slice stays."""
        value: Any = self.sk.values.get(node)
        out: list[Any] = []
        i = 0
        while i < len(path):
            k = path[i]
            if isinstance(value, (tuple, list)) and isinstance(k, (int, slice)) and not isinstance(k, bool):
                positions = range(len(value))
                if isinstance(k, slice):
                    if i + 1 == len(path):
                        out.append(k)
                        break
                    positions = positions[k]
                    i += 1
                    k = path[i]
                k = positions[k]
                out.append(k)
                value = value[k]
            else:
                out.append(k)
                value = value.get(k) if isinstance(value, dict) else None
            i += 1
        return tuple(out)

    def origin_of(self, t: torch.Tensor) -> Origin:
        got = self.origin.get(id(t))
        if got is not None:
            return got
        if id(t) in self.attrs:
            stale = self.stale_attrs.get(id(t))
            return ("stale", stale) if stale is not None else ("attr", (id(t),))
        raise Differs(f"eager computes with a tensor the graph never had ({tuple(t.shape)} {t.dtype})")

    def same(self, g: Any, e: Any) -> None:
        """Raise :class:`Differs` unless eager's value ``e`` is the graph's ``g`` (its ``at``
        says where inside them, for the message)."""
        if isinstance(g, torch.fx.Node):
            name = g.name
            if name in self.sk.plain:
                self.same(self.sk.plain[name], e)
            elif name in self.sk.containers:
                node, base = self.canon[name]
                if _nesting(self.sk.values[name]) != _nesting(e):
                    raise Differs(f"eager passes {short(e)} where the graph passes {name}")
                rebuild(e, lambda t, path: self._same_tensor(g, t, (node, self.resolve(node, (*base, *path)))))
            else:
                self._same_tensor(g, e, self.canon[name])
            return
        keys: Any = None
        if isinstance(g, (tuple, list)) and isinstance(e, (tuple, list)):
            named = hasattr(g, "_fields") or hasattr(e, "_fields")
            if len(g) != len(e) or isinstance(g, list) != isinstance(e, list) or (named and type(g) is not type(e)):
                raise Differs(f"eager passes {short(e)} where the graph passes {short(g)}")
            keys = range(len(g))
        elif isinstance(g, dict) and isinstance(e, dict) and list(g) == list(e):
            keys = list(g)
        if keys is not None:
            for k in keys:
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
        if isinstance(e, torch.Tensor) or not isinstance(e, PLAIN_TYPES) or not same_plain(g, e):
            raise Differs(f"eager passes {short(e)} ({type(e).__name__}), the graph {short(g)}")

    def _same_tensor(self, g: torch.fx.Node, t: Any, want: Origin) -> Any:
        if not isinstance(t, torch.Tensor):
            raise Differs(f"eager passes {type(t).__name__} where the graph passes {g.name}")
        got = self.origin.get(id(t)) or self.origin_of(t)
        if got == want:
            return t
        if got[0] == "made" and want[0] == "attr":
            ref = self.attrs[want[1][0]]
            if ref.dtype == got[1].dtype and ref.shape == got[1].shape and torch.equal(ref, got[1]):
                return t
            raise Differs(f"eager makes another constant than the graph's {g.target}")
        raise Differs(f"eager passes {origin_name(got)} where the graph passes {origin_name(want)}")

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


def origin_name(origin: Origin) -> str:
    """How a message names what an eager tensor stands for."""
    if origin[0] == "attr":
        return "a model attribute"
    if origin[0] == "stale":
        return f"a tensor on memory eager changed in place at {origin[1]} (the graph copies it there)"
    if origin[0] == "made":
        return "a constant"
    return str(origin[0]) + "".join(f"[{k!r}]" for k in origin[1])


def _nesting(v: Any) -> Any:
    """A value's nesting: containers with their lengths and keys, each tensor as one mark."""
    if isinstance(v, (tuple, list)):
        return (len(v), tuple(_nesting(x) for x in v))
    if isinstance(v, dict):
        return (tuple(v), tuple(_nesting(x) for x in v.values()))
    return "T" if isinstance(v, (torch.Tensor, Leaf)) else repr(v)
