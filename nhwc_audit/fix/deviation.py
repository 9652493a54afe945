"""What the repair reports about rounding: how far the repaired model's results, and the naive
conversion's, are from the original's in the model's own dtype (:func:`deviations`), and, when
the conversion is off, where both stand against float64 (:func:`exactness`). The checks
(:mod:`.equivalence`) prove the math; these say what the kernels do to the values the user
trains with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..prepare.copy import own_dtype_name
from ..tensors import to_nchw
from . import results as res
from .results import Deviation, Results, Sample

__all__ = ["Exactness", "deviations", "double", "exactness", "graph_key"]


@dataclass(frozen=True, slots=True)
class Exactness:
    """Where the model's own-dtype runs stand against exact math, the original model in float64,
    on the sample: asked when the naive conversion deviates beyond :data:`~.results.CONVERSION`. torch
    2.14.1's CPU BatchNorm backward at batch 1 computes the NCHW model's parameter gradients wrong
    when its incoming gradient is channels_last-strided (its float64 kernel as its float32 one);
    a model can amplify float32 rounding in both layouts alike (batch statistics over a few
    values)."""

    original: Deviation
    """The original model's own-dtype results against its float64 ones."""
    conversion: Deviation
    """The naive conversion's own-dtype results against the original's float64 ones."""
    float64: Deviation
    """The naive conversion in float64 against the original in float64: rounding (~1e-12) unless
    the conversion changes the math (code that reads the memory order) or a float64 kernel of one
    layout computes otherwise."""
    agrees: bool = True
    """The float64 runs agree, against the own-dtype gap: their difference is under 1e-6 of the
    values' size, or under 1% of the own-dtype runs' difference. A value that is 0 up to rounding
    (a norm over a batch-1 2x2 map, averaged over that map) has no size to measure against."""


def double(v: Any) -> Any:
    """``v`` in float64 when a floating tensor, else ``v``."""
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def graph_key(m: nn.Module) -> tuple[Any, ...] | None:
    """What identifies a repaired graph's computation between two copies of it: its code and
    the modules it calls, by type and parameters (a rewrite that swaps a module leaves the code
    as it was; the rewrites never change a weight's value)."""
    if not isinstance(m, torch.fx.GraphModule):
        return None
    called = sorted({str(n.target) for n in m.graph.nodes if n.op == "call_module"})
    mods = [(t, type(m.get_submodule(t)).__name__, tuple(map(id, m.get_submodule(t).parameters()))) for t in called]
    return (m.code, *mods)


def deviations(
    model: nn.Module,
    naive: nn.Module | None,
    repaired: nn.Module | None,
    sample: Sample,
    grads: bool,
    reference: dict[str, Any] | None = None,
) -> tuple[Deviation | None, Deviation | None, Exactness | None]:
    """The repaired model's deviation from the original in the model's own dtype (None when
    ``repaired`` is None: nothing was rewritten, the repair hands back the naive conversion),
    the naive conversion's (None when it cannot run, None given: it breaks where the repair
    fixed a view), and, when the naive conversion's is beyond :data:`~.results.CONVERSION`,
    where both stand against float64 (:func:`exactness`). The float64 check says a rewrite
    keeps the math; this says what the kernels it picks, and the conversion itself, do to the
    rounding the user trains with (GroupNorm's channels_last CPU backward is less exact than
    InstanceNorm's). ``reference``: the checks' dict (``sample`` is their first)."""
    args, kwargs = sample
    own = (reference or {}).get("own")  # the original's results on the sample, from the checks
    try:
        nchw_args, nchw_kwargs = tree_map(to_nchw, (args, kwargs))
        ref = own[0] if own else res.outputs(res.fresh_copy(model), nchw_args, nchw_kwargs, grads, reference=reference)
    except Exception:  # nothing rewritten, nothing checked: a model that cannot run with gradients
        return None, None, None
    dtype = own_dtype_name(model)
    mine: Deviation | None = None
    if repaired is not None:
        seen = (reference or {}).get("trial", {}).get(graph_key(repaired))
        got = seen or res.outputs(res.fresh_copy(repaired), args, kwargs, grads, reference=reference)
        mine = res.deviation_of(got, ref, dtype)
    if naive is None:
        return mine, None, None
    try:
        kept = (reference or {}).get("naive")  # the naive results, when a check computed them
        got = kept[0] if kept else res.outputs(res.fresh_copy(naive), args, kwargs, grads, reference=reference)
    except Exception:
        return mine, None, None  # an error the audit did not see: no noise estimate
    theirs = res.deviation_of(got, ref, dtype)
    exact = exactness(model, naive, sample, grads, (ref, got)) if theirs.off else None
    return mine, theirs, exact


def exactness(
    model: nn.Module, naive: nn.Module, sample: Sample, grads: bool, own: tuple[Results, Results]
) -> Exactness | None:
    """The original's and the naive conversion's results in the model's own dtype (``own``, in
    that order) against the original's in float64 on ``sample``, and the conversion's in float64
    against those, and whether the float64 runs agree (:attr:`Exactness.agrees`); None when
    either cannot run in float64."""
    args, kwargs = tree_map(double, sample)
    try:
        m64, n64 = res.fresh_copy(copy.deepcopy(model).double()), res.fresh_copy(copy.deepcopy(naive).double())
        exact = res.outputs(m64, tree_map(to_nchw, args), tree_map(to_nchw, kwargs), grads)
        converted = res.outputs(n64, args, kwargs, grads)
    except Exception:
        return None
    dtype = own_dtype_name(model)
    (outs64, grads64), (outs32, grads32) = res.gap_norms(converted, exact), res.gap_norms(own[1], own[0])
    agrees = all(
        d64 <= 1e-6 * size or d64 <= 1e-2 * d32
        for (d64, size), (d32, _) in zip([*outs64, grads64], [*outs32, grads32], strict=False)
    )
    return Exactness(
        original=res.deviation_of(own[0], exact, dtype),
        conversion=res.deviation_of(own[1], exact, dtype),
        float64=res.deviation_of(converted, exact, "float64"),
        agrees=agrees,
    )
