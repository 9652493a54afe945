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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from ._tensors import first_line
from .errors import SharedWeightWrite

__all__ = ["DEFAULT_BUDGET_BYTES", "LeafCalls", "replay", "versions_of"]

DEFAULT_BUDGET_BYTES = 2 * 1024**3
"""What :class:`LeafCalls` may keep alive (about every activation of one forward); past it
the replay check is off and the plain check runs."""


@dataclass(frozen=True)
class _Call:
    leaves: list[Any]
    """The flattened (args, kwargs) as the graph passed them."""
    spec: Any
    """Their pytree spec; None when the graph passed positional tensors only."""
    versions: tuple[int | None, ...]
    """Each tensor leaf's version counter at the call (None for non-tensors)."""
    snapshots: list[Any]
    """Copies of tensor leaves taken just before something wrote to them in place (None for
    the leaves nothing overwrote, and for those the replay matches by identity)."""
    result: Any


_Noted = tuple[list[Any], Any, tuple[int | None, ...], list[Any]]


class LeafCalls:
    """What each leaf module call of a propagation was given and returned, per module path.

    With ``batch=None`` the record keeps the graph's own tensors (the replay then runs on the
    same sample); an input the replay compares by value is copied only when an op is about to
    write to it in place (:meth:`before_write`, called by the propagation's dispatch mode).
    With ``batch=B`` it keeps a private copy of the first sample of every tensor (the first
    1/B of its leading dim when B divides it: batch-major reshapes such as attention windows
    keep sample 0 there; other tensors whole), one copy per tensor and version, so that the
    replay runs on one sample: keeping every activation of a whole batch would cost more than
    the check (fresh memory for each one)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, *, batch: int | None = None) -> None:
        self.calls: dict[str, list[_Call]] = {}
        self.budget = budget_bytes
        self.batch = batch
        self.kept = 0
        self._storages: set[int] = set()
        self._results: set[int] = set()
        """``id()`` of every tensor a recorded call returned (kept alive by the record)."""
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """batch mode: graph tensor -> {version: its first sample's copy}."""
        self._watched: dict[int, list[tuple[torch.Tensor, int, list[Any], int]]] = {}
        """storage -> (tensor, version, snapshots list, index) of recorded inputs that the
        replay compares by value: copied before anything writes to that storage."""
        self.off: str | None = None
        """Why the record is unusable (None while it is usable)."""

    def sample(self, value: Any) -> Any:
        """batch mode: ``value`` with each tensor replaced by its first sample's copy (the same
        copy for the same tensor in the same state, so identities carry over)."""
        if self.batch is None:
            return value
        return tree_map(lambda v: self._sample(v) if isinstance(v, torch.Tensor) else v, value)

    def _sample(self, t: torch.Tensor) -> torch.Tensor:
        if t in self._copies:
            per: dict[int, torch.Tensor] = self._copies[t]
        else:
            per = self._copies[t] = {}
        copy = per.get(t._version)
        if copy is None:
            rows = t.shape[0] // self.batch if t.dim() >= 1 and self.batch and t.shape[0] % self.batch == 0 else 0
            copy = (t[:rows] if rows else t).clone()
            per[t._version] = copy
        return copy

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
            self._results.clear()
            self._watched.clear()
            self._copies = WeakIdKeyDictionary()

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Noted | None:
        """Note a leaf call's inputs just before it runs."""
        if self.off is not None:
            return None
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            leaves, spec = list(args), None  # the common case, without pytree's cost
        else:
            leaves, spec = tree_flatten((tuple(args), dict(kwargs)))  # fx hands immutable_list/dict
        if self.batch is not None:
            leaves = [self._sample(t) if isinstance(t, torch.Tensor) else t for t in leaves]
        versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in leaves)
        snapshots: list[Any] = [None] * len(leaves)
        if self.batch is None:
            # the replay hands eager the tensors leaf calls returned and matches those by identity;
            # any other input is compared by value, so watch it for in-place writes
            for j, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and id(t) not in self._results:
                    entry = (t, t._version, snapshots, j)
                    self._watched.setdefault(t.untyped_storage().data_ptr(), []).append(entry)
        self._keep(leaves)
        return leaves, spec, versions, snapshots

    def before_write(self, t: torch.Tensor) -> None:
        """An op is about to write to ``t`` in place: copy the recorded inputs on its storage
        that still hold the value they had at their call."""
        entries = self._watched.pop(t.untyped_storage().data_ptr(), None) if self._watched else None
        for tensor, version, snapshots, j in entries or ():
            if tensor._version == version and snapshots[j] is None:
                snapshots[j] = tensor.clone()
                self._keep([snapshots[j]])

    def after(self, target: str, noted: _Noted | None, result: Any) -> None:
        if self.off is not None or noted is None:
            return
        result = self.sample(result)
        out = [result] if isinstance(result, torch.Tensor) else tree_flatten(result)[0]
        self._keep(out)
        if self.off is None:
            self.calls.setdefault(target, []).append(_Call(*noted, result=result))
            self._results.update(id(t) for t in out if isinstance(t, torch.Tensor))


