"""What a propagation leaves for the replay check (:mod:`.replay`): the graph's run in outline,
with no activation kept (:class:`Skeleton`).

Per node: its value's layout when it holds tensors (shape, strides, dtype and storage of each;
a tuple, list or dict of them kept as such), its value itself when it holds none (``x.size(0)``,
a shape), and which input nodes it wrote to in place.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..tensors import is_plain_dense

__all__ = ["PLAIN_TYPES", "Leaf", "Skeleton", "Unsupported", "extent", "is_plain", "rebuild", "standin"]

PLAIN_TYPES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format, slice)
"""Values a node may hold that the replay compares by value (with tuples, lists and dicts of
them, ``torch.Size`` among the tuples)."""


class Unsupported(Exception):
    """A value the replay cannot stand in for (another container type, a tensor subclass)."""


def _plain_dense(t: torch.Tensor) -> None:
    if not is_plain_dense(t):
        raise Unsupported(f"a {type(t).__name__} ({t.layout}) value")


class Leaf:
    """One tensor of a node's value, as the replay stands in for it: shape, strides, dtype,
    device, and the bytes of memory it spans (:attr:`memory`: tensors that overlap there
    alias; a freed block may be reused by a later tensor, which only ever makes the replay
    more careful)."""

    __slots__ = ("device", "dtype", "offset", "shape", "storage", "stride")

    def __init__(self, t: torch.Tensor) -> None:
        _plain_dense(t)
        self.shape = t.shape
        self.stride = t.stride()
        self.dtype = t.dtype
        self.device = t.device
        self.storage = t.untyped_storage().data_ptr()
        self.offset = t.storage_offset()

    @property
    def memory(self) -> tuple[int, int, int]:
        """(storage, first byte, byte past the last) it spans (worked out when asked: rarely)."""
        return _span(self.storage, int(self.offset), self.shape, self.stride, self.dtype.itemsize)

    def standin(self) -> torch.Tensor:
        """A meta-device tensor of this shape, strides and dtype: no memory, no values."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def _span(storage: int, offset: int, shape: Any, stride: Any, size: int) -> tuple[int, int, int]:
    lo = offset * size
    if any(n == 0 for n in shape):
        return storage, lo, lo
    span = 1 + sum((int(n) - 1) * abs(int(st)) for n, st in zip(shape, stride, strict=True))
    return storage, lo, lo + span * size


def extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, byte past the last) of the memory a dense tensor spans."""
    return _span(t.untyped_storage().data_ptr(), int(t.storage_offset()), t.shape, t.stride(), t.element_size())


def standin(t: torch.Tensor) -> torch.Tensor:
    """A meta-device tensor of ``t``'s shape, strides and dtype."""
    _plain_dense(t)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def rebuild(value: Any, leaf: Callable[[Any, tuple[Any, ...]], Any], path: tuple[Any, ...] = ()) -> Any:
    """``value`` with each tensor (or :class:`Leaf`) replaced by ``leaf(it, path)`` (its index
    and key path in tuples, lists and dicts); plain values as they are. Raises
    :class:`Unsupported` for any other value holding a tensor."""
    if isinstance(value, (torch.Tensor, Leaf)):
        return leaf(value, path)
    kind = type(value)
    if kind in (tuple, list):
        return kind(rebuild(v, leaf, (*path, i)) for i, v in enumerate(value))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return kind(*(rebuild(v, leaf, (*path, i)) for i, v in enumerate(value)))
    if isinstance(value, tuple) and kind.__module__ == "torch.return_types":  # torch.max(x, 1)
        return kind([rebuild(v, leaf, (*path, i)) for i, v in enumerate(value)])
    if kind in (dict, OrderedDict):
        return kind((k, rebuild(v, leaf, (*path, k))) for k, v in value.items())
    if is_plain(value):
        return value
    raise Unsupported(f"a {kind.__name__} value")


def is_plain(value: Any) -> bool:
    """``value`` holds no tensor and is made of :data:`PLAIN_TYPES`, tuples, lists and dicts."""
    if isinstance(value, PLAIN_TYPES):
        return True
    if type(value) in (tuple, list, torch.Size):
        return all(is_plain(v) for v in value)
    if type(value) in (dict, OrderedDict):
        return all(is_plain(v) for v in value.values())
    return False


class Skeleton:
    """One propagation in outline, as the replay needs it (see the module docstring)."""

    def __init__(self) -> None:
        self.plain: dict[str, Any] = {}
        """Node name -> its value, for nodes whose value holds no tensor."""
        self.values: dict[str, Any] = {}
        """Node name -> its value with each tensor as a :class:`Leaf`."""
        self.containers: set[str] = set()
        """Nodes whose value is a tuple, list or dict holding tensors."""
        self.written: dict[str, tuple[str, ...]] = {}
        """Node name -> the input nodes whose tensors it wrote to in place."""
        self.same: dict[str, str] = {}
        """Node name -> the input node whose tensor its value is (``x.contiguous()`` of a
        contiguous tensor, an Identity, an in-place method's result)."""
        self.off: str | None = None
        """Why the skeleton is unusable (None while it is usable)."""

    def disable(self, why: str) -> None:
        if self.off is None:
            self.off = why
            self.plain.clear()
            self.values.clear()

    def note(
        self, n: torch.fx.Node, inputs: list[tuple[str | None, torch.Tensor]], versions: list[int], value: Any
    ) -> None:
        """Note node ``n``'s ``value``; ``inputs``: (producer node, tensor) of what it read, with
        their ``_version`` before it ran."""
        if self.off is not None or n.op == "output":
            return
        if versions:
            written = [p for (p, t), v in zip(inputs, versions, strict=True) if p is not None and t._version != v]
            if written:
                self.written[n.name] = tuple(dict.fromkeys(written))
        try:
            if isinstance(value, torch.Tensor):
                self.values[n.name] = Leaf(value)
                same = next((p for p, t in inputs if t is value and p is not None), None)
                if same is not None:
                    self.same[n.name] = same
            elif is_plain(value):
                self.plain[n.name] = value
            else:
                self.values[n.name] = rebuild(value, lambda t, _: Leaf(t))
                self.containers.add(n.name)
        except Unsupported as e:
            self.disable(f"node {n.name} gives {e}")
