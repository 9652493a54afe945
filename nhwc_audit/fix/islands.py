"""A repaired graph run with the nodes its rewrites made or changed computed in float64, the rest
in the model's own dtype: what the repair's check compares with the naive conversion.

A rewrite can pick a kernel that rounds more than the op it replaces (GroupNorm's channels_last
CPU backward, in place of InstanceNorm's: 1.3e-3 relative on the bundled UNet's gradients, the
conversion itself 4e-6). Computed in float64, the rewritten nodes round by nothing, and what is
left is the rounding of the nodes both graphs share, which the naive conversion shows too: a
repaired graph that keeps the math then sits within rounding of the naive one (2e-7 and 1e-6
on that UNet), where a changed formula still shows (an epsilon changed: 5e-5 and 2e-2). This
costs two float32 passes where a float64 check of the whole model costs ~7x as much.

Each rewritten node runs as it is first (its dtypes and layouts), then in float64 on float64
copies of its inputs and parameters; its float64 values are handed on in the first run's dtypes
and layouts, with the random state it drew from. A node that writes in place, returns something
else than tensors (a dtype, a size) or returns memory of its input (a view; ``x.float()`` is
``x``) keeps its first run: a float64 copy would not write through to the tensor the graph goes
on reading.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from ..propagate.inputs import positional_inputs

__all__ = ["in_float64", "rewritten_nodes"]

_IN_PLACE_OPERATORS = {
    operator.setitem,
    operator.delitem,
    *(getattr(operator, n) for n in dir(operator) if n.startswith("i") and n[1:] in dir(operator)),
}
"""``x[i] = v`` (returns None: no view of its input shows the write), ``x += y`` and the like."""


def rewritten_nodes(trial: torch.fx.GraphModule, base: torch.fx.GraphModule) -> frozenset[str]:
    """The nodes of ``trial`` that are not in ``base`` as they are there: a name ``base`` lacks,
    another op, target, argument or keyword, or another module object under the same target."""
    before = {n.name: n for n in base.graph.nodes}
    out: set[str] = set()
    for n in trial.graph.nodes:
        b = before.get(n.name)
        if b is None or (b.op, b.target, repr(b.args), repr(b.kwargs)) != (
            n.op,
            n.target,
            repr(n.args),
            repr(n.kwargs),
        ):
            out.add(n.name)
        elif n.op == "call_module" and trial.get_submodule(str(n.target)) is not base.get_submodule(str(n.target)):
            out.add(n.name)
    return frozenset(out)


def _writes_in_place(n: torch.fx.Node, gm: torch.nn.Module) -> bool:
    if n.kwargs.get("inplace") or "out" in n.kwargs:
        return True
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(str(n.target)), "inplace", False))
    if n.target in _IN_PLACE_OPERATORS:
        return True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _up(v: Any) -> Any:
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _storages(tree: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or any(
        t.dim() == rank and t.is_contiguous(memory_format=fmt)
        for rank, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d))
    )


def _plain(result: Any, inputs: Any) -> bool:
    """``result`` (the node run as it is) is to be kept: it holds something else than tensors (a
    dtype, a size), no floating tensor, a tensor that shares memory with an input (a view, a
    conversion to the dtype it has: ``x.float()`` is ``x``), or one not laid out densely."""
    leaves = [v for v in tree_leaves(result) if v is not None]
    if not leaves or not all(isinstance(v, torch.Tensor) for v in leaves):
        return True
    if not any(v.is_floating_point() for v in leaves) or not all(_dense(v) for v in leaves):
        return True
    return bool(_storages(leaves) & _storages(inputs))


class _Float64Islands(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, names: frozenset[str]) -> None:
        super().__init__(gm)
        self._names = names

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self._names or n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        if _writes_in_place(n, self.module):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        own = [t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not own or any(d != own[0] for d in own):
            return super().run_node(n)  # nothing to compute in float64, or a mix of dtypes to keep
        rng = torch.random.get_rng_state()
        result = getattr(self, n.op)(n.target, args, kwargs)  # as it runs: its dtypes and layouts
        if _plain(result, (args, kwargs)):
            return result
        after = torch.random.get_rng_state()
        torch.random.set_rng_state(rng)  # a random op draws what it drew as it ran
        wide_args, wide_kwargs = tree_map(_up, args), tree_map(_up, kwargs)
        if n.op == "call_module":
            mod = self.fetch_attr(str(n.target))
            state = {k: _up(v) for k, v in [*mod.named_parameters(), *mod.named_buffers()]}
            wide = torch.func.functional_call(mod, state, wide_args, wide_kwargs)
        else:
            wide = getattr(self, n.op)(n.target, wide_args, wide_kwargs)
        torch.random.set_rng_state(after)
        got, spec = tree_flatten(result)
        values, wide_spec = tree_flatten(wide)
        if spec != wide_spec:
            return result
        # the float64 values, in the dtype and layout the node gives as it runs
        return tree_unflatten(
            [w if r is None else torch.empty_like(r).copy_(w) for r, w in zip(got, values, strict=True)], spec
        )


def in_float64(trial: torch.fx.GraphModule, names: frozenset[str]) -> Callable[..., Any]:
    """Call ``trial`` as its forward is called, with the nodes ``names`` computed in float64 and
    their results handed on in the dtypes and layouts the nodes give as they run."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return _Float64Islands(trial, names).run(*positional_inputs(trial, args, kwargs), enable_io_processing=False)

    return run
