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
and layouts. A node that writes in place, draws random numbers (``rand_like`` draws other ones
in float64: the generators of the CPU and of its tensors' CUDA devices are compared), returns
something else than tensors (a dtype, a size) or returns memory of its input (a view;
``x.float()`` is ``x``) keeps its first run: a float64 copy would not write through to the
tensor the graph goes on reading.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from ..capture.proxies import node_writes
from ..propagate.fresh_args import FreshArgs
from ..propagate.inputs import positional_inputs
from ..tensors import in_a_dense_format
from .results import CONVERSION, ELEMENTS, ROUNDING, gradient_noise, within
from .runs import Results, Sample, fresh_copy, outputs

__all__ = ["CONVERSION", "KERNEL", "Float64Run", "against_naive", "naive_results", "rewritten_nodes"]


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
    if n.op == "call_module":
        module = gm.get_submodule(str(n.target))
        return bool(n.kwargs.get("inplace") or "out" in n.kwargs or getattr(module, "inplace", False))
    return node_writes(n)


def _up(v: Any) -> Any:
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _storages(tree: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _plain(result: Any, inputs: Any) -> bool:
    """``result`` (the node run as it is) is to be kept: it holds something else than tensors (a
    dtype, a size), no floating tensor, a tensor that shares memory with an input (a view, a
    conversion to the dtype it has: ``x.float()`` is ``x``), or one not laid out densely."""
    leaves = [v for v in tree_leaves(result) if v is not None]
    if not leaves or not all(isinstance(v, torch.Tensor) for v in leaves):
        return True
    if not any(v.is_floating_point() for v in leaves) or not all(map(in_a_dense_format, leaves)):
        return True
    return bool(_storages(leaves) & _storages(inputs))


def _random_states(tree: Any) -> list[torch.Tensor]:
    """The CPU generator's state, and each CUDA device's that a tensor of ``tree`` is on."""
    cuda = {t.device.index or 0 for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    return [torch.random.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in sorted(cuda))]


def _distance(got: torch.Tensor, exact: torch.Tensor) -> float:
    """``|got - exact| / |exact|`` over the finite values of ``exact`` (inf where ``got`` is not
    finite there; an exact zero makes any rounding far: the checks after decide)."""
    a, b = exact.detach().double(), got.detach().double()
    diff = b - a
    if bool(diff.isfinite().all()):  # both finite everywhere
        return float(diff.norm()) / max(float(a.norm()), 1e-30)
    finite = a.isfinite()
    if not bool(b[finite].isfinite().all()):
        return math.inf
    zero = torch.zeros_like(a)
    return float(torch.where(finite, diff, zero).norm()) / max(float(torch.where(finite, a, zero).norm()), 1e-30)


class _Float64Islands(FreshArgs):
    def __init__(self, gm: torch.fx.GraphModule, names: frozenset[str]) -> None:
        super().__init__(gm)
        self._names = names
        self.kernel_errors: list[tuple[float, str]] = []
        """(relative distance of a node's float32 result from its float64 value, node)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self._names or n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        if _writes_in_place(n, self.module):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        leaves = tree_leaves((args, kwargs))
        own_tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not own_tensors or any(t.dtype != own_tensors[0].dtype for t in own_tensors):
            return super().run_node(n)  # nothing to compute in float64, or a mix of dtypes to keep
        rng = _random_states((args, kwargs))
        result = getattr(self, n.op)(n.target, args, kwargs)  # as it runs: its dtypes and layouts
        drew = any(not torch.equal(a, b) for a, b in zip(rng, _random_states((args, kwargs)), strict=True))
        if drew or _plain(result, (args, kwargs)):
            return result  # ... or it drew random numbers (rand_like draws others in float64)
        wide_args, wide_kwargs = tree_map(_up, args), tree_map(_up, kwargs)
        if n.op == "call_module":
            mod = self.fetch_attr(str(n.target))
            state = {k: _up(v) for k, v in [*mod.named_parameters(), *mod.named_buffers()]}
            wide = torch.func.functional_call(mod, state, wide_args, wide_kwargs)
        else:
            wide = getattr(self, n.op)(n.target, wide_args, wide_kwargs)
        got, spec = tree_flatten(result)
        values, wide_spec = tree_flatten(wide)
        if spec != wide_spec:
            return result
        for r, w in zip(got, values, strict=True):
            if isinstance(r, torch.Tensor) and r.is_floating_point() and r.shape == w.shape:
                self.kernel_errors.append((_distance(r, w), n.name))
        # the float64 values, in the dtype and layout the node gives as it runs
        return tree_unflatten(
            [w if r is None else torch.empty_like(r).copy_(w) for r, w in zip(got, values, strict=True)], spec
        )


KERNEL = 1e-3
"""How far a rewritten node's float32 result may sit from its float64 value (relative norm)
for this check to decide: a kernel's rounding. Beyond it (GroupNorm's channels_last CPU kernel
on activations whose mean is 100x their spread is off by 5e-3, InstanceNorm's by 3e-6; a
floor() on a grid step; an overflow) the float64 values handed on would hide what the float32
graph computes, and the checks after decide."""


class Float64Run:
    """Calls ``trial`` as its forward is called, with the nodes ``names`` computed in float64
    (:class:`_Float64Islands`) and their results handed on in the dtypes and layouts the nodes
    give as they run; after a call, ``worst`` holds the largest distance of a rewritten node's
    float32 result from its float64 value (relative norm) and the node."""

    def __init__(self, trial: torch.fx.GraphModule, names: frozenset[str]) -> None:
        self.trial, self.names = trial, names
        self.worst: tuple[float, str] = (0.0, "")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        interp = _Float64Islands(self.trial, self.names)
        out = interp.run(*positional_inputs(self.trial, args, kwargs), enable_io_processing=False)
        self.worst = max([self.worst, *interp.kernel_errors])
        return out


def naive_results(
    naive: nn.Module, samples: list[Sample], grads: bool, originals: list[Results], reference: dict[str, Any]
) -> list[Results] | None:
    """The naive conversion's results on the samples, when it may stand in for the original (within
    :data:`CONVERSION` of ``originals``), with each parameter's gradient noise (naive against
    original): computed once per repair in ``reference`` (``"naive"``, ``"noise"``); None when it
    may not, or cannot run."""
    if "naive" not in reference:
        reference["naive"] = None
        try:
            theirs = [outputs(fresh_copy(naive), a, k, grads, reference=reference) for a, k in samples]
        except Exception:
            return None
        if all(within(n, o, CONVERSION, CONVERSION) for n, o in zip(theirs, originals, strict=True)):
            reference["naive"] = theirs
            reference["noise"] = [gradient_noise(n, o) for n, o in zip(theirs, originals, strict=True)]
    got: list[Results] | None = reference["naive"]
    return got


def against_naive(
    naive: nn.Module,
    trial: nn.Module,
    samples: list[Sample],
    grads: bool,
    originals: list[Results],
    reference: dict[str, Any],
) -> bool:
    """Is ``trial`` shown to keep the math, against the naive conversion ``naive``, both fx
    graphs: the trial, its rewritten nodes in float64, within rounding of the naive conversion on
    every sample, with the naive conversion within :data:`CONVERSION` of the original
    (``originals``: its results on the samples), shows it; a rewritten node whose float32 result
    is beyond :data:`KERNEL` of its float64 value, like anything else, leaves it (False) to the
    checks after. The naive results, and each parameter's gradient noise (naive against
    original), are computed once per repair in ``reference``."""
    if not isinstance(trial, torch.fx.GraphModule) or not isinstance(naive, torch.fx.GraphModule):
        return False
    naives = naive_results(naive, samples, grads, originals, reference)
    if naives is None:
        return False
    try:
        names = rewritten_nodes(trial, naive)
        for (a, k), ref, noise in zip(samples, naives, reference["noise"], strict=True):
            mine = fresh_copy(trial)
            assert isinstance(mine, torch.fx.GraphModule)
            run = Float64Run(mine, names)
            got = outputs(mine, a, k, grads, run=run, reference=reference)
            if run.worst[0] > KERNEL or not within(got, ref, ROUNDING, ELEMENTS, noise):
                return False
    except Exception:
        return False  # the checks after decide
    return True
