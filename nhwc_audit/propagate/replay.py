"""Fidelity check of an fx capture without a second forward pass.

A symbolic trace can differ from what the model does eagerly (``isinstance`` checks on
proxies, ``try/except`` around traced code, fx-only branches). The plain check runs the
model eagerly once more and compares outputs: one whole forward. The replay check gets the
same answer for the cost of the model's Python: while the graph is propagated, every leaf
module call (``call_module`` node) keeps its inputs and output (:class:`LeafCalls`); then
the model runs eagerly with each leaf module's call replaced by the recorded one
(:func:`replay`). Everything between leaf modules (adds, cats, reshapes, functional calls)
runs for real, every leaf call's inputs are compared with the inputs the graph gave it, and
the final outputs with the graph's: a graph that differs from eager shows up at the first
leaf call or output it changes.

The check is conservative: whenever it cannot tell (a leaf call it has no record of, a
recorded tensor changed in place since it was recorded, too much to keep, a value that
differs for any reason such as random ops), it answers with a reason and the caller runs
the plain check instead, which decides.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import first_line
from .compare import tensor_difference

__all__ = ["DEFAULT_BUDGET_BYTES", "LeafCalls", "replay"]

DEFAULT_BUDGET_BYTES = 2 * 1024**3
"""What :class:`LeafCalls` may keep alive (about every activation of one forward); past it
the replay check is off and the plain check runs."""


class _Slot:
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
class _Call:
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
        self.calls: dict[str, list[_Call]] = {}
        self.budget = budget_bytes
        self.batch = batch
        self.kept = 0
        self._storages: set[int] = set()
        self._slots: dict[int, tuple[weakref.ref[torch.Tensor], dict[int, _Slot]]] = {}
        """id(graph tensor) -> (weak reference to it, {version: slot}); a weak reference, so
        that a stand-in does not keep its tensor's memory alive."""
        self._watched: dict[int, list[tuple[_Slot, torch.Tensor]]] = {}
        """storage -> slots compared by value that still hold the graph's own tensor."""
        self.off: str | None = None
        """Why the record is unusable (None while it is usable)."""

    def _first(self, t: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return t
        rows = t.shape[0] // self.batch if t.dim() >= 1 and t.shape[0] % self.batch == 0 else 0
        return t[:rows] if rows else t

    def _fill(self, slot: _Slot, t: torch.Tensor) -> None:
        if self.batch is None:
            slot.value = t
        else:
            with _own_ops():
                slot.value = self._first(t).clone()
        slot.check = slot.value._version
        self._keep([slot.value])

    def _slot(self, t: torch.Tensor, *, real: bool, by_value: bool = False, upgrade: bool = True) -> _Slot:
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
            slot = per[t._version] = _Slot()
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
            self.calls.setdefault(target, []).append(_Call(leaves, spec, result))


class _Differs(Exception):
    pass


def _same(x: Any, y: Any, handed: dict[int, int], what: str) -> None:
    """Raise :class:`_Differs` unless eager's ``x`` is the graph's ``y`` (a slot, or a plain
    value)."""
    check = None
    if isinstance(y, _Slot):
        y, check = y.value, y.check
    if isinstance(y, torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise _Differs(f"{what}: eager passes {type(x).__name__} where the graph passes a tensor")
        if x is y:
            # the very tensor the replay handed out: fine unless eager changed it since
            expected = handed.get(id(x), check)
            if expected is None or x._version != expected:
                raise _Differs(f"{what}: changed in place since it was recorded")
            return
        if x.device.type == "meta" or y.device.type == "meta":
            raise _Differs(f"{what}: eager computes with a value the graph only passes between leaf modules")
        if check is not None and y._version != check:
            raise _Differs(f"{what}: the recorded input changed in place after the call")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise _Differs(f"{what}: eager gives {tuple(x.shape)} {x.dtype}, the graph {tuple(y.shape)} {y.dtype}")
        diff = tensor_difference(x, y)
        if diff is not None:
            raise _Differs(f"{what}: {diff}")
        return
    try:
        same = bool(x == y)
    except Exception:
        same = False
    if not same and x is not y:
        raise _Differs(f"{what}: eager passes {_short(x)}, the graph {_short(y)}")


def _plain(v: Any) -> Any:
    """Mappings as plain dicts and lists as plain lists: fx returns ``{...}`` where eager
    code returns an OrderedDict (torchvision's segmentation models)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if type(v) is tuple:
        return tuple(_plain(x) for x in v)
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _handed_out(result: Any, handed: dict[int, int]) -> Any:
    """A recorded result with its slots resolved, noting each tensor's version as handed out."""

    def value(v: Any) -> Any:
        if isinstance(v, _Slot):
            handed[id(v.value)] = v.value._version
            return v.value
        return v

    return tree_map(value, result, is_leaf=lambda v: isinstance(v, _Slot))


@contextlib.contextmanager
def _replaced(model: nn.Module, calls: LeafCalls, handed: dict[int, int], used: dict[str, int]) -> Iterator[None]:
    patched: list[nn.Module] = []

    def make(target: str) -> Any:
        recorded = calls.calls[target]

        def call(*args: Any, **kwargs: Any) -> Any:
            i = used.get(target, 0)
            used[target] = i + 1
            if i >= len(recorded):
                raise _Differs(f"eager calls {target} {i + 1} times, the graph {len(recorded)}")
            c = recorded[i]
            if c.spec is None and not kwargs and len(args) == len(c.leaves):
                leaves, spec = list(args), None  # the graph passed tensors only; _same checks each
            else:
                leaves, spec = tree_flatten((args, kwargs))
            if spec != c.spec:
                raise _Differs(f"{target} (call {i + 1}): eager passes other arguments than the graph")
            for j, (x, y) in enumerate(zip(leaves, c.leaves, strict=True)):
                _same(x, y, handed, f"{target} (call {i + 1}) input {j}")
            return _handed_out(c.result, handed)

        return call

    try:
        for target in calls.calls:
            mod = model.get_submodule(target)
            if "_call_impl" in mod.__dict__:
                raise _Differs(f"{target} already replaces its call")
            mod._call_impl = make(target)  # type: ignore[method-assign]  # instance attribute: hooks included
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.__dict__["_call_impl"]


def replay(
    model: nn.Module,
    calls: LeafCalls,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    graph_out: Any,
) -> str | None:
    """Run ``model`` eagerly (the caller sets seeds, autocast and guards) with its leaf module
    calls replaced by ``calls``; None when every leaf call and the output match the graph's
    (``graph_out``, the propagation's output, unchanged since), else why the replay cannot
    vouch for the graph."""
    if calls.off is not None:
        return calls.off
    want_slots = calls.slots(graph_out)
    handed: dict[int, int] = {}
    used: dict[str, int] = {}
    try:
        with _replaced(model, calls, handed, used), torch.no_grad():
            out = model(*args, **kwargs)
        for target, recorded in calls.calls.items():
            if used.get(target, 0) != len(recorded):
                raise _Differs(f"eager calls {target} {used.get(target, 0)} times, the graph {len(recorded)}")
        got, got_spec = tree_flatten(_plain(out))
        want, want_spec = tree_flatten(_plain(want_slots), is_leaf=lambda v: isinstance(v, _Slot))
        if got_spec != tree_flatten(_plain(graph_out))[1]:
            raise _Differs("eager returns another output structure than the graph")
        for j, (x, y) in enumerate(zip(got, want, strict=True)):
            _same(x, y, handed, f"output {j}")
    except _Differs as e:
        return str(e)
    except Exception as e:
        return f"the replay raised {first_line(e)}"
    return None
