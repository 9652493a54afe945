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
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import first_line
from .compare import tensor_difference
from .leaf_calls import LeafCalls, Slot

__all__ = ["replay"]


class _Differs(Exception):
    pass


def _same(x: Any, y: Any, handed: dict[int, int], what: str) -> None:
    """Raise :class:`_Differs` unless eager's ``x`` is the graph's ``y`` (a slot, or a plain
    value)."""
    check = None
    if isinstance(y, Slot):
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
        if isinstance(v, Slot):
            handed[id(v.value)] = v.value._version
            return v.value
        return v

    if isinstance(result, Slot):  # the common case, without pytree's walk
        return value(result)
    return tree_map(value, result, is_leaf=lambda v: isinstance(v, Slot))


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
        modules = dict(model.named_modules())
        for target in calls.calls:
            mod = modules.get(target) or model.get_submodule(target)
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
        want, want_spec = tree_flatten(_plain(want_slots), is_leaf=lambda v: isinstance(v, Slot))
        if got_spec != tree_flatten(_plain(graph_out))[1]:
            raise _Differs("eager returns another output structure than the graph")
        for j, (x, y) in enumerate(zip(got, want, strict=True)):
            _same(x, y, handed, f"output {j}")
    except _Differs as e:
        return str(e)
    except Exception as e:
        return f"the replay raised {first_line(e)}"
    return None
