"""Fidelity check of an fx capture without a second forward and without keeping activations.

A symbolic trace can differ from what the model does eagerly (``isinstance`` checks on
proxies, ``try/except`` around traced code, fx-only branches, an in-place ``+=`` that fx
records out of place). The plain check runs the model eagerly once more and compares
outputs: one whole forward. The replay gets the same answer for the cost of the model's
Python: the model runs eagerly on meta-device stand-ins of the sample, and every call that
makes or writes a tensor (a leaf module, a torch function, a method, an operator, a function
fx was told to keep whole) is matched, in order, with the graph's next call, and answered
with stand-ins of what the graph's call returned (:class:`.skeleton.Skeleton`: shapes,
strides and dtypes, no values). A call matches when it is the same module or function with
the same plain arguments and tensors that come from the same nodes; what each eager tensor
stands for is tracked through every call and in-place write. Calls that are the same on the
same inputs compute the same values, so a graph that matches call for call, and returns the
same nodes, computes what eager computes; a graph that differs shows up at the first call it
changes. Calls that only read metadata (``x.shape``, ``x.size(0)``) run on the stand-ins;
their results are compared where they are used.

Like fx itself, the replay takes a leaf module call, and a call of a function the model marks
with ``torch.fx.wrap``, as a call whose effect is its result: a Python side effect inside one
(a list it appends to, an attribute it sets) that the forward reads later is not seen.
Models with hooks are left to the full check (a hook is code eager runs that fx does not).

The check is conservative: whenever it cannot tell (a call on values, such as ``.item()``,
that meta tensors cannot run, a value it cannot stand in for, an in-place write eager makes
where the graph makes a copy while another view of that memory is still used), it answers
with a reason and the caller runs the plain check instead, which decides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from ..errors import first_line
from .fresh_args import fresh
from .replay_state import ReplayState
from .replay_values import Differs
from .skeleton import Skeleton, Unsupported, is_plain, rebuild, standin

__all__ = ["replay"]

_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks")
"""A module's own hook tables."""
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
"""torch.nn's tables of hooks for every module (``register_module_forward_hook``)."""


def _wrap_registry() -> list[tuple[dict[str, Any], str]]:
    """(module namespace, name) of each function ``torch.fx.wrap`` registered: fx's tracer
    patches those names there, and so does the replay (torch keeps no public list of them)."""
    from torch.fx import _symbolic_trace

    registry = getattr(_symbolic_trace, "_wrapped_fns_to_patch", {})
    return [(where, key[1]) for key, where in registry.items() if isinstance(where, dict) and len(key) == 2]


@contextlib.contextmanager
def _answered(
    gm: nn.Module, modules: dict[str, nn.Module], graph: torch.fx.Graph, state: ReplayState
) -> Iterator[None]:
    """Leaf module calls, and calls of the functions fx keeps whole (``torch.fx.wrap``: where
    they are defined), answered by ``state``; ``modules``: ``gm``'s named modules."""
    patched: list[nn.Module] = []
    wrapped: list[tuple[dict[str, Any], str, Any]] = []

    def make(target: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return state.leaf(target, args, kwargs)

        return call

    try:
        kept_whole = {id(n.target) for n in graph.nodes if n.op == "call_function"}
        for where, name in _wrap_registry():
            fn = where.get(name)
            if fn is not None and id(fn) in kept_whole:
                where[name] = make(fn)
                wrapped.append((where, name, fn))
        for target in dict.fromkeys(str(n.target) for n in graph.nodes if n.op == "call_module"):
            mod = modules[target] if target in modules else gm.get_submodule(target)
            if "_call_impl" in mod.__dict__:
                raise Differs(f"{target} already replaces its call")
            mod.__dict__["_call_impl"] = make(target)  # shadows the class's method: hooks included
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.__dict__["_call_impl"]
        for where, name, fn in reversed(wrapped):
            where[name] = fn


def replay(
    model: nn.Module,
    graph: torch.fx.Graph,
    skeleton: Skeleton,
    inputs: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str | None:
    """Run ``model`` (the root of ``graph``; the caller sets autocast, guards and autograd) eagerly on
    stand-ins of the sample (``args``, ``kwargs``; ``inputs``: placeholder name -> its value)
    with its calls answered from ``skeleton``; None when every call and the output match the
    graph's, else why the replay cannot vouch for the graph."""
    if skeleton.off is not None:
        return skeleton.off
    modules = dict(model.named_modules())
    hooked = [name or "the model" for name, m in modules.items() if any(map(m.__dict__.get, _HOOKS))]
    if hooked or any(getattr(_nn_module, name, None) for name in _GLOBAL_HOOKS):
        where = ", ".join(hooked[:3]) + (", ..." if len(hooked) > 3 else "") if hooked else "every module"
        return f"hooks on {where}: the replay cannot run them on stand-ins"
    try:
        state = ReplayState(model, modules.values(), graph, skeleton)
        by_value = {id(v): name for name, v in inputs.items()}

        def stand(v: Any) -> Any:
            name = by_value.get(id(v))
            if name is None:
                if is_plain(v):
                    return v
                raise Unsupported("an input the graph has no placeholder for")
            return state.track(rebuild(v, lambda t, _: standin(t)), state.canon[name])

        eager_args = tuple(stand(a) for a in args)
        eager_kwargs = {k: stand(v) for k, v in kwargs.items()}
        with _answered(model, modules, graph, state), state:  # in the caller's autograd mode
            out = model(*eager_args, **eager_kwargs)
        if state.pos != len(state.calls):
            n = state.calls[state.pos]
            raise Differs(f"the graph calls {n.name} ({getattr(n.target, '__name__', n.target)}), eager does not")
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        try:
            state.same(fresh(output.args[0]), fresh(out))
        except Differs as e:
            raise Differs("output" + "".join(f"[{k!r}]" for k in reversed(e.at)) + f": {e}") from None
    except (Differs, Unsupported) as e:
        return str(e)
    except Exception as e:
        return f"the replay raised {first_line(e)}"
    return None
