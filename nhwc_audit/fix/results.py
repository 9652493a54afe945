"""A model's results on one sample (its outputs, and its parameters' gradients of a fixed random
linear loss), and how far two such results are apart (:class:`Deviation`): what the repair's
checks (:mod:`.equivalence`, :mod:`.islands`) compare."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..prepare.clone import clone_modules
from ..tensors import clone_value, iter_tensors, seeded

__all__ = ["Deviation", "Results", "Sample", "deviation_of", "fresh_copy", "outputs", "worst_element"]

Sample = tuple[tuple[Any, ...], dict[str, Any]]
Results = tuple[list[torch.Tensor], dict[str, torch.Tensor]]
"""A model's outputs, and its parameters' gradients by name, on one sample."""


def outputs(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: bool,
    run: Callable[..., Any] | None = None,
) -> Results:
    """``model``'s outputs on ``(args, kwargs)`` (copied first) and, with ``grads``, its
    parameters' gradients by name; ``run`` calls the model another way (an interpreter over it)."""
    with seeded(0, (args, kwargs)):
        ctx = torch.enable_grad() if grads else torch.no_grad()
        with ctx:
            out = (run or model)(*tree_map(clone_value, args), **tree_map(clone_value, kwargs))
            tensors = iter_tensors(out)
            g: dict[str, torch.Tensor] = {}
            if grads:
                floats = [t for t in tensors if t.is_floating_point() and t.requires_grad]
                if floats:
                    # a fixed random linear loss (the sum of a softmax output has no gradient)
                    gen = torch.Generator().manual_seed(7)
                    weights = [torch.randn(t.shape, generator=gen).to(t.device) for t in floats]
                    loss = sum((t.float() * w).sum() for t, w in zip(floats, weights, strict=True))
                    assert isinstance(loss, torch.Tensor)
                    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                    got = torch.autograd.grad(loss, [p for _, p in names], allow_unused=True)
                    g = {n: gr for (n, _), gr in zip(names, got, strict=True) if gr is not None}
    return [t.detach() for t in tensors], g


def fresh_copy(model: nn.Module) -> nn.Module:
    """A private copy for a checking run (buffers copied: BatchNorm stats must not drift;
    parameters shared). A GraphModule's copy runs the same graph and code (a check never changes
    them) on its own module tree: its own deepcopy generates its code again (15.6 ms against
    2.6 ms on the bundled UNet)."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    if not isinstance(model, torch.fx.GraphModule):
        return clone_modules(model, memo)
    new = object.__new__(type(model))  # the instance's own class: its forward is the graph's code
    new.__dict__.update(model.__dict__)
    new.__dict__["_parameters"] = dict(model._parameters)
    new.__dict__["_buffers"] = {n: None if b is None else copy.deepcopy(b, memo) for n, b in model._buffers.items()}
    new.__dict__["_modules"] = {n: None if c is None else clone_modules(c, memo) for n, c in model._modules.items()}
    return new


@dataclass(frozen=True, slots=True)
class Deviation:
    """How far a channels_last model's results, in the model's own dtype, are from the
    original model's: the largest relative deviation of an output (the norm of the difference
    over the norm of the original's), and the relative deviation of all parameter gradients
    together (the update a training step would make; one parameter's own gradient can be zero
    up to rounding, a conv bias before a norm layer). Values equal in both (an infinity, a NaN
    in the same place) do not count; any other non-finite difference is ``inf``."""

    outputs: float
    gradients: float | None
    """None without gradients (not asked for, or no parameter gets one)."""
    dtype: str = "float32"
    """The dtype both ran in: the model's own."""


def _norms(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(norm of ``other - ref``, norm of ``ref``) over the finite values of ``ref``, where equal
    non-finite values (the same infinity, NaN against NaN) differ by nothing."""
    a, b = ref.detach().double(), other.detach().double()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), b - a)
    return float(diff.norm()), float(torch.where(a.isfinite(), a, torch.zeros_like(a)).norm())


def _largest(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(largest ``|other - ref|`` of one element, largest finite ``|ref|``), equal non-finite
    values differing by nothing (NaN where a difference is not a number)."""
    if ref.numel() == 0:
        return 0.0, 0.0
    a, b = ref.detach().double(), other.detach().double()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), b - a).abs()
    return float(diff.max()), float(torch.where(a.isfinite(), a, torch.zeros_like(a)).abs().max())


def worst_element(results: Results, ref: Results) -> float:
    """The largest difference of one element between ``results`` and ``ref``, relative to the
    largest magnitude of its output in ``ref``, or for a parameter's gradient of the largest
    gradient anywhere in ``ref`` (a gradient that is zero but for rounding, a conv bias before
    a norm layer, has no scale of its own); pairs of one shape only, as :func:`deviation_of`
    pairs them. A norm-wise deviation dilutes a change of a few elements; this does not."""
    (outs, grads), (ref_outs, ref_grads) = results, ref
    worst = 0.0
    for a, b in zip(outs, ref_outs, strict=False):
        if a.is_floating_point() and a.shape == b.shape:
            diff, scale = _largest(b, a)
            worst = max(worst, _relative(diff, scale) if diff == diff else math.inf)
    pairs = [_largest(ref_grads[n], g) for n, g in grads.items() if n in ref_grads and g.shape == ref_grads[n].shape]
    scale = max((s for _, s in pairs), default=0.0)
    for diff, _ in pairs:
        worst = max(worst, _relative(diff, scale) if diff == diff else math.inf)
    return worst


def _relative(diff: float, scale: float) -> float:
    return diff / max(scale, 1e-30) if math.isfinite(diff) else math.inf


def deviation_of(results: Results, ref: Results, dtype: str = "float32") -> Deviation:
    (outs, grads), (ref_outs, ref_grads) = results, ref
    outputs = max(
        (
            _relative(*_norms(b, a))
            for a, b in zip(outs, ref_outs, strict=False)
            if a.is_floating_point() and a.shape == b.shape
        ),
        default=0.0,
    )
    shared = [n for n in ref_grads if n in grads and grads[n].shape == ref_grads[n].shape]
    if not shared:
        return Deviation(outputs, None, dtype)
    pairs = [_norms(ref_grads[n], grads[n]) for n in shared]
    diff = math.sqrt(sum(d * d for d, _ in pairs))
    return Deviation(outputs, _relative(diff, math.sqrt(sum(r * r for _, r in pairs))), dtype)
