"""The record a replay check answers from: every leaf module call of a propagation, its inputs
and output, one slot per graph tensor and version (:class:`LeafCalls`). See :mod:`.replay`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DEFAULT_BUDGET_BYTES", "Call", "LeafCalls", "Slot"]

DEFAULT_BUDGET_BYTES = 2 * 1024**3
"""What :class:`LeafCalls` may keep alive (about every activation of one forward); past it
the replay check is off and the plain check runs."""


class Slot:
    """One graph tensor in one state (tensor and version) as the replay sees it."""

    __slots__ = ("check", "value")

    def __init__(self) -> None:
        self.value: torch.Tensor = _NOTHING
        """The graph's tensor itself (whole-sample record), a copy of its first sample (batch
        record), a copy taken before an in-place write, or a meta-device stand-in."""
        self.check: int | None = None
        """``value._version`` when it was stored (None for stand-ins)."""


_NOTHING = torch.empty(0, device="meta")


def _own_ops() -> Any:
    """The record's own copies and stand-ins bypass the propagation's dispatch recorder
    (they are not the model's ops, and going through Python dispatch costs more than them)."""
    return torch._C._DisableTorchDispatch()


@dataclass(frozen=True)
class Call:
    leaves: list[Any]
    """The flattened (args, kwargs) as the graph passed them, tensors as slots."""
    spec: Any
    """Their pytree spec; None when the graph passed positional tensors only."""
    result: Any
    """What the call returned, tensors as slots."""


_Noted = tuple[list[Any], Any]


class LeafCalls:
    """What each leaf module call of a propagation was given and returned, per module path.

    Every graph tensor, in each state it is seen in, becomes one slot, so the replay sees the
    same object wherever the graph used the same tensor. A tensor the graph only ever passes
    into leaf modules (``opaque``) is needed by identity only and is kept as a meta-device
    stand-in: no memory held, and any eager use of it fails the replay (the full check then
    decides). Other tensors keep their values: with ``batch=None`` the graph's own tensors
    (the replay then runs on the same sample; an input compared by value is copied only when
    an op is about to write to it in place, :meth:`before_write`); with ``batch=B`` a copy of
    the first sample (the first 1/B of the leading dim when B divides it: batch-major
    reshapes such as attention windows keep sample 0 there; other tensors whole), so that
    the replay runs on one sample: keeping a whole batch's activations would cost more than
    the check (fresh memory for each)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, *, batch: int | None = None) -> None:
        self.calls: dict[str, list[Call]] = {}
        self.budget = budget_bytes
        self.batch = batch
        self.kept = 0
        self._storages: set[int] = set()
        self._slots: dict[int, tuple[weakref.ref[torch.Tensor], dict[int, Slot]]] = {}
        """id(graph tensor) -> (weak reference to it, {version: slot}); a weak reference, so
        that a stand-in does not keep its tensor's memory alive."""
        self._watched: dict[int, list[tuple[Slot, torch.Tensor]]] = {}
        """storage -> slots compared by value that still hold the graph's own tensor."""
        self.off: str | None = None
        """Why the record is unusable (None while it is usable)."""

    def _first(self, t: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return t
        rows = t.shape[0] // self.batch if t.dim() >= 1 and t.shape[0] % self.batch == 0 else 0
        return t[:rows] if rows else t

    def _fill(self, slot: Slot, t: torch.Tensor) -> None:
        if self.batch is None:
            slot.value = t
        else:
            with _own_ops():
                slot.value = self._first(t).clone()
        slot.check = slot.value._version
        self._keep([slot.value])

    def _slot(self, t: torch.Tensor, *, real: bool, by_value: bool = False, upgrade: bool = True) -> Slot:
        """The slot of ``t`` in its current state. ``real``: the replay needs its value (a
        stand-in otherwise); ``by_value``: eager will bring its own tensor for it (an input no
        recorded call returned), so watch it for in-place writes; ``upgrade``: give an existing
        stand-in a real value."""
        entry = self._slots.get(id(t))
        if entry is None or entry[0]() is not t:  # new, or an id reused after its tensor died
            entry = self._slots[id(t)] = (weakref.ref(t), {})
        per = entry[1]
        slot = per.get(t._version)
        if slot is None:
            slot = per[t._version] = Slot()
            if real:
                self._fill(slot, t)
                if by_value and self.batch is None:
                    self._watched.setdefault(t.untyped_storage().data_ptr(), []).append((slot, t))
            else:
                first = self._first(t)
                with _own_ops():
                    slot.value = torch.empty_strided(first.shape, first.stride(), dtype=first.dtype, device="meta")
        elif real and upgrade and slot.check is None and slot.value.device.type == "meta":
            self._fill(slot, t)  # a tensor first seen as opaque turns out to be needed by value
        return slot

    def slots(self, value: Any, *, real: bool = True) -> Any:
        """``value`` with each tensor replaced by its slot."""
        return tree_map(lambda v: self._slot(v, real=real) if isinstance(v, torch.Tensor) else v, value)

    def _keep(self, leaves: list[Any]) -> None:
        for t in leaves:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() not in self._storages:
                    self._storages.add(s.data_ptr())
                    self.kept += s.nbytes()
        if self.kept > self.budget:
            self.disable(f"keeping every leaf module's inputs would hold more than {self.budget / 2**30:.0f} GiB")

    def disable(self, why: str) -> None:
        if self.off is None:
            self.off = why
            self.calls.clear()
            self._storages.clear()
            self._watched.clear()
            self._slots.clear()

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Noted | None:
        """Note a leaf call's inputs just before it runs."""
        if self.off is not None:
            return None
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            leaves, spec = list(args), None  # the common case, without pytree's cost
        else:
            leaves, spec = tree_flatten((tuple(args), dict(kwargs)))  # fx hands immutable_list/dict
        # a tensor a recorded call returned keeps its slot (eager gets it from the replay and
        # brings it back: matched by identity); any other is compared by value
        slots = [
            self._slot(t, real=True, by_value=True, upgrade=False) if isinstance(t, torch.Tensor) else t for t in leaves
        ]
        return slots, spec

    def before_write(self, t: torch.Tensor) -> None:
        """An op is about to write to ``t`` in place: copy the recorded inputs on its storage
        that still hold the value they had at their call."""
        entries = self._watched.pop(t.untyped_storage().data_ptr(), None) if self._watched else None
        for slot, tensor in entries or ():
            if slot.value is tensor and tensor._version == slot.check:
                with _own_ops():
                    slot.value = tensor.clone()
                slot.check = slot.value._version
                self._keep([slot.value])

    def after(self, target: str, noted: _Noted | None, result: Any, *, opaque: bool = False) -> None:
        """Note what a leaf call returned; ``opaque``: the graph passes it only into leaf
        modules (kept as a stand-in unless it also has a use by value)."""
        if self.off is not None or noted is None:
            return
        leaves, spec = noted
        if isinstance(result, torch.Tensor):
            result = self._slot(result, real=not opaque)  # the common case, without pytree's cost
        else:
            result = self.slots(result, real=not opaque)
        if self.off is None:
            self.calls.setdefault(target, []).append(Call(leaves, spec, result))