class _Differs(Exception):
    pass


def _same(x: Any, y: Any, version: int | None, snapshot: Any, handed: dict[int, int], what: str) -> None:
    """Raise :class:`_Differs` unless eager's ``x`` is the graph's ``y`` (``y`` had ``version``
    at the call; ``snapshot`` is its copy from then, or None)."""
    if isinstance(y, torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise _Differs(f"{what}: eager passes {type(x).__name__} where the graph passes a tensor")
        if x is y:
            # the very tensor the graph used: fine unless eager changed it since the replay handed it out
            expected = handed.get(id(x), version)
            if expected is None or x._version != expected:
                raise _Differs(f"{what}: changed in place since it was recorded")
            return
        if isinstance(snapshot, torch.Tensor):
            y = snapshot  # its value before an in-place module overwrote it
        elif version is not None and y._version != version:
            raise _Differs(f"{what}: the recorded input changed in place after the call")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise _Differs(f"{what}: eager gives {tuple(x.shape)} {x.dtype}, the graph {tuple(y.shape)} {y.dtype}")
        if not torch.equal(x, y):
            try:
                torch.testing.assert_close(x, y, equal_nan=True, check_stride=False)
            except AssertionError:
                raise _Differs(f"{what}: values differ") from None
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
    for t in tree_flatten(result)[0]:
        if isinstance(t, torch.Tensor):
            handed[id(t)] = t._version
    return result


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
                _same(x, y, c.versions[j], c.snapshots[j], handed, f"{target} (call {i + 1}) input {j}")
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
    out_versions: tuple[int | None, ...],
) -> str | None:
    """Run ``model`` eagerly (the caller sets seeds, autocast and guards) with its leaf module
    calls replaced by ``calls``; None when every leaf call and the output match the graph's
    (``graph_out``, whose tensor leaves had ``out_versions`` when the propagation ended),
    else why the replay cannot vouch for the graph."""
    if calls.off is not None:
        return calls.off
    handed: dict[int, int] = {}
    used: dict[str, int] = {}
    try:
        with _replaced(model, calls, handed, used), torch.no_grad():
            out = model(*args, **kwargs)
        for target, recorded in calls.calls.items():
            if used.get(target, 0) != len(recorded):
                raise _Differs(f"eager calls {target} {used.get(target, 0)} times, the graph {len(recorded)}")
        got, got_spec = tree_flatten(_plain(out))
        want, want_spec = tree_flatten(_plain(graph_out))
        if got_spec != want_spec:
            raise _Differs("eager returns another output structure than the graph")
        for j, (x, y) in enumerate(zip(got, want, strict=True)):
            _same(x, y, out_versions[j], None, handed, f"output {j}")
    except _Differs as e:
        return str(e)
    except SharedWeightWrite:
        raise
    except Exception as e:
        return f"the replay raised {first_line(e)}"
    return None


def versions_of(value: Any) -> tuple[int | None, ...]:
    """Version counters of ``value``'s flattened leaves (None for non-tensors)."""
    return tuple(t._version if isinstance(t, torch.Tensor) else None for t in tree_flatten(value)[0])
